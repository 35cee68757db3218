"""Samplers: reverse-time SDE and probability-flow ODE solvers over latent tokens.

A sampler is a frozen dataclass subclassing :class:`AbstractSampler`, with a ``build(score_fn, sde)`` method that returns a pure
``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``, and a
``network_evaluations`` property (per sample; ``None`` where it varies).

- :class:`EulerMaruyama`: the reverse SDE (the paper's sampler).
- :class:`ProbabilityFlowODE`: the probability-flow ODE with a diffrax solver, fixed or
  adaptive steps.
- :class:`EDMHeun`: few-step Heun on Karras et al.'s noise schedule.
- :class:`GuidedEulerMaruyama`: Euler–Maruyama with resampling, the default for interval
  conditions (:mod:`numpyro_simformer.samplers.guidance`).
"""

from numpyro_simformer.samplers.edm import EDMHeun
from numpyro_simformer.samplers.base import AbstractSampler
from numpyro_simformer.samplers.euler_maruyama import EulerMaruyama
from numpyro_simformer.samplers.guidance import GaussianIntervalGuidance, GuidedEulerMaruyama, SigmoidIntervalGuidance
from numpyro_simformer.samplers.ode import ProbabilityFlowODE

__all__ = [
    "EulerMaruyama",
    "ProbabilityFlowODE",
    "EDMHeun",
    "GuidedEulerMaruyama",
    "GaussianIntervalGuidance",
    "SigmoidIntervalGuidance",
    "AbstractSampler",
]
