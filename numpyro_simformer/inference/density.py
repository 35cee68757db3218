"""Log densities of any conditional, by the probability-flow ODE and the change of variables.

The maths. The probability-flow ODE ``dx/dt = F(x, t) = f(t) x - g(t)^2 s(x, t) / 2`` moves
a point ``x_0`` of the data to ``x_1`` at t = 1 while the density obeys
``d log p_t(x_t) / dt = -div F(x_t, t)`` (the instantaneous change of variables of
continuous normalising flows, Chen et al. 2018). Integrating from ``t_min`` to 1,

    log p_0(x_0) = log p_1(x_1) + integral_{t_min}^{1} div F(x_t, t) dt,

with ``p_1`` the density at t = 1, nearly Gaussian (:func:`terminal_log_prob`). For a
conditional, only the latent tokens move and count: observed tokens are clamped inputs of
the network, ``F`` is zero on them, and the divergence sums over latent tokens. It is the trace of the Jacobian ``dF/dx``, written as
``sum_v v^T (dF/dx) v`` over probe vectors ``v``: the latent unit vectors give the exact
trace (one Jacobian-vector product each, sharing one linearisation), Rademacher vectors
give Hutchinson's unbiased estimate ``E[v^T J v] = tr J``, used beyond
``exact_trace_max_dim`` latent tokens.

That density is in z-space. Tokens in the user's space are ``x = T(z)``, elementwise
(z-scoring, then the site's bijection onto its support), so

    log p_x(x) = log p_z(z) - log |dx/dz|,

summed over the latent tokens only (:func:`latent_log_abs_det_jacobian`; with every token
latent it equals :meth:`TokenTransform.log_abs_det_jacobian_from_z`).

Example:
    >>> sf.log_prob({"theta": theta_points}, observed={"x": x_o})          # doctest: +SKIP
    array([-2.31, -1.87, ...])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.tokens.transforms import base_transform, couples_elements, outside_discrete_support
from numpyro_simformer.samplers.ode import probability_flow_drift

__all__ = [
    "ProbabilityFlowLogDensity",
    "terminal_log_prob",
    "latent_log_abs_det_jacobian",
    "trace_probes",
    "points_to_tokens",
    "conditional_log_prob",
]


def terminal_log_prob(sde, score, condition_mask, data_variance=1.0):
    """``log p_1(x_1)`` of the latent tokens from the network's score at t = 1.

    ``p_1`` is the data convolved with noise of variance ``sigma(1)^2``, close to a Gaussian
    of the prior's variance ``v`` but centred at the (conditional) data mean, which is far
    from the prior's zero mean for a conditional: a point ``x_1 = 10`` and a mean of 0.8
    already shift ``log p_1`` by 0.08 per token. The Gaussian ``N(mu, v)`` has score
    ``-(x - mu) / v``, so with the network's score ``s(x_1)``,
    ``log p_1(x_1) = -v |s|^2 / 2 - log(2 pi v) / 2`` per latent token: the mean comes from
    the network, only the error in the variance remains: about
    ``(lambda - 1) (1 + z^2) / (2 sigma_max^2)`` per latent token for a conditional of variance
    ``lambda`` (z-space) along some direction, ``z`` the point's standardised distance; 0 on
    average for z-scored joints, -0.01 nats per token for a narrow posterior (``lambda`` << 1).

    Args:
        sde: the forward SDE (``prior_std``).
        score: (..., num_tokens) the score at t = 1 (ignored on observed tokens).
        condition_mask: bool (..., num_tokens), True where observed.
        data_variance: the conditional's variance per latent token in z-space that ``v``
            assumes, ``v = prior_std(sqrt(data_variance))^2`` (1: z-scored tokens, right for a
            joint; 0: a narrow conditional such as a posterior).

    Returns:
        (...,).
    """
    variance = sde.prior_std() ** 2 if data_variance == 1.0 else sde.prior_std(math.sqrt(data_variance)) ** 2
    log_density = -0.5 * variance * score**2 - 0.5 * jnp.log(2 * math.pi * variance)
    return jnp.sum(jnp.where(condition_mask, 0.0, log_density), axis=-1)


def latent_log_abs_det_jacobian(transform, z, latent_mask):
    """``log |dx/dz|`` of the latent tokens, x the constrained tokens, for each leading index.

    Args:
        transform: a :class:`~numpyro_simformer.tokens.transforms.TokenTransform`.
        z: (..., num_tokens) in z-space.
        latent_mask: bool (num_tokens,), True for the tokens whose Jacobian counts.

    Returns:
        (...,). Discrete sites count nothing (as in ``log_abs_det_jacobian_from_z``).

    Raises:
        NotImplementedError: a site whose bijection is not elementwise (ordered vectors)
            is only partly latent.
    """
    latent_mask = np.asarray(latent_mask, dtype=bool)
    layout = transform.layout
    slices = layout.slices()
    batch_shape = z.shape[:-1]
    unconstrained = z * transform.std + transform.mean
    total = jnp.sum(jnp.where(latent_mask, jnp.log(transform.std), 0.0)) * jnp.ones(batch_shape)
    for site, bijection in zip(layout.sites, transform.bijections):
        site_mask = latent_mask[slices[site.name]]
        if site.is_discrete or not site_mask.any():
            continue
        value = unconstrained[..., slices[site.name]].reshape(batch_shape + site.shape)
        if not couples_elements(bijection):
            elementwise = base_transform(bijection)  # the wrappers only sum over event dims
            log_det = elementwise.log_abs_det_jacobian(value, elementwise(value))
            log_det = jnp.broadcast_to(log_det, batch_shape + site.shape).reshape(batch_shape + (-1,))
            total = total + jnp.sum(jnp.where(site_mask, log_det, 0.0), axis=-1)
        elif site_mask.all():
            log_det = bijection.log_abs_det_jacobian(value, bijection(value))
            total = total + jnp.sum(log_det.reshape(batch_shape + (-1,)), axis=-1)
        else:
            raise NotImplementedError(
                f"Site {site.name!r} has a support whose bijection couples its elements "
                f"({type(bijection).__name__}); its log density is only available with all of "
                "its elements latent or all observed."
            )
    return total


def trace_probes(rng_key, condition_mask, num_points: int, exact_trace_max_dim: int, num_probes: int):
    """Probe vectors for the divergence, and whether they give the exact trace.

    Args:
        rng_key: a JAX PRNG key (used only for Hutchinson probes).
        condition_mask: bool numpy array (num_tokens,), True where observed.
        num_points: number of points evaluated together.
        exact_trace_max_dim: the most latent tokens for which the exact trace is used.
        num_probes: Hutchinson probes per point.

    Returns:
        ``(probes, exact)``: float (num_probes_or_latent, num_points, num_tokens) and a bool.
        With the exact trace the probes are the latent unit vectors.
    """
    latent = np.flatnonzero(~np.asarray(condition_mask))
    num_tokens = condition_mask.shape[-1]
    if latent.size <= exact_trace_max_dim:
        basis = np.eye(num_tokens, dtype=np.float32)[latent]
        return jnp.broadcast_to(basis[:, None, :], (latent.size, num_points, num_tokens)), True
    signs = jax.random.rademacher(rng_key, (num_probes, num_points, num_tokens), dtype=jnp.float32)
    return jnp.where(jnp.asarray(condition_mask), 0.0, signs), False


@dataclass(frozen=True)
class ProbabilityFlowLogDensity:
    """How :meth:`Simformer.log_prob` integrates the probability-flow ODE and its divergence.

    Attributes:
        solver: a diffrax ODE solver (default ``Tsit5``).
        num_steps: uniform steps in t; ``None`` (default) for adaptive steps with a PID
            controller at ``rtol``/``atol``.
        rtol, atol: tolerances of the adaptive controller (on the tokens and the log density).
        max_steps: the most steps an adaptive solve may take.
        exact_trace_max_dim: up to this many latent tokens the divergence is the exact
            Jacobian trace (one Jacobian-vector product per latent token); beyond, Hutchinson's
            estimator with ``num_probes`` Rademacher probes (unbiased, but noisy: the log
            density then varies with ``rng_key``).
        num_probes: Hutchinson probes per point, fixed along each trajectory.
        terminal_variance: the variance per latent token, in z-space, that the terminal
            density ``p_1`` assumes for the conditional (:func:`terminal_log_prob`). 1
            (default) is right for a joint of z-scored tokens and costs a narrow conditional
            about ``-0.01`` nats per latent token (``-(1 - S) / (S + sigma_max^2)`` at variance
            ``S``); 0 is right for a narrow posterior and costs a joint ``+0.01`` per token.
    """

    solver: diffrax.AbstractSolver = field(default_factory=diffrax.Tsit5)
    num_steps: int | None = None
    rtol: float = 1e-4
    atol: float = 1e-4
    max_steps: int = 4096
    exact_trace_max_dim: int = 32
    num_probes: int = 1
    terminal_variance: float = 1.0

    def __post_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                f"ProbabilityFlowLogDensity.solver must be a diffrax solver, got {type(self.solver).__name__}."
            )
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"ProbabilityFlowLogDensity.num_steps must be positive or None, got {self.num_steps}.")
        if self.exact_trace_max_dim < 0:
            raise ValueError(
                f"ProbabilityFlowLogDensity.exact_trace_max_dim must be 0 or more, got {self.exact_trace_max_dim}."
            )
        if self.num_probes < 1:
            raise ValueError(f"ProbabilityFlowLogDensity.num_probes must be positive, got {self.num_probes}.")
        if not self.terminal_variance >= 0:
            raise ValueError(
                f"ProbabilityFlowLogDensity.terminal_variance must be 0 or more, got {self.terminal_variance}."
            )

    def build(self, score_fn, sde):
        """A pure ``log_prob_fn(params, z, condition_mask, probes, exact) -> (num_points,)``.

        ``z``: (num_points, num_tokens) in z-space, observed tokens holding their values;
        ``condition_mask``: bool (num_tokens,); ``probes`` from :func:`trace_probes`;
        ``exact`` (static): whether the probes give the exact trace. Returns
        ``log p_z(latent tokens | observed tokens)`` per point.
        """
        if self.num_steps is None:
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
            dt0, max_steps = None, self.max_steps
        else:
            controller = diffrax.ConstantStepSize()
            dt0, max_steps = (1.0 - sde.t_min) / self.num_steps, self.num_steps
        solver, terminal_variance = self.solver, float(self.terminal_variance)

        def vector_field(time, state, args):
            params, observed, mask, probes, probe_scale = args
            y, _ = state

            def drift(y):
                return probability_flow_drift(score_fn, sde, params, jnp.where(mask, observed, y), time, mask)

            dy, jvp_fn = jax.linearize(drift, y)
            probes = probes.astype(y.dtype)  # float64 state under jax_enable_x64, float32 probes
            quadratic = jax.vmap(lambda v: jnp.sum(v * jvp_fn(v), axis=-1))(probes)
            return dy, probe_scale * jnp.sum(quadratic, axis=0)

        term = diffrax.ODETerm(vector_field)

        def log_prob_fn(params, z, condition_mask, probes, exact: bool):
            mask = jnp.broadcast_to(condition_mask, z.shape)
            probe_scale = 1.0 if exact else 1.0 / probes.shape[0]
            state = (z, jnp.zeros(z.shape[:-1], z.dtype))
            solution = diffrax.diffeqsolve(
                term, solver, t0=sde.t_min, t1=1.0, dt0=dt0, y0=state,
                args=(params, z, mask, probes, probe_scale), stepsize_controller=controller,
                max_steps=max_steps, saveat=diffrax.SaveAt(t1=True),
            )
            y_final, divergence_integral = solution.ys[0][-1], solution.ys[1][-1]
            x_final = jnp.where(mask, z, y_final)
            score = score_fn(params, x_final, jnp.ones(z.shape[:-1], z.dtype), mask)
            return terminal_log_prob(sde, score, mask, terminal_variance) + divergence_integral

        return log_prob_fn


def points_to_tokens(layout: TokenLayout, values: Mapping, observed_values: np.ndarray, condition_mask: np.ndarray):
    """Validate ``values`` for a log density and assemble constrained tokens (num_points, num_tokens).

    Args:
        layout: the token layout.
        values: ``{site: array (num_points, *site.shape)}`` for every site with a latent
            element; elements that are observed are ignored (NaN is fine there).
        observed_values: float (num_tokens,), the observed values (NaN where latent).
        condition_mask: bool (num_tokens,), True where observed.

    Raises:
        TypeError: ``values`` is not a mapping, or holds a non-numeric value.
        ValueError: a latent site is missing, a site is unknown or fully observed, a shape
            is wrong, the number of points differs between sites, or a latent element is NaN.
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"`values` must be a dict mapping site names to arrays, got {type(values).__name__}.")
    slices = layout.slices()
    latent_sites = [site.name for site in layout.sites if not condition_mask[slices[site.name]].all()]
    for name in values:
        if name not in slices:
            raise ValueError(f"`values` names an unknown site {name!r}; the token sites are {layout.site_names}.")
        if name not in latent_sites:
            raise ValueError(
                f"`values` gives site {name!r}, which is observed: its value is a condition, not a point "
                f"at which to evaluate the density. Pass it in `observed` only; `values` takes {latent_sites}."
            )
    missing = [name for name in latent_sites if name not in values]
    if missing:
        raise ValueError(
            f"`values` lacks the sites {missing}: the density is of all unobserved sites "
            f"{latent_sites} given `observed`. Give each of them (num_points, *site shape), or "
            "observe the ones to condition on."
        )
    tokens, num_points = None, {}
    arrays = {}
    for name in latent_sites:
        site = layout.site(name)
        try:
            array = np.asarray(jax.device_get(values[name]), dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"values[{name!r}] must be numeric, got {type(values[name]).__name__}.") from None
        if array.ndim != len(site.shape) + 1 or array.shape[1:] != site.shape:
            raise ValueError(
                f"values[{name!r}] has shape {array.shape}; expected (num_points, *{site.shape}) with a "
                f"leading axis of points (for one point: value[None])."
            )
        num_points[name] = array.shape[0]
        arrays[name] = array.reshape(array.shape[0], site.size)  # -1 fails for zero points
    if len(set(num_points.values())) > 1:
        raise ValueError(f"The sites of `values` have different numbers of points: {num_points}.")
    count = next(iter(num_points.values()))
    tokens = np.broadcast_to(observed_values, (count, layout.num_tokens)).copy()
    for name, array in arrays.items():
        part = np.where(condition_mask[slices[name]], tokens[:, slices[name]], array)
        if np.isnan(part).any():
            point, element = np.argwhere(np.isnan(part))[0]
            raise ValueError(
                f"values[{name!r}] is NaN at point {point}, element {layout.labels[slices[name]][element]!r}, "
                "which is latent. Every latent element needs a value."
            )
        tokens[:, slices[name]] = part
    return tokens


def conditional_log_prob(rng_key, log_prob_fn, params, transform, tokens, condition_mask, *,
                         exact_trace_max_dim: int, num_probes: int, batch_size: int) -> np.ndarray:
    """``log p(latent tokens | observed tokens)`` in the user's space, one per point.

    Args:
        rng_key: a JAX PRNG key for Hutchinson probes; may be ``None`` with the exact trace.
        log_prob_fn: ``jax.jit(ProbabilityFlowLogDensity.build(...), static_argnames="exact")``.
        params: the network's parameters.
        transform: the :class:`~numpyro_simformer.tokens.transforms.TokenTransform`.
        tokens: float (num_points, num_tokens), constrained, observed tokens holding their
            values (see :func:`points_to_tokens`).
        condition_mask: bool (num_tokens,), True where observed.
        exact_trace_max_dim, num_probes: see :class:`ProbabilityFlowLogDensity`.
        batch_size: points per call.

    Returns:
        float64 (num_points,); ``-inf`` where a point lies outside its sites' support (for a
        discrete site: is no integer of it); empty for zero points.
    """
    condition_mask = np.asarray(condition_mask, dtype=bool)
    num_latent = int((~condition_mask).sum())
    if num_latent > exact_trace_max_dim and rng_key is None:
        raise ValueError(
            f"This query has {num_latent} latent tokens, more than exact_trace_max_dim="
            f"{exact_trace_max_dim}, so the divergence uses Hutchinson's random estimator: pass "
            "`rng_key`, or raise `exact_trace_max_dim` for the exact trace."
        )
    if len(tokens) == 0:
        return np.zeros(0, dtype=np.float64)
    z = np.asarray(transform.to_z_fn(np.asarray(tokens, dtype=np.float32)))
    inside = np.all(np.isfinite(z), axis=-1) & ~outside_discrete_support(transform, tokens).any(axis=-1)
    z = np.where(np.isfinite(z), z, 0.0).astype(np.float32)  # placeholders; those points return -inf
    num_points = z.shape[0]
    chunk = min(batch_size, num_points)
    results = []
    for index, start in enumerate(range(0, num_points, chunk)):
        part = z[start : start + chunk]
        key = None if rng_key is None else jax.random.fold_in(rng_key, index)
        probes, exact = trace_probes(key, condition_mask, part.shape[0], exact_trace_max_dim, num_probes)
        log_prob_z = log_prob_fn(params, jnp.asarray(part), jnp.asarray(condition_mask), probes, exact=exact)
        log_det = latent_log_abs_det_jacobian(transform, jnp.asarray(part), ~condition_mask)
        results.append(np.asarray(log_prob_z - log_det, dtype=np.float64))
    return np.where(inside, np.concatenate(results), -np.inf)
