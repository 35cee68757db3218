"""Lotka–Volterra as a benchmark task: a fixed set of observation times, NUTS references.

θ_k = 1 + 2 sigmoid(z_k), z_k ~ N(0, 1), k = 0..3 (site ``theta``, shape (4,));
du/dt = θ₀ u − θ₁ u v, dv/dt = −θ₂ v + θ₃ u v from (u, v) = (1, 0.5) on t ∈ [0, 15],
solved with diffrax (Tsit5, fixed step 0.1); prey ``u`` and predators ``v`` observed with
Gaussian noise of std 0.1 at ``num_times`` times each (sites ``u`` and ``v``, plates
``time_u`` and ``time_v``).

The paper observes each species at 20 random times per simulation and trains on them as a
time series. This task fixes the times (``num_times`` evenly spaced in (0, 15], 10 by
default: 24 tokens), so that every conditional is a fixed set of tokens and its reference
is NUTS on the same model (the simulator has an explicit likelihood). The library's
time-series machinery (coordinates, random time subsets) is exercised by
``examples/lotka_volterra.py``; this task measures accuracy on arbitrary conditionals.
"""

from __future__ import annotations

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform, SigmoidTransform

from numpyro_simformer.tasks.task import Task

__all__ = ["lotka_volterra", "lotka_volterra_model", "lotka_volterra_trajectory"]

T_END = 15.0
NOISE = 0.1
_STEP = 0.1


def lotka_volterra_trajectory(theta, times):
    """Prey and predators at ``times`` (sorted or not), shape (len(times), 2)."""

    def vector_field(t, y, args):
        u, v = y[0], y[1]
        return jnp.stack([theta[0] * u - theta[1] * u * v, -theta[2] * v + theta[3] * u * v])

    y0 = jnp.array([1.0, 0.5], dtype=jnp.result_type(theta))
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=T_END, dt0=_STEP, y0=y0,
        saveat=diffrax.SaveAt(ts=jnp.asarray(times, dtype=y0.dtype)),
        stepsize_controller=diffrax.ConstantStepSize(), max_steps=int(round(T_END / _STEP)) + 1,
    )  # fmt: skip
    return solution.ys


def lotka_volterra_model(times) -> None:
    """The simulator with an explicit likelihood: ``theta`` (4,), ``u`` and ``v`` at ``times``."""
    base = dist.Normal(0.0, 1.0).expand([4]).to_event(1)
    squash = [SigmoidTransform(), AffineTransform(1.0, 2.0, domain=constraints.unit_interval)]
    theta = numpyro.sample("theta", dist.TransformedDistribution(base, squash))
    path = lotka_volterra_trajectory(theta, times)
    with numpyro.plate("time_u", len(times)):
        numpyro.sample("u", dist.Normal(path[:, 0], NOISE))
    with numpyro.plate("time_v", len(times)):
        numpyro.sample("v", dist.Normal(path[:, 1], NOISE))


def lotka_volterra(num_times: int = 10) -> Task:
    """The Lotka–Volterra task with ``num_times`` evenly spaced observation times per species."""
    if num_times < 1:
        raise ValueError(f"lotka_volterra: num_times must be >= 1, got {num_times}.")
    times = tuple(float(t) for t in np.linspace(T_END / num_times, T_END, num_times))
    model = functools.partial(lotka_volterra_model, times)
    return Task(
        name="lotka_volterra",
        model=model,
        parameter_sites=("theta",),
        data_sites=("u", "v"),
        likelihood_model=model,
        # An ODE fitted to a few noisy points of an oscillation has poor local optima in which
        # chains started at arbitrary prior draws stay stuck: start at the best of many; θ are
        # strongly correlated: dense mass matrix.
        nuts_defaults={"num_chains": 8, "num_warmup": 1000, "init_candidates": 64, "dense_mass": True,
                       "target_accept_prob": 0.9},
    )
