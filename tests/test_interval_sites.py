"""``interval_sites="clip"``: bounded-interval sites in their own coordinates, denoised estimates clipped.

The exact parts (which sites are clipped, where, and that clipping touches only the
estimates outside the bounds) are checked exactly. The end-to-end test trains a small
network on a posterior cut by its prior's bound (a normal likelihood next to the edge of
a uniform prior) and compares it with the analytic truncated normal, with the tolerances
of ``test_simformer.py``: 5 Monte Carlo standard errors plus 0.1 exact standard deviations
for the network's approximation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints, transforms as numpyro_transforms
from scipy import stats

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.layout import TokenLayout
from numpyro_simformer.samplers.euler_maruyama import clip_score
from numpyro_simformer.sde import VESDE, VPSDE
from numpyro_simformer.sites import SiteInfo
from numpyro_simformer.transforms import IntervalClip, fit_token_transform, site_bijection


def _site(name, distribution, shape=()):
    return SiteInfo(name, shape, len(distribution.event_shape), distribution.support, distribution.is_discrete,
                    tuple(f"{name}_dim_{i}" for i in range(len(shape))))


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=["ve", "vp"])
def test_clip_score_moves_only_estimates_outside_the_bounds(sde, rng_key):
    key_x, key_score, key_time = jax.random.split(rng_key, 3)
    x_t = jax.random.normal(key_x, (500, 3)) * 2.0
    score = jax.random.normal(key_score, (500, 3)) * 3.0
    time = jax.random.uniform(key_time, (500,), minval=0.01, maxval=1.0)
    lower = jnp.array([-0.5, -jnp.inf, 0.0])
    upper = jnp.array([0.5, jnp.inf, jnp.inf])
    clipped = clip_score(sde, score, x_t, time, lower, upper)

    alpha, sigma = sde.marginal(time)
    denoise = lambda s: (x_t + sigma[:, None] ** 2 * s) / alpha[:, None]
    before, after = np.asarray(denoise(score)), np.asarray(denoise(clipped))
    inside = (before >= np.asarray(lower)) & (before <= np.asarray(upper))
    assert inside.any() and (~inside).any()
    # Estimates inside the bounds (and every token without bounds) keep their score bit for bit.
    np.testing.assert_array_equal(np.asarray(clipped)[inside], np.asarray(score)[inside])
    np.testing.assert_array_equal(np.asarray(clipped)[:, 1], np.asarray(score)[:, 1])
    # Those outside now denoise onto the nearest bound.
    np.testing.assert_allclose(after[~inside], np.clip(before, lower, upper)[~inside], rtol=1e-4, atol=1e-4)


def test_clipped_estimate_is_never_farther_from_a_point_in_the_box(rng_key):
    """The projection argument behind the option: any x_0 in the box is at least as close
    to the clipped estimate as to the unclipped one."""
    sde = VESDE()
    key_x, key_score, key_data = jax.random.split(rng_key, 3)
    x_t = jax.random.normal(key_x, (1_000, 2)) * 3.0
    score = jax.random.normal(key_score, (1_000, 2))
    time = jnp.full((1_000,), 0.5)
    lower, upper = jnp.array([-1.0, 0.0]), jnp.array([1.0, 2.0])
    x_0 = jax.random.uniform(key_data, (1_000, 2), minval=lower, maxval=upper)
    alpha, sigma = sde.marginal(time)
    denoise = lambda s: (x_t + sigma[:, None] ** 2 * s) / alpha[:, None]
    error_before = np.abs(np.asarray(denoise(score) - x_0))
    error_after = np.abs(np.asarray(denoise(clip_score(sde, score, x_t, time, lower, upper)) - x_0))
    assert np.all(error_after <= error_before + 1e-4)
    assert np.mean(error_after < error_before - 1e-3) > 0.1  # and it does move some


def test_which_sites_are_clipped():
    uniform = _site("a", dist.Uniform(-2.0, 3.0).expand([2]).to_event(1), (2,))
    bijection = site_bijection(uniform, interval_sites="clip")
    assert isinstance(bijection, IntervalClip)
    np.testing.assert_array_equal(bijection.lower, [-2.0, -2.0])
    np.testing.assert_array_equal(bijection.upper, [3.0, 3.0])
    np.testing.assert_array_equal(bijection(jnp.array([-5.0, 4.0])), [-2.0, 3.0])
    np.testing.assert_array_equal(bijection.inv(jnp.array([0.5, 1.0])), [0.5, 1.0])
    assert np.isnan(bijection.inv(jnp.array([-2.5, 3.5]))).all()  # outside: no density
    assert isinstance(site_bijection(_site("b", dist.Beta(2.0, 2.0)), interval_sites="clip"), IntervalClip)
    # An open interval is clipped just inside, so every value is in the support.
    open_site = SiteInfo("c", (), 0, constraints.open_interval(0.0, 1.0), False, ())
    value = site_bijection(open_site, interval_sites="clip")(jnp.array([-1.0, 0.0, 1.0, 2.0]))
    assert np.all(constraints.open_interval(0.0, 1.0)(value))
    # Half-bounded, unbounded and discrete sites keep their usual representation.
    half = site_bijection(_site("d", dist.HalfNormal(1.0)), interval_sites="clip")
    assert not isinstance(half, IntervalClip) and isinstance(half, numpyro_transforms.ExpTransform)
    assert isinstance(site_bijection(_site("e", dist.Normal()), interval_sites="clip"),
                      numpyro_transforms.IdentityTransform)
    assert isinstance(site_bijection(_site("f", dist.Binomial(10, 0.5)), interval_sites="clip"),
                      numpyro_transforms.IdentityTransform)
    # The default is NumPyro's logit-scale bijection.
    assert not isinstance(site_bijection(uniform), IntervalClip)
    with pytest.raises(ValueError, match="interval_sites"):
        site_bijection(uniform, interval_sites="reflect")


def test_z_bounds_are_the_interval_in_z_space():
    sites = (_site("theta", dist.Uniform(0.0, 4.0)), _site("x", dist.Normal()))
    layout = TokenLayout(sites=sites, node_ids=np.arange(2, dtype=np.int32), coordinates=np.zeros(2, np.float32))
    tokens = np.array([[1.0, 5.0], [3.0, -1.0]], np.float32)  # theta: mean 2, std 1
    clipped = fit_token_transform(layout, tokens, interval_sites="clip")
    lower, upper = clipped.z_bounds()
    np.testing.assert_allclose(lower, [-2.0, -np.inf])
    np.testing.assert_allclose(upper, [2.0, np.inf])
    assert fit_token_transform(layout, tokens).z_bounds() is None


def test_bad_interval_sites_is_named():
    with pytest.raises(ValueError, match="interval_sites.*'transform', 'clip'"):
        Simformer(lambda: None, interval_sites="logit")


BOUND_NOISE = 0.1
X_OBSERVED = (0.97, 0.5)


def edge_model():
    theta = numpyro.sample("theta", dist.Uniform(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, BOUND_NOISE).to_event(1))


@pytest.fixture(scope="module")
def clipped_fit():
    return Simformer(
        edge_model, num_simulations=4_000, interval_sites="clip", progress_bar=False,
        network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
        training=TrainingConfig(max_steps=3_000, batch_size=256, validation_interval=250),
    ).fit(jax.random.key(3))


@pytest.mark.slow
def test_posterior_cut_by_the_prior_bound_matches_the_truncated_normal(clipped_fit, rng_key):
    num_samples = 4_000
    tree = clipped_fit.sample(rng_key, observed={"x": np.array(X_OBSERVED)}, num_samples=num_samples)
    theta = tree.posterior["theta"].values.reshape(-1, 2)
    assert np.all((theta >= 0.0) & (theta <= 1.0))
    for index, x in enumerate(X_OBSERVED):
        exact = stats.truncnorm((0.0 - x) / BOUND_NOISE, (1.0 - x) / BOUND_NOISE, loc=x, scale=BOUND_NOISE)
        std = exact.std()
        mean_tolerance = 5 * std / np.sqrt(num_samples) + 0.1 * std
        assert abs(theta[:, index].mean() - exact.mean()) < mean_tolerance
        assert abs(theta[:, index].std() - std) < 5 * std / np.sqrt(2 * num_samples) + 0.1 * std
    # The mass against the bound (exactly 0.319 within 0.05 of 1 for theta[0]), within
    # 5 binomial standard errors plus 0.05 for the network.
    exact_edge = 1.0 - stats.truncnorm(-X_OBSERVED[0] / BOUND_NOISE, (1.0 - X_OBSERVED[0]) / BOUND_NOISE,
                                       loc=X_OBSERVED[0], scale=BOUND_NOISE).cdf(0.95)
    edge = np.mean(theta[:, 0] > 0.95)
    assert abs(edge - exact_edge) < 5 * np.sqrt(exact_edge * (1 - exact_edge) / num_samples) + 0.05


@pytest.mark.slow
def test_clip_mode_survives_save_and_load(clipped_fit, rng_key, tmp_path):
    clipped_fit.save(tmp_path / "clip")
    record = json.loads((tmp_path / "clip" / "simformer.json").read_text())
    assert record["options"]["interval_sites"] == "clip"
    loaded = Simformer.load(tmp_path / "clip", edge_model)
    assert loaded.interval_sites == "clip" and isinstance(loaded.transform.bijections[0], IntervalClip)
    observed = {"x": np.array(X_OBSERVED)}
    first = clipped_fit.sample(rng_key, observed=observed, num_samples=256)
    second = loaded.sample(rng_key, observed=observed, num_samples=256)
    np.testing.assert_array_equal(first.posterior["theta"].values, second.posterior["theta"].values)
    # A checkpoint written before the option existed has no such field: it was "transform".
    del record["options"]["interval_sites"]
    (tmp_path / "clip" / "simformer.json").write_text(json.dumps(record))
    assert Simformer.load(tmp_path / "clip", edge_model).interval_sites == "transform"
