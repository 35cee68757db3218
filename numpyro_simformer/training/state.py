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

from numpyro_simformer.diffusion.score import build_score_fn
from numpyro_simformer.model.simulate import SimulationInfo
from numpyro_simformer.model.spec import ModelSpec
from numpyro_simformer.nn import NetworkConfig, SimformerNetwork, build_denoiser_fn
from numpyro_simformer.tokens.transforms import TokenTransform
from numpyro_simformer.training.loop import TrainingHistory

__all__ = ["FittedState", "network_config_for_spec", "network_for_spec", "spec_denoiser_fn"]


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
