"""Where Two Moons goes wrong: posterior mass next to the prior's box, Simformer against reference.

Trains the Simformer as ``run.py`` does for one seed (same keys, library defaults, 10,000
simulations, dense attention), or loads a checkpoint it saved before, then prints for some
sbibm observations the fraction of draws within ``0.01`` and ``0.001`` of the box
``[-1, 1]^2``, for sbibm's reference samples and for 10,000 Simformer draws.

    python benchmarks/edge_mass.py --seed 0 --checkpoint /tmp/two_moons_seed0

Not a test: training takes about ten minutes on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from numpyro_simformer import Simformer, tasks


def edge_fractions(theta: np.ndarray, margins=(0.01, 0.001)) -> list[float]:
    """Fraction of rows of ``theta`` within each margin of the box [-1, 1]^d."""
    distance = 1.0 - np.abs(theta).max(axis=1)
    return [float(np.mean(distance < margin)) for margin in margins]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, required=True, help="loaded if it exists, else trained and saved")
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 5, 7, 10])
    args = parser.parse_args()

    task = tasks.two_moons()
    key_fit, _, _ = jax.random.split(jax.random.key(args.seed), 3)  # run.py's keys
    if args.checkpoint.exists():
        sf = Simformer.load(args.checkpoint, task.model)
    else:
        sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
                       exclude_sites=list(task.exclude_sites))
        sf.fit(key_fit)
        sf.save(args.checkpoint)
    print("| observation | draws | within 0.01 of the box | within 0.001 |\n|---|---|---|---|")
    for number in args.observations:
        tree = sf.sample(jax.random.key(number), observed=task.observation(number), num_samples=10_000)
        estimate = np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2)
        for name, draws in (("reference", task.reference_posterior_samples(number)), ("Simformer", estimate)):
            near, nearer = edge_fractions(draws)
            print(f"| {number} | {name} | {near:.2%} | {nearer:.2%} |")


if __name__ == "__main__":
    main()
