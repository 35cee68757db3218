"""numpyro_simformer: all-in-one simulation-based inference for NumPyro models.

Write a simulator as a NumPyro model; :class:`Simformer` reads its sites and dependency
graph, simulates the joint, trains one transformer by denoising score matching, and
answers any conditional query as an ArviZ ``DataTree``.

The package's layers, each usable alone: ``model`` (reading a model into a
:class:`ModelSpec`, the element graph, simulation), ``tokens`` (layout and transforms),
``diffusion`` (SDEs, score, loss, condition masks), ``nn`` (the transformer), ``samplers``,
``training`` (configuration, loop, checkpoints, :func:`~numpyro_simformer.training.fit_state`),
``inference`` (queries, the sampling driver, log densities, the DataTree), ``io``
(save/load) and ``diagnostics``. :class:`Simformer` is the thin shell over them, holding one
:class:`FittedState`.
"""

__version__ = "0.2.0"

from numpyro_simformer.diffusion import VESDE, VPSDE, AbstractSDE, ConditionMaskDistribution, build_score_fn
from numpyro_simformer.ensemble import SimformerEnsemble
from numpyro_simformer.inference import ProbabilityFlowLogDensity, QuerySpace, build_sample_fn
from numpyro_simformer.model import (
    ModelOptions,
    ModelSpec,
    SimulationError,
    SimulationReport,
    Simulator,
    attention_mask,
    dependency_matrix,
    read_model_spec,
    read_simulations,
)
from numpyro_simformer.nn import NetworkConfig
from numpyro_simformer.samplers import (
    AbstractSampler,
    EDMHeun,
    EulerMaruyama,
    GuidedEulerMaruyama,
    ProbabilityFlowODE,
)
from numpyro_simformer.samplers.guidance import (
    AbstractIntervalGuidance,
    GaussianIntervalGuidance,
    SigmoidIntervalGuidance,
)
from numpyro_simformer.simformer import Simformer
from numpyro_simformer.training import FittedState, TrainingConfig

__all__ = [
    "__version__",
    "Simformer",
    "SimformerEnsemble",
    "FittedState",
    "ModelSpec",
    "ModelOptions",
    "read_model_spec",
    "Simulator",
    "SimulationReport",
    "SimulationError",
    "read_simulations",
    "dependency_matrix",
    "attention_mask",
    "NetworkConfig",
    "TrainingConfig",
    "ConditionMaskDistribution",
    "AbstractSDE",
    "VESDE",
    "VPSDE",
    "AbstractSampler",
    "EulerMaruyama",
    "ProbabilityFlowODE",
    "EDMHeun",
    "GuidedEulerMaruyama",
    "AbstractIntervalGuidance",
    "GaussianIntervalGuidance",
    "SigmoidIntervalGuidance",
    "ProbabilityFlowLogDensity",
    "QuerySpace",
    "build_score_fn",
    "build_sample_fn",
]
