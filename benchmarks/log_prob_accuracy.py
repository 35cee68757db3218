"""How accurate is ``Simformer.log_prob``, and where does its error come from (issue 31, item 9)?

An unseen two-parameter conjugate model,

    theta ~ N(m0, diag(s0^2)),  m0 = (1, -0.5), s0 = (1, 2)
    x     ~ N(A theta, 0.5^2 I), A = [[1, 0], [0.5, 1], [1, -1]]   (three data elements),

is fitted with library defaults (``Simformer(model, num_simulations=N).fit(key(seed))``), then
for three observations drawn from the model, ``log_prob`` of exact posterior draws is compared
with the exact posterior log density. The error is split into

- ``terminal``: the density at t = 1, ``log p_1(x_1)``, taken from the network's score
  (``density.terminal_log_prob``) minus the exact ``log p_1`` at the same ``x_1``;
- ``flow``: the rest (the trajectory and the divergence integral of the network's
  probability-flow ODE): ``exact log p_1(x_1) + int div F dt - log|dx/dz| - exact``;

and compared with the same machinery on the exact score of the z-scored posterior (the
solver's and the formula's share), a tight solver (rtol = atol = 1e-6) on the network, and
the same network with the terminal density replaced by the alternatives in
``TERMINALS``.

    python benchmarks/log_prob_accuracy.py --seeds 0 1 2 --simulations 5000 \
        --cache /tmp/log_prob_accuracy

Fits are saved under ``--cache`` and loaded from there when rerun. Not a test: a fit at
5,000 simulations takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.stats import multivariate_normal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from numpyro_simformer import ProbabilityFlowLogDensity, Simformer, SimformerEnsemble  # noqa: E402
from numpyro_simformer.inference.density import latent_log_abs_det_jacobian, terminal_log_prob  # noqa: E402
from numpyro_simformer.samplers.ode import probability_flow_drift  # noqa: E402

PRIOR_MEAN = np.array([1.0, -0.5])
PRIOR_STD = np.array([1.0, 2.0])
DESIGN = np.array([[1.0, 0.0], [0.5, 1.0], [1.0, -1.0]])
NOISE = 0.5


def model():
    theta = numpyro.sample("theta", dist.Normal(jnp.asarray(PRIOR_MEAN), jnp.asarray(PRIOR_STD)).to_event(1))
    numpyro.sample("x", dist.Normal(jnp.asarray(DESIGN) @ theta, NOISE).to_event(1))


def exact_posterior(x_o):
    precision = np.diag(1 / PRIOR_STD**2) + DESIGN.T @ DESIGN / NOISE**2
    covariance = np.linalg.inv(precision)
    mean = covariance @ (PRIOR_MEAN / PRIOR_STD**2 + DESIGN.T @ x_o / NOISE**2)
    return mean, covariance


def observations(count=3, seed=1):
    rng = np.random.default_rng(seed)
    theta = PRIOR_MEAN + PRIOR_STD * rng.normal(size=(count, 2))
    return theta @ DESIGN.T + NOISE * rng.normal(size=(count, 3))


def fitted(seed: int, num_simulations: int, cache: Path) -> Simformer:
    path = cache / f"seed{seed}_n{num_simulations}"
    if path.exists():
        return Simformer.load(path, model)
    start = time.perf_counter()
    sf = Simformer(model, num_simulations=num_simulations, progress_bar=False).fit(jax.random.key(seed))
    print(f"# fit seed {seed}, {num_simulations} simulations: {time.perf_counter() - start:.0f} s, "
          f"{int(sf.history.step[-1])} steps (best {sf.history.best_step})", flush=True)
    sf.save(path)
    return sf


def fitted_ensemble(seed: int, num_simulations: int, members: int, cache: Path) -> SimformerEnsemble:
    path = cache / f"ensemble{members}_seed{seed}_n{num_simulations}"
    if path.exists():
        return SimformerEnsemble.load(path, model)
    start = time.perf_counter()
    ensemble = SimformerEnsemble(model, num_members=members, num_simulations=num_simulations, progress_bar=False)
    ensemble.fit(jax.random.key(seed))
    print(f"# ensemble of {members}, seed {seed}, {num_simulations} simulations: "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    ensemble.save(path)
    return ensemble


def flow_parts(score_fn, sde, params, z, mask, density):
    """``(x_1, int_{t_min}^1 div F dt)`` of the probability-flow ODE from the points ``z``."""
    if density.num_steps is None:
        controller, dt0, max_steps = diffrax.PIDController(rtol=density.rtol, atol=density.atol), None, density.max_steps
    else:
        controller = diffrax.ConstantStepSize()
        dt0, max_steps = (1.0 - sde.t_min) / density.num_steps, density.num_steps
    latent = np.flatnonzero(~np.asarray(mask[0]))
    probes = jnp.asarray(np.eye(z.shape[-1], dtype=np.float32)[latent])

    def vector_field(time, state, args):
        y, _ = state

        def drift(y):
            return probability_flow_drift(score_fn, sde, params, jnp.where(mask, z, y), time, mask)

        dy, jvp_fn = jax.linearize(drift, y)
        return dy, jnp.sum(jax.vmap(lambda v: jnp.sum(v * jvp_fn(v), axis=-1))(
            jnp.broadcast_to(probes[:, None, :], (len(latent),) + y.shape)), axis=0)

    solution = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), density.solver, t0=sde.t_min, t1=1.0, dt0=dt0,
                                   y0=(z, jnp.zeros(z.shape[0])), stepsize_controller=controller,
                                   max_steps=max_steps, saveat=diffrax.SaveAt(t1=True))
    return jnp.where(mask, z, solution.ys[0][-1]), solution.ys[1][-1]


def gaussian_score_fn(sde, latent, mean, covariance):
    """The exact score of the noised z-space posterior on the latent tokens (zero elsewhere)."""

    def score_fn(params, x, time, mask):
        alpha, sigma = sde.marginal(time)
        cov_t = alpha[:, None, None] ** 2 * covariance + sigma[:, None, None] ** 2 * jnp.eye(len(mean))
        part = -jnp.linalg.solve(cov_t, (x[:, latent] - alpha[:, None] * mean)[..., None])[..., 0]
        return jnp.zeros_like(x).at[:, latent].set(part)

    return score_fn


def evaluate(sf: Simformer, x_o, num_points: int, rng, tight: bool, exact_score: bool):
    """Per-point errors (nats) of the parts; returns a dict of arrays."""
    state = sf._fitted_state("log_prob")
    space = sf.query_space()
    transform, sde = space.transform, state.sde
    mean, covariance = exact_posterior(x_o)
    theta = rng.multivariate_normal(mean, covariance, size=num_points)
    exact = multivariate_normal(mean, covariance).logpdf(theta)
    tokens = np.concatenate([theta, np.tile(x_o, (num_points, 1))], axis=1).astype(np.float32)
    mask_row = np.array([False, False, True, True, True])
    z = jnp.asarray(transform.to_z_fn(tokens))
    mask = jnp.broadcast_to(jnp.asarray(mask_row), z.shape)
    log_det = np.asarray(latent_log_abs_det_jacobian(transform, z, ~mask_row))
    z_mean = (mean - transform.mean[:2]) / transform.std[:2]
    z_cov = covariance / np.outer(transform.std[:2], transform.std[:2])
    p1_cov = z_cov + sde.prior_std(0.0) ** 2 * np.eye(2)  # VE at t = 1: alpha = 1, variance sigma_max^2

    def exact_terminal(x1):
        return multivariate_normal(z_mean, p1_cov).logpdf(np.asarray(x1)[:, :2])

    out = {"default": sf.log_prob({"theta": theta}, observed={"x": x_o}) - exact}
    narrow = ProbabilityFlowLogDensity(terminal_variance=0.0)  # the terminal density of a narrow conditional
    out["terminal_variance_0"] = sf.log_prob({"theta": theta}, observed={"x": x_o}, density=narrow) - exact
    density = ProbabilityFlowLogDensity()
    x1, divergence = flow_parts(space.score_fn, sde, state.params, z, mask, density)
    score_1 = space.score_fn(state.params, x1, jnp.ones(num_points), mask)
    terminal_net = np.asarray(terminal_log_prob(sde, score_1, mask))
    divergence = np.asarray(divergence)
    out["terminal"] = terminal_net - exact_terminal(x1)
    out["flow"] = exact_terminal(x1) + divergence - log_det - exact
    # Alternatives for log p_1: the prior's Gaussian N(0, v) (ignores the conditional's mean), and a
    # Gaussian centred at the Tweedie mean E[x_0 | x_1] averaged over the points' x_1.
    variance = float(sde.prior_std() ** 2)
    x1_latent = np.asarray(x1)[:, :2]
    prior_terminal = np.sum(-0.5 * x1_latent**2 / variance - 0.5 * np.log(2 * math.pi * variance), axis=-1)
    out["terminal_prior"] = prior_terminal - exact_terminal(x1)
    tweedie = x1_latent + (sde.prior_std(0.0) ** 2) * np.asarray(score_1)[:, :2]
    centre = tweedie.mean(axis=0)
    mean_terminal = np.sum(-0.5 * (x1_latent - centre) ** 2 / variance - 0.5 * np.log(2 * math.pi * variance), -1)
    out["terminal_tweedie_mean"] = mean_terminal - exact_terminal(x1)
    out["tweedie_centre_error"] = np.linalg.norm(centre - z_mean) * np.ones(num_points)
    if tight:
        tight_density = ProbabilityFlowLogDensity(rtol=1e-6, atol=1e-6, max_steps=16384)
        out["tight_solver"] = sf.log_prob({"theta": theta}, observed={"x": x_o}, density=tight_density) - exact
    if exact_score:
        score_fn = gaussian_score_fn(sde, np.array([0, 1]), jnp.asarray(z_mean, jnp.float32),
                                     jnp.asarray(z_cov, jnp.float32))
        x1_e, div_e = flow_parts(score_fn, sde, None, z, mask, density)
        score_e = score_fn(None, x1_e, jnp.ones(num_points), mask)
        out["exact_score"] = np.asarray(terminal_log_prob(sde, score_e, mask)) + np.asarray(div_e) - log_det - exact
        out["exact_score_flow"] = exact_terminal(x1_e) + np.asarray(div_e) - log_det - exact
    return out


def bands(sf: Simformer, num_points: int, sigmas=(1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)):
    """Where along the noise level the flow's error accumulates, and how it grows with r^2.

    Along the network's trajectory from each point, ``e(t) = exact log p_t(x_t) + int_{t_min}^t
    div F - log|dx/dz| - exact log p_0`` starts at 0 and ends at the flow's error; its increments
    between noise levels say which levels err. ``r^2`` is the point's squared Mahalanobis distance.
    """
    state, space = sf._fitted_state("log_prob"), sf.query_space()
    transform, sde, score_fn = space.transform, state.sde, space.score_fn
    sigmas = np.asarray(sigmas)
    ts = np.log(sigmas / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min)
    ts[0], ts[-1] = sde.t_min, 1.0
    mask_row = np.array([False, False, True, True, True])
    probes = jnp.asarray(np.eye(5, dtype=np.float32)[:2])
    final, distances, increments = [], [], []
    for number, x_o in enumerate(observations()):
        mean, covariance = exact_posterior(x_o)
        theta = np.random.default_rng(100 + number).multivariate_normal(mean, covariance, size=num_points)
        exact = multivariate_normal(mean, covariance).logpdf(theta)
        tokens = np.concatenate([theta, np.tile(x_o, (num_points, 1))], axis=1).astype(np.float32)
        z = jnp.asarray(transform.to_z_fn(tokens))
        mask = jnp.broadcast_to(jnp.asarray(mask_row), z.shape)
        log_det = np.asarray(latent_log_abs_det_jacobian(transform, z, ~mask_row))
        z_mean = (mean - transform.mean[:2]) / transform.std[:2]
        z_cov = covariance / np.outer(transform.std[:2], transform.std[:2])

        def vector_field(time, y_state, args):
            y, _ = y_state
            dy, jvp_fn = jax.linearize(
                lambda y: probability_flow_drift(score_fn, sde, state.params, jnp.where(mask, z, y), time, mask), y)
            quadratic = jax.vmap(lambda v: jnp.sum(v * jvp_fn(v), -1))(jnp.broadcast_to(probes[:, None], (2,) + y.shape))
            return dy, jnp.sum(quadratic, 0)

        solution = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=sde.t_min, t1=1.0, dt0=None,
                                       y0=(z, jnp.zeros(num_points)), max_steps=4096,
                                       stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4),
                                       saveat=diffrax.SaveAt(ts=jnp.asarray(ts)))
        ys, divergences = np.asarray(solution.ys[0]), np.asarray(solution.ys[1])
        e = np.array([multivariate_normal(z_mean, z_cov + float(sde.sigma(t)) ** 2 * np.eye(2)).logpdf(ys[k][:, :2])
                      + divergences[k] - log_det - exact for k, t in enumerate(ts)])
        final.append(e[-1])
        increments.append(np.diff(e, axis=0))
        distances.append(np.einsum("ni,ij,nj->n", theta - mean, np.linalg.inv(covariance), theta - mean))
    error, r2, increments = np.concatenate(final), np.concatenate(distances), np.concatenate(increments, axis=1)
    print(f"flow error: mean abs {np.mean(np.abs(error)):.3f}, mean {np.mean(error):+.3f}")
    print("| sigma from | to | mean abs increment | mean increment | sd |\n|---|---|---|---|---|")
    for k in range(len(sigmas) - 1):
        print(f"| {sigmas[k]:g} | {sigmas[k + 1]:g} | {np.mean(np.abs(increments[k])):.3f} | "
              f"{np.mean(increments[k]):+.3f} | {np.std(increments[k]):.3f} |")
    slope, intercept = np.polyfit(r2 - 2, error, 1)
    print(f"error ~ {intercept:+.3f} + {slope:.3f} (r^2 - 2); correlation {np.corrcoef(error, r2)[0, 1]:.2f}")
    print("| r^2 from | to | points | mean abs error | mean error |\n|---|---|---|---|---|")
    for low, high in [(0, 1), (1, 3), (3, 6), (6, np.inf)]:
        chosen = (r2 >= low) & (r2 < high)
        print(f"| {low} | {high} | {chosen.sum()} | {np.mean(np.abs(error[chosen])):.3f} | {np.mean(error[chosen]):+.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--simulations", nargs="+", type=int, default=[5_000])
    parser.add_argument("--points", type=int, default=200, help="exact posterior draws per observation")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/log_prob_accuracy"))
    parser.add_argument("--tight", action="store_true", help="also rtol = atol = 1e-6 on the network")
    parser.add_argument("--exact-score", action="store_true", help="also the exact score in the same machinery")
    parser.add_argument("--ensemble", type=int, default=0,
                        help="instead: a SimformerEnsemble of this many members (the mixture's log_prob only)")
    parser.add_argument("--bands", action="store_true",
                        help="instead: where along the noise level the flow's error accumulates (first seed)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.bands:
        bands(fitted(args.seeds[0], args.simulations[0], args.cache), args.points)
        return
    x_os = observations()
    print("| simulations | seed | observation | part | mean abs error | mean signed error | sd |")
    print("|---|---|---|---|---|---|---|")
    for num_simulations in args.simulations:
        for seed in args.seeds:
            if args.ensemble:
                ensemble = fitted_ensemble(seed, num_simulations, args.ensemble, args.cache)
            else:
                sf = fitted(seed, num_simulations, args.cache)
            rows = {}
            for number, x_o in enumerate(x_os):
                rng = np.random.default_rng(100 + number)
                if args.ensemble:
                    mean, covariance = exact_posterior(x_o)
                    theta = rng.multivariate_normal(mean, covariance, size=args.points)
                    mixture = ensemble.log_prob({"theta": theta}, observed={"x": x_o})
                    narrow = ProbabilityFlowLogDensity(terminal_variance=0.0)
                    mixture_narrow = ensemble.log_prob({"theta": theta}, observed={"x": x_o}, density=narrow)
                    members = [member.log_prob({"theta": theta}, observed={"x": x_o}) for member in ensemble.members]
                    exact = multivariate_normal(mean, covariance).logpdf(theta)
                    result = {f"ensemble{args.ensemble}": mixture - exact,
                              f"ensemble{args.ensemble}_terminal_variance_0": mixture_narrow - exact}
                    result.update({f"member{k}": value - exact for k, value in enumerate(members)})
                    result.update({f"member{i}-member{j}": members[i] - members[j]  # disagreement, not error
                                   for i in range(len(members)) for j in range(i + 1, len(members))})
                else:
                    result = evaluate(sf, x_o, args.points, rng, args.tight, args.exact_score)
                for part, error in result.items():
                    rows.setdefault(part, []).append(error)
                    print(f"| {num_simulations} | {seed} | {number} | {part} | {np.mean(np.abs(error)):.3f} | "
                          f"{np.mean(error):+.3f} | {np.std(error):.3f} |", flush=True)
            for part, errors in rows.items():
                error = np.concatenate(errors)
                print(f"| {num_simulations} | {seed} | all | {part} | {np.mean(np.abs(error)):.3f} | "
                      f"{np.mean(error):+.3f} | {np.std(error):.3f} |", flush=True)


if __name__ == "__main__":
    main()
