"""Tree and HMM: the paper's structured tasks, with exact references for any conditional.

- Tree: θ₀ ~ N(0, 1); θ₁, θ₂ ~ N(θ₀, 1); x₁ ~ N(sin²θ₁, 0.2²); x₂ ~ N(0.1 θ₁², 0.2²);
  x₃ ~ N(0.1 θ₂², 0.6²); x₄ ~ N(cos²θ₂, 0.1²). One scalar site each: ``theta_0``..``theta_2``,
  ``x_1``..``x_4`` (the paper's indices).
- HMM: θ₀ ~ N(0, 0.5²); θᵢ ~ N(θᵢ₋₁, 0.5²); xᵢ ~ N(θᵢ², 0.5²), i = 0..9. Sites ``theta_0``..
  ``theta_9`` then ``x_0``..``x_9``.

Both posteriors are strongly multimodal (x depends on θ through even and periodic
functions: the joint is invariant under θ -> -θ, and sin², cos² add modes π apart), which
NUTS chains do not cross. Both graphs are trees of scalar θ's with leaf x's, so exact
inference on a grid is cheap: belief propagation over a 1-d grid per θ (Gaussian
transitions as convolutions), then backward sampling with a piecewise-linear density per
cell, which makes the discretisation error second order in the grid step (0.01 here,
against posterior widths of 0.1 and more). Latent x's are leaves: drawn given θ.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.signal import fftconvolve

from numpyro_simformer.tasks._grid import normalise, numpy_rng, sample_grid
from numpyro_simformer.tasks.reference import Reflection
from numpyro_simformer.tasks.task import Task

__all__ = ["tree", "tree_model", "tree_conditional_sampler", "hmm", "hmm_model", "hmm_conditional_sampler"]

_GRID = np.linspace(-12.0, 12.0, 2401)
_STEP = float(_GRID[1] - _GRID[0])
_CHUNK = 1000

_TREE_LEAVES = {  # x site -> (θ site, mean function, std)
    "x_1": ("theta_1", lambda t: np.sin(t) ** 2, 0.2),
    "x_2": ("theta_1", lambda t: 0.1 * t**2, 0.2),
    "x_3": ("theta_2", lambda t: 0.1 * t**2, 0.6),
    "x_4": ("theta_2", lambda t: np.cos(t) ** 2, 0.1),
}
_HMM_LENGTH, _HMM_SCALE = 10, 0.5


def tree_model() -> None:
    """The Tree task as a NumPyro model (seven scalar sites)."""
    theta_0 = numpyro.sample("theta_0", dist.Normal(0.0, 1.0))
    theta_1 = numpyro.sample("theta_1", dist.Normal(theta_0, 1.0))
    theta_2 = numpyro.sample("theta_2", dist.Normal(theta_0, 1.0))
    numpyro.sample("x_1", dist.Normal(jnp.sin(theta_1) ** 2, 0.2))
    numpyro.sample("x_2", dist.Normal(0.1 * theta_1**2, 0.2))
    numpyro.sample("x_3", dist.Normal(0.1 * theta_2**2, 0.6))
    numpyro.sample("x_4", dist.Normal(jnp.cos(theta_2) ** 2, 0.1))


def hmm_model() -> None:
    """The HMM task as a NumPyro model (ten θ sites, then ten x sites)."""
    thetas, previous = [], 0.0
    for index in range(_HMM_LENGTH):
        previous = numpyro.sample(f"theta_{index}", dist.Normal(previous, _HMM_SCALE))
        thetas.append(previous)
    for index, theta in enumerate(thetas):
        numpyro.sample(f"x_{index}", dist.Normal(theta**2, _HMM_SCALE))


def _log_normal(value, loc, scale):
    return -0.5 * ((value - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def _smooth(weights, scale):
    """∫ N(g; g', scale²) w(g') dg' on the grid (up to a constant), as a convolution."""
    half = int(np.ceil(8 * scale / _STEP))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * _STEP / scale) ** 2)
    smoothed = np.clip(fftconvolve(weights, kernel, mode="same"), 0.0, None)
    return smoothed / smoothed.max()


def _sample_rows(rng, log_base: np.ndarray, locs: np.ndarray, scale: float) -> np.ndarray:
    """One draw per loc from exp(log_base(g)) N(loc; g, scale²), on a window of ±8 scale."""
    half = int(np.ceil(8 * scale / _STEP))
    window = np.arange(-half, half + 1)
    out = np.empty(len(locs))
    for start in range(0, len(locs), _CHUNK):
        chunk = locs[start : start + _CHUNK]
        offsets = np.rint((chunk - _GRID[0]) / _STEP).astype(int) - half
        index = offsets[:, None] + half + window
        inside = (index >= 0) & (index < len(_GRID))
        clipped = np.clip(index, 0, len(_GRID) - 1)
        log_weights = np.where(inside, log_base[clipped] + _log_normal(chunk[:, None], _GRID[clipped], scale), -np.inf)
        out[start : start + _CHUNK] = sample_grid(rng, normalise(log_weights), _GRID[0], _STEP, offsets=offsets)
    return out


def _scalar_observed(observed: Mapping[str, object], sites: tuple[str, ...]) -> dict[str, float]:
    values = {}
    for name, value in observed.items():
        if name not in sites:
            raise ValueError(f"observed names {name!r}, not a site of this task: {sites}.")
        array = np.asarray(value, dtype=np.float64)
        if array.shape != ():
            raise ValueError(f"observed[{name!r}] must be a scalar (the site is scalar), got shape {array.shape}.")
        if not np.isnan(array):
            values[name] = float(array)
    return values


def tree_conditional_sampler(rng_key, observed: Mapping[str, object], num_samples: int) -> dict[str, np.ndarray]:
    """Exact draws (to grid accuracy) from any conditional of the Tree task.

    Args:
        rng_key: a JAX PRNG key.
        observed: scalar site values, NaN or absent = latent.
        num_samples: number of draws.

    Returns:
        Dict site -> (num_samples,) for all seven sites, observed ones constant.
    """
    sites = tree().token_sites
    fixed = _scalar_observed(observed, sites)
    rng = numpy_rng(rng_key)
    leaf_log_likelihood = {"theta_1": np.zeros_like(_GRID), "theta_2": np.zeros_like(_GRID)}
    for leaf, (parent, mean_fn, scale) in _TREE_LEAVES.items():
        if leaf in fixed:
            leaf_log_likelihood[parent] += _log_normal(fixed[leaf], mean_fn(_GRID), scale)
    draws = {}
    if "theta_0" in fixed:
        draws["theta_0"] = np.full(num_samples, fixed["theta_0"])
    else:
        log_weights = _log_normal(_GRID, 0.0, 1.0)
        for child in ("theta_1", "theta_2"):
            if child in fixed:
                log_weights = log_weights + _log_normal(fixed[child], _GRID, 1.0)
            else:
                log_weights = log_weights + np.log(_smooth(normalise(leaf_log_likelihood[child]), 1.0) + 1e-300)
        draws["theta_0"] = sample_grid(rng, normalise(log_weights), _GRID[0], _STEP, num_samples)
    for child in ("theta_1", "theta_2"):
        if child in fixed:
            draws[child] = np.full(num_samples, fixed[child])
        else:
            draws[child] = _sample_rows(rng, leaf_log_likelihood[child], draws["theta_0"], 1.0)
    for leaf, (parent, mean_fn, scale) in _TREE_LEAVES.items():
        if leaf in fixed:
            draws[leaf] = np.full(num_samples, fixed[leaf])
        else:
            draws[leaf] = mean_fn(draws[parent]) + scale * rng.standard_normal(num_samples)
    return {name: draws[name] for name in sites}


def hmm_conditional_sampler(rng_key, observed: Mapping[str, object], num_samples: int) -> dict[str, np.ndarray]:
    """Exact draws (to grid accuracy) from any conditional of the HMM task.

    Forward filtering on the grid (θ's that are observed pass on their value), then
    backward sampling; latent x's are drawn given θ.

    Args:
        rng_key: a JAX PRNG key.
        observed: scalar site values, NaN or absent = latent.
        num_samples: number of draws.

    Returns:
        Dict site -> (num_samples,) for all twenty sites, observed ones constant.
    """
    sites = hmm().token_sites
    fixed = _scalar_observed(observed, sites)
    rng = numpy_rng(rng_key)
    filtered = []  # per step: grid weights, or None where θ is observed
    for step in range(_HMM_LENGTH):
        if f"theta_{step}" in fixed:
            filtered.append(None)
            continue
        if step == 0:
            log_prediction = _log_normal(_GRID, 0.0, _HMM_SCALE)
        elif filtered[step - 1] is None:
            log_prediction = _log_normal(_GRID, fixed[f"theta_{step - 1}"], _HMM_SCALE)
        else:
            log_prediction = np.log(_smooth(filtered[step - 1], _HMM_SCALE) + 1e-300)
        if f"x_{step}" in fixed:
            log_prediction = log_prediction + _log_normal(fixed[f"x_{step}"], _GRID**2, _HMM_SCALE)
        filtered.append(normalise(log_prediction))
    draws = {}
    for step in reversed(range(_HMM_LENGTH)):
        name = f"theta_{step}"
        if name in fixed:
            draws[name] = np.full(num_samples, fixed[name])
        elif step == _HMM_LENGTH - 1:
            draws[name] = sample_grid(rng, filtered[step], _GRID[0], _STEP, num_samples)
        else:
            log_filtered = np.log(filtered[step] + 1e-300)
            draws[name] = _sample_rows(rng, log_filtered, draws[f"theta_{step + 1}"], _HMM_SCALE)
    for step in range(_HMM_LENGTH):
        name = f"x_{step}"
        if name in fixed:
            draws[name] = np.full(num_samples, fixed[name])
        else:
            draws[name] = draws[f"theta_{step}"] ** 2 + _HMM_SCALE * rng.standard_normal(num_samples)
    return {name: draws[name] for name in sites}


def _sign_flip(sites: tuple[str, ...]) -> Reflection:
    return Reflection(sites, tuple(range(len(sites))), (-1.0,) * len(sites))


def tree() -> Task:
    """The Tree task: exact conditionals on a grid; NUTS twin = the model itself."""
    parameters = ("theta_0", "theta_1", "theta_2")
    return Task(
        name="tree",
        model=tree_model,
        parameter_sites=parameters,
        data_sites=("x_1", "x_2", "x_3", "x_4"),
        likelihood_model=tree_model,
        reflections=(_sign_flip(parameters),),
        exact_sampler=tree_conditional_sampler,
    )


def hmm() -> Task:
    """The HMM task: exact conditionals on a grid; NUTS twin = the model itself."""
    parameters = tuple(f"theta_{index}" for index in range(_HMM_LENGTH))
    return Task(
        name="hmm",
        model=hmm_model,
        parameter_sites=parameters,
        data_sites=tuple(f"x_{index}" for index in range(_HMM_LENGTH)),
        likelihood_model=hmm_model,
        reflections=(_sign_flip(parameters),),
        exact_sampler=hmm_conditional_sampler,
    )
