"""The front object against analytic answers on a conjugate Gaussian model.

One small network is trained once per module (about a minute on 2 cores) and queried for
the posterior, the likelihood and a mixed conditional. Exact answers come from Gaussian
conditioning of the joint. Tolerances: ``5`` Monte Carlo standard errors of the estimate
(from the number of samples) plus a fixed approximation budget of ``0.1`` exact standard
deviations for a network trained on 4,000 simulations for 3,000 steps.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st

NOISE = 0.5
NUM_SAMPLES = 2_000


def gaussian_model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, NOISE).to_event(1))


def joint_covariance():
    eye = np.eye(3)
    return np.block([[eye, eye], [eye, eye * (1 + NOISE**2)]])


def exact_conditional(tokens_observed: np.ndarray):
    """Mean and covariance of the latent tokens (NaN entries) given the rest."""
    cov = joint_covariance()
    latent = np.isnan(tokens_observed)
    observed = ~latent
    gain = cov[np.ix_(latent, observed)] @ np.linalg.inv(cov[np.ix_(observed, observed)])
    mean = gain @ tokens_observed[observed]
    covariance = cov[np.ix_(latent, latent)] - gain @ cov[np.ix_(observed, latent)]
    return mean, covariance


def small_simformer(model=gaussian_model, **kwargs):
    options = dict(
        num_simulations=4_000,
        network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
        training=TrainingConfig(max_steps=3_000, batch_size=256, validation_interval=250),
        progress_bar=False,
    )
    options.update(kwargs)
    return Simformer(model, **options)


@pytest.fixture(scope="module")
def fitted():
    return small_simformer().fit(jax.random.key(0))


def draws(tree, group, name):
    value = tree[group][name].values
    return value.reshape((-1,) + value.shape[2:])


def assert_matches(samples: np.ndarray, mean: np.ndarray, covariance: np.ndarray, rng_key):
    std = np.sqrt(np.diag(covariance))
    n = samples.shape[0]
    mean_tolerance = 5 * std / np.sqrt(n) + 0.1 * std
    std_tolerance = 5 * std / np.sqrt(2 * n) + 0.1 * std
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), mean_tolerance)
    np.testing.assert_array_less(np.abs(samples.std(0) - std), std_tolerance)
    reference = np.random.default_rng(int(jax.random.randint(rng_key, (), 0, 2**30))).multivariate_normal(
        mean, covariance, size=n
    )
    assert c2st(samples, reference, early_stopping=True) < 0.6


@pytest.mark.slow
def test_posterior_matches_exact(fitted, rng_key):
    x_o = np.array([1.0, -0.5, 0.3])
    tree = fitted.sample(rng_key, observed={"x": x_o}, num_samples=NUM_SAMPLES)
    assert set(tree.children) == {"posterior", "observed_data"}
    theta = draws(tree, "posterior", "theta")
    mean, covariance = exact_conditional(np.concatenate([np.full(3, np.nan), x_o]))
    assert_matches(theta, mean, covariance, rng_key)


@pytest.mark.slow
def test_likelihood_matches_exact(fitted, rng_key):
    theta_o = np.array([0.5, -1.0, 1.5])
    tree = fitted.sample(rng_key, observed={"theta": theta_o}, num_samples=NUM_SAMPLES)
    assert set(tree.children) == {"posterior_predictive", "observed_data"}
    x = draws(tree, "posterior_predictive", "x")
    mean, covariance = exact_conditional(np.concatenate([theta_o, np.full(3, np.nan)]))
    assert_matches(x, mean, covariance, rng_key)


@pytest.mark.slow
def test_mixed_query_matches_exact(fitted, rng_key):
    """theta[0] fixed, x[1] missing (NaN): infer theta[1:], x[1]."""
    theta_o = np.array([0.8, np.nan, np.nan])
    x_o = np.array([1.2, np.nan, -0.7])
    tree = fitted.sample(rng_key, observed={"theta": theta_o, "x": x_o}, num_samples=NUM_SAMPLES)
    theta = draws(tree, "posterior", "theta")
    x = draws(tree, "posterior_predictive", "x")
    # Partially observed sites appear whole, with their observed elements as given.
    np.testing.assert_array_equal(theta[:, 0], 0.8)
    np.testing.assert_array_equal(x[:, [0, 2]], np.broadcast_to([1.2, -0.7], (NUM_SAMPLES, 2)))
    np.testing.assert_array_equal(tree["observed_data"]["x"].values, x_o)
    mean, covariance = exact_conditional(np.concatenate([theta_o, x_o]))
    assert_matches(np.column_stack([theta[:, 1:], x[:, 1]]), mean, covariance, rng_key)


@pytest.mark.slow
def test_joint_when_nothing_observed(fitted, rng_key):
    tree = fitted.sample(rng_key, num_samples=NUM_SAMPLES)
    joint = np.column_stack([draws(tree, "posterior", "theta"), draws(tree, "posterior_predictive", "x")])
    assert_matches(joint, np.zeros(6), joint_covariance(), rng_key)


@pytest.mark.slow
def test_same_key_same_samples(fitted, rng_key):
    observed = {"x": np.array([0.1, 0.2, 0.3])}
    first = fitted.sample(rng_key, observed=observed, num_samples=64)
    second = fitted.sample(rng_key, observed=observed, num_samples=64)
    np.testing.assert_array_equal(first.posterior["theta"].values, second.posterior["theta"].values)
    other = fitted.sample(jax.random.fold_in(rng_key, 1), observed=observed, num_samples=64)
    assert not np.array_equal(first.posterior["theta"].values, other.posterior["theta"].values)


@pytest.mark.slow
def test_observed_tokens_never_move_in_z_space(fitted, rng_key):
    """Run the sampler directly: clamped tokens equal their values bit for bit."""
    condition_mask = np.array([True, False, False, False, True, False])
    z_observed = np.where(condition_mask, np.array([0.3, 0, 0, 0, -1.2, 0], np.float32), 0.0).astype(np.float32)
    sample_fn = fitted.sampler.build(fitted.state.score_fn, fitted.sde)
    z = np.asarray(sample_fn(rng_key, fitted.params, z_observed, condition_mask, 32))
    np.testing.assert_array_equal(z[:, condition_mask], np.broadcast_to(z_observed[condition_mask], (32, 2)))
    assert np.all(np.isfinite(z))


@pytest.mark.slow
def test_fit_records_history_and_simulation_info(fitted):
    history = fitted.history
    assert len(history.step) == len(history.validation_loss) > 0
    assert np.all(np.isfinite(history.validation_loss))
    assert history.validation_loss.min() < history.validation_loss[0]
    assert fitted.simulation_info.num_valid == 4_000
    assert fitted.simulation_info.num_invalid == 0



def test_repr_says_what_the_fit_read_and_trained(fitted):
    assert repr(small_simformer()) == "Simformer(model=gaussian_model, num_simulations=4,000): not fitted"
    text = repr(fitted)
    history = fitted.history
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(fitted.params))
    for line in ("theta (3,) real, parameter", "x (3,) real, data", "6, one element each",
                 f"undirected: {int(fitted.attention_mask.sum())} of 36 token pairs may attend",
                 f"2 layers, width 32, 2 heads, {num_params:,} parameters",
                 "4,000 valid of 4,000 (0 with NaN or inf dropped)",
                 f"{int(history.step[-1]):,} steps", f"weights from step {history.best_step:,} (validation loss"):
        assert line in text, (line, text)

def bounded_model():
    theta = numpyro.sample("theta", dist.Uniform(0.0, 1.0).expand([2]).to_event(1))
    rate = numpyro.sample("rate", dist.HalfNormal(1.0))
    numpyro.sample("x", dist.Normal(theta, 0.3 + rate).to_event(1))


@pytest.mark.slow
def test_bounded_prior_samples_stay_in_bounds(rng_key):
    sf = small_simformer(bounded_model, num_simulations=1_000,
                         training=TrainingConfig(max_steps=200, validation_interval=100))
    sf.fit(rng_key)
    tree = sf.sample(jax.random.fold_in(rng_key, 1), observed={"x": np.array([2.5, -2.0])}, num_samples=2_000)
    theta = tree.posterior["theta"].values
    assert np.all((theta > 0) & (theta < 1))
    assert np.all(tree.posterior["rate"].values > 0)


def test_plate_names_become_dims(rng_key):
    def model():
        with numpyro.plate("groups", 3):
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            with numpyro.plate("trials", 2, dim=-2):
                numpyro.sample("y", dist.Normal(mu, 1.0))

    sf = small_simformer(model, num_simulations=200, training=TrainingConfig(max_steps=50, validation_interval=50))
    sf.fit(rng_key)
    tree = sf.sample(rng_key, observed={"y": np.zeros((2, 3))}, num_samples=8)
    assert tree.posterior["mu"].dims == ("chain", "draw", "groups")
    assert tree["observed_data"]["y"].dims == ("trials", "groups")


def test_fit_simulations_with_users_draws(rng_key):
    theta = np.random.default_rng(0).normal(size=(500, 3))
    x = theta + NOISE * np.random.default_rng(1).normal(size=(500, 3))
    x[0, 1] = np.nan  # one bad simulation, dropped and counted
    sf = small_simformer(training=TrainingConfig(max_steps=50, validation_interval=50))
    with pytest.warns(UserWarning, match="1 of 500 simulations"):
        sf.fit_simulations(rng_key, {"theta": theta, "x": x})
    assert sf.simulation_info.num_invalid == 1
    tree = sf.sample(rng_key, observed={"x": np.zeros(3)}, num_samples=4)
    assert tree.posterior["theta"].shape == (1, 4, 3)
