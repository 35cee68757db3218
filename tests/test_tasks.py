"""Tests of the benchmark tasks and their references (shapes, exact answers, NUTS checks)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from numpyro_simformer.diagnostics import c2st_fast, c2st_null_std
from numpyro_simformer.tasks import (
    ReferenceNotConvergedError,
    Reflection,
    SbibmDataUnavailableError,
    TwoMoonsLikelihood,
    ensure_sbibm_files,
    gaussian_mixture,
    hmm,
    linear_gaussian,
    linear_gaussian_conditional,
    lotka_volterra,
    nuts_reference,
    nuts_reference_with_diagnostics,
    random_condition_masks,
    slcp,
    tree,
    two_moons,
)

TASKS = {"linear_gaussian": linear_gaussian, "gaussian_mixture": gaussian_mixture, "two_moons": two_moons,
         "slcp": slcp, "tree": tree, "hmm": hmm, "lotka_volterra": lotka_volterra}  # fmt: skip
EXPECTED_SHAPES = {
    "linear_gaussian": {"theta": (10,), "x": (10,)},
    "gaussian_mixture": {"theta": (2,), "x": (2,)},
    "two_moons": {"theta": (2,), "x": (2,)},
    "slcp": {"theta": (5,), "x": (8,)},
    "tree": {name: () for name in ("theta_0", "theta_1", "theta_2", "x_1", "x_2", "x_3", "x_4")},
    "hmm": {f"{kind}_{index}": () for kind in ("theta", "x") for index in range(10)},
    "lotka_volterra": {"theta": (4,), "u": (10,), "v": (10,)},
}


@pytest.fixture
def rng_key(request):
    """One key per test, from the test's name: nothing is seeded globally."""
    return jax.random.key(zlib.crc32(request.node.name.encode()))


@pytest.fixture(scope="module")
def sbibm_available():
    try:
        ensure_sbibm_files("two_moons")
        for task in ("gaussian_linear", "gaussian_mixture", "slcp"):
            ensure_sbibm_files(task)
    except SbibmDataUnavailableError as error:
        pytest.skip(f"sbibm reference files not cached and the download failed (needs network): {error}")


# ---------------------------------------------------------------- simulators and layout


@pytest.mark.parametrize("name", sorted(TASKS))
def test_simulate_shapes_and_token_layout(name, rng_key):
    task = TASKS[name]()
    expected = EXPECTED_SHAPES[name]
    assert task.site_shapes == expected

    def one(key):  # vmapped seed + trace of the raw model, as the library will use it
        trace = handlers.trace(handlers.seed(task.model, key)).get_trace()
        return {site: trace[site]["value"] for site in task.token_sites}

    draws = jax.vmap(one)(jax.random.split(rng_key, 3))
    for site, shape in expected.items():
        assert draws[site].shape == (3, *shape)
        assert np.all(np.isfinite(draws[site]))
    tokens = task.flatten(draws)
    assert tokens.shape == (3, task.num_tokens)
    np.testing.assert_array_equal(task.flatten(task.unflatten(tokens)), tokens)
    assert task.data_token_mask().sum() == sum(int(np.prod(expected[site], dtype=int)) for site in task.data_sites)
    twin = handlers.trace(handlers.seed(task.likelihood_model, rng_key)).get_trace()
    assert {site for site in twin if twin[site]["type"] == "sample"} == set(task.token_sites)


def test_two_moons_matches_sbibm_formula(rng_key):
    """x = (r cos a + 0.25 - |θ1+θ2|/√2, r sin a + (θ2-θ1)/√2), with a, r the excluded sites."""
    task = two_moons()
    trace = handlers.trace(handlers.seed(task.model, rng_key)).get_trace()
    theta, a, r = (trace[name]["value"] for name in ("theta", "a", "r"))
    expected = jnp.array(
        [r * jnp.cos(a) + 0.25 - jnp.abs(theta[0] + theta[1]) / jnp.sqrt(2), r * jnp.sin(a) + (theta[1] - theta[0]) / jnp.sqrt(2)]
    )
    np.testing.assert_allclose(trace["x"]["value"], expected, rtol=1e-6)
    assert task.exclude_sites == ("a", "r")


def test_two_moons_likelihood_is_a_normalised_density(rng_key):
    theta = jnp.array([0.3, -0.5])
    likelihood = TwoMoonsLikelihood(theta)
    center = np.asarray(likelihood.sample(rng_key, (2000,))).mean(axis=0)
    grid = np.linspace(-0.2, 0.2, 801)
    points = jnp.stack(jnp.meshgrid(center[0] + grid, center[1] + grid, indexing="ij"), -1)
    mass = float(jnp.exp(likelihood.log_prob(points)).sum() * (grid[1] - grid[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=0.01)


def test_slcp_data_are_four_iid_interleaved_pairs(rng_key):
    """x = (x11, x12, x21, x22, ...): pair k has mean (θ1, θ2) and stds θ3², θ4²."""
    theta = np.array([1.0, -2.0, 1.2, 0.5, 0.3])
    x = slcp().simulate(rng_key, 4000, {"theta": theta})["x"].reshape(4000 * 4, 2)
    np.testing.assert_allclose(x.mean(axis=0), theta[:2], atol=0.05)
    np.testing.assert_allclose(x.std(axis=0), [1.2**2, 0.5**2], rtol=0.05)
    np.testing.assert_allclose(np.corrcoef(x.T)[0, 1], np.tanh(0.3), atol=0.05)


# ---------------------------------------------------------------- exact references


def test_linear_gaussian_conditional_matches_precision_route():
    """Covariance conditioning vs. the joint precision matrix, for a mixed conditional."""
    observed = {"theta": np.r_[np.full(4, np.nan), np.linspace(-0.3, 0.3, 6)], "x": np.r_[0.5, np.full(9, np.nan)]}
    conditional = linear_gaussian_conditional(observed)
    tokens = conditional.observed_tokens
    latent = conditional.latent_mask
    eye = np.eye(10)
    precision = np.linalg.inv(np.block([[0.1 * eye, 0.1 * eye], [0.1 * eye, 0.2 * eye]]))
    precision_ll = precision[np.ix_(latent, latent)]
    expected_mean = -np.linalg.solve(precision_ll, precision[np.ix_(latent, ~latent)] @ tokens[~latent])
    np.testing.assert_allclose(conditional.mean, expected_mean, atol=1e-10)
    np.testing.assert_allclose(conditional.covariance, np.linalg.inv(precision_ll), atol=1e-10)
    # by hand: θ1 | x1 = 0.5 is N(0.25, 0.05); x2 | θ2 latent is N(0, 0.2)
    assert conditional.mean[0] == pytest.approx(0.25) and conditional.covariance[0, 0] == pytest.approx(0.05)
    x2 = int(np.sum(latent[:11]))
    assert conditional.covariance[x2, x2] == pytest.approx(0.2)


def test_linear_gaussian_conditional_samples(rng_key):
    observed = {"x": np.full(10, 0.4)}
    draws = linear_gaussian().reference_conditional(rng_key, observed, 20000)
    assert set(draws) == {"theta"}
    np.testing.assert_allclose(draws["theta"].mean(axis=0), 0.2, atol=5 * np.sqrt(0.05 / 20000))
    np.testing.assert_allclose(draws["theta"].std(axis=0), np.sqrt(0.05), rtol=5 / np.sqrt(2 * 20000))
    with pytest.raises(ValueError, match="shape"):
        linear_gaussian_conditional({"x": np.zeros(3)})


def _moments_on_grid(log_density, grid):
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    mean = np.sum(weights * grid)
    return mean, np.sqrt(np.sum(weights * (grid - mean) ** 2))


def _normal_logpdf(value, loc, scale):
    return -0.5 * ((value - loc) / scale) ** 2 - np.log(scale)


def test_tree_exact_sampler_gaussian_and_multimodal_cases(rng_key):
    task, num = tree(), 20000
    key_gauss, key_multi = jax.random.split(rng_key)
    draws = task.reference_conditional(key_gauss, {"theta_1": 1.0, "theta_2": 2.0}, num)
    assert abs(draws["theta_0"].mean() - 1.0) < 5 * np.sqrt(1 / 3 / num)  # N((a+b)/3, 1/3)
    assert draws["theta_0"].std() == pytest.approx(np.sqrt(1 / 3), rel=5 / np.sqrt(2 * num))
    # θ1 | θ0 = 0.5, x1 = 0.1, x2 = 0.3: multimodal through sin²; moments from a fine grid
    draws = task.reference_conditional(key_multi, {"theta_0": 0.5, "x_1": 0.1, "x_2": 0.3}, num)
    grid = np.linspace(-10, 10, 200001)
    log_density = (
        _normal_logpdf(grid, 0.5, 1.0) + _normal_logpdf(0.1, np.sin(grid) ** 2, 0.2) + _normal_logpdf(0.3, 0.1 * grid**2, 0.2)
    )
    mean, std = _moments_on_grid(log_density, grid)
    assert abs(draws["theta_1"].mean() - mean) < 5 * std / np.sqrt(num)
    assert draws["theta_1"].std() == pytest.approx(std, rel=5 / np.sqrt(2 * num))
    assert set(draws) == {"theta_1", "theta_2", "x_3", "x_4"}  # latent sites only


def test_hmm_exact_sampler_bridge_and_filtering(rng_key):
    task, num = hmm(), 20000
    draws = task.reference_conditional(rng_key, {"theta_3": 1.0, "theta_5": 2.0, "x_7": 1.5}, num)
    # θ4 between two observed neighbours (x4 latent): N(1.5, 0.5²/2)
    assert abs(draws["theta_4"].mean() - 1.5) < 5 * np.sqrt(0.125 / num)
    assert draws["theta_4"].std() == pytest.approx(np.sqrt(0.125), rel=5 / np.sqrt(2 * num))
    # θ0 | θ3 = 1 (x0..x2 latent): Gaussian random walk, N(1/4, 3·0.25/4)
    assert abs(draws["theta_0"].mean() - 0.25) < 5 * np.sqrt(0.1875 / num)
    assert draws["theta_0"].std() == pytest.approx(np.sqrt(0.1875), rel=5 / np.sqrt(2 * num))
    # θ7 | θ6 ... depends on x7 = 1.5: both signs of sqrt(1.5) reachable, but θ5 = 2 favours +
    assert np.mean(draws["theta_7"] > 0) > 0.9


def test_two_moons_exact_conditional_matches_rejection(rng_key):
    """x2 | θ, x1 on the half ring, against simulations accepted when x1 is within 0.002."""
    task, theta = two_moons(), np.array([0.3, -0.2])
    key_simulate, key_exact = jax.random.split(rng_key)
    x = task.simulate(key_simulate, 400_000, {"theta": theta})["x"].astype(np.float64)
    accepted = x[np.abs(x[:, 0] - 0.3) < 0.002, 1]
    assert len(accepted) > 300
    draws = task.reference_conditional(key_exact, {"theta": theta, "x": np.array([0.3, np.nan])}, 4000)
    assert set(draws) == {"x"} and np.all(draws["x"][:, 0] == 0.3)
    assert abs(draws["x"][:, 1].mean() - accepted.mean()) < 5 * accepted.std() / np.sqrt(len(accepted))
    assert draws["x"][:, 1].std() == pytest.approx(accepted.std(), rel=0.15)


def test_random_condition_masks(rng_key):
    task = slcp()
    masks = random_condition_masks(rng_key, task, 4000)
    assert masks.shape == (4000, 13) and masks.dtype == bool
    assert not masks.all(axis=1).any()
    is_data = task.data_token_mask()
    joint = (~masks).all(axis=1).mean()
    posterior = (masks == is_data).all(axis=1).mean()
    likelihood = (masks == ~is_data).all(axis=1).mean()
    for fraction in (joint, posterior, likelihood):
        assert fraction == pytest.approx(0.2, abs=0.04)


def test_random_conditionals_end_to_end(rng_key):
    task = hmm()
    key_joint, key_masks, key_reference = jax.random.split(rng_key, 3)
    joint = task.flatten(task.simulate(key_joint, 5))
    masks = random_condition_masks(key_masks, task, 5)
    for index, (tokens, mask) in enumerate(zip(joint, masks)):
        observed = task.observed_from_mask(tokens, mask)
        draws = task.reference_conditional(jax.random.fold_in(key_reference, index), observed, 50)
        latent_sites = {name for name, value in observed.items() if np.isnan(value)}
        assert set(draws) == latent_sites
        assert all(value.shape == (50,) and np.all(np.isfinite(value)) for value in draws.values())


# ---------------------------------------------------------------- NUTS reference


def _assert_matches_gaussian(flat, mean, std, ess):
    np.testing.assert_allclose(flat.mean(axis=0), mean, atol=float(5 * std.max() / np.sqrt(ess)))
    np.testing.assert_allclose(flat.std(axis=0), std, rtol=float(5 / np.sqrt(2 * ess)))


def test_nuts_reference_linear_gaussian_posterior(rng_key):
    task = linear_gaussian()
    observed = {"x": np.linspace(-0.6, 0.6, 10)}
    draws, diagnostics = nuts_reference_with_diagnostics(rng_key, task.likelihood_model, observed, 2000, num_warmup=300)
    assert diagnostics.converged and diagnostics.max_rhat < 1.01
    exact = linear_gaussian_conditional(observed)
    _assert_matches_gaussian(draws["theta"], exact.mean, np.sqrt(np.diag(exact.covariance)), diagnostics.min_bulk_ess)
    assert set(draws) == {"theta"}


def test_nuts_reference_mixed_conditional_with_partial_sites(rng_key):
    """Some θ and some x observed within the same sites (NaN = latent)."""
    task = linear_gaussian()
    observed = {"theta": np.r_[np.full(5, np.nan), np.full(5, 0.2)], "x": np.r_[np.full(3, 0.5), np.full(7, np.nan)]}
    draws, diagnostics = nuts_reference_with_diagnostics(rng_key, task.likelihood_model, observed, 2000, num_warmup=300)
    assert diagnostics.converged
    exact = linear_gaussian_conditional(observed)
    flat = task.flatten(draws)
    assert np.all(flat[:, ~exact.latent_mask] == exact.observed_tokens[~exact.latent_mask])
    _assert_matches_gaussian(
        flat[:, exact.latent_mask], exact.mean, np.sqrt(np.diag(exact.covariance)), diagnostics.min_bulk_ess
    )


def test_nuts_reference_partial_transformed_site_with_best_of_prior_inits(rng_key):
    """Part of a site whose support is computed inside the model (a transformed distribution's
    codomain) is observed; chains start at the best of many prior draws. Checked against a
    grid posterior of the latent element."""
    from numpyro.distributions.transforms import AffineTransform, SigmoidTransform

    def model():
        squash = [SigmoidTransform(), AffineTransform(1.0, 2.0, domain=dist.constraints.unit_interval)]
        theta = numpyro.sample("theta", dist.TransformedDistribution(dist.Normal(0.0, 1.0).expand([2]).to_event(1), squash))
        numpyro.sample("x", dist.Normal(theta, 0.2).to_event(1))

    observed = {"theta": np.array([2.0, np.nan]), "x": np.array([np.nan, 2.5])}
    draws, diagnostics = nuts_reference_with_diagnostics(rng_key, model, observed, 2000, num_warmup=300,
                                                         init_candidates=16)
    assert diagnostics.converged
    assert np.all(draws["theta"][:, 0] == 2.0) and np.all(draws["x"][:, 1] == 2.5)
    grid = np.linspace(1.0 + 1e-6, 3.0 - 1e-6, 20001)
    unit = (grid - 1.0) / 2.0
    log_prior = -0.5 * np.log(unit / (1 - unit)) ** 2 - np.log(unit * (1 - unit))  # logit-normal, up to a constant
    weights = np.exp(log_prior - 0.5 * ((2.5 - grid) / 0.2) ** 2)
    weights /= weights.sum()
    mean = np.sum(weights * grid)
    std = np.sqrt(np.sum(weights * (grid - mean) ** 2))
    _assert_matches_gaussian(draws["theta"][:, 1:], np.array([mean]), np.array([std]), diagnostics.min_bulk_ess)
    _assert_matches_gaussian(draws["x"][:, :1], np.array([2.0]), np.array([0.2]), diagnostics.min_bulk_ess)
    # The transformed site observed whole, the data partly: x[0] | θ[0] = 2 is N(2, 0.2).
    draws, diagnostics = nuts_reference_with_diagnostics(rng_key, model, {"theta": np.array([2.0, 2.2]), "x": observed["x"]},
                                                         2000, num_warmup=300, init_candidates=4)
    assert diagnostics.converged and set(draws) == {"x"}
    _assert_matches_gaussian(draws["x"][:, :1], np.array([2.0]), np.array([0.2]), diagnostics.min_bulk_ess)
    with pytest.raises(ValueError, match="init_candidates"):
        nuts_reference(rng_key, model, observed, 10, init_candidates=0)


def test_nuts_reference_reflection_fixes_sign_multimodality(rng_key):
    def model():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(mu**2, 0.1))

    flip = Reflection(("mu",), (0,), (-1.0,))
    draws, diagnostics = nuts_reference_with_diagnostics(
        rng_key, model, {"x": 1.0}, 2000, num_warmup=300, reflections=(flip,)
    )
    assert diagnostics.converged and diagnostics.reflections_used == 1
    assert np.mean(draws["mu"] > 0) == pytest.approx(0.5, abs=4 * 0.5 / np.sqrt(2000))


def test_nuts_reference_errors(rng_key):
    model = linear_gaussian().likelihood_model
    with pytest.raises(ValueError, match="not a latent sample site"):
        nuts_reference(rng_key, model, {"y": np.zeros(10)}, 10)
    with pytest.raises(ValueError, match="shape"):
        nuts_reference(rng_key, model, {"x": np.zeros(3)}, 10)
    with pytest.raises(ValueError, match="nothing to infer"):
        nuts_reference(rng_key, model, {"x": np.zeros(10), "theta": np.zeros(10)}, 10)


def test_nuts_reference_refuses_unconverged_runs(rng_key):
    def model():
        numpyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ReferenceNotConvergedError, match="bulk ESS"):
        nuts_reference(rng_key, model, {}, 8, num_warmup=5, num_chains=1, min_bulk_ess=1e6)


# ---------------------------------------------------------------- sbibm files (network on first use)


@pytest.mark.parametrize(("name", "theta_dim", "x_dim"), [("linear_gaussian", 10, 10), ("gaussian_mixture", 2, 2),
                                                          ("two_moons", 2, 2), ("slcp", 5, 8)])  # fmt: skip
def test_sbibm_loaders(sbibm_available, name, theta_dim, x_dim):
    task = TASKS[name]()
    for number in (1, 10):
        assert task.observation(number)["x"].shape == (x_dim,)
        assert task.true_parameters(number)["theta"].shape == (theta_dim,)
        reference = task.reference_posterior_samples(number)
        assert reference.shape == (10000, theta_dim) and np.all(np.isfinite(reference))
    with pytest.raises(ValueError, match="num_observation"):
        task.observation(11)


def test_sbibm_two_moons_reference_matches_exact_sampler(sbibm_available, rng_key):
    task, num = two_moons(), 1000
    ours = task.reference_conditional(rng_key, task.observation(1), num)["theta"]
    reference = task.reference_posterior_samples(1)[:num]
    assert abs(c2st_fast(reference, ours) - 0.5) < 4 * c2st_null_std(num, num)


def test_tasks_without_sbibm_files_say_so():
    with pytest.raises(NotImplementedError, match="random_condition_masks"):
        tree().observation(1)
