"""The fitted state of a Simformer: one immutable value.

A :class:`FittedState` is everything a fitted Simformer knows: the :class:`ModelSpec` it
was read into, the token transform fitted to the simulations, the network's graph
definition, constants and trained parameters, the training history and the simulation
record. :class:`~numpyro_simformer.Simformer` holds one as ``sf.state``; checkpoints write
and read exactly this value; ensembles, diagnostics and benchmarks read it through its
public attributes. Its pure functions (:attr:`FittedState.denoiser_fn`,
:attr:`FittedState.score_fn`) are built once per state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import numpy as np

from numpyro_simformer.diffusion.score import build_score_fn
from numpyro_simformer.model.simulate import SimulationInfo
from numpyro_simformer.model.spec import ModelSpec
from numpyro_simformer.nn import NetworkConfig, SimformerNetwork, build_denoiser_fn
from numpyro_simformer.tokens.transforms import TokenTransform
from numpyro_simformer.training.loop import TrainingHistory

__all__ = ["FittedState", "describe_state", "network_config_for_spec", "network_for_spec", "spec_denoiser_fn"]


def network_config_for_spec(spec: ModelSpec, config: NetworkConfig) -> NetworkConfig:
    """``config`` with its depth fixed for ``spec``'s tokens (:meth:`NetworkConfig.for_tokens`).

    The tokens counted are the ones trained: the grouping's, or one per element of the
    layout at the fit's arguments.
    """
    grouping = spec.grouping
    return config.for_tokens(spec.layout.num_tokens if grouping is None else grouping.num_tokens)


def network_for_spec(spec: ModelSpec, config: NetworkConfig, rngs) -> SimformerNetwork:
    """A new :class:`SimformerNetwork` for ``spec``'s tokens: one per element, or the grouping's."""
    config = network_config_for_spec(spec, config)
    grouping = spec.grouping
    if grouping is None:
        return SimformerNetwork(spec.layout.num_nodes, config, variable_size=spec.variable_dims is not None,
                                rngs=rngs)
    return SimformerNetwork(grouping.num_tokens, config, slots=grouping.slots, rngs=rngs)


def spec_denoiser_fn(graphdef, constants, spec: ModelSpec):
    """:func:`~numpyro_simformer.nn.build_denoiser_fn` over ``spec``'s layout (and grouping)."""
    layout = spec.layout
    return build_denoiser_fn(graphdef, constants, layout.node_ids, layout.coordinates, spec.attention_mask,
                             grouping=spec.grouping)


@dataclass(frozen=True, eq=False)
class FittedState:
    """What a fit produced; immutable.

    Attributes:
        spec: the :class:`~numpyro_simformer.model.spec.ModelSpec` of the model at the fit's arguments.
        transform: the :class:`~numpyro_simformer.tokens.transforms.TokenTransform` (supports and z-scoring).
        network: the :class:`~numpyro_simformer.nn.NetworkConfig` of the network.
        sde: the diffusion the network was trained for.
        graphdef, constants, params: the network split by ``nnx.split(network, nnx.Param, ...)``;
            ``params`` are the trained (EMA) weights.
        history: the :class:`~numpyro_simformer.training.loop.TrainingHistory`.
        simulation_info: the :class:`~numpyro_simformer.model.simulate.SimulationInfo` of the training data.
        simulation_time, training_time: seconds spent simulating and training.
    """

    spec: ModelSpec
    transform: TokenTransform
    network: NetworkConfig
    sde: Any
    graphdef: Any
    constants: Any
    params: Any
    history: TrainingHistory
    simulation_info: SimulationInfo
    simulation_time: float = 0.0
    training_time: float = 0.0

    @cached_property
    def denoiser_fn(self):
        """Pure ``denoiser_fn(params, values, time, condition_mask, ...)`` over the spec's layout."""
        return spec_denoiser_fn(self.graphdef, self.constants, self.spec)

    @cached_property
    def score_fn(self):
        """Pure ``score_fn(params, x_t, time, condition_mask) -> score`` in z-space."""
        return build_score_fn(self.denoiser_fn, self.sde)


def describe_state(state: FittedState) -> list[tuple[str, str]]:
    """``(label, text)`` lines that say what a fit read and trained (``repr`` of a fitted Simformer)."""
    spec, history, info = state.spec, state.history, state.simulation_info
    sites = [(f"{site.name} {site.shape} {_support_text(spec.supports.get(site.name, site.support))}, "
              f"{'data' if site.name in spec.data_sites else 'parameter'}") for site in spec.layout.sites]
    grouping = spec.grouping
    num_elements = spec.layout.num_tokens
    if grouping is None:
        tokens = f"{num_elements:,}, one element each"
        mask = spec.attention_mask
    else:
        grouped = ", ".join(f"{name} {k} per token" for name, k in grouping.elements_per_token.items() if k > 1)
        tokens = f"{grouping.num_tokens:,} for {num_elements:,} elements ({grouped})"
        mask = grouping.attention_mask
    attention = spec.options.attention
    attention = attention if isinstance(attention, str) else "user mask"
    linked, pairs = int(np.asarray(mask).sum()), int(np.asarray(mask).size)
    config = state.network
    num_params = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(state.params))
    lines = [
        *(("sites" if index == 0 else "", site) for index, site in enumerate(sites)),
        ("tokens", tokens),
        ("attention", f"{attention}: {linked:,} of {pairs:,} token pairs may attend"),
        ("network", f"{_count(config.num_layers, 'layer')}, width {config.width}, {_count(config.num_heads, 'head')}, "
                    f"{num_params:,} parameters"),
        ("simulations", f"{info.num_valid:,} valid of {info.num_requested:,} ({info.num_invalid:,} with NaN or inf "
                        f"dropped) in {state.simulation_time:.1f} s"),
    ]
    if len(history.step):
        at = np.flatnonzero(np.asarray(history.step) == history.best_step)  # the weights kept
        best = int(at[0]) if at.size else int(np.argmin(history.validation_loss))
        stop = "stopped early (validation loss stalled)" if history.stopped_early else "not stopped early"
        lines.append(("training", f"{int(history.step[-1]):,} steps in {state.training_time:.0f} s, {stop}; "
                                  f"weights from step {int(history.step[best]):,} "
                                  f"(validation loss {float(history.validation_loss[best]):.4g})"))
    else:
        lines.append(("training", f"{state.training_time:.0f} s, no validation recorded"))
    return lines


def _support_text(support) -> str:
    """A support as NumPyro names it: ``real``, ``positive``, ``interval(0, 1)``."""
    from numpyro.distributions import constraints

    while isinstance(support, constraints.independent):  # the event dims are in the shape
        support = support.base_constraint
    for name in constraints.__all__:
        candidate = getattr(constraints, name, None)
        if isinstance(candidate, constraints.Constraint) and candidate is support:
            return name
    lower, upper = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
    if lower is not None and upper is not None and np.size(lower) == 1 and np.size(upper) == 1:
        return f"interval({float(lower):g}, {float(upper):g})"
    return type(support).__name__.lstrip("_")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")
