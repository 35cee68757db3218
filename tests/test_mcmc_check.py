"""The check against NUTS on the same model.

The contract test uses a barely trained network (its answer is wrong; only the plumbing
is checked). The slow test trains a small network well on a conjugate Gaussian and
expects the classifier to be unable to tell it from NUTS: C2ST below 0.6 with 1,000
samples a side (the null spread is 0.011; the fast classifier reads 0.6 for answers
about 0.25 standard deviations off).
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import EulerMaruyama, NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics.c2st import c2st_fast
from numpyro_simformer.diagnostics.mcmc_check import MCMCCheck, check_against_mcmc

NOISE = 0.5


def model(noise=NOISE):
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, noise).to_event(1))


def test_contract_with_a_partial_query(rng_key):
    sf = Simformer(
        model, num_simulations=200,
        network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=16, num_time_features=8),
        training=TrainingConfig(max_steps=10, steps_per_call=5, batch_size=32, validation_interval=5),
        sampler=EulerMaruyama(num_steps=5), progress_bar=False,
    ).fit(jax.random.key(0))
    observed = {"x": np.array([0.5, np.nan]), "theta": np.array([np.nan, 0.3])}
    with pytest.warns(Warning):  # 2 chains x 100 draws cannot pass the convergence checks
        result = check_against_mcmc(sf, rng_key, observed, num_samples=100, num_warmup=100, num_chains=2,
                                    c2st_fn=c2st_fast, nuts_options={"min_bulk_ess": 1e9})
    assert isinstance(result, MCMCCheck)
    assert result.labels == ("theta[0]", "x[1]")
    assert result.mean_difference.shape == (2,) and np.all(np.isfinite(result.std_difference))
    assert 0.0 <= result.c2st <= 1.0
    assert result.nuts_samples["theta"].shape == (100, 2) and result.simformer_samples["x"].shape == (100, 2)
    text = repr(result)
    assert "C2ST" in text and "theta[0]" in text and "x[1]" in text and "NOT CONVERGED" in text


@pytest.mark.slow
def test_well_trained_posterior_matches_nuts(rng_key):
    sf = Simformer(
        model, num_simulations=4_000,
        network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
        training=TrainingConfig(max_steps=3_000, batch_size=256, validation_interval=250),
        progress_bar=False,
    ).fit(jax.random.key(1))
    result = check_against_mcmc(sf, rng_key, {"x": np.array([1.0, -0.5])}, num_samples=1_000, num_warmup=400,
                                num_chains=4, c2st_fn=c2st_fast)
    print(result)
    assert result.nuts_diagnostics.converged
    assert result.c2st < 0.6
    assert np.all(np.abs(result.mean_difference) < 0.25) and np.all(np.abs(result.std_difference) < 0.25)
