"""Denoising score matching on the latent tokens of one example, vmapped at the edge.

With ``x_t = alpha(t) x_0 + sigma(t) eps`` and the score parametrised as
``s = -eps_hat / sigma(t)``, the sigma(t)^2-weighted score-matching loss is the plain
noise-prediction loss ``|eps_hat - eps|^2``. Observed tokens stay clean and are left out.

Latent discrete elements can be dequantized: each example's integer ``x`` becomes
``x + DEQUANTIZATION_SD * e`` with ``e ~ N(0, 1)`` drawn afresh, so the network learns a
smooth density (a narrow bump at each integer, weighted by its probability) instead of the
scores of point masses, which grow without bound as the noise vanishes and dominate the
loss. Rounding a draw returns the integer it stands for, wrongly with probability
``P(|e| > 4) = 6e-5`` per element. Observed discrete elements stay exact integers, as a
query gives them, so conditioning on them asks the discrete model's question.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DEQUANTIZATION_SD", "noise_example", "example_loss", "dequantize_example", "build_example_losses_fn",
           "batch_loss", "network_input"]


def network_input(sde, values, time, condition_mask):
    """Scale latent tokens to unit variance (EDM's c_in); observed tokens pass unchanged.

    For z-scored data, ``x_t`` has variance ``alpha^2 + sigma^2``.
    """
    alpha, sigma = sde.marginal(time)
    scale = jax.lax.rsqrt(alpha**2 + sigma**2)
    return jnp.where(condition_mask, values, values * scale[..., None])


def noise_example(rng_key, sde, x0, condition_mask):
    """Draw ``t`` and ``eps``; return the noised tokens ``x_t`` (observed ones clean)."""
    key_time, key_noise = jax.random.split(rng_key)
    time = jax.random.uniform(key_time, (), minval=sde.t_min, maxval=1.0)
    noise = jax.random.normal(key_noise, x0.shape)
    alpha, sigma = sde.marginal(time)
    x_t = jnp.where(condition_mask, x0, alpha * x0 + sigma * noise)
    return x_t, time, noise


# Standard deviation of the dequantization noise, in units of the integers' spacing: an
# eighth, so that rounding undoes it except 4 standard deviations out (6e-5 of draws).
# Measured on 12 Bernoulli trials (Beta-Bernoulli, 6,000 steps; `docs/benchmarks.md`):
# posterior C2ST 0.509 (1/8), 0.508 (1/5), 0.541 (uniform over the unit bin), 0.561 on the
# integers themselves.
DEQUANTIZATION_SD = 0.125


def dequantize_example(rng_key, x0, widths):
    """``x0 + widths * DEQUANTIZATION_SD * e``, ``e ~ N(0, 1)`` per element; ``widths`` is
    the integers' unit spacing in z-space (``1 / std``) for discrete elements, 0 elsewhere."""
    return x0 + widths * DEQUANTIZATION_SD * jax.random.normal(rng_key, x0.shape, x0.dtype)


def example_loss(predicted_noise, noise, condition_mask, element_weights=None):
    """Squared error on latent tokens, averaged over all tokens of the example.

    ``element_weights``: optional (num_elements,) weights of a grouped layout, ``1 / k``
    for an element of a token of ``k`` elements, so that each token, not each element,
    counts once (as with one element per token); the sum is divided by the token count.
    """
    latent = ~condition_mask
    if element_weights is None:
        return jnp.sum(jnp.where(latent, (predicted_noise - noise) ** 2, 0.0)) / latent.size
    squared = element_weights * (predicted_noise - noise) ** 2
    return jnp.sum(jnp.where(latent, squared, 0.0)) / jnp.sum(element_weights)


def build_example_losses_fn(denoiser_fn, sde, element_weights=None, dequantize=None):
    """``losses(params, keys, x0, condition_mask, structure=None) -> (batch,)``: one loss per example.

    ``keys`` holds one key per example (its time and noise), so a batch scored in pieces
    with the matching pieces of ``keys`` gives the losses of the whole batch scored at once.
    ``structure``: optional per-example ``(coordinates, attention_mask, present)`` passed
    to the denoiser (training on random subsets of variable-size dims).
    ``element_weights``: as in :func:`example_loss` (a grouped layout's tokens count once).
    ``dequantize``: optional (num_elements,) unit spacings in z-space, nonzero for discrete
    elements: their latent values are dequantized (:func:`dequantize_example`; its draw comes
    from a key folded out of the example's, so the time and noise are those of a run without).
    """
    if element_weights is not None:
        element_weights = jnp.asarray(element_weights, dtype=jnp.float32)
    if dequantize is not None:
        dequantize = jnp.asarray(dequantize, dtype=jnp.float32)

    def losses(params, keys, x0, condition_mask, structure=None):
        if dequantize is not None:  # latent elements only: queries condition on exact integers
            spread = jax.vmap(lambda key, x: dequantize_example(jax.random.fold_in(key, 1), x, dequantize))(keys, x0)
            x0 = jnp.where(condition_mask, x0, spread)
        x_t, time, noise = jax.vmap(lambda key, x, mask: noise_example(key, sde, x, mask))(
            keys, x0, condition_mask
        )
        extra = {} if structure is None else dict(zip(("coordinates", "attention_mask", "present"), structure))
        predicted = denoiser_fn(params, network_input(sde, x_t, time, condition_mask), time, condition_mask, **extra)
        return jax.vmap(lambda p, n, m: example_loss(p, n, m, element_weights))(predicted, noise, condition_mask)

    return losses


def batch_loss(example_losses_fn):
    """``loss_fn(params, rng_key, x0, condition_mask, structure=None) -> scalar``: the
    batch mean of ``example_losses_fn``, one key per example split from ``rng_key``."""

    def loss_fn(params, rng_key, x0, condition_mask, structure=None):
        keys = jax.random.split(rng_key, x0.shape[0])
        return jnp.mean(example_losses_fn(params, keys, x0, condition_mask, structure))

    return loss_fn
