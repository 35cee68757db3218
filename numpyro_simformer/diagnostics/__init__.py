"""Diagnostics for simulation-based inference: two-sample tests, calibration, a check against MCMC."""

from numpyro_simformer.diagnostics.c2st import c2st, c2st_fast, c2st_null_std
from numpyro_simformer.diagnostics.calibration import coverage, rank_uniformity_pvalue, sbc, uniformity_test
from numpyro_simformer.diagnostics.mcmc_check import MCMCCheck, check_against_mcmc
from numpyro_simformer.diagnostics.plots import plot_coverage

__all__ = ["c2st", "c2st_fast", "c2st_null_std", "sbc", "coverage", "uniformity_test", "rank_uniformity_pvalue",
           "plot_coverage", "check_against_mcmc", "MCMCCheck"]
