"""The score of the data from the network's noise prediction, and two helpers every sampler uses.

All tokens live in z-space; observed tokens are held at their values and the network sees
them as observed (:func:`~numpyro_simformer.diffusion.loss.network_input`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from numpyro_simformer.diffusion.loss import network_input

__all__ = ["build_score_fn", "initial_latent", "tweedie_denoise"]


def build_score_fn(denoiser_fn, sde):
    """``score_fn(params, x_t, time, condition_mask) -> score`` from the noise predictor.

    ``x_t``: (batch, num_tokens); ``time``: (batch,). The score of observed tokens is
    meaningless and should be ignored by callers.
    """

    def score_fn(params, x_t, time, condition_mask):
        _, sigma = sde.marginal(time)
        noise = denoiser_fn(params, network_input(sde, x_t, time, condition_mask), time, condition_mask)
        return -noise / sigma[..., None]

    return score_fn


def initial_latent(rng_key, sde, observed_values, condition_mask, num_samples):
    """Draw latent tokens from the prior at t = 1; observed tokens take their values."""
    noise = jax.random.normal(rng_key, (num_samples,) + observed_values.shape)
    return jnp.where(condition_mask, observed_values, noise * sde.prior_std())


def tweedie_denoise(score_fn, sde, params, x, time, condition_mask):
    """``E[x_0 | x_t]`` for latent tokens; observed tokens unchanged."""
    alpha, sigma = sde.marginal(time)
    score = score_fn(params, x, time, condition_mask)
    denoised = (x + sigma[..., None] ** 2 * score) / alpha[..., None]
    return jnp.where(condition_mask, x, denoised)
