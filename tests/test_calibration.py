"""Simulation-based calibration, coverage and TARP.

The statistical tests need no network: ``sbc`` takes a posterior function, here the exact
posterior of a conjugate Gaussian and deliberately broken versions of it. With an exact
posterior the ranks are uniform, so the p-values are uniform too; the thresholds
(0.001 per element) then fail a correct answer with probability about 0.1 % per element,
and the key is fixed. The broken answers give p-values below 1e-6 at 300 simulations.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import EulerMaruyama, NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics.calibration import coverage, rank_uniformity_pvalue, sbc, uniformity_test

NOISE = 0.5
POSTERIOR_GAIN = 1 / (1 + NOISE**2)  # posterior mean = gain * x
POSTERIOR_STD = np.sqrt(NOISE**2 / (1 + NOISE**2))
NUM_SIMULATIONS = 300


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, NOISE).to_event(1))


def gaussian_posterior(scale=1.0, shift=0.0):
    """The exact posterior p(theta | x), its std times ``scale`` and its mean moved by ``shift`` stds."""

    def posterior_fn(rng_key, observed, num_samples):
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rng_key)))
        noise = rng.normal(size=(num_samples, 2))
        mean = POSTERIOR_GAIN * observed["x"] + shift * POSTERIOR_STD
        return {"theta": mean + scale * POSTERIOR_STD * noise}

    return posterior_fn


def run(posterior_fn, rng_key, **kwargs):
    options = dict(model=model, observed_sites=["x"], num_simulations=NUM_SIMULATIONS, num_samples=100)
    options.update(kwargs)
    return sbc(rng_key, posterior_fn, **options)


@pytest.fixture(scope="module")
def exact_tree():
    return run(gaussian_posterior(), jax.random.key(11))


def test_tree_layout(exact_tree):
    assert set(exact_tree.children) == {"prior_sbc", "sbc_ranks", "tarp"}
    assert exact_tree["prior_sbc"]["theta"].dims == ("chain", "draw", "theta_dim_0")
    assert exact_tree["prior_sbc"]["theta"].shape == (1, NUM_SIMULATIONS, 2)
    ranks = exact_tree["sbc_ranks"]["theta"].values
    assert ranks.dtype.kind == "i" and ranks.min() >= 0 and ranks.max() <= 100
    pit = exact_tree["prior_sbc"]["theta"].values
    assert np.all((pit > 0) & (pit < 1))
    assert exact_tree.attrs["target_sites"] == ["theta"] and exact_tree.attrs["num_samples"] == 100


def test_exact_posterior_passes(exact_tree):
    for method in ("ks", "chi2"):
        pvalues = uniformity_test(exact_tree, method=method)
        assert np.all(pvalues["theta"].values > 1e-3), (method, pvalues)
        assert float(pvalues["tarp"]) > 1e-3


@pytest.mark.parametrize("scale, shift", [(0.5, 0.0), (1.0, 0.5)], ids=["over-confident", "biased"])
def test_broken_posterior_fails(scale, shift):
    tree = run(gaussian_posterior(scale, shift), jax.random.key(12))
    for method in ("ks", "chi2"):
        assert np.all(uniformity_test(tree, method=method)["theta"].values < 1e-6), method


def test_over_confident_tarp_fails():
    tree = run(gaussian_posterior(0.5), jax.random.key(13))
    assert float(uniformity_test(tree)["tarp"]) < 1e-6


def test_coverage(exact_tree):
    result = coverage(exact_tree)
    levels = result["credibility_level"].values
    tolerance = 4 * np.sqrt(levels * (1 - levels) / NUM_SIMULATIONS) + 1 / NUM_SIMULATIONS
    assert np.all(np.abs(result["theta"].values - levels) <= tolerance)
    assert np.all(np.abs(result["tarp"].values - levels) <= tolerance)
    narrow = coverage(run(gaussian_posterior(0.5), jax.random.key(14)), levels=[0.5, 0.9])
    assert np.all(narrow["theta"].values < np.array([0.5, 0.9]) - 0.1)


def test_rank_uniformity_pvalue_on_raw_ranks():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 101, size=(500, 3))
    assert np.all(rank_uniformity_pvalue(uniform, 100) > 1e-3)
    piled = np.concatenate([np.zeros((100, 3), int), uniform[:400]])
    assert np.all(rank_uniformity_pvalue(piled, 100) < 1e-6)
    assert rank_uniformity_pvalue(uniform[:, 0], 100).shape == ()
    with pytest.raises(ValueError, match="lie in"):
        rank_uniformity_pvalue(uniform, 50)


def test_ties_are_broken_at_random():
    def discrete_model():
        rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
        numpyro.sample("count", dist.Poisson(rate))

    def prior_predictive(rng_key, observed, num_samples):  # p(count | rate): exact, discrete
        rng = np.random.default_rng(np.asarray(jax.random.key_data(rng_key)))
        return {"count": rng.poisson(observed["rate"], size=num_samples).astype(float)}

    tree = sbc(jax.random.key(3), prior_predictive, model=discrete_model, observed_sites=["rate"],
               num_simulations=300, num_samples=50)
    assert float(uniformity_test(tree)["count"]) > 1e-3


def test_plot_ecdf_pit_reads_the_tree(exact_tree):
    import matplotlib

    matplotlib.use("Agg")
    import arviz_plots
    import matplotlib.pyplot as plt

    arviz_plots.plot_ecdf_pit(exact_tree, backend="matplotlib")
    arviz_plots.plot_ecdf_pit(exact_tree, group="tarp", backend="matplotlib")
    plt.close("all")


def test_plot_coverage(exact_tree):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from numpyro_simformer.diagnostics.plots import plot_coverage

    ax = plot_coverage(exact_tree)
    assert len(ax.lines) >= 3  # two elements, tarp, the diagonal
    plt.close("all")


def test_errors():
    with pytest.raises(ValueError, match="model="):
        sbc(jax.random.key(0), gaussian_posterior(), observed_sites=["x"])
    with pytest.raises(ValueError, match="observed_sites"):
        sbc(jax.random.key(0), gaussian_posterior(), model=model)
    with pytest.raises(ValueError, match="both observed and targets"):
        sbc(jax.random.key(0), gaussian_posterior(), model=model, observed_sites=["x"], target_sites=["x"])
    with pytest.raises(ValueError, match="not sites"):
        sbc(jax.random.key(0), gaussian_posterior(), model=model, observed_sites=["y"])
    with pytest.raises(ValueError, match="expected"):
        run(lambda key, observed, n: {"theta": np.zeros((n, 3))}, jax.random.key(0), num_simulations=3)


def test_sbc_of_a_simformer(rng_key):
    """The contract with a (barely trained) Simformer: its posterior is queried, shapes follow."""
    sf = Simformer(
        model, num_simulations=200,
        network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=16, num_time_features=8),
        training=TrainingConfig(max_steps=10, steps_per_call=5, batch_size=32, validation_interval=5),
        sampler=EulerMaruyama(num_steps=5), progress_bar=False,
    ).fit(jax.random.key(0))
    tree = sbc(rng_key, sf, num_simulations=12, num_samples=8)
    assert tree.attrs["observed_sites"] == ["x"] and tree.attrs["target_sites"] == ["theta"]
    assert tree["sbc_ranks"]["theta"].shape == (1, 12, 2)
    assert tree["sbc_ranks"]["theta"].values.max() <= 8
