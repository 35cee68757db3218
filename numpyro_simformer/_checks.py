"""Argument checks shared by the public entry points."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_rng_key", "check_positive_int", "check_fitted"]


def check_rng_key(rng_key, caller: str) -> None:
    """Raise a TypeError naming ``caller`` unless ``rng_key`` is one JAX PRNG key.

    Typed keys (``jax.random.key``) and raw ``uint32[2]`` keys (``jax.random.PRNGKey``) pass.
    """
    dtype, shape = getattr(rng_key, "dtype", None), getattr(rng_key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and tuple(shape) == ():
        return
    if dtype == np.uint32 and tuple(shape) == (2,):
        return
    got = repr(rng_key) if dtype is None else f"an array of dtype {dtype} and shape {tuple(shape)}"
    raise TypeError(
        f"`{caller}` takes one JAX PRNG key as `rng_key`, e.g. `jax.random.key(0)`; got {got}. "
        "Split a key with `jax.random.split` for several calls."
    )


def check_positive_int(value, name: str) -> None:
    """Raise a ValueError naming the argument unless ``value`` is a positive integer."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_fitted(simformer, caller: str) -> None:
    """Raise a RuntimeError naming ``caller`` unless ``simformer`` is fitted."""
    if not simformer.fitted:
        raise RuntimeError(f"`{caller}` needs a fitted Simformer: call `fit(rng_key, ...)` first.")
