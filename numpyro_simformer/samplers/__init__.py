"""Samplers: reverse-time SDE and (later) probability-flow ODE solvers over latent tokens.

A sampler is a frozen dataclass with a ``build(score_fn, sde)`` method that returns a pure
``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``.
"""

from numpyro_simformer.samplers.euler_maruyama import EulerMaruyama, build_score_fn

__all__ = ["EulerMaruyama", "build_score_fn"]
