"""Simplex sites (Dirichlet): one token per element through the centred log-ratio.

Fast tier: the transform's round trip and what a query may ask of a simplex site. Slow
tier: a network trained on a Dirichlet site reproduces its marginal moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from helpers import TINY
from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.model.sites import SiteInfo
from numpyro_simformer.tokens.transforms import SimplexLogRatio, couples_elements, site_bijection

CONCENTRATION = np.array([2.0, 3.0, 5.0])


def model():
    weights = numpyro.sample("w", dist.Dirichlet(CONCENTRATION))
    numpyro.sample("x", dist.Normal(weights, 0.1).to_event(1))


@pytest.mark.parametrize("distribution", [
    dist.Dirichlet(jnp.ones(4)),
    dist.Dirichlet(jnp.ones(4)).expand([2]),
    dist.Dirichlet(jnp.ones(4)).expand([2]).to_event(1),
])
def test_log_ratio_round_trip_keeps_one_coordinate_per_element(distribution):
    shape = distribution.batch_shape + distribution.event_shape
    site = SiteInfo("w", tuple(shape), len(distribution.event_shape), distribution.support, False, ())
    bijection = site_bijection(site)
    assert couples_elements(bijection)
    weights = distribution.sample(jax.random.key(0))
    unconstrained = bijection.inv(weights)
    assert unconstrained.shape == weights.shape
    np.testing.assert_allclose(unconstrained.sum(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(bijection(unconstrained), weights, rtol=1e-5, atol=1e-7)
    # off the zero-sum hyperplane nothing changes: any network output lands on the simplex
    np.testing.assert_allclose(bijection(unconstrained + 3.0), weights, rtol=1e-5, atol=1e-7)


def test_log_ratio_has_no_density_on_r_k():
    with pytest.raises(NotImplementedError, match="no density"):
        SimplexLogRatio().log_abs_det_jacobian(jnp.zeros(3), jnp.ones(3) / 3)


@pytest.fixture(scope="module")
def tiny():
    return Simformer(model, **TINY).fit(jax.random.key(0))


@pytest.mark.parametrize("query, error, match", [
    (dict(observed={"w": np.array([0.2, np.nan, np.nan])}), ValueError, r"observed\['w'\] gives some elements"),
    (dict(observed={"w": np.array([0.2, 0.3, 0.6])}), ValueError, r"observed\['w'\] is \[0.2, 0.3, 0.6\], outside"),
    (dict(intervals={"w": (0.1, 0.9)}), ValueError, r"intervals\['w'\].*not supported"),
])
def test_bad_simplex_queries_name_the_site(tiny, query, error, match):
    with pytest.raises(error, match=match):
        tiny.sample(jax.random.key(1), num_samples=4, **query)


def test_log_prob_given_the_simplex_works_and_of_it_says_why_not(tiny):
    weights, x = np.array([[0.2, 0.3, 0.5]]), np.array([[0.1, 0.2, 0.7]])
    assert np.isfinite(tiny.log_prob({"x": x}, observed={"w": weights[0]})).all()
    with pytest.raises(NotImplementedError, match="simplex site latent"):
        tiny.log_prob({"w": weights}, observed={"x": x[0]})


@pytest.mark.slow
def test_trained_joint_reproduces_the_dirichlet_moments():
    # A small network (measured on three keys: means within 0.007, variances within 14 %).
    sf = Simformer(model, num_simulations=2000, training=TrainingConfig(max_steps=3000, batch_size=256),
                   network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   progress_bar=False).fit(jax.random.key(0))
    tree = sf.sample(jax.random.key(1), num_samples=4000)
    weights = tree["posterior"]["w"].values.reshape(-1, 3)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert weights.min() > 0
    mean = CONCENTRATION / CONCENTRATION.sum()
    variance = mean * (1 - mean) / (CONCENTRATION.sum() + 1)
    # Monte Carlo error of the mean is sqrt(0.023 / 4000) ~ 0.0024; 0.02 leaves room for the
    # network's own error and still rejects Dirichlet(1, 1, 1) (mean 1/3, 0.13 away).
    np.testing.assert_allclose(weights.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(weights.var(0), variance, rtol=0.25)


def test_a_support_whose_bijection_changes_the_shape_is_still_refused_by_name():
    def correlated():
        numpyro.sample("corr", dist.LKJCholesky(3, 2.0))

    with pytest.raises(NotImplementedError, match=r"Site 'corr' has support .*one token per element is not possible"):
        Simformer(correlated, num_simulations=10, progress_bar=False).fit(jax.random.key(0))
