"""``interval_sites="reflect"`` / ``"reject"``: bounded-interval sites in their own coordinates.

The exact parts (which sites, their bounds in z-space, the fold, the rejection loop on a
known distribution, training that does not depend on the mode) are checked exactly or
against sample-size tolerances. The end-to-end tests train one small network on a
posterior cut by its prior's bound (a normal likelihood next to the edge of a uniform
prior). The reflected answer is compared with the analytic truncated normal, with the
tolerances of ``test_simformer.py``: 5 Monte Carlo standard errors plus 0.1 exact
standard deviations for the network's approximation. The rejected answer is not held to
that: on this model the network spills about 12 % of its mass over the bound and
rejection leaves the mass against the bound short (measured in docs/bounded-sites.md);
its tests check what rejection promises (support, counts, a normalised density).
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
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.inference.rejection import SUPPORT_STREAM, draws_in_support
from numpyro_simformer.model.sites import SiteInfo
from numpyro_simformer.tokens.transforms import DiscreteRound, IntervalClip, IntervalReflect, fit_token_transform, site_bijection
from numpyro_simformer.io.serialization import RECORD_DIGEST, seal_record


def _site(name, distribution, shape=()):
    return SiteInfo(name, shape, len(distribution.event_shape), distribution.support, distribution.is_discrete,
                    tuple(f"{name}_dim_{i}" for i in range(len(shape))))


def test_which_sites_are_kept_in_their_own_coordinates():
    uniform = _site("a", dist.Uniform(-2.0, 3.0).expand([2]).to_event(1), (2,))
    bijection = site_bijection(uniform, interval_sites="reject")
    assert isinstance(bijection, IntervalClip)
    np.testing.assert_array_equal(bijection.lower, [-2.0, -2.0])
    np.testing.assert_array_equal(bijection.upper, [3.0, 3.0])
    np.testing.assert_array_equal(bijection(jnp.array([-5.0, 4.0])), [-2.0, 3.0])
    np.testing.assert_array_equal(bijection.inv(jnp.array([0.5, 1.0])), [0.5, 1.0])
    assert np.isnan(bijection.inv(jnp.array([-2.5, 3.5]))).all()  # outside: no density
    assert isinstance(site_bijection(_site("b", dist.Beta(2.0, 2.0)), interval_sites="reject"), IntervalClip)
    # An open interval is clipped just inside, so every value is in the support.
    open_site = SiteInfo("c", (), 0, constraints.open_interval(0.0, 1.0), False, ())
    value = site_bijection(open_site, interval_sites="reject")(jnp.array([-1.0, 0.0, 1.0, 2.0]))
    assert np.all(constraints.open_interval(0.0, 1.0)(value))
    reflect = site_bijection(uniform, interval_sites="reflect")
    assert isinstance(reflect, IntervalReflect)
    # The fold: inside exactly the identity, outside mirrored at the bounds (again and again).
    inside = jnp.array([-2.0, -1.234567, 0.1, 2.999999, 3.0])
    np.testing.assert_array_equal(reflect(jnp.stack([inside, inside], -1)), jnp.stack([inside, inside], -1))
    np.testing.assert_allclose(reflect(jnp.array([[3.5, -2.5], [8.5, -7.5], [13.5, 4.0]])),
                               [[2.5, -1.5], [-1.5, 2.5], [2.5, 2.0]], atol=1e-5)
    open_reflect = site_bijection(SiteInfo("c", (), 0, constraints.open_interval(0.0, 1.0), False, ()),
                                  interval_sites="reflect")
    assert np.all(constraints.open_interval(0.0, 1.0)(open_reflect(jnp.array([0.0, 1.0, 2.0, -3.0]))))
    # Half-bounded, unbounded and discrete sites keep their usual representation.
    half = site_bijection(_site("d", dist.HalfNormal(1.0)), interval_sites="reject")
    assert not isinstance(half, IntervalClip) and isinstance(half, numpyro_transforms.ExpTransform)
    assert isinstance(site_bijection(_site("e", dist.Normal()), interval_sites="reject"),
                      numpyro_transforms.IdentityTransform)
    discrete = site_bijection(_site("f", dist.Binomial(10, 0.5)), interval_sites="reject")
    assert isinstance(discrete, DiscreteRound) and not isinstance(discrete, IntervalClip)  # rounds into 0..10
    # The default is NumPyro's logit-scale bijection.
    assert not isinstance(site_bijection(uniform), IntervalClip)
    with pytest.raises(ValueError, match="interval_sites"):
        site_bijection(uniform, interval_sites="mirror")


def test_z_bounds_are_the_interval_in_z_space():
    sites = (_site("theta", dist.Uniform(0.0, 4.0)), _site("x", dist.Normal()))
    layout = TokenLayout(sites=sites, node_ids=np.arange(2, dtype=np.int32), coordinates=np.zeros(2, np.float32))
    tokens = np.array([[1.0, 5.0], [3.0, -1.0]], np.float32)  # theta: mean 2, std 1
    own = fit_token_transform(layout, tokens, interval_sites="reject")
    lower, upper = own.z_bounds()
    np.testing.assert_allclose(lower, [-2.0, -np.inf])
    np.testing.assert_allclose(upper, [2.0, np.inf])
    assert fit_token_transform(layout, tokens).z_bounds() is None
    assert fit_token_transform(layout, tokens, interval_sites="reflect").z_bounds() is None  # nothing is rejected


def _normal_draws(key, count):
    """(count, 2 observations, 2 tokens): N(0, 1) for observation 0, N(3, 1) for observation 1."""
    return jax.random.normal(key, (count, 2, 2)) + jnp.array([0.0, 3.0])[None, :, None]


def test_rejection_keeps_exactly_the_draws_inside(rng_key):
    lower, upper = np.array([0.0, -np.inf]), np.array([np.inf, np.inf])  # token 0 >= 0, token 1 free
    latent = np.ones((2, 2), bool)
    z, drawn, inside = draws_in_support(_normal_draws, rng_key, 5_000, lower, upper, latent)
    assert z.shape == (5_000, 2, 2) and np.all(z[..., 0] >= 0)
    # The first round's draws inside come first, in order; more rounds used fold_in keys.
    first = np.asarray(_normal_draws(rng_key, 5_000))
    np.testing.assert_array_equal(z[: (first[:, 0, 0] >= 0).sum(), 0], first[first[:, 0, 0] >= 0, 0])
    # Acceptance: P(N(0,1) >= 0) = 0.5 and P(N(3,1) >= 0) = 0.99865, within 5 binomial errors.
    for index, exact in enumerate([0.5, stats.norm.sf(-3.0)]):
        assert abs(inside[index] / drawn[index] - exact) < 5 * np.sqrt(exact * (1 - exact) / drawn[index]) + 1e-9
    # The kept draws are the restricted distribution: a half-normal for observation 0.
    half = stats.halfnorm()
    assert abs(z[:, 0, 0].mean() - half.mean()) < 5 * half.std() / np.sqrt(5_000)
    # Nothing outside: the first round is returned as it is.
    everything = np.array([-np.inf, -np.inf])
    z_all, drawn_all, inside_all = draws_in_support(_normal_draws, rng_key, 100, everything, -everything, latent)
    np.testing.assert_array_equal(z_all, np.asarray(_normal_draws(rng_key, 100)))
    np.testing.assert_array_equal(drawn_all, [100, 100])
    np.testing.assert_array_equal(inside_all, [100, 100])


def test_rejection_ignores_observed_tokens_and_names_what_failed(rng_key):
    lower, upper = np.array([10.0, 10.0]), np.array([np.inf, np.inf])  # (almost) never inside
    token_1_observed = np.array([[True, False], [True, False]])  # latent mask: token 1 is not checked
    z, _, _ = draws_in_support(_normal_draws, rng_key, 10, np.array([-np.inf, 10.0]), upper, token_1_observed)
    assert z.shape == (10, 2, 2)
    with pytest.raises(RuntimeError, match=r"observation 0 .*\(latent bounded sites 'theta'\).*interval_sites='transform'"):
        draws_in_support(_normal_draws, rng_key, 10, lower, upper, np.ones((2, 2), bool),
                         describe=lambda index: "latent bounded sites 'theta'")


def test_bad_interval_sites_is_named():
    with pytest.raises(ValueError, match="interval_sites.*'transform', 'reflect', 'reject'"):
        Simformer(lambda: None, interval_sites="logit")


BOUND_NOISE = 0.1
X_OBSERVED = (0.97, 0.5)


def edge_model():
    theta = numpyro.sample("theta", dist.Uniform(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, BOUND_NOISE).to_event(1))


@pytest.fixture(scope="module")
def rejecting_fit():
    return Simformer(
        edge_model, num_simulations=4_000, interval_sites="reject", progress_bar=False,
        network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
        training=TrainingConfig(max_steps=3_000, batch_size=256, validation_interval=250),
    ).fit(jax.random.key(3))


@pytest.fixture(scope="module")
def reflecting_fit(rejecting_fit, tmp_path_factory):
    """The same network answering with reflection: training does not depend on the mode
    (checked exactly below), so the checkpoint is loaded with the option switched."""
    path = tmp_path_factory.mktemp("reflect") / "fit"
    rejecting_fit.save(path)
    record = json.loads((path / "simformer.json").read_text())
    record["options"]["interval_sites"] = "reflect"
    (path / "simformer.json").write_text(json.dumps(seal_record(record)))  # an edit on purpose: sealed again
    return Simformer.load(path, edge_model)


def test_training_does_not_depend_on_reflect_or_reject(rng_key):
    fits = [Simformer(edge_model, num_simulations=300, interval_sites=mode, progress_bar=False,
                      network=NetworkConfig(width=16, num_layers=1, num_heads=2, mlp_width=16),
                      training=TrainingConfig(max_steps=20, batch_size=32, validation_interval=10)).fit(rng_key)
            for mode in ("reflect", "reject")]
    for left, right in zip(jax.tree.leaves(fits[0].params), jax.tree.leaves(fits[1].params)):
        np.testing.assert_array_equal(left, right)
    np.testing.assert_array_equal(fits[0].transform.mean, fits[1].transform.mean)
    np.testing.assert_array_equal(fits[0].transform.std, fits[1].transform.std)


@pytest.mark.slow
def test_reflected_posterior_cut_by_the_prior_bound_matches_the_truncated_normal(reflecting_fit, rng_key):
    num_samples = 4_000
    tree = reflecting_fit.sample(rng_key, observed={"x": np.array(X_OBSERVED)}, num_samples=num_samples)
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
    assert "draws_outside_support" not in tree.attrs  # nothing is redrawn
    with pytest.raises(NotImplementedError, match=r"\['theta'\].*interval_sites='reject'"):
        reflecting_fit.log_prob({"theta": theta[:2]}, observed={"x": np.array(X_OBSERVED)}, rng_key=rng_key)


@pytest.mark.slow
def test_rejected_draws_lie_inside_and_are_counted(rejecting_fit, rng_key):
    num_samples = 2_000
    tree = rejecting_fit.sample(rng_key, observed={"x": np.array(X_OBSERVED)}, num_samples=num_samples)
    theta = tree.posterior["theta"].values.reshape(-1, 2)
    assert theta.shape == (num_samples, 2) and np.all((theta >= 0.0) & (theta <= 1.0))
    # This network spills mass over the bound at x = 0.97, so some draws were redrawn.
    acceptance, outside = tree.attrs["support_acceptance"], tree.attrs["draws_outside_support"]
    assert 0.5 < acceptance < 1 and outside > 0


@pytest.mark.slow
def test_batched_observations_are_each_restricted(rejecting_fit, rng_key):
    observed = {"x": np.array([X_OBSERVED, [0.02, 1.1]])}
    tree = rejecting_fit.sample(rng_key, observed=observed, num_samples=500)
    theta = tree.posterior["theta"].values
    assert theta.shape == (1, 500, 2, 2) and np.all((theta >= 0) & (theta <= 1))
    assert len(tree.attrs["support_acceptance"]) == len(tree.attrs["draws_outside_support"]) == 2


@pytest.mark.slow
def test_log_prob_is_renormalised_over_the_support(rejecting_fit, rng_key):
    """The network's density restricted to the unit square, divided by its mass there.

    Two checks. (1) The renormalisation is one constant per query: two estimates of the
    mass inside (4,000 flow draws each, independent keys) shift every point by the same
    amount, within 5 standard errors of their difference. (2) The restricted density integrates to 1
    over the square (midpoint rule, 30 x 30) within 0.1: the flow's own density, integrated
    over a wide box, misses about 4 % of the mass on this small network, and the share
    inside misses as much; unrenormalised, the integral here is about 0.86. Outside the
    square the density is -inf, and the mass needs a key.
    """
    cells = 30
    grid = (np.arange(cells) + 0.5) / cells
    points = np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)
    observed = {"x": np.array(X_OBSERVED)}
    log_density = rejecting_fit.log_prob({"theta": points}, observed=observed, rng_key=rng_key)
    other = rejecting_fit.log_prob({"theta": points}, observed=observed, rng_key=jax.random.fold_in(rng_key, 1))
    shift = other - log_density
    np.testing.assert_allclose(shift, shift[0], atol=1e-9)
    share = 0.85  # below the flow's share inside for this network (0.92 measured), so the bound is loose
    assert abs(shift[0]) < 5 * np.sqrt(2 * (1 - share) / (4_000 * share))
    integral = np.exp(log_density).sum() / cells**2
    assert abs(integral - 1.0) < 0.1
    outside = rejecting_fit.log_prob({"theta": np.array([[1.2, 0.5], [0.5, -0.1]])}, observed=observed,
                                     rng_key=rng_key)
    np.testing.assert_array_equal(outside, [-np.inf, -np.inf])
    with pytest.raises(ValueError, match="rng_key"):
        rejecting_fit.log_prob({"theta": points[:2]}, observed=observed)


@pytest.mark.slow
def test_reject_mode_survives_save_and_load(rejecting_fit, rng_key, tmp_path):
    rejecting_fit.save(tmp_path / "reject")
    record = json.loads((tmp_path / "reject" / "simformer.json").read_text())
    assert record["options"]["interval_sites"] == "reject"
    loaded = Simformer.load(tmp_path / "reject", edge_model)
    assert loaded.interval_sites == "reject" and isinstance(loaded.transform.bijections[0], IntervalClip)
    observed = {"x": np.array(X_OBSERVED)}
    first = rejecting_fit.sample(rng_key, observed=observed, num_samples=256)
    second = loaded.sample(rng_key, observed=observed, num_samples=256)
    np.testing.assert_array_equal(first.posterior["theta"].values, second.posterior["theta"].values)
    # A checkpoint written before the option existed (format 1, unsealed) has no such field: it was "transform".
    del record["options"]["interval_sites"], record[RECORD_DIGEST]
    record["format_version"] = 1
    (tmp_path / "reject" / "simformer.json").write_text(json.dumps(record))
    assert Simformer.load(tmp_path / "reject", edge_model).interval_sites == "transform"
