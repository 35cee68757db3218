"""Two Moons and SLCP, written to match sbibm's simulators exactly.

- Two Moons (sbibm ``two_moons``): θ ~ U(-1, 1)², a ~ U(-π/2, π/2), r ~ N(0.1, 0.01²),
  x = (r cos a + 0.25 - |θ₁ + θ₂|/√2, r sin a + (θ₂ - θ₁)/√2). The simulator draws ``a``
  and ``r`` (excluded from the tokens) and puts x at a Delta site, which has no usable
  density; :class:`TwoMoonsLikelihood` is the explicit density of x given θ, including
  the 1/(π r) Jacobian of the polar map (sbibm's ``_likelihood`` leaves it out; its
  reference samples come from its exact sampler, which matches ours). The joint is
  invariant under (θ₁, θ₂) -> (-θ₂, -θ₁): the posterior's two moons. NUTS on that density
  diverges at the hard edge of the half ring (about 45 % of transitions), so the task's
  reference for any conditional is exact instead: :func:`two_moons_conditional_sampler`.
- SLCP (sbibm ``slcp``): θ ~ U(-3, 3)⁵; x ∈ R⁸ holds 4 iid 2-d Gaussians, flattened as
  (x₁₁, x₁₂, x₂₁, x₂₂, ...), with mean (θ₁, θ₂), stds θ₃², θ₄², correlation tanh(θ₅) and
  1e-6 added to both variances, as sbibm. The joint is invariant under θ₃ -> -θ₃ and
  under θ₄ -> -θ₄: the posterior's four modes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.util import validate_sample

from numpyro_simformer.tasks._grid import numpy_rng, sample_grid
from numpyro_simformer.tasks.reference import Reflection
from numpyro_simformer.tasks.task import Task

__all__ = [
    "TwoMoonsLikelihood",
    "two_moons",
    "two_moons_model",
    "two_moons_likelihood_model",
    "two_moons_posterior_sampler",
    "two_moons_conditional_sampler",
    "slcp",
    "slcp_model",
]

_R_LOC, _R_SCALE, _OFFSET = 0.1, 0.01, 0.25
_SQRT2 = math.sqrt(2.0)


def _moon_shift(theta, xp=jnp):
    """(-|θ1 + θ2|/√2, (θ2 - θ1)/√2): sbibm's rotation by -π/4 and fold."""
    z0 = (theta[..., 0] + theta[..., 1]) / _SQRT2
    z1 = (theta[..., 1] - theta[..., 0]) / _SQRT2
    return xp.stack([-xp.abs(z0), z1], axis=-1)


def two_moons_model() -> None:
    """The Two Moons simulator: sites ``theta`` (2,), ``a``, ``r`` (noise) and ``x`` (2,)."""
    theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1))
    a = numpyro.sample("a", dist.Uniform(-math.pi / 2, math.pi / 2))
    r = numpyro.sample("r", dist.Normal(_R_LOC, _R_SCALE))
    p = jnp.stack([r * jnp.cos(a) + _OFFSET, r * jnp.sin(a)], axis=-1)
    numpyro.sample("x", dist.Delta(p + _moon_shift(theta), event_dim=1))


class TwoMoonsLikelihood(dist.Distribution):
    """Density of Two Moons' x given θ: a half ring of radius N(0.1, 0.01²) around a shift.

    With (u, v) = x - shift(θ) - (0.25, 0) and r = |(u, v)|: p(x | θ) = N(r; 0.1, 0.01²) /
    (π r) for u > 0, else 0.
    """

    arg_constraints = {"theta": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params = ["theta"]

    def __init__(self, theta, *, validate_args=None):
        self.theta = theta
        super().__init__(batch_shape=jnp.shape(theta)[:-1], event_shape=(2,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        key_a, key_r = jax.random.split(key)
        shape = sample_shape + self.batch_shape
        a = jax.random.uniform(key_a, shape, minval=-math.pi / 2, maxval=math.pi / 2)
        r = _R_LOC + _R_SCALE * jax.random.normal(key_r, shape)
        p = jnp.stack([r * jnp.cos(a) + _OFFSET, r * jnp.sin(a)], axis=-1)
        return p + _moon_shift(self.theta)

    @validate_sample
    def log_prob(self, value):
        p = value - _moon_shift(self.theta)
        u, v = p[..., 0] - _OFFSET, p[..., 1]
        r = jnp.sqrt(u**2 + v**2)
        log_density = dist.Normal(_R_LOC, _R_SCALE).log_prob(r) - jnp.log(r) - math.log(math.pi)
        return jnp.where(u > 0, log_density, -jnp.inf)


def two_moons_likelihood_model() -> None:
    """Two Moons with x drawn from :class:`TwoMoonsLikelihood` (no ``a``, ``r``): for NUTS."""
    theta = numpyro.sample("theta", dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1))
    numpyro.sample("x", TwoMoonsLikelihood(theta))


def two_moons_posterior_sampler(rng_key, observed, num_samples: int):
    """Exact posterior draws of θ given a whole x (sbibm's construction); ``None`` otherwise.

    Draws (a, r) from the simulator, solves x = p(a, r) + shift(θ) for θ (two solutions,
    one picked with probability 1/2) and rejects θ outside the prior.

    Args:
        rng_key: a JAX PRNG key.
        observed: ``{"x": (2,)}``; any other conditional returns ``None``.
        num_samples: number of draws.

    Returns:
        ``{"theta": (num_samples, 2)}`` or ``None`` when this is not the posterior.
    """
    if set(observed) != {"x"} or np.any(np.isnan(observed["x"])):
        return None
    x_o = np.asarray(observed["x"], dtype=np.float64)
    accepted, total = [], 0
    while total < num_samples:
        rng_key, key_a, key_r, key_sign = jax.random.split(rng_key, 4)
        batch = 4 * (num_samples - total) + 100
        a = np.asarray(jax.random.uniform(key_a, (batch,), minval=-math.pi / 2, maxval=math.pi / 2), np.float64)
        r = _R_LOC + _R_SCALE * np.asarray(jax.random.normal(key_r, (batch,)), np.float64)
        abs_z0 = r * np.cos(a) + _OFFSET - x_o[0]
        z0 = abs_z0 * np.where(np.asarray(jax.random.bernoulli(key_sign, 0.5, (batch,))), 1.0, -1.0)
        z1 = x_o[1] - r * np.sin(a)
        theta = np.stack([(z0 - z1) / _SQRT2, (z0 + z1) / _SQRT2], axis=-1)
        keep = (abs_z0 >= 0) & np.all(np.abs(theta) <= 1.0, axis=-1)
        accepted.append(theta[keep])
        total += int(keep.sum())
        if total == 0 and batch > 10**7:
            raise ValueError(f"x = {x_o} is (nearly) impossible under the Two Moons prior.")
    return {"theta": np.concatenate(accepted)[:num_samples]}


_U_GRID = np.linspace(0.0, 0.2, 2001)  # noise (u, v) = r (cos a, sin a); r < 0.2 with certainty
_V_GRID = np.linspace(-0.2, 0.2, 4001)
_THETA_GRID = np.linspace(-1.0, 1.0, 4001)


def _noise_density(u, v):
    """Density of (u, v) = r (cos a, sin a): N(r; 0.1, 0.01²) / (π r) for u > 0."""
    r = np.sqrt(u**2 + v**2)
    density = np.exp(-0.5 * ((r - _R_LOC) / _R_SCALE) ** 2) / (np.sqrt(2 * np.pi) * _R_SCALE * np.pi * np.maximum(r, 1e-12))
    return np.where(u > 0, density, 0.0)


@functools.lru_cache(maxsize=1)
def _noise_marginals() -> tuple[np.ndarray, np.ndarray]:
    """Tabulated marginal densities of u (on _U_GRID) and of v (on _V_GRID)."""
    density = _noise_density(_U_GRID[:, None], _V_GRID[None, :])
    return np.trapezoid(density, _V_GRID, axis=1), np.trapezoid(density, _U_GRID, axis=0)


def _sample_noise_given(rng, known: np.ndarray, known_is_u: bool) -> np.ndarray:
    """One draw per row of v | u (or u | v) from the noise density, on a grid."""
    grid = _V_GRID if known_is_u else _U_GRID
    # the grid draws of the other coordinate may overshoot a density edge by < one step
    known = np.clip(known, 1e-9, _U_GRID[-1]) if known_is_u else np.clip(known, _V_GRID[0], _V_GRID[-1])
    out = np.empty(len(known))
    for start in range(0, len(known), 1000):
        chunk = known[start : start + 1000, None]
        weights = _noise_density(chunk, grid[None]) if known_is_u else _noise_density(grid[None], chunk)
        out[start : start + 1000] = sample_grid(rng, weights, grid[0], grid[1] - grid[0])
    return out


def _latent_theta(rng, theta_o, x_o, num_samples) -> np.ndarray:
    """Draws of θ given the observed θ elements and x elements (NaN = latent)."""
    u_marginal, v_marginal = _noise_marginals()
    known_x = ~np.isnan(x_o)

    def weight(theta):  # p(observed x elements | θ), for θ (..., 2)
        shift = _moon_shift(theta, np)
        u, v = x_o[0] - _OFFSET - shift[..., 0], x_o[1] - shift[..., 1]
        if known_x.all():
            return _noise_density(u, v)
        if known_x[0]:
            return np.interp(u, _U_GRID, u_marginal, left=0.0, right=0.0)
        return np.interp(v, _V_GRID, v_marginal, left=0.0, right=0.0)

    theta = np.broadcast_to(theta_o, (num_samples, 2)).copy()
    latent = np.isnan(theta_o)
    if not known_x.any():  # the prior, independent across elements
        theta[:, latent] = rng.uniform(-1.0, 1.0, size=(num_samples, int(latent.sum())))
    elif latent.sum() == 1:
        index = int(np.flatnonzero(latent)[0])
        candidates = np.broadcast_to(theta_o, (len(_THETA_GRID), 2)).copy()
        candidates[:, index] = _THETA_GRID
        step = _THETA_GRID[1] - _THETA_GRID[0]
        theta[:, index] = sample_grid(rng, weight(candidates), _THETA_GRID[0], step, num_samples)
    elif latent.sum() == 2:  # one x element known: the weight depends on one rotated coordinate
        half_diagonal = np.sqrt(2.0)
        z_grid = np.linspace(-half_diagonal, half_diagonal, 8001)
        other = np.zeros_like(z_grid)
        z_pair = np.stack([z_grid, other] if known_x[0] else [other, z_grid], -1)
        theta_grid = np.stack([(z_pair[:, 0] - z_pair[:, 1]), (z_pair[:, 0] + z_pair[:, 1])], -1) / half_diagonal
        chord = 2.0 * (half_diagonal - np.abs(z_grid))  # the prior square is |z0| + |z1| <= sqrt(2)
        z_known = sample_grid(rng, weight(theta_grid) * chord, z_grid[0], z_grid[1] - z_grid[0], num_samples)
        z_free = rng.uniform(-1.0, 1.0, num_samples) * (half_diagonal - np.abs(z_known))
        z0, z1 = (z_known, z_free) if known_x[0] else (z_free, z_known)
        theta = np.stack([z0 - z1, z0 + z1], -1) / half_diagonal
    return theta


def two_moons_conditional_sampler(rng_key, observed, num_samples: int):
    """Exact draws (to grid accuracy) from any conditional of Two Moons.

    Latent θ elements first, given the observed θ elements and the observed x elements
    (through the density of the ring noise, or its tabulated marginal when one x element
    is observed), on a grid; then latent x elements given θ and the observed x element,
    from the conditional of the ring noise. The posterior (whole x observed, θ latent)
    uses :func:`two_moons_posterior_sampler`.

    Args:
        rng_key: a JAX PRNG key.
        observed: ``{"theta": (2,), "x": (2,)}``, either optional, NaN = latent.
        num_samples: number of draws.

    Returns:
        ``{"theta": (num_samples, 2), "x": (num_samples, 2)}``, observed elements constant.
    """
    unknown = sorted(set(observed) - {"theta", "x"})
    if unknown:
        raise ValueError(f"observed names {unknown}; Two Moons' token sites are 'theta' and 'x'.")
    theta_o = np.asarray(observed.get("theta", np.full(2, np.nan)), dtype=np.float64).reshape(2)
    x_o = np.asarray(observed.get("x", np.full(2, np.nan)), dtype=np.float64).reshape(2)
    key_posterior, key_rest = jax.random.split(rng_key)
    if np.isnan(theta_o).all() and not np.isnan(x_o).any():
        theta = two_moons_posterior_sampler(key_posterior, {"x": x_o}, num_samples)["theta"]
        return {"theta": theta, "x": np.broadcast_to(x_o, (num_samples, 2)).copy()}
    rng = numpy_rng(key_rest)
    theta = _latent_theta(rng, theta_o, x_o, num_samples)
    shift = _moon_shift(theta, np) + np.array([_OFFSET, 0.0])
    x = np.broadcast_to(x_o, (num_samples, 2)).copy()
    if np.isnan(x_o).all():
        a = rng.uniform(-np.pi / 2, np.pi / 2, num_samples)
        r = _R_LOC + _R_SCALE * rng.standard_normal(num_samples)
        x = shift + np.stack([r * np.cos(a), r * np.sin(a)], -1)
    elif np.isnan(x_o[1]):
        x[:, 1] = shift[:, 1] + _sample_noise_given(rng, x_o[0] - shift[:, 0], known_is_u=True)
    elif np.isnan(x_o[0]):
        x[:, 0] = shift[:, 0] + _sample_noise_given(rng, x_o[1] - shift[:, 1], known_is_u=False)
    return {"theta": theta, "x": x}


def two_moons() -> Task:
    """sbibm's ``two_moons``, with its explicit-likelihood twin and its reflection."""
    return Task(
        name="two_moons",
        model=two_moons_model,
        parameter_sites=("theta",),
        data_sites=("x",),
        exclude_sites=("a", "r"),
        likelihood_model=two_moons_likelihood_model,
        reflections=(Reflection(("theta",), (1, 0), (-1.0, -1.0)),),
        sbibm_name="two_moons",
        exact_sampler=two_moons_conditional_sampler,
    )


def _slcp_scale_tril(theta):
    s1, s2, rho = theta[..., 2] ** 2, theta[..., 3] ** 2, jnp.tanh(theta[..., 4])
    eps = 1e-6
    var1, var2, cov12 = s1**2 + eps, s2**2 + eps, rho * s1 * s2
    l11 = jnp.sqrt(var1)
    l21 = cov12 / l11
    l22 = jnp.sqrt(jnp.clip(var2 - l21**2, min=eps * 1e-3))
    zero = jnp.zeros_like(l11)
    return jnp.stack([jnp.stack([l11, zero], -1), jnp.stack([l21, l22], -1)], -2)


def slcp_model() -> None:
    """SLCP: ``theta`` (5,) ~ U(-3, 3)⁵, ``x`` (8,) = 4 iid 2-d Gaussians, flattened."""
    theta = numpyro.sample("theta", dist.Uniform(-3.0 * jnp.ones(5), 3.0 * jnp.ones(5)).to_event(1))
    loc = jnp.tile(theta[..., :2], 4)
    scale_tril = jnp.kron(jnp.eye(4), _slcp_scale_tril(theta))
    numpyro.sample("x", dist.MultivariateNormal(loc, scale_tril=scale_tril))


def slcp() -> Task:
    """sbibm's ``slcp``; the simulator is its own explicit-likelihood model."""
    identity = (0, 1, 2, 3, 4)
    return Task(
        name="slcp",
        model=slcp_model,
        parameter_sites=("theta",),
        data_sites=("x",),
        likelihood_model=slcp_model,
        reflections=(
            Reflection(("theta",), identity, (1.0, 1.0, -1.0, 1.0, 1.0)),
            Reflection(("theta",), identity, (1.0, 1.0, 1.0, -1.0, 1.0)),
        ),
        sbibm_name="slcp",
        nuts_defaults={"num_chains": 8, "num_warmup": 2000, "thinning": 10, "dense_mass": True, "target_accept_prob": 0.95},
    )
