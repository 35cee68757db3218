"""Draws restricted to the support: rejection for sites kept in their own coordinates.

Under ``interval_sites="reject"`` a site on a bounded interval is a token in its own
(z-scored) coordinates, so the network's distribution can put some mass outside the
interval. The answer is that distribution restricted to the support and renormalised,
as the prior itself restricts the posterior: draws with a latent token outside its bounds
are dropped and more are drawn until every observation has ``num_samples``.

Example:
    >>> draw = lambda key, n: jax.random.normal(key, (n, 1, 1))   # (draw, observation, token)
    >>> z, drawn, inside = draws_in_support(draw, jax.random.key(0), 100, np.zeros(1),
    ...                                     np.full(1, np.inf), np.ones((1, 1), bool))
"""

from __future__ import annotations

import math

import jax
import numpy as np

__all__ = ["inside_support", "draws_in_support", "SUPPORT_STREAM"]

# fold_in data of the keys of the extra rounds (and of log_prob's acceptance estimate)
SUPPORT_STREAM = 0x73757070


def inside_support(z, lower, upper, latent) -> np.ndarray:
    """bool (draw, observation): every latent token of the draw within its bounds.

    ``z``: (draw, observation, token); ``lower``/``upper``: (token,) in z-space;
    ``latent``: bool (observation, token). Observed tokens are not checked.
    """
    z = np.asarray(z)
    within = (z >= lower) & (z <= upper)
    return np.all(within | ~np.asarray(latent, dtype=bool), axis=-1)


def draws_in_support(draw, rng_key, num_samples: int, lower, upper, latent, *, max_draws_factor: int = 100,
                     describe=None):
    """``num_samples`` draws per observation inside the bounds, by rejection.

    Args:
        draw: ``draw(rng_key, n) -> (n, num_observations, num_tokens)`` z-space draws.
        rng_key: the first round draws with it (so a query with nothing rejected gives
            exactly the draws it gives without rejection); round ``r`` with
            ``fold_in(rng_key, SUPPORT_STREAM + r)``.
        num_samples: draws wanted per observation.
        lower, upper: float (num_tokens,) bounds in z-space (``-inf``/``inf``: none).
        latent: bool (num_observations, num_tokens), the tokens drawn (observed ones are
            never checked).
        max_draws_factor: give up after drawing this many times ``num_samples``.
        describe: optional ``describe(observation) -> str`` naming what was rejected, for
            the error message.

    Returns:
        ``(z, drawn, inside)``: z (num_samples, num_observations, num_tokens) as a numpy
        array; int arrays (num_observations,) of draws made and of draws inside.

    Raises:
        RuntimeError: when an observation's draws are inside too rarely to collect
            ``num_samples`` within ``max_draws_factor * num_samples`` draws.
    """
    z = np.asarray(draw(rng_key, num_samples))
    keep = inside_support(z, lower, upper, latent)
    kept = [z[keep[:, index], index] for index in range(z.shape[1])]
    drawn = np.full(z.shape[1], num_samples, dtype=np.int64)
    accepted = keep.sum(axis=0).astype(np.int64)
    round_index = 0
    while accepted.min() < num_samples:
        if drawn.max() >= max_draws_factor * num_samples or (accepted.min() == 0 and round_index > 0):
            worst = int(np.argmin(accepted / drawn))
            what = "" if describe is None else f" ({describe(worst)})"
            raise RuntimeError(
                f"Only {accepted[worst]} of {drawn[worst]} draws for observation {worst} lie inside the support"
                f"{what}: with interval_sites='reject', draws outside a bounded site's interval are redrawn, and "
                "the network puts too little of its mass inside. Check the observation against the simulations "
                "(is it one the model can produce?), train on more simulations, or use interval_sites='transform', "
                "which keeps every draw inside."
            )
        round_index += 1
        acceptance = max(accepted.min(), 1) / drawn[np.argmin(accepted)]
        deficit = num_samples - accepted.min()
        size = int(min(math.ceil(1.2 * deficit / acceptance) + 16, max_draws_factor * num_samples - drawn.max(),
                       10 * num_samples))
        more = np.asarray(draw(jax.random.fold_in(rng_key, SUPPORT_STREAM + round_index), max(size, 1)))
        keep = inside_support(more, lower, upper, latent)
        for index in range(more.shape[1]):
            if accepted[index] < num_samples:
                kept[index] = np.concatenate([kept[index], more[keep[:, index], index]])
        drawn += more.shape[0]
        accepted += keep.sum(axis=0)
    z = np.stack([part[:num_samples] for part in kept], axis=1)
    return z, drawn, accepted
