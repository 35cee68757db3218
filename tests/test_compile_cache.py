"""A repeated query compiles nothing: every jitted function is built once per fitted state and query shape."""

import logging

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from helpers import TINY
from numpyro_simformer import ProbabilityFlowLogDensity, Simformer


def model():
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, scale).to_event(1))


@pytest.fixture(scope="module")
def fitted():
    return Simformer(model, **TINY).fit(jax.random.key(0))


def _compilations(caplog, query) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        query()
    return [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]


@pytest.mark.parametrize("kind", ["posterior", "batch", "interval", "log_prob"])
def test_a_second_identical_query_compiles_nothing(fitted, caplog, kind):
    x_o = np.array([0.5, -0.3])
    queries = {
        "posterior": lambda key: fitted.sample(key, observed={"x": x_o}, num_samples=7),
        "batch": lambda key: fitted.sample(key, observed={"x": np.stack([x_o, -x_o])}, num_samples=5),
        "interval": lambda key: fitted.sample(key, observed={"theta": np.zeros(2)}, num_samples=6,
                                              intervals={"x": (0.0, None)}),
        "log_prob": lambda key: fitted.log_prob({"theta": np.zeros((3, 2)), "scale": np.ones(3)},
                                                observed={"x": x_o}, density=ProbabilityFlowLogDensity(num_steps=4)),
    }
    first = _compilations(caplog, lambda: queries[kind](jax.random.key(1)))
    assert first, "the first query compiled nothing: the log capture does not see compilations"
    # another key and other observed values of the same shapes: the same compiled functions
    x_o = np.array([-1.0, 2.0])
    second = _compilations(caplog, lambda: queries[kind](jax.random.key(2)))
    assert second == [], f"the repeated {kind} query compiled again: {second}"
