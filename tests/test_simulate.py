"""``simulate``: chunked, vmapped draws equal per-key draws; bad draws are counted, not used."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from numpyro_simformer.model.simulate import simulate


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(jnp.log(theta[0]) + theta[1], 0.1))  # NaN when theta[0] < 0


def one_draw(key, fn=model):
    with numpyro.validation_enabled(False):  # a NaN location is a bad draw to count, not an error
        trace = handlers.trace(handlers.seed(fn, key)).get_trace()
    return np.asarray(trace["theta"]["value"]), float(trace["x"]["value"])


def test_chunks_equal_per_key_draws_and_invalid_draws_are_counted():
    key = jax.random.key(7)
    draws, info = simulate(key, model, 25, ["theta", "x"], chunk_size=10)  # chunks of 10, 10 and 5
    singles = [one_draw(k) for k in jax.random.split(key, 25)]
    finite = np.array([np.isfinite(x) for _, x in singles])
    assert 0 < (~finite).sum() < 25  # the test sees both kinds
    assert (info.num_requested, info.num_valid, info.num_invalid) == (25, finite.sum(), (~finite).sum())
    assert info.vectorized
    assert draws["theta"].shape == (finite.sum(), 2) and draws["x"].shape == (finite.sum(),)
    assert draws["theta"].dtype == np.float32
    np.testing.assert_allclose(draws["theta"], np.stack([t for t, _ in singles])[finite], rtol=1e-6)
    np.testing.assert_allclose(draws["x"], np.array([x for _, x in singles])[finite], rtol=1e-5)


def test_model_that_cannot_be_vmapped_is_simulated_one_draw_at_a_time():
    def branching():  # Python control flow on a sampled value: fails under vmap
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        scale = 1.0 if float(theta) > 0 else 2.0
        numpyro.sample("x", dist.Normal(theta, scale))

    key = jax.random.key(3)
    with pytest.warns(UserWarning, match="could not be vmapped"):
        draws, info = simulate(key, branching, 7, ["theta", "x"], chunk_size=3)
    assert not info.vectorized and info.num_valid == 7
    expected = np.array([[float(v) for v in one_draw(k, branching)] for k in jax.random.split(key, 7)])
    np.testing.assert_allclose(np.stack([draws["theta"], draws["x"]], axis=1), expected, rtol=1e-6)
