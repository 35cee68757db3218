"""Discrete sites are trained dequantized: latent integers blurred by narrow Gaussian noise."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

from numpyro_simformer import NetworkConfig, Simformer, Simulator, TrainingConfig
from numpyro_simformer.diagnostics import c2st_fast
from numpyro_simformer.diagnostics.c2st import c2st_null_std
from numpyro_simformer.diffusion.loss import DEQUANTIZATION_SD, dequantize_example
from numpyro_simformer.model.spec import read_model_spec
from numpyro_simformer.tokens.transforms import dequantization_widths, fit_token_transform, integer_valued_sites

from helpers import TINY

NUM_TRIALS = 12


def beta_bernoulli():
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    with numpyro.plate("trials", NUM_TRIALS):
        numpyro.sample("x", dist.Bernoulli(p))


def test_widths_are_one_bin_in_z_space_for_discrete_elements_only(rng_key):
    spec = read_model_spec(rng_key, beta_bernoulli, (), {}, Simformer(beta_bernoulli).model_options)
    layout = spec.layout
    p = np.linspace(0.1, 0.9, 200)
    x = (np.random.default_rng(0).uniform(size=(200, NUM_TRIALS)) < p[:, None]).astype(np.float32)
    tokens = layout.flatten_host({"p": p.astype(np.float32), "x": x})
    transform = fit_token_transform(layout, tokens)
    widths = dequantization_widths(transform)
    slices = layout.slices()
    np.testing.assert_array_equal(widths[slices["p"]], 0.0)
    np.testing.assert_allclose(widths[slices["x"]], 1.0 / x.std(axis=0), rtol=1e-5)
    # a continuous model has none
    spec = read_model_spec(rng_key, lambda: numpyro.sample("a", dist.Normal(0, 1)), (), {},
                           Simformer(beta_bernoulli).model_options)
    assert dequantization_widths(fit_token_transform(spec.layout, np.zeros((10, 1), np.float32))) is None


def test_dequantization_noise_has_an_eighth_of_the_spacing_as_sd(rng_key):
    x0 = jnp.array([0.0, 1.0, 2.0, 3.0])
    widths = jnp.array([0.0, 0.5, 2.0, 1.0])  # the first is continuous
    draws = jax.vmap(lambda key: dequantize_example(key, x0, widths))(jax.random.split(rng_key, 4_000))
    assert np.all(draws[:, 0] == 0.0)
    errors = np.asarray(draws[:, 1:] - x0[1:]) / np.asarray(widths[1:])  # in units of the spacing
    # N(0, 1/64): mean and variance to 5 standard errors of 4,000 draws; rounding undoes it
    np.testing.assert_allclose(errors.mean(axis=0), 0.0, atol=5 * DEQUANTIZATION_SD / np.sqrt(4_000))
    np.testing.assert_allclose(errors.var(axis=0), DEQUANTIZATION_SD**2,
                               atol=5 * np.sqrt(2 / 4_000) * DEQUANTIZATION_SD**2)
    assert np.all(np.round(errors) == 0)


def test_continuous_models_do_not_depend_on_the_option(rng_key):
    def model():
        a = numpyro.sample("a", dist.Normal(0, 1))
        numpyro.sample("x", dist.Normal(a, 0.5))

    params = [Simformer(model, discrete_sites=option, **TINY).fit(rng_key).params for option in ("dequantize", "integers")]
    for left, right in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(left, right)


def test_integer_valued_sites_are_found_among_the_continuous_ones(rng_key):
    spec = read_model_spec(rng_key, beta_bernoulli, (), {}, Simformer(beta_bernoulli).model_options)
    x = np.random.default_rng(0).integers(0, 2, size=(50, NUM_TRIALS)).astype(np.float32)
    def found(p):
        return integer_valued_sites(spec.layout, spec.layout.flatten_host({"p": p.astype(np.float32), "x": x}))
    assert found(np.linspace(0.1, 0.9, 50)) == []  # x is declared discrete, p is real
    assert found(np.arange(50) % 2) == ["p"]  # p only ever 0 or 1
    assert found(np.ones(50)) == []  # a constant is no sign of a discrete site
    tokens = spec.layout.flatten_host({"p": (np.arange(50) % 2).astype(np.float32), "x": x})
    assert integer_valued_sites(spec.layout, tokens, chunk_rows=7) == ["p"]  # read in chunks
    tokens[-1, spec.layout.slices()["p"]] = 0.5  # one real value, in the last chunk
    assert integer_valued_sites(spec.layout, tokens, chunk_rows=7) == []
    assert integer_valued_sites(spec.layout, spec.layout.flatten_host(
        {"p": (np.arange(10) % 2).astype(np.float32), "x": x[:10]})) == []  # too few rows to tell


def test_counts_along_a_coordinate_train_and_answer_at_new_coordinates(rng_key):
    """Training on random subsets of a series (pooled statistics per node) blurs the counts
    at each subset position by its node's spacing; a query at other coordinates (another
    size) rounds and clips the counts, and reflects a bounded series into its interval
    (both bijections hold bounds, which once had the training size)."""
    def counts(t):
        rate = numpyro.sample("rate", dist.LogNormal(1.0, 0.3))
        with numpyro.plate("time", len(t)):
            numpyro.sample("y", dist.Poisson(rate * (1.0 + t)))
            numpyro.sample("share", dist.Beta(rate, 2.0))

    grid = np.linspace(0.0, 1.0, 10)
    sf = Simformer(counts, coordinates={"time": "t"}, points_per_dim=4, interval_sites="reflect",
                   **TINY).fit(rng_key, t=grid)
    tree = sf.sample(rng_key, observed={"rate": 2.0}, num_samples=8, model_kwargs={"t": np.array([0.2, 0.7])})
    y, share = tree.posterior_predictive["y"].values, tree.posterior_predictive["share"].values
    assert y.shape == (1, 8, 2) and np.issubdtype(y.dtype, np.integer) and np.all(y >= 0)
    assert share.shape == (1, 8, 2) and np.all((share >= 0) & (share <= 1))


def test_bad_option_names_the_argument():
    with pytest.raises(ValueError, match="discrete_sites.*'dequantize', 'integers'"):
        Simformer(beta_bernoulli, discrete_sites="round")


def test_integer_valued_continuous_site_is_warned_about(rng_key):
    def binary(key, p):
        return (jax.random.uniform(key, (5,)) < p).astype(jnp.float32)

    def undeclared():
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        numpyro.sample("x", Simulator(binary, p, event_shape=(5,)))

    def declared():
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        numpyro.sample("x", Simulator(binary, p, event_shape=(5,), support=constraints.boolean))

    with pytest.warns(UserWarning, match=r"Every simulated value of 'x' is an integer.*support=constraints.boolean"):
        Simformer(undeclared, **TINY).fit(rng_key)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Every simulated value")
        Simformer(declared, **TINY).fit(rng_key)


@pytest.mark.slow
def test_beta_bernoulli_posterior_and_likelihood_are_exact(rng_key):
    """p ~ Beta(2, 2), 12 Bernoulli(p) trials: the posterior given k successes is
    Beta(2 + k, 14 - k); given p each trial is 1 with probability p.

    Posterior threshold: 4 null standard deviations of the C2ST accuracy for this sample size
    plus a fixed approximation budget of 0.05 for a small network trained briefly. The
    likelihood's share of ones per trial must be within 4 binomial standard errors of p plus
    0.05. Measured on 2 CPU cores with 3,000 steps (three other keys): posterior C2ST
    0.508-0.539 against a threshold of 0.582; shares of ones at most 0.046 from p = 0.3
    against an allowance of 0.091. (6,000 steps gave 0.509; 0.561 trained on the integers.)
    """
    num_samples = 2_000
    sf = Simformer(beta_bernoulli, num_simulations=4_000, progress_bar=False,
                   network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   training=TrainingConfig(max_steps=3_000, batch_size=128, validation_interval=500))
    key_fit, key_post, key_like, key_reference = jax.random.split(rng_key, 4)
    sf.fit(key_fit)
    x_o = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], np.float32)
    k = int(x_o.sum())
    tree = sf.sample(key_post, observed={"x": x_o}, num_samples=num_samples)
    samples = tree.posterior["p"].values.reshape(-1, 1)
    seed = int(jax.random.randint(key_reference, (), 0, 2**30))
    reference = np.random.default_rng(seed).beta(2 + k, 2 + NUM_TRIALS - k, size=(num_samples, 1))
    accuracy = c2st_fast(reference, samples)
    assert accuracy < 0.5 + 4 * c2st_null_std(num_samples, num_samples) + 0.05, accuracy

    p_o = 0.3
    tree = sf.sample(key_like, observed={"p": p_o}, num_samples=num_samples)
    x = tree.posterior_predictive["x"].values.reshape(-1, NUM_TRIALS)
    assert set(np.unique(x)) <= {0, 1}
    share = x.mean(axis=0)
    assert np.all(np.abs(share - p_o) < 4 * np.sqrt(p_o * (1 - p_o) / num_samples) + 0.05), share
