"""Linear Gaussian and Gaussian Mixture: sbibm's ``gaussian_linear`` and ``gaussian_mixture``.

- Linear Gaussian: θ ∈ R¹⁰ ~ N(0, 0.1 I), x | θ ~ N(θ, 0.1 I) (variances). (θ, x) is jointly
  Gaussian, so every conditional is Gaussian in closed form: :func:`linear_gaussian_conditional`.
- Gaussian Mixture: θ ∈ R² ~ U(-10, 10)², x | θ ~ ½ N(θ, I) + ½ N(θ, 0.01 I), one mixture
  component for the whole vector as in sbibm. The component is summed out
  (``MixtureSameFamily``), so the simulator is also its own explicit-likelihood model.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_simformer.tasks.task import Task

__all__ = [
    "GaussianConditional",
    "linear_gaussian",
    "linear_gaussian_conditional",
    "linear_gaussian_model",
    "gaussian_mixture",
    "gaussian_mixture_model",
]

_DIM = 10
_PRIOR_VARIANCE = 0.1
_NOISE_VARIANCE = 0.1


def linear_gaussian_model() -> None:
    """θ ~ N(0, 0.1 I₁₀) at site ``theta``; x ~ N(θ, 0.1 I₁₀) at site ``x``."""
    theta = numpyro.sample("theta", dist.Normal(jnp.zeros(_DIM), jnp.sqrt(_PRIOR_VARIANCE)).to_event(1))
    numpyro.sample("x", dist.Normal(theta, jnp.sqrt(_NOISE_VARIANCE)).to_event(1))


def _joint_covariance() -> np.ndarray:
    eye = np.eye(_DIM)
    return np.block(
        [[_PRIOR_VARIANCE * eye, _PRIOR_VARIANCE * eye], [_PRIOR_VARIANCE * eye, (_PRIOR_VARIANCE + _NOISE_VARIANCE) * eye]]
    )


class GaussianConditional(NamedTuple):
    """The Gaussian conditional of the latent tokens of Linear Gaussian.

    Attributes:
        mean: (num_latent,) mean of the latent tokens, in token order.
        covariance: (num_latent, num_latent).
        latent_mask: bool (20,), True for latent tokens (θ₁..θ₁₀ then x₁..x₁₀).
        observed_tokens: (20,) token vector, NaN where latent.
    """

    mean: np.ndarray
    covariance: np.ndarray
    latent_mask: np.ndarray
    observed_tokens: np.ndarray

    def sample(self, rng_key, num_samples: int) -> dict[str, np.ndarray]:
        """Exact draws, as ``{"theta": (n, 10), "x": (n, 10)}`` with observed tokens constant."""
        latent = np.asarray(
            jax.random.multivariate_normal(
                rng_key, jnp.asarray(self.mean), jnp.asarray(self.covariance), (num_samples,), method="eigh"
            ),
            dtype=np.float64,
        )
        tokens = np.broadcast_to(self.observed_tokens, (num_samples, 2 * _DIM)).copy()
        tokens[:, self.latent_mask] = latent
        return {"theta": tokens[:, :_DIM], "x": tokens[:, _DIM:]}


def linear_gaussian_conditional(observed: Mapping[str, object]) -> GaussianConditional:
    """The exact conditional of any subset of Linear Gaussian's 20 tokens given the rest.

    Args:
        observed: ``{"theta": (10,), "x": (10,)}``, either site optional; NaN = latent.

    Returns:
        A :class:`GaussianConditional` (mean, covariance, and a ``sample`` method).

    Example:
        >>> x_o = np.full(10, 0.5)
        >>> conditional = linear_gaussian_conditional({"x": x_o})
        >>> np.allclose(conditional.mean, 0.25), np.allclose(np.diag(conditional.covariance), 0.05)
        (True, True)
    """
    tokens = np.full(2 * _DIM, np.nan)
    for index, name in enumerate(("theta", "x")):
        if name in observed:
            value = np.asarray(observed[name], dtype=np.float64)
            if value.shape != (_DIM,):
                raise ValueError(f"observed[{name!r}] must have shape ({_DIM},), got {value.shape}.")
            tokens[index * _DIM : (index + 1) * _DIM] = value
    unknown = sorted(set(observed) - {"theta", "x"})
    if unknown:
        raise ValueError(f"observed names {unknown}; Linear Gaussian's sites are 'theta' and 'x'.")
    latent = np.isnan(tokens)
    if not latent.any():
        raise ValueError("observed fixes all 20 tokens: there is no conditional left.")
    covariance = _joint_covariance()
    cov_ll = covariance[np.ix_(latent, latent)]
    if latent.all():
        return GaussianConditional(np.zeros(2 * _DIM), cov_ll, latent, tokens)
    cov_lo = covariance[np.ix_(latent, ~latent)]
    cov_oo = covariance[np.ix_(~latent, ~latent)]
    gain = np.linalg.solve(cov_oo, cov_lo.T).T
    mean = gain @ tokens[~latent]
    conditional_covariance = cov_ll - gain @ cov_lo.T
    return GaussianConditional(mean, 0.5 * (conditional_covariance + conditional_covariance.T), latent, tokens)


def _linear_gaussian_exact(rng_key, observed, num_samples):
    return linear_gaussian_conditional(observed).sample(rng_key, num_samples)


def linear_gaussian() -> Task:
    """sbibm's ``gaussian_linear``: 10-d Gaussian prior and likelihood, exact conditionals.

    Example:
        >>> task = linear_gaussian()
        >>> task.num_tokens, task.observation(1)["x"].shape
        (20, (10,))
    """
    return Task(
        name="linear_gaussian",
        model=linear_gaussian_model,
        parameter_sites=("theta",),
        data_sites=("x",),
        likelihood_model=linear_gaussian_model,
        sbibm_name="gaussian_linear",
        exact_sampler=_linear_gaussian_exact,
    )


def gaussian_mixture_model() -> None:
    """θ ~ U(-10, 10)² at ``theta``; x ~ ½ N(θ, I) + ½ N(θ, 0.01 I) at ``x``."""
    theta = numpyro.sample("theta", dist.Uniform(-10.0 * jnp.ones(2), 10.0 * jnp.ones(2)).to_event(1))
    scales = jnp.array([1.0, 0.1])[:, None]
    components = dist.Normal(jnp.broadcast_to(theta, (2, 2)), scales).to_event(1)
    numpyro.sample("x", dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.5, 0.5])), components))


def gaussian_mixture() -> Task:
    """sbibm's ``gaussian_mixture``; the simulator is its own explicit-likelihood model."""
    return Task(
        name="gaussian_mixture",
        model=gaussian_mixture_model,
        parameter_sites=("theta",),
        data_sites=("x",),
        likelihood_model=gaussian_mixture_model,
        sbibm_name="gaussian_mixture",
        nuts_defaults={"num_chains": 8, "thinning": 5},
    )
