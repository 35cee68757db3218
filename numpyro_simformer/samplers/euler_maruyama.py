"""Reverse-time SDE sampler (Euler–Maruyama) with observed tokens held fixed.

All tokens live in z-space. Latent tokens start from the SDE's prior at t = 1 and follow
``dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) dW`` backwards to ``t_min``; observed tokens
are clamped to their values at every step (zero drift and diffusion) and the network sees
them as observed. A final Tweedie step ``x_0 = (x + sigma^2 s) / alpha`` removes the last
bit of noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from numpyro_simformer.diffusion.score import initial_latent, tweedie_denoise
from numpyro_simformer.samplers.base import AbstractSampler

__all__ = ["EulerMaruyama"]


@dataclass(frozen=True)
class EulerMaruyama(AbstractSampler):
    """Euler–Maruyama on the reverse SDE, ``num_steps`` uniform steps in t.

    ``num_steps`` network evaluations per sample (plus one for the final denoising).
    The reference uses 500 steps; the notes measured 100 matching 500 once the network
    is trained (at a fifth of the cost).
    """

    num_steps: int = 100
    final_denoise: bool = True

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"EulerMaruyama.num_steps must be positive, got {self.num_steps}.")

    @property
    def network_evaluations(self) -> int:
        return self.num_steps + int(self.final_denoise)

    def build(self, score_fn, sde):
        """A pure ``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``.

        ``observed_values``, ``condition_mask``: (num_tokens,) in z-space; returns
        (num_samples, num_tokens) in z-space. ``num_samples`` must be static under jit.
        """
        times = jnp.linspace(1.0, sde.t_min, self.num_steps + 1)

        def sample_fn(rng_key, params, observed_values, condition_mask, num_samples):
            key_init, key_steps = jax.random.split(rng_key)
            x = initial_latent(key_init, sde, observed_values, condition_mask, num_samples)
            mask = jnp.broadcast_to(condition_mask, x.shape)

            def step(x, inputs):
                t, t_next, key = inputs
                dt = t_next - t
                time = jnp.full((num_samples,), t)
                score = score_fn(params, x, time, mask)
                g = sde.diffusion(t)
                drift = sde.drift_coefficient(t) * x - g**2 * score
                noise = jax.random.normal(key, x.shape)
                x_next = x + drift * dt + g * jnp.sqrt(-dt) * noise
                return jnp.where(mask, x, x_next), None

            keys = jax.random.split(key_steps, self.num_steps)
            x, _ = jax.lax.scan(step, x, (times[:-1], times[1:], keys))
            if self.final_denoise:
                x = tweedie_denoise(score_fn, sde, params, x, jnp.full((num_samples,), times[-1]), mask)
            return x

        return sample_fn
