"""From simulations to a :class:`~numpyro_simformer.training.state.FittedState`.

:func:`fit_state` is the whole fit after simulation, as one function of its inputs:
tokenise the simulations, fit the token transform (supports and z-scoring), build the
network, train it, and return the immutable fitted state. The simulation table stays on
the host: the device sees batches (or the table once, when it is small enough to keep
there, ``TrainingConfig.stream_data``).
"""

from __future__ import annotations

import ctypes
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_simformer.diffusion.loss import build_example_losses_fn
from numpyro_simformer.diffusion.masks import ConditionMaskDistribution
from numpyro_simformer.model.simulate import SimulationInfo
from numpyro_simformer.model.spec import ModelSpec
from numpyro_simformer.model.variable import Subsampler
from numpyro_simformer.nn import NetworkConfig
from numpyro_simformer.training.state import FittedState, network_config_for_spec, network_for_spec, spec_denoiser_fn
from numpyro_simformer.tokens.transforms import (DISCRETE_SITES, dequantization_widths, integer_valued_sites,
                                                 tokens_to_z)
from numpyro_simformer.training.loop import TrainingConfig, train

__all__ = ["fit_state", "FEW_SIMULATIONS"]

# Below this many valid simulations fit warns: statistics and validation from a handful of rows.
FEW_SIMULATIONS = 100


def fit_state(rng_key, spec: ModelSpec, draws: dict[str, np.ndarray], info: SimulationInfo, *,
              network: NetworkConfig, sde, training: TrainingConfig, condition_masks: ConditionMaskDistribution,
              interval_sites: str = "transform", discrete_sites: str = "dequantize", points_per_dim: int = 20,
              progress_bar: bool = False, simulation_time: float = 0.0) -> FittedState:
    """Train a Simformer on ``draws`` of ``spec``'s token sites.

    Args:
        rng_key: a JAX PRNG key (network initialisation and training).
        spec: the model's :class:`~numpyro_simformer.model.spec.ModelSpec`.
        draws: ``{site: array (num_simulations, *site shape)}``, finite rows only. Emptied
            once tokenised (the caller's dict too), so that the host holds one copy.
        info: the :class:`SimulationInfo` of the draws.
        network, sde, training, condition_masks, interval_sites, discrete_sites, points_per_dim:
            as the :class:`~numpyro_simformer.Simformer` arguments of those names.
        progress_bar: a training progress bar.
        simulation_time: seconds spent simulating (recorded in the state).

    Raises:
        RuntimeError: when no simulation is finite.
    """
    if info.num_valid == 0:
        raise RuntimeError(
            f"All {info.num_requested} simulations contained NaN or inf; there is nothing "
            "to train on. Check the simulator (and its priors) for values it cannot handle."
        )
    if info.num_invalid:
        warnings.warn(f"{info.num_invalid} of {info.num_requested} simulations contained NaN or inf and were dropped.",
                      stacklevel=3)
    layout = spec.layout
    if discrete_sites not in DISCRETE_SITES:
        raise ValueError(f"`discrete_sites` must be one of {DISCRETE_SITES}, got {discrete_sites!r}.")
    data = layout.flatten_host(draws)  # the draws are handed over site by site
    draws.clear()
    _warn_integer_valued(layout, data)
    variable_size = spec.variable_dims is not None
    transform, finite = tokens_to_z(layout, data, spec.supports, pool_nodes=variable_size,
                                    interval_sites=interval_sites)
    _release_freed_memory()  # the simulation's chunks and per-site arrays, freed above
    if not finite.all():  # on a support's boundary: counted as invalid (tokens_to_z warns)
        data = data[finite]
        info = info._replace(num_valid=int(finite.sum()), num_invalid=info.num_invalid + int((~finite).sum()))
    if data.shape[0] < FEW_SIMULATIONS:
        held_out = training.num_validation(data.shape[0])
        warnings.warn(
            f"Training on only {data.shape[0]} valid simulations: the z-scoring statistics come "
            f"from them and {held_out} are held out for validation"
            f"{' (none: training never stops early)' if held_out == 0 else ''}. Answers from so few "
            f"are rough; raise `num_simulations` (a few hundred at least, thousands for most models).",
            stacklevel=3,
        )
    key_init, key_train = jax.random.split(rng_key)
    network = network_config_for_spec(spec, network)  # the default depth follows the token count
    graphdef, params, constants = nnx.split(network_for_spec(spec, network, nnx.Rngs(params=key_init)), nnx.Param, ...)
    denoiser_fn = spec_denoiser_fn(graphdef, constants, spec)
    subsample, data_mask, trained = None, spec.data_mask, transform
    if variable_size:  # train on random subsets: the subset's node ids
        subsample = Subsampler.build(layout, spec.variable_dims, spec.attention_mask, points_per_dim)
        data_mask = spec.data_mask_of(subsample.template)
        denoiser_fn = functools.partial(denoiser_fn, node_ids=jnp.asarray(subsample.template.node_ids))
        trained = transform.on_layout(subsample.template)  # a subset's positions: their nodes' statistics
    dequantize = dequantization_widths(trained) if discrete_sites == "dequantize" else None
    tag = (layout.labels, network, variable_size, sde, np.packbits(spec.attention_mask).tobytes(),
           points_per_dim, None if spec.grouping is None else spec.grouping.members.tobytes())
    if dequantize is not None:  # runs without discrete sites keep their fingerprints
        tag += ("dequantize",)
    start = time.perf_counter()
    params, history = train(
        key_train, build_example_losses_fn(denoiser_fn, sde, _token_weights(spec.grouping), dequantize), params,
        data, data_mask, training, condition_masks, progress_bar=progress_bar, checkpoint_tag=repr(tag),
        subsample=subsample,
    )
    return FittedState(spec=spec, transform=transform, network=network, sde=sde, graphdef=graphdef,
                       constants=constants, params=params, history=history, simulation_info=info,
                       simulation_time=simulation_time, training_time=time.perf_counter() - start)


def _warn_integer_valued(layout, data) -> None:
    """Warn about continuous sites whose every simulated value is an integer."""
    found = integer_valued_sites(layout, data)
    if found:
        warnings.warn(
            f"Every simulated value of {', '.join(map(repr, found))} is an integer ({data.shape[0]} simulations), "
            "but the site's support is continuous, so the network learns point masses, which can cost much "
            "accuracy on every query. If the site is discrete, declare it: a discrete distribution, or "
            "`Simulator(..., support=constraints.boolean)` (or `nonnegative_integer`, "
            "`integer_interval(a, b)`); a discrete site's integers are blurred by narrow Gaussian noise "
            "in training (`discrete_sites='dequantize'`) and returned as integers.",
            stacklevel=4,
        )


def _token_weights(grouping):
    """``1 / k`` per element of a token of ``k`` elements (``None`` without grouping).

    With these weights the loss averages over tokens, as with one element per token: a site
    of 200 elements in 20 tokens weighs as 20 tokens beside a parameter's 4, not as 200.
    """
    if grouping is None:
        return None
    members = np.asarray(grouping.members)
    weights = np.zeros(grouping.num_elements, np.float32)
    for row in members:
        row = row[row >= 0]
        weights[row] = 1.0 / len(row)
    return weights


def _release_freed_memory() -> None:
    """Hand memory freed on the heap back to the operating system (glibc's ``malloc_trim``).

    Simulation frees thousands of chunk-sized arrays; glibc keeps such memory in its heap,
    where it counts in the process's RSS for the rest of the fit (about 0.6x the token
    table at 10^6 simulations, measured by ``benchmarks/parallel.py``). Elsewhere than
    glibc this does nothing.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
