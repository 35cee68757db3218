"""Condition masks for training: which tokens are observed in each training example.

A condition mask is a bool array (num_tokens,), True where the token is observed. During
training each example draws its own mask from a mixture (the paper's "structured
random"): the joint (nothing observed), the posterior (all data observed), the likelihood
(all parameters observed), and Bernoulli masks. An all-observed draw becomes the joint,
since it leaves nothing to learn.

The attention masks derived from the model's graph live in :mod:`numpyro_simformer.model.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ConditionMaskDistribution", "sample_condition_mask"]


@dataclass(frozen=True)
class ConditionMaskDistribution:
    """Mixture over condition masks used in training.

    Attributes:
        joint, posterior, likelihood: weights of the three structured masks.
        bernoulli: weights of the Bernoulli masks, one per entry of ``bernoulli_rates``.
        bernoulli_rates: probability that a token is observed under each Bernoulli mask.
    """

    joint: float = 0.2
    posterior: float = 0.2
    likelihood: float = 0.2
    bernoulli: tuple[float, ...] = (0.2, 0.2)
    bernoulli_rates: tuple[float, ...] = (0.3, 0.7)

    def __post_init__(self):
        # Tuples, whatever sequence was given: the distribution is a static (hashed) jit argument.
        for name in ("bernoulli", "bernoulli_rates"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        weights = self.weights
        if len(self.bernoulli) != len(self.bernoulli_rates):
            raise ValueError(
                "ConditionMaskDistribution needs one weight per Bernoulli rate: got "
                f"bernoulli={self.bernoulli} and bernoulli_rates={self.bernoulli_rates}."
            )
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"ConditionMaskDistribution weights must be >= 0 and not all 0, got {weights}.")
        if any(not 0 <= rate <= 1 for rate in self.bernoulli_rates):
            raise ValueError(f"bernoulli_rates must lie in [0, 1], got {self.bernoulli_rates}.")

    @property
    def weights(self) -> np.ndarray:
        return np.array([self.joint, self.posterior, self.likelihood, *self.bernoulli], dtype=np.float32)


def sample_condition_mask(rng_key, data_mask, distribution: ConditionMaskDistribution):
    """Draw one condition mask.

    Args:
        rng_key: a JAX PRNG key.
        data_mask: bool (num_tokens,), True for data tokens (sites without children).
        distribution: the mixture to draw from.

    Returns:
        bool (num_tokens,), True where observed; never all True.
    """
    key_choice, key_bernoulli = jax.random.split(rng_key)
    data_mask = jnp.asarray(data_mask, dtype=bool)
    weights = jnp.asarray(distribution.weights)
    choice = jax.random.choice(key_choice, weights.shape[0], p=weights / weights.sum())
    rates = jnp.asarray(distribution.bernoulli_rates, dtype=jnp.float32)
    bernoulli_masks = jax.random.uniform(key_bernoulli, (rates.shape[0],) + data_mask.shape) < rates[:, None]
    candidates = jnp.concatenate(
        [jnp.stack([jnp.zeros_like(data_mask), data_mask, ~data_mask]), bernoulli_masks]
    )
    mask = candidates[choice]
    return jnp.where(jnp.all(mask), jnp.zeros_like(mask), mask)
