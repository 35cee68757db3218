"""Sampling a 1-d density known on a uniform grid, to second order in the grid step.

The density is taken as linear between grid points (not constant per cell), so a cell is
picked by its trapezoid mass and the position inside it by inverting the cell's quadratic
CDF. Shared by the exact conditional samplers of the Tree, HMM and Two Moons tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["normalise", "numpy_rng", "sample_grid"]


def numpy_rng(rng_key) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (no global state)."""
    return np.random.default_rng(np.asarray(jax.random.bits(rng_key, (4,), jnp.uint32)))


def normalise(log_weights) -> np.ndarray:
    """exp(log_weights - max) along the last axis."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    return np.exp(log_weights - np.max(log_weights, axis=-1, keepdims=True))


def sample_grid(
    rng: np.random.Generator,
    weights: np.ndarray,
    origin: float,
    step: float,
    num_samples: int | None = None,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """Draws from the piecewise-linear density through ``weights`` on a uniform grid.

    Args:
        rng: a NumPy generator.
        weights: (G,) non-negative density values at ``origin + step * arange(G)``, giving
            ``num_samples`` draws; or (n, W), one draw per row, row i on the grid points
            ``offsets[i] + arange(W)`` (default offsets 0).
        origin, step: the grid.
        num_samples: number of draws when ``weights`` is 1-d.
        offsets: (n,) integer grid offsets of the rows.

    Returns:
        (num_samples,) or (n,) positions.
    """
    weights = np.atleast_2d(weights)
    left, right = weights[:, :-1], weights[:, 1:]
    cumulative = np.cumsum(0.5 * (left + right), axis=1)
    if np.any(cumulative[:, -1] <= 0):
        raise ValueError("A grid density has zero mass: the conditional is impossible on this grid.")
    if weights.shape[0] == 1 and num_samples is not None:
        targets = rng.uniform(0.0, cumulative[0, -1], size=num_samples)
        cell = np.minimum(np.searchsorted(cumulative[0], targets, side="right"), cumulative.shape[1] - 1)
        rows = np.zeros(num_samples, dtype=int)
    else:
        targets = rng.uniform(0.0, 1.0, size=weights.shape[0]) * cumulative[:, -1]
        cell = np.minimum((cumulative <= targets[:, None]).sum(axis=1), cumulative.shape[1] - 1)
        rows = np.arange(weights.shape[0])
    before = np.where(cell > 0, cumulative[rows, np.maximum(cell - 1, 0)], 0.0)
    target = np.clip(targets - before, 0.0, None)  # mass into the cell, in units of weight x step
    w_left, w_right = left[rows, cell], right[rows, cell]
    root = np.sqrt(np.clip(w_left**2 + 2.0 * (w_right - w_left) * target, 0.0, None))
    denominator = w_left + root
    fraction = np.where(denominator > 0, 2.0 * target / np.where(denominator > 0, denominator, 1.0), 0.0)
    start = 0 if offsets is None else offsets
    return origin + (start + cell + np.clip(fraction, 0.0, 1.0)) * step
