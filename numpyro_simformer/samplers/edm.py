"""Few-step sampling: the EDM schedule and Heun steps of Karras et al. (2022), for any SDE.

Idea. Divide the tokens by ``alpha(t)``: ``x_hat = x / alpha`` has the variance-exploding
marginal ``x_hat = x_0 + sigma_hat eps`` with noise level ``sigma_hat(t) = sigma(t) / alpha(t)``
(for the VE SDE, ``alpha = 1`` and ``sigma_hat = sigma``). In that variable the
probability-flow ODE is ``dx_hat / d sigma_hat = (x_hat - D(x_hat, sigma_hat)) / sigma_hat``
with the denoiser ``D = (x + sigma^2 s) / alpha`` (Tweedie), whose trajectories are nearly
straight lines. Karras et al. step it with Heun's method on the noise levels

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

``i = 0 .. N-1``, then ``sigma_N = 0``: the last step is a plain Euler step to zero noise,
which is exactly the Tweedie denoising. That is ``2 N - 1`` network evaluations for ``N``
noise levels. Each noise level is mapped back to the SDE's time ``t(sigma_hat)`` (by
bisection, since ``sigma_hat`` increases with t), which is what the network was trained on.

Example:
    >>> sampler = EDMHeun(num_steps=13)       # 25 network evaluations per sample
    >>> sampler.network_evaluations
    25
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer.samplers.base import AbstractSampler
from numpyro_simformer.diffusion.score import initial_latent

__all__ = ["EDMHeun", "edm_noise_levels", "time_of_noise_level"]


def _noise_level(sde, time):
    alpha, sigma = sde.marginal(time)
    return sigma / alpha


def time_of_noise_level(sde, noise_level, *, num_iterations: int = 60):
    """The time t in ``[t_min, 1]`` with ``sigma(t) / alpha(t) == noise_level`` (bisection in t).

    Args:
        sde: the forward SDE; ``sigma(t) / alpha(t)`` must increase with t (true for VE and VP).
        noise_level: array of noise levels, clipped to the SDE's range.

    Returns:
        an array of times, same shape as ``noise_level``.
    """
    noise_level = jnp.asarray(noise_level, dtype=jnp.float32)
    low = jnp.full(noise_level.shape, sde.t_min, dtype=jnp.float32)
    high = jnp.ones(noise_level.shape, dtype=jnp.float32)

    def body(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        above = _noise_level(sde, middle) >= noise_level
        return jnp.where(above, low, middle), jnp.where(above, middle, high)

    low, high = jax.lax.fori_loop(0, num_iterations, body, (low, high))
    return 0.5 * (low + high)


def edm_noise_levels(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s ``num_steps`` noise levels from ``sigma_max`` down to ``sigma_min``, then 0.

    Returns:
        float array (num_steps + 1,), decreasing, last entry 0.
    """
    if num_steps == 1:
        return np.array([sigma_max, 0.0])
    ramp = np.linspace(0.0, 1.0, num_steps)
    inverse_rho = 1.0 / rho
    levels = (sigma_max**inverse_rho + ramp * (sigma_min**inverse_rho - sigma_max**inverse_rho)) ** rho
    return np.append(levels, 0.0)


@dataclass(frozen=True)
class EDMHeun(AbstractSampler):
    """Deterministic Heun steps on Karras et al.'s noise schedule: ``2 num_steps - 1`` evaluations.

    Attributes:
        num_steps: number of noise levels ``N`` (the last step, to zero noise, is the
            Tweedie denoising).
        rho: the schedule's exponent; larger values put more levels at small noise
            (Karras et al. use 7).
        sigma_min, sigma_max: the schedule's ends as noise levels ``sigma / alpha``;
            ``None`` (default) takes the SDE's range ``sigma_hat(t_min)``, ``sigma_hat(1)``.
        churn: Karras et al.'s ``S_churn``. 0 (default): deterministic. Above 0, before each
            step the noise is raised from ``sigma_i`` to ``(1 + gamma) sigma_i`` with fresh
            noise, ``gamma = min(churn / num_steps, sqrt(2) - 1)`` (not above the SDE's
            ``sigma_max``): a stochastic sampler that corrects some of the score's errors,
            at the same number of network evaluations.
    """

    num_steps: int = 13
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    churn: float = 0.0

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"EDMHeun.num_steps must be a positive integer, got {self.num_steps}.")
        if self.rho <= 0:
            raise ValueError(f"EDMHeun.rho must be positive, got {self.rho}.")
        if self.churn < 0:
            raise ValueError(f"EDMHeun.churn must be 0 or more, got {self.churn}.")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"EDMHeun.{name} must be positive or None, got {value}.")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(
                f"EDMHeun needs sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}."
            )

    @property
    def network_evaluations(self) -> int:
        return 2 * self.num_steps - 1

    def noise_levels(self, sde) -> np.ndarray:
        """The schedule for ``sde``: (num_steps + 1,) noise levels ``sigma / alpha``, last 0."""
        sigma_min = float(_noise_level(sde, sde.t_min)) if self.sigma_min is None else self.sigma_min
        sigma_max = float(_noise_level(sde, 1.0)) if self.sigma_max is None else self.sigma_max
        return edm_noise_levels(self.num_steps, sigma_min, sigma_max, self.rho)

    def build(self, score_fn, sde):
        """A pure ``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``.

        ``observed_values``, ``condition_mask``: (num_tokens,) in z-space; returns
        (num_samples, num_tokens) in z-space. ``num_samples`` must be static under jit.
        """
        levels = self.noise_levels(sde)
        gamma = min(self.churn / self.num_steps, math.sqrt(2.0) - 1.0)
        raised = levels[:-1] * (1.0 + gamma)
        raised = np.where(raised <= levels[0] * (1 + 1e-6), raised, levels[:-1])  # stay in the trained range
        extra_noise = jnp.asarray(np.sqrt(np.maximum(raised**2 - levels[:-1] ** 2, 0.0)), dtype=jnp.float32)
        levels = jnp.asarray(levels, dtype=jnp.float32)
        raised = jnp.asarray(raised, dtype=jnp.float32)
        level_times = time_of_noise_level(sde, levels[:-1])
        raised_times = time_of_noise_level(sde, raised)
        num_steps, stochastic = self.num_steps, gamma > 0

        def denoise(params, x_hat, time, observed, mask):
            """``D(x_hat, sigma_hat(time))`` in the scaled variable; observed tokens unchanged."""
            alpha, sigma = sde.marginal(time)
            x = jnp.where(mask, observed, alpha * x_hat)
            score = score_fn(params, x, jnp.full(x.shape[:-1], time), mask)
            return jnp.where(mask, observed, (x + sigma**2 * score) / alpha)

        def sample_fn(rng_key, params, observed_values, condition_mask, num_samples):
            key_init, key_churn = jax.random.split(rng_key) if stochastic else (rng_key, None)
            x = initial_latent(key_init, sde, observed_values, condition_mask, num_samples)
            mask = jnp.broadcast_to(condition_mask, x.shape)
            observed = jnp.broadcast_to(observed_values, x.shape)
            x_hat = jnp.where(mask, observed, x / sde.marginal(level_times[0])[0])
            keys = jax.random.split(key_churn, num_steps) if stochastic else jnp.zeros(num_steps)

            def churn(x_hat, index, key):
                """Raise the noise from sigma_i to (1 + gamma) sigma_i with fresh noise (Karras et al.)."""
                if not stochastic:
                    return x_hat
                noise = jax.random.normal(key, x_hat.shape)
                return jnp.where(mask, observed, x_hat + extra_noise[index] * noise)

            def heun_step(x_hat, inputs):
                index, key = inputs
                x_hat = churn(x_hat, index, key)
                level, level_next = raised[index], levels[index + 1]
                slope = (x_hat - denoise(params, x_hat, raised_times[index], observed, mask)) / level
                x_euler = x_hat + (level_next - level) * slope
                slope_next = (x_euler - denoise(params, x_euler, level_times[index + 1], observed, mask)) / level_next
                x_next = x_hat + (level_next - level) * 0.5 * (slope + slope_next)
                return jnp.where(mask, observed, x_next), None

            x_hat, _ = jax.lax.scan(heun_step, x_hat, (jnp.arange(num_steps - 1), keys[:-1]))
            # Euler step to zero noise: x_hat + (0 - s) (x_hat - D) / s = D.
            x_hat = churn(x_hat, num_steps - 1, keys[-1])
            return denoise(params, x_hat, raised_times[num_steps - 1], observed, mask)

        return sample_fn
