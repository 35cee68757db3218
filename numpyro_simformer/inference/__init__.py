"""Answering queries: validation and conversion, the sampling driver, log densities, the DataTree."""

from numpyro_simformer.inference.density import ProbabilityFlowLogDensity
from numpyro_simformer.inference.driver import QuerySpace, build_sample_fn, draw_z
from numpyro_simformer.inference.query import Query, build_query

__all__ = ["Query", "build_query", "QuerySpace", "build_sample_fn", "draw_z", "ProbabilityFlowLogDensity"]
