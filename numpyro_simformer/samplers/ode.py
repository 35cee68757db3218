"""Probability-flow ODE sampler (diffrax), observed tokens held fixed.

The reverse SDE and the ODE ``dx/dt = f(t) x - g(t)^2 s(x, t) / 2`` share their marginals
(Song et al. 2021), so integrating the ODE from the prior at t = 1 down to ``t_min`` draws
from the same distribution, without noise, and with any ODE solver: a fixed-step Heun
(2 network evaluations per step) or an adaptive Runge-Kutta pair (Tsit5, Dopri5) with a
PID step-size controller.

The ODE state is the token vector of a batch of samples; the observed tokens travel in
``args`` and are written into the network's input at every evaluation, and the vector
field is zero on them, so they cannot drift. A final Tweedie step removes the noise left
at ``t_min``.

Example:
    >>> import diffrax
    >>> fixed = ProbabilityFlowODE(solver=diffrax.Heun(), num_steps=25)   # 51 evaluations
    >>> adaptive = ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None, rtol=1e-3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import diffrax
import jax.numpy as jnp

from numpyro_simformer.samplers.base import AbstractSampler
from numpyro_simformer.diffusion.score import initial_latent, tweedie_denoise

__all__ = ["ProbabilityFlowODE", "probability_flow_drift"]


def probability_flow_drift(score_fn, sde, params, x, time, condition_mask):
    """The probability-flow vector field ``f(t) x - g(t)^2 s(x, t) / 2``, zero on observed tokens.

    Args:
        score_fn: ``score_fn(params, x, time, condition_mask) -> score``.
        sde: the forward SDE.
        params: the network's parameters (passed through to ``score_fn``).
        x: (num_samples, num_tokens) tokens at time ``time``; observed tokens hold their values.
        time: scalar diffusion time.
        condition_mask: bool (num_samples, num_tokens), True where observed.

    Returns:
        (num_samples, num_tokens) ``dx/dt``.
    """
    batch_time = jnp.full(x.shape[:-1], time, dtype=x.dtype)
    score = score_fn(params, x, batch_time, condition_mask)
    drift = sde.drift_coefficient(time) * x - 0.5 * sde.diffusion(time) ** 2 * score
    return jnp.where(condition_mask, 0.0, drift)


@dataclass(frozen=True)
class ProbabilityFlowODE(AbstractSampler):
    """Integrate the probability-flow ODE from t = 1 to ``t_min`` with a diffrax solver.

    Attributes:
        solver: any diffrax ODE solver. ``diffrax.Heun()`` (default, 2 network evaluations
            per step) for fixed steps; ``diffrax.Tsit5()`` or ``diffrax.Dopri5()`` (6
            evaluations per accepted or rejected step) for adaptive steps.
        num_steps: number of uniform steps in t; ``None`` chooses the steps adaptively
            with a ``diffrax.PIDController(rtol, atol)`` (the solver needs an error
            estimate then: Heun, Tsit5, Dopri5 ... but not Euler).
        rtol, atol: tolerances of the adaptive controller, on the root-mean-square error
            over all tokens of a batch of samples in z-space.
        max_steps: the most steps an adaptive solve may take (an error is raised beyond).
        final_denoise: end with one Tweedie step ``(x + sigma^2 s) / alpha`` at ``t_min``.
    """

    solver: diffrax.AbstractSolver = field(default_factory=diffrax.Heun)
    num_steps: int | None = 50
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 4096
    final_denoise: bool = True

    def __post_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                f"ProbabilityFlowODE.solver must be a diffrax solver such as diffrax.Heun() or "
                f"diffrax.Tsit5(), got {type(self.solver).__name__}."
            )
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(
                f"ProbabilityFlowODE.num_steps must be a positive integer or None (adaptive), "
                f"got {self.num_steps}."
            )
        if self.num_steps is None and not (self.rtol > 0 and self.atol > 0):
            raise ValueError(
                f"ProbabilityFlowODE needs rtol > 0 and atol > 0 for adaptive steps, got "
                f"rtol={self.rtol}, atol={self.atol}."
            )

    @property
    def network_evaluations(self) -> int | None:
        """Network evaluations per sample for fixed steps; ``None`` when adaptive (it varies)."""
        if self.num_steps is None:
            return None
        if not isinstance(self.solver, diffrax.AbstractRungeKutta):  # no Butcher tableau to count stages
            return None
        tableau = self.solver.tableau
        per_step = tableau.num_stages - int(tableau.fsal)
        return self.num_steps * per_step + int(tableau.fsal) + int(self.final_denoise)

    def build(self, score_fn, sde):
        """A pure ``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``.

        ``observed_values``, ``condition_mask``: (num_tokens,) in z-space; returns
        (num_samples, num_tokens) in z-space. ``num_samples`` must be static under jit.
        """
        solver = self.solver
        if self.num_steps is None:
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
            dt0 = None
        else:
            controller = diffrax.ConstantStepSize()
            dt0 = (sde.t_min - 1.0) / self.num_steps
        max_steps = self.max_steps if self.num_steps is None else self.num_steps
        final_denoise = self.final_denoise

        def vector_field(time, y, args):
            params, observed, mask = args
            x = jnp.where(mask, observed, y)
            return probability_flow_drift(score_fn, sde, params, x, time, mask)

        term = diffrax.ODETerm(vector_field)

        def sample_fn(rng_key, params, observed_values, condition_mask, num_samples):
            x = initial_latent(rng_key, sde, observed_values, condition_mask, num_samples)
            mask = jnp.broadcast_to(condition_mask, x.shape)
            observed = jnp.broadcast_to(observed_values, x.shape)
            solution = diffrax.diffeqsolve(
                term, solver, t0=1.0, t1=sde.t_min, dt0=dt0, y0=x, args=(params, observed, mask),
                stepsize_controller=controller, max_steps=max_steps,
                saveat=diffrax.SaveAt(t1=True),
            )
            x = jnp.where(mask, observed, solution.ys[-1])
            if final_denoise:
                x = tweedie_denoise(score_fn, sde, params, x, jnp.full((num_samples,), sde.t_min), mask)
            return x

        return sample_fn
