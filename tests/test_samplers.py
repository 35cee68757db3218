"""Samplers against exact answers.

Fast tier: every sampler is run on the exact score of a Gaussian (no network), so the
only error is the sampler's own; observed tokens must never move; the counted network
evaluations must equal ``network_evaluations``. Tolerances: 5 Monte Carlo standard errors
plus a discretisation budget of 0.05 exact standard deviations.

Slow tier: one small network is trained once for the module on the conjugate model
theta ~ N(0, 1)^3, x ~ N(theta, 0.5^2), and the new samplers must match the exact
posterior as Euler–Maruyama does (same tolerances as ``test_simformer.py``), and agree
with Euler–Maruyama by C2ST.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import EDMHeun, EulerMaruyama, GuidedEulerMaruyama, NetworkConfig, ProbabilityFlowODE
from numpyro_simformer import Simformer, TrainingConfig, VESDE, VPSDE
from numpyro_simformer.diagnostics import c2st
from numpyro_simformer.samplers.edm import edm_noise_levels, time_of_noise_level

NOISE = 0.5

# ------------------------------------------------------------------ exact Gaussian scores

MEAN = np.array([0.3, -0.2, 0.5, 0.0, 0.1, -0.4])
FACTOR = np.random.default_rng(7).normal(size=(6, 6))
COVARIANCE = FACTOR @ FACTOR.T / 6 + 0.2 * np.eye(6)
CONDITION_MASK = np.array([False, False, True, False, True, False])
OBSERVED = np.where(CONDITION_MASK, np.array([0, 0, 0.7, 0, -0.3, 0]), 0.0).astype(np.float32)


def gaussian_conditional(mean, covariance, condition_mask, observed):
    latent, given = ~condition_mask, condition_mask
    gain = covariance[np.ix_(latent, given)] @ np.linalg.inv(covariance[np.ix_(given, given)])
    conditional_mean = mean[latent] + gain @ (observed[given] - mean[given])
    conditional_covariance = covariance[np.ix_(latent, latent)] - gain @ covariance[np.ix_(given, latent)]
    return conditional_mean, conditional_covariance


def exact_score_fn(sde, mean, covariance, condition_mask, observed):
    """``score_fn(params, x, time, mask)`` of ``p_t(latent | observed)`` for Gaussian data (params unused)."""
    conditional_mean, conditional_covariance = gaussian_conditional(mean, covariance, condition_mask, observed)
    latent = np.flatnonzero(~condition_mask)
    conditional_mean = jnp.asarray(conditional_mean, jnp.float32)
    conditional_covariance = jnp.asarray(conditional_covariance, jnp.float32)

    def score_fn(params, x, time, mask):
        alpha, sigma = sde.marginal(time)
        covariance_t = (alpha[:, None, None] ** 2 * conditional_covariance
                        + sigma[:, None, None] ** 2 * jnp.eye(len(latent)))
        residual = x[:, latent] - alpha[:, None] * conditional_mean
        score = -jnp.linalg.solve(covariance_t, residual[..., None])[..., 0]
        return jnp.zeros_like(x).at[:, latent].set(score)

    return score_fn


FAST_SAMPLERS = [
    EulerMaruyama(num_steps=200),
    ProbabilityFlowODE(solver=diffrax.Heun(), num_steps=50),
    ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None, rtol=1e-3, atol=1e-3),
    EDMHeun(num_steps=13),
    EDMHeun(num_steps=25, churn=10.0),
    GuidedEulerMaruyama(num_steps=50, resampling_steps=2),
]
FAST_IDS = ["euler_maruyama", "ode_heun", "ode_tsit5", "edm", "edm_churn", "guided"]


def assert_moments(samples, mean, covariance, budget=0.05):
    std = np.sqrt(np.diag(covariance))
    n = samples.shape[0]
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * std / np.sqrt(n) + budget * std)
    np.testing.assert_array_less(np.abs(samples.std(0) - std), 5 * std / np.sqrt(2 * n) + budget * std)
    correlation = np.corrcoef(samples.T)
    exact_correlation = covariance / np.outer(std, std)
    np.testing.assert_array_less(np.abs(correlation - exact_correlation), 5 / np.sqrt(n) + budget)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
@pytest.mark.parametrize("sampler", FAST_SAMPLERS, ids=FAST_IDS)
def test_sampler_matches_gaussian_conditional_with_exact_score(sampler, sde, rng_key):
    score_fn = exact_score_fn(sde, MEAN, COVARIANCE, CONDITION_MASK, OBSERVED)
    sample_fn = jax.jit(sampler.build(score_fn, sde), static_argnums=4)
    z = np.asarray(sample_fn(rng_key, None, jnp.asarray(OBSERVED), jnp.asarray(CONDITION_MASK), 4_000))
    mean, covariance = gaussian_conditional(MEAN, COVARIANCE, CONDITION_MASK, OBSERVED)
    assert_moments(z[:, ~CONDITION_MASK], mean, covariance)


@pytest.mark.parametrize("sampler", FAST_SAMPLERS, ids=FAST_IDS)
def test_observed_tokens_never_move(sampler, rng_key):
    sde = VESDE()
    score_fn = exact_score_fn(sde, MEAN, COVARIANCE, CONDITION_MASK, OBSERVED)
    z = np.asarray(sampler.build(score_fn, sde)(rng_key, None, jnp.asarray(OBSERVED), jnp.asarray(CONDITION_MASK), 16))
    np.testing.assert_array_equal(z[:, CONDITION_MASK], np.broadcast_to(OBSERVED[CONDITION_MASK], (16, 2)))
    assert np.all(np.isfinite(z))


@pytest.mark.parametrize(
    "sampler",
    [EulerMaruyama(num_steps=7), ProbabilityFlowODE(num_steps=5), ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=4),
     EDMHeun(num_steps=6), EDMHeun(num_steps=1), EDMHeun(num_steps=5, churn=5.0),
     GuidedEulerMaruyama(num_steps=4, resampling_steps=3)],
    ids=lambda sampler: repr(sampler)[:40],
)
def test_network_evaluations_are_what_the_sampler_says(sampler, rng_key):
    """Count the score calls of one run with a host callback: one call = one evaluation per sample."""
    sde = VESDE()
    exact = exact_score_fn(sde, MEAN, COVARIANCE, CONDITION_MASK, OBSERVED)
    calls = []

    def counting_score_fn(params, x, time, mask):
        jax.debug.callback(lambda: calls.append(1))
        return exact(params, x, time, mask)

    sample_fn = jax.jit(sampler.build(counting_score_fn, sde), static_argnums=4)
    jax.block_until_ready(sample_fn(rng_key, None, jnp.asarray(OBSERVED), jnp.asarray(CONDITION_MASK), 8))
    jax.effects_barrier()
    assert len(calls) == sampler.network_evaluations


def test_adaptive_ode_reports_no_fixed_evaluation_count():
    assert ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None).network_evaluations is None
    assert ProbabilityFlowODE(num_steps=50).network_evaluations == 101  # Heun: 2 per step + final denoising


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["VE", "VP"])
def test_time_of_noise_level_inverts_the_schedule(sde):
    times = jnp.linspace(sde.t_min, 1.0, 17)
    alpha, sigma = sde.marginal(times)
    recovered = time_of_noise_level(sde, sigma / alpha)
    np.testing.assert_allclose(recovered, times, atol=1e-5)


def test_edm_noise_levels_run_from_sigma_max_to_zero():
    levels = edm_noise_levels(13, 1e-3, 10.0)
    assert levels.shape == (14,)
    np.testing.assert_allclose(levels[[0, -2, -1]], [10.0, 1e-3, 0.0], rtol=1e-6)
    assert np.all(np.diff(levels) < 0)
    np.testing.assert_allclose(EDMHeun(num_steps=5).noise_levels(VESDE())[0], 10.0, rtol=1e-5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: EDMHeun(num_steps=0), ValueError, "num_steps"),
        (lambda: EDMHeun(sigma_min=2.0, sigma_max=1.0), ValueError, "sigma_min < sigma_max"),
        (lambda: EDMHeun(rho=0.0), ValueError, "rho"),
        (lambda: EDMHeun(churn=-1.0), ValueError, "churn"),
        (lambda: ProbabilityFlowODE(num_steps=0), ValueError, "num_steps"),
        (lambda: ProbabilityFlowODE(solver="heun"), TypeError, "diffrax solver"),
        (lambda: ProbabilityFlowODE(num_steps=None, rtol=0.0), ValueError, "rtol"),
        (lambda: GuidedEulerMaruyama(resampling_steps=-1), ValueError, "resampling_steps"),
        (lambda: GuidedEulerMaruyama(num_steps=0), ValueError, "num_steps"),
    ],
)
def test_sampler_configuration_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------ a trained network


def gaussian_model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, NOISE).to_event(1))


def exact_posterior(x_o):
    eye = np.eye(3)
    covariance = np.block([[eye, eye], [eye, eye * (1 + NOISE**2)]])
    return gaussian_conditional(np.zeros(6), covariance, np.array([False] * 3 + [True] * 3), np.concatenate([np.zeros(3), x_o]))


@pytest.fixture(scope="module")
def fitted():
    return Simformer(
        gaussian_model,
        num_simulations=4_000,
        network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
        training=TrainingConfig(max_steps=3_000, batch_size=256, validation_interval=250),
        progress_bar=False,
    ).fit(jax.random.key(0))


X_OBSERVED = np.array([1.0, -0.5, 0.3])


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampler",
    [ProbabilityFlowODE(num_steps=25), ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None), EDMHeun(num_steps=13)],
    ids=["heun25", "tsit5", "edm13"],
)
def test_ode_samplers_match_exact_posterior_and_euler_maruyama(fitted, sampler, rng_key):
    num_samples = 2_000
    theta = fitted.sample(rng_key, observed={"x": X_OBSERVED}, num_samples=num_samples, sampler=sampler)
    theta = theta.posterior["theta"].values.reshape(-1, 3)
    mean, covariance = exact_posterior(X_OBSERVED)
    std = np.sqrt(np.diag(covariance))
    np.testing.assert_array_less(np.abs(theta.mean(0) - mean), 5 * std / np.sqrt(num_samples) + 0.1 * std)
    # The spread by quantiles: a network's probability-flow ODE has a few far outliers
    # (heavier tails than the reverse SDE), which the plain std would weigh.
    spread = (np.percentile(theta, 84, axis=0) - np.percentile(theta, 16, axis=0)) / 2
    np.testing.assert_array_less(np.abs(spread - std), 5 * std / np.sqrt(num_samples) + 0.1 * std)
    euler = fitted.sample(jax.random.fold_in(rng_key, 1), observed={"x": X_OBSERVED}, num_samples=num_samples,
                          sampler=EulerMaruyama(num_steps=200))
    assert c2st(theta, euler.posterior["theta"].values.reshape(-1, 3), early_stopping=True) < 0.6
    reference = np.random.default_rng(0).multivariate_normal(mean, covariance, size=num_samples)
    assert c2st(theta, reference, early_stopping=True) < 0.6
