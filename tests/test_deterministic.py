"""``numpyro.deterministic`` sites in the answers: recomputed from every draw's token sites.

The relation to the sampled sites is exact whatever the network learned, so a network
trained for a few steps is enough.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from helpers import TINY
from numpyro_simformer import Simformer


def model():
    scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
    count = numpyro.sample("count", dist.Poisson(3.0))
    with numpyro.plate("obs", 3):
        mean = numpyro.sample("mean", dist.Normal(0.0, 1.0))
        numpyro.deterministic("scaled", scale * mean)  # in the plate: dims (.., "obs")
        x = numpyro.sample("x", dist.Normal(scale * mean, 1.0))
    numpyro.deterministic("shifted_sum", jnp.sum(x) + count)  # depends on data and a discrete site


@pytest.fixture(scope="module")
def fitted():
    return Simformer(model, **TINY).fit(jax.random.key(0))


def test_deterministic_sites_are_functions_of_each_draw(fitted):
    observed = {"x": np.array([0.5, -1.0, 2.0])}
    tree = fitted.sample(jax.random.key(1), observed=observed, num_samples=50)
    posterior = tree["posterior"]
    assert posterior["scaled"].dims == ("chain", "draw", "obs")
    np.testing.assert_allclose(posterior["scaled"], posterior["scale"] * posterior["mean"], rtol=1e-5, atol=1e-5)
    # the observed data enter as observed, the discrete site as its integer draw
    count = tree["posterior_predictive"]["count"]  # no sample site below it: a data site
    np.testing.assert_allclose(posterior["shifted_sum"], observed["x"].sum() + count, rtol=1e-5)


def test_deterministic_sites_of_a_batch_and_of_the_joint(fitted):
    xs = np.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    tree = fitted.sample(jax.random.key(2), observed={"x": xs}, num_samples=20)
    posterior = tree["posterior"]
    assert posterior["scaled"].dims == ("chain", "draw", "observation", "obs")
    np.testing.assert_allclose(posterior["shifted_sum"], xs.sum(axis=1) + tree["posterior_predictive"]["count"],
                               rtol=1e-5)

    joint = fitted.sample(jax.random.key(3), num_samples=20)
    np.testing.assert_allclose(joint["posterior"]["shifted_sum"],
                               joint["posterior_predictive"]["x"].sum("obs") + joint["posterior_predictive"]["count"],
                               rtol=1e-5)


def test_return_deterministic_false_skips_them(fitted):
    tree = fitted.sample(jax.random.key(1), observed={"x": np.zeros(3)}, num_samples=5, return_deterministic=False)
    assert "scaled" not in tree["posterior"] and "shifted_sum" not in tree["posterior"]


def test_deterministic_site_that_depends_on_an_excluded_site_is_named_not_returned():
    def with_noise():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        noise = numpyro.sample("noise", dist.Normal(0.0, 1.0))
        numpyro.deterministic("double", 2 * theta)
        numpyro.deterministic("noisy", theta + noise)
        numpyro.sample("x", dist.Normal(theta + noise, 1.0))

    sf = Simformer(with_noise, exclude_sites=["noise"], **TINY).fit(jax.random.key(0))
    with pytest.warns(UserWarning, match=r"\['noisy'\] depend on sites outside the tokens"):
        tree = sf.sample(jax.random.key(1), observed={"x": 1.0}, num_samples=10)
    assert "noisy" not in tree["posterior"]
    np.testing.assert_allclose(tree["posterior"]["double"], 2 * tree["posterior"]["theta"], rtol=1e-5)
    assert list(tree.attrs["deterministic_sites_not_returned"]) == ["noisy"]


def test_deterministic_sites_follow_a_query_at_new_coordinates():
    def curve(t):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("time", len(t)):
            mean = numpyro.deterministic("mean", theta[0] + theta[1] * t)
            numpyro.sample("x", dist.Normal(mean, 0.1))

    sf = Simformer(curve, coordinates={"time": "t"}, **TINY).fit(jax.random.key(0), t=jnp.linspace(0.0, 1.0, 5))
    new_t = np.linspace(0.0, 2.0, 7)
    tree = sf.sample(jax.random.key(1), observed={"x": np.zeros(7)}, num_samples=10, model_kwargs={"t": new_t})
    mean, theta = tree["posterior"]["mean"], tree["posterior"]["theta"].values
    assert mean.dims == ("chain", "draw", "time") and mean.shape[-1] == 7
    np.testing.assert_allclose(mean, theta[..., :1] + theta[..., 1:] * new_t, rtol=1e-4, atol=1e-5)
