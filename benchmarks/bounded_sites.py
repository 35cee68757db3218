"""The three ways of handling a bounded-interval site, on a posterior cut off by its prior's bound.

Model: theta ~ Uniform(0, 1)^2, x ~ N(theta, 0.1^2 I), observed x = (0.97, 0.5). The exact
posterior is a product of truncated normals; theta[0]'s density is highest at the bound 1.
For each ``interval_sites`` mode one network is trained (same key, same simulations) and
its posterior compared with exact draws: random-forest C2ST (10,000 per side), the mean
of theta[0], and the mass within 0.05 of the bound.

    python benchmarks/bounded_sites.py            # writes benchmarks/results/bounded_sites.{csv,md}
    python benchmarks/bounded_sites.py --quick    # tiny settings (the test suite runs this)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import time
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy import stats

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st
from run import machine  # benchmarks/run.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = 0.1
X_OBSERVED = (0.97, 0.5)
MODES = ("transform", "reflect", "reject")


def edge_model():
    theta = numpyro.sample("theta", dist.Uniform(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, NOISE).to_event(1))


def exact_posterior(num_samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([
        stats.truncnorm(-x / NOISE, (1 - x) / NOISE, loc=x, scale=NOISE).rvs(num_samples, random_state=rng)
        for x in X_OBSERVED
    ])


def run(mode: str, args) -> dict:
    sf = Simformer(edge_model, num_simulations=args.num_simulations, interval_sites=mode, progress_bar=False,
                   network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   training=TrainingConfig(max_steps=args.max_steps, batch_size=256, validation_interval=250))
    sf.fit(jax.random.key(args.seed))
    start = time.perf_counter()
    tree = sf.sample(jax.random.key(args.seed + 1), observed={"x": np.array(X_OBSERVED)},
                     num_samples=args.num_samples)
    sampling_s = time.perf_counter() - start
    theta = tree.posterior["theta"].values.reshape(-1, 2)
    reference = exact_posterior(args.num_samples, args.seed)
    return {
        "interval_sites": mode,
        "c2st_rf": round(c2st(reference, theta, classifier="rf"), 4),
        "mean_theta0": round(float(theta[:, 0].mean()), 4),
        "exact_mean_theta0": round(float(reference[:, 0].mean()), 4),
        "mass_within_0.05_of_bound": round(float(np.mean(theta[:, 0] > 0.95)), 4),
        "exact_mass": round(float(np.mean(reference[:, 0] > 0.95)), 4),
        "share_inside": round(float(tree.attrs.get("support_acceptance", 1.0)), 4),
        "training_s": round(sf.training_time, 1),
        "steps": int(sf.history.step[-1]),
        "sampling_s": round(sampling_s, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-simulations", type=int, default=10_000)
    parser.add_argument("--max-steps", type=int, default=10_000)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny settings; results not written")
    parser.add_argument("--output", default=None, help="results file stem (default: bounded_sites)")
    args = parser.parse_args()
    if args.quick:
        args.num_simulations, args.max_steps, args.num_samples = 300, 20, 200
    rows = [run(mode, args) for mode in MODES]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    settings = (f"{args.num_simulations} simulations, at most {args.max_steps} steps, {args.num_samples} draws per "
                f"side, seed {args.seed}; {datetime.date.today()}; {machine()}")
    table = "\n".join(lines) + f"\n\n{settings}\n"
    print(table)
    if args.quick and args.output is None:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (args.output or "bounded_sites")
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
