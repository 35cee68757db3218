"""Joint draws from a NumPyro model, vmapped and jitted, bad simulations counted.

``simulate`` runs the model forward ``num_simulations`` times, in chunks, each chunk one
jitted ``vmap`` over keys. Draws with a NaN or inf in any token are dropped and counted in
the returned :class:`SimulationInfo`; nothing is silently used.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

__all__ = ["SimulationInfo", "simulate", "filter_finite", "build_chunk_fn", "draw_shapes", "NOT_VECTORIZABLE_WARNING"]

# Raised while tracing a model whose Python control flow depends on sampled values: it cannot be vmapped.
_NOT_VECTORIZABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                     jax.errors.TracerArrayConversionError, jax.errors.TracerIntegerConversionError)
NOT_VECTORIZABLE_WARNING = (
    "The model could not be vmapped (its Python control flow depends on sampled values); simulating one "
    "draw at a time, which is slow. Use `jnp.where`/`lax.cond` in the model to make it vectorizable."
)


class SimulationInfo(NamedTuple):
    """What happened during simulation."""

    num_requested: int
    num_valid: int
    num_invalid: int
    vectorized: bool


def _build_draw_fn(model: Callable, model_args: tuple, model_kwargs: dict, site_names: Sequence[str]):
    def draw(rng_key):
        trace = handlers.trace(handlers.seed(model, rng_key)).get_trace(*model_args, **model_kwargs)
        return {name: jnp.asarray(trace[name]["value"], dtype=jnp.float32) for name in site_names}

    return draw


def _draw_chunk(draw_chunk, chunk_keys, data_parallel):
    if data_parallel is None:
        return jax.device_get(draw_chunk(chunk_keys))
    num = chunk_keys.shape[0]
    padded = -(-num // data_parallel.num_devices) * data_parallel.num_devices
    chunk_keys = jnp.concatenate([chunk_keys, jnp.repeat(chunk_keys[:1], padded - num, axis=0)])
    draws = jax.device_get(draw_chunk(jax.device_put(chunk_keys, data_parallel.batch)))
    return {name: value[:num] for name, value in draws.items()}


def build_chunk_fn(model: Callable, model_args: tuple, model_kwargs: dict, site_names: Sequence[str],
                   data_parallel=None):
    """``simulate_chunk(chunk_keys, vectorized) -> (draws, vectorized)``: one chunk of joint draws.

    Each key gives one joint draw of ``site_names`` (float32 NumPy arrays with a leading
    draw axis). With ``vectorized`` the chunk is one jitted ``vmap`` (compiled once per
    chunk length); a model that cannot be vmapped is then run one draw at a time and
    ``vectorized=False`` is returned, for the caller to pass on (and warn about once). The
    draws depend on the chunk's keys alone: the same keys give the same draws in this
    process, in a worker process or on a cluster.
    """
    draw = _build_draw_fn(model, model_args, model_kwargs, site_names)
    draw_chunk = jax.jit(jax.vmap(draw))

    def simulate_chunk(chunk_keys, vectorized: bool = True):
        if vectorized:
            try:
                return _draw_chunk(draw_chunk, chunk_keys, data_parallel), True
            except _NOT_VECTORIZABLE:
                pass
        single = [jax.device_get(draw(key)) for key in chunk_keys]
        return {name: np.stack([s[name] for s in single]) for name in site_names}, False

    return simulate_chunk


def filter_finite(draws: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Keep the simulations whose every site value is finite; return them and the mask."""
    names = list(draws)
    num = len(draws[names[0]])
    finite = np.ones(num, dtype=bool)
    for name in names:
        value = np.asarray(draws[name]).reshape(num, -1)
        finite &= np.all(np.isfinite(value), axis=1)
    if finite.all():  # the common case: no copy of the simulations
        return {name: np.asarray(value) for name, value in draws.items()}, finite
    return {name: np.asarray(value)[finite] for name, value in draws.items()}, finite


def simulate(
    rng_key,
    model: Callable,
    num_simulations: int,
    site_names: Sequence[str],
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    chunk_size: int = 10_000,
    progress_bar: bool = False,
    data_parallel=None,
) -> tuple[dict[str, np.ndarray], SimulationInfo]:
    """Draw ``num_simulations`` joint samples of ``site_names`` from ``model``.

    The draws are split into chunks of ``chunk_size``; each chunk is one jitted ``vmap``.
    A model whose Python control flow depends on sampled values cannot be vmapped; it is
    then run one draw at a time (slowly) with a warning.

    Args:
        rng_key: a JAX PRNG key; the draws are a pure function of it.
        model: the NumPyro model.
        num_simulations: how many joint draws to make.
        site_names: the sites to keep.
        model_args, model_kwargs: passed to the model.
        chunk_size: draws per jitted call (bounds the memory of one call).
        progress_bar: show a tqdm bar over chunks.
        data_parallel: a :class:`~numpyro_simformer.training.parallel.DataParallel`: each chunk's
            keys are sharded over its devices. Every draw depends on its own key alone,
            so the draws equal unsharded ones; only one chunk is on the devices at a time
            and the draws are gathered on the host.

    Returns:
        ``(draws, info)``: a dict of NumPy arrays with a leading simulation axis (finite
        draws only) and a :class:`SimulationInfo`.
    """
    keys = jax.random.split(rng_key, num_simulations)
    simulate_chunk = build_chunk_fn(model, model_args, model_kwargs or {}, site_names, data_parallel)
    vectorized = True
    draws = None  # filled chunk by chunk: the host holds one copy of the simulations, not two
    starts = range(0, num_simulations, chunk_size)
    if progress_bar:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="simulating", unit="chunk")
    for start in starts:
        chunk_keys = keys[start : start + chunk_size]
        chunk, chunk_vectorized = simulate_chunk(chunk_keys, vectorized)
        if vectorized and not chunk_vectorized:
            warnings.warn(NOT_VECTORIZABLE_WARNING, stacklevel=2)
        vectorized = chunk_vectorized
        if draws is None:
            draws = {name: np.empty((num_simulations, *np.shape(chunk[name])[1:]), np.float32) for name in site_names}
        for name in site_names:
            draws[name][start : start + chunk_keys.shape[0]] = chunk[name]
    draws, finite = filter_finite(draws)
    info = SimulationInfo(num_simulations, int(finite.sum()), int((~finite).sum()), vectorized)
    return draws, info


def draw_shapes(rng_key, model: Callable, site_names: Sequence[str], model_args: tuple = (),
                model_kwargs: dict | None = None) -> dict[str, tuple]:
    """The shape of one joint draw of each of ``site_names``, found by tracing (nothing is simulated).

    A model that cannot be traced abstractly (Python control flow on sampled values) is
    run once instead.
    """
    draw = _build_draw_fn(model, model_args, model_kwargs or {}, site_names)
    try:
        values = jax.eval_shape(draw, rng_key)
    except _NOT_VECTORIZABLE:
        values = draw(rng_key)
    return {name: tuple(value.shape) for name, value in values.items()}
