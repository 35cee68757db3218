"""Reading a NumPyro model: sites, the element-level graph, simulation, variable-size dims.

:func:`read_model_spec` reads a model once into a frozen :class:`ModelSpec`; everything else
in the library takes the spec.
"""

from numpyro_simformer.model.executors import ChunkReport, SimulationError, SimulationReport, simulate_chunks
from numpyro_simformer.model.graph import attention_mask, dependency_matrix, element_parents
from numpyro_simformer.model.simulate import SimulationInfo, simulate
from numpyro_simformer.model.simulation_store import SimulationDirectoryError, read_simulations
from numpyro_simformer.model.simulator import Simulator
from numpyro_simformer.model.sites import SiteInfo, read_sites, trace_model
from numpyro_simformer.model.spec import ModelOptions, ModelSpec, read_model_spec

__all__ = [
    "ModelOptions",
    "ModelSpec",
    "read_model_spec",
    "SiteInfo",
    "read_sites",
    "trace_model",
    "element_parents",
    "dependency_matrix",
    "attention_mask",
    "simulate",
    "SimulationInfo",
    "simulate_chunks",
    "SimulationReport",
    "ChunkReport",
    "SimulationError",
    "SimulationDirectoryError",
    "read_simulations",
    "Simulator",
]
