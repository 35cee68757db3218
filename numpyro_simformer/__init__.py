"""numpyro_simformer: all-in-one simulation-based inference for NumPyro models.

Write a simulator as a NumPyro model; :class:`Simformer` reads its sites and dependency
graph, simulates the joint, trains one transformer by denoising score matching, and
answers any conditional query as an ArviZ ``DataTree``.
"""

__version__ = "0.1.0"

from numpyro_simformer.graph import attention_mask, dependency_matrix
from numpyro_simformer.masks import ConditionMaskDistribution
from numpyro_simformer.nn import NetworkConfig
from numpyro_simformer.density import ProbabilityFlowLogDensity
from numpyro_simformer.samplers import EDMHeun, EulerMaruyama, GuidedEulerMaruyama, ProbabilityFlowODE
from numpyro_simformer.sde import VESDE, VPSDE
from numpyro_simformer.simformer import Simformer
from numpyro_simformer.simulator import Simulator
from numpyro_simformer.ensemble import SimformerEnsemble
from numpyro_simformer.train import TrainingConfig

__all__ = [
    "__version__",
    "Simformer",
    "SimformerEnsemble",
    "Simulator",
    "dependency_matrix",
    "attention_mask",
    "NetworkConfig",
    "TrainingConfig",
    "ConditionMaskDistribution",
    "EulerMaruyama",
    "ProbabilityFlowODE",
    "EDMHeun",
    "GuidedEulerMaruyama",
    "ProbabilityFlowLogDensity",
    "VESDE",
    "VPSDE",
]
