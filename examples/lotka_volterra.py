"""Lotka–Volterra: a time series observed anywhere, parameters and predictions in one query.

The model solves the predator–prey ODE with diffrax inside NumPyro; prey ``u`` and predators
``v`` are observed with noise at times given as model arguments. The Simformer is trained
on random subsets of a dense simulated grid and then asked, in one query, for the
parameters and the whole trajectory given a handful of unstructured observations (the
paper's Figure 5): posterior and posterior predictive tighten as observations are added.

Run:  python examples/lotka_volterra.py          (about 15 minutes on a 2-core CPU)
      python examples/lotka_volterra.py --tiny   (what the test suite runs)

Writes ``lotka_volterra.png`` to the output folder (default ``docs/images``).
"""

import argparse
import pathlib
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import AffineTransform, SigmoidTransform

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig

T_END = 15.0
NOISE = 0.1


def trajectory(theta, times):
    """Prey and predator populations at ``times`` (any order), from (u, v) = (1, 0.5) at t = 0."""

    def vector_field(t, y, args):
        u, v = y
        return jnp.stack([theta[0] * u - theta[1] * u * v, -theta[2] * v + theta[3] * u * v])

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=0.0, t1=T_END, dt0=0.05, y0=jnp.array([1.0, 0.5]),
        saveat=diffrax.SaveAt(dense=True), stepsize_controller=diffrax.ConstantStepSize(), max_steps=400,
    )
    return jax.vmap(solution.evaluate)(jnp.asarray(times))  # (len(times), 2)


def lotka_volterra(t_u, t_v):
    """theta_k = 1 + 2 sigmoid(z_k), z_k ~ N(0, 1); u and v observed at t_u and t_v, noise 0.1."""
    base = dist.Normal(0.0, 1.0).expand([4]).to_event(1)
    theta = numpyro.sample("theta", dist.TransformedDistribution(base, [SigmoidTransform(), AffineTransform(1.0, 2.0, domain=constraints.unit_interval)]))
    with numpyro.plate("time_u", len(t_u)):
        numpyro.sample("u", dist.Normal(trajectory(theta, t_u)[:, 0], NOISE))
    with numpyro.plate("time_v", len(t_v)):
        numpyro.sample("v", dist.Normal(trajectory(theta, t_v)[:, 1], NOISE))


def main(tiny: bool = False, output: str = "docs/images") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if tiny:
        settings = dict(num_simulations=300, network=NetworkConfig(width=16, num_layers=1, num_heads=1, mlp_width=32),
                        training=TrainingConfig(max_steps=100, batch_size=32))
        grid, num_samples, num_predictions = np.linspace(0.0, T_END, 12), 50, 24
        counts = (12,)  # one query: each new set of times re-reads the graph (~30 s here)
    else:
        settings = dict(num_simulations=10_000, training=TrainingConfig(max_steps=6_000))
        grid, num_samples, num_predictions = np.linspace(0.0, T_END, 100), 1_000, 200
        counts = (4, 12)
    start = time.perf_counter()
    sf = Simformer(lotka_volterra, coordinates={"time_u": "t_u", "time_v": "t_v"}, points_per_dim=20,
                   progress_bar=not tiny, **settings)
    sf.fit(jax.random.key(0), t_u=grid, t_v=grid)
    print(f"trained in {time.perf_counter() - start:.0f} s on {sf.simulation_info.num_valid} simulations")

    # One ground truth, observed at random times; queries with the first 4 and the first 12.
    theta_true = np.array([1.6, 2.2, 1.4, 1.9])
    rng = np.random.default_rng(1)
    t_all = np.sort(rng.uniform(0.0, T_END, 12))
    truth = np.asarray(trajectory(jnp.asarray(theta_true), t_all))
    observations = truth + NOISE * rng.normal(size=truth.shape)
    t_new = np.linspace(0.0, T_END, num_predictions // 2)
    dense_truth = np.asarray(trajectory(jnp.asarray(theta_true), t_new))

    results = {}
    figure, axes = plt.subplots(len(counts), 2, figsize=(11, 3.25 * len(counts)), squeeze=False,
                                gridspec_kw={"width_ratios": [2.2, 1]})
    for row, count in enumerate(counts):
        # Prey at the even-indexed times, predators at the odd ones: unstructured observations.
        t_u_obs, t_v_obs = t_all[:count][0::2], t_all[:count][1::2]
        u_obs, v_obs = observations[:count][0::2, 0], observations[:count][1::2, 1]
        t_u = np.concatenate([t_u_obs, t_new])
        t_v = np.concatenate([t_v_obs, t_new])
        nan = np.full(t_new.size, np.nan)
        tree = sf.sample(jax.random.key(2 + row), num_samples=num_samples,
                         observed={"u": np.concatenate([u_obs, nan]), "v": np.concatenate([v_obs, nan])},
                         model_kwargs={"t_u": t_u, "t_v": t_v})
        results[count] = tree
        axis = axes[row, 0]
        for name, obs_t, obs, colour, index in (("u", t_u_obs, u_obs, "C0", 0), ("v", t_v_obs, v_obs, "C1", 1)):
            draws = tree.posterior_predictive[name].values.reshape(num_samples, -1)[:, len(obs_t):]
            low, median, high = np.quantile(draws, [0.05, 0.5, 0.95], axis=0)
            axis.fill_between(t_new, low, high, color=colour, alpha=0.25, label=f"{name}: 90 % predictive")
            axis.plot(t_new, median, color=colour)
            axis.plot(t_new, dense_truth[:, index], color=colour, linestyle="--", linewidth=1)
            axis.scatter(obs_t, obs, color=colour, edgecolor="k", zorder=3)
        axis.set_title(f"{count} observations ({len(t_u_obs)} prey, {len(t_v_obs)} predators); dashed: truth")
        axis.set_xlabel("t")
        axis.legend(loc="upper right", fontsize=8)
        theta = tree.posterior["theta"].values.reshape(num_samples, 4)
        parts = axes[row, 1].violinplot(theta, showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.5)
        axes[row, 1].scatter(np.arange(1, 5), theta_true, color="k", marker="x", label="true θ")
        axes[row, 1].set_xticks(np.arange(1, 5), [f"θ{k}" for k in range(4)])
        axes[row, 1].set_title("posterior of θ")
        axes[row, 1].legend(fontsize=8)
        print(f"{count} observations: posterior mean {theta.mean(0).round(2)}, sd {theta.std(0).round(2)} "
              f"(true {theta_true})")
    figure.tight_layout()
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figure.savefig(output / "lotka_volterra.png", dpi=110)
    plt.close(figure)
    results["figure"] = output / "lotka_volterra.png"
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings (seconds; for the tests)")
    parser.add_argument("--output", default="docs/images")
    arguments = parser.parse_args()
    main(tiny=arguments.tiny, output=arguments.output)
