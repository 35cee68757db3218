"""Cost of high-dimensional data sites, grouped and one element per token.

One model family: theta (2,) ~ N(0, I), x (n,) = theta_0 + theta_1 t + sigma eps on n points
t in [-1, 1], with sigma = 0.2 sqrt(n) so the posterior has the same width at every n. For
n in 10, 100, 1,000, 10,000 and for the default grouping (``elements_per_token=None``) and
one element per token (``elements_per_token=1``), a fresh subprocess reads the model, draws
the simulations, trains a fixed number of steps and draws posterior samples, and reports:
reading the model (the element graph), steps/s, seconds per 10,000 posterior draws (from
``--draws`` draws, scaled) and the process's peak memory. This measures cost only: the
steps are fixed, not trained to early stopping, so no accuracy column.

``--accuracy`` measures what the defaults buy instead: ``Simformer(model,
num_simulations=10_000)`` with nothing else (default grouping, training to early stopping or
the step cap; ``--max-time`` adds a training budget),
its training time and steps, and the posterior C2ST (sbibm's MLP, 10,000 draws per side)
against the exact Gaussian posterior on three observations simulated from the model.

    python benchmarks/high_dim.py                   # writes benchmarks/results/high_dim.md
    python benchmarks/high_dim.py --sizes 10 100    # a subset
    python benchmarks/high_dim.py --accuracy --sizes 10 100 1000   # results/high_dim_accuracy.md

Not a test. One element per token at 10,000 elements is not run: the attention logits of
one batch alone would take batch x heads x 10,002^2 x 4 bytes (51 GB at the default batch).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Both workers' model: a linear trend observed at n points (sys.argv[1]), and the token
# columns of a fitted Simformer's row.
MODEL = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
from numpyro_simformer import Simformer, TrainingConfig

n = int(sys.argv[1])
sigma = 0.2 * np.sqrt(n)
t = np.linspace(-1, 1, n)

def model():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta[0] + theta[1] * jnp.asarray(t), sigma).to_event(1))

def token_columns(sf):
    grouping = sf.spec.grouping
    return {"elements": n + 2, "tokens": n + 2 if grouping is None else grouping.num_tokens,
            "elements_per_token": 1 if grouping is None else max(grouping.elements_per_token.values())}
"""

WORKER = MODEL + r"""
per_token, steps, draws = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
per_token = None if per_token == "auto" else int(per_token)
sf = Simformer(model, num_simulations=2_000, elements_per_token=per_token, progress_bar=False,
               training=TrainingConfig(max_steps=steps, patience=None, validation_interval=steps))
start = time.perf_counter()
spec = sf.read_model(jax.random.key(0))
read_s = time.perf_counter() - start
sf.fit(jax.random.key(0))
x_o = np.asarray(0.5 - 1.0 * t)
sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=draws)  # compile the sampler for this many draws
start = time.perf_counter()
tree = sf.sample(jax.random.key(2), observed={"x": x_o}, num_samples=draws)
sample_s = time.perf_counter() - start
print(json.dumps({
    **token_columns(sf),
    "read_s": read_s,
    "layers": sf.state.network.num_layers,
    "steps": int(sf.history.step[-1]),
    "training_s": sf.training_time,
    "steps_per_s": int(sf.history.step[-1]) / sf.training_time,
    "s_per_10k_draws": sample_s * 10_000 / draws,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


ACCURACY_WORKER = MODEL + r"""
from numpyro_simformer.diagnostics import c2st

num_draws = 10_000
max_time = float(sys.argv[2]) if float(sys.argv[2]) > 0 else None
training = {} if max_time is None else {"training": TrainingConfig(max_time=max_time)}
sf = Simformer(model, num_simulations=10_000, progress_bar=False, **training).fit(jax.random.key(0))
design = np.stack([np.ones(n), t], axis=1)  # x = design @ theta + sigma eps
covariance = np.linalg.inv(np.eye(2) + design.T @ design / sigma**2)
rng = np.random.default_rng(0)
scores, sampling_s = [], []
for index in range(3):
    theta_true = rng.standard_normal(2)
    x_o = design @ theta_true + sigma * rng.standard_normal(n)
    mean = covariance @ design.T @ x_o / sigma**2
    exact = rng.multivariate_normal(mean, covariance, size=num_draws)
    start = time.perf_counter()
    tree = sf.sample(jax.random.key(10 + index), observed={"x": x_o}, num_samples=num_draws)
    sampling_s.append(time.perf_counter() - start)
    scores.append(c2st(exact, np.asarray(tree.posterior["theta"].values).reshape(num_draws, 2)))
print(json.dumps({
    **token_columns(sf),
    "layers": sf.state.network.num_layers,
    "steps": int(sf.history.step[-1]),
    "training_s": sf.training_time,
    "s_per_10k_draws": float(np.median(sampling_s)),
    "c2st": [round(float(score), 3) for score in scores],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def _worker(source: str, *argv) -> dict:
    result = subprocess.run([sys.executable, "-c", source, *map(str, argv)], capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def accuracy(sizes: list[int], max_time: float | None, out: str | None = None) -> None:
    """Default settings at 10^4 simulations (and optionally a training time budget): training
    time and posterior C2ST against the exact answer."""
    lines = ["| data elements + 2 | tokens | elements per token | layers | steps | training s | s per 10,000 draws "
             "| C2ST (3 observations) | mean | peak memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        row = _worker(ACCURACY_WORKER, n, max_time or 0)
        print(n, row, flush=True)
        if "error" in row:
            lines.append(f"| {n + 2} | | | | | | | {row['error']} | | |")
            continue
        lines.append(f"| {row['elements']} | {row['tokens']} | {row['elements_per_token']} | {row['layers']} | {row['steps']} "
                     f"| {row['training_s']:.0f} | {row['s_per_10k_draws']:.1f} | "
                     f"{', '.join(f'{score:.3f}' for score in row['c2st'])} | {sum(row['c2st']) / 3:.3f} "
                     f"| {row['peak_rss_mib']:.0f} |")
    budget = ("" if max_time is None else f" --max-time {max_time:g}") + ("" if out is None else f" --out {out}")
    settings = "nothing else" if max_time is None else f"`training=TrainingConfig(max_time={max_time:g})`"
    code = _code()
    text = (f"# High-dimensional data sites: accuracy with default settings\n\nMachine: {_machine()}. Code: {code}. Command: "
            f"`python benchmarks/high_dim.py --accuracy --sizes {' '.join(map(str, sizes))}{budget}`. "
            f"`Simformer(model, num_simulations=10_000)` and {settings}, one fresh process per row; C2ST: sbibm's "
            "MLP, 10,000 posterior draws against 10,000 exact ones, three observations simulated from the model.\n\n"
            + "\n".join(lines) + "\n")
    RESULTS.mkdir(exist_ok=True)
    out = out or ("high_dim_accuracy.md" if max_time is None else "high_dim_accuracy_budget.md")
    (RESULTS / out).write_text(text)
    print(text)


def _code() -> str:
    """The short hash of the checkout the benchmark ran from."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def _machine() -> str:
    return f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores"


def run(n: int, per_token: str, steps: int, draws: int) -> dict:
    row = _worker(WORKER, n, per_token, steps, draws)
    return {"elements": n + 2, **row} if "error" in row else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--draws", type=int, default=1_000)
    parser.add_argument("--accuracy", action="store_true",
                        help="default settings at 10^4 simulations: training time and C2ST against the exact posterior")
    parser.add_argument("--max-time", type=float, default=None,
                        help="with --accuracy: TrainingConfig(max_time=...) in seconds (default: none, the step cap)")
    parser.add_argument("--out", default=None,
                        help="with --accuracy: file name in results/ (default: high_dim_accuracy[_budget].md)")
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args.sizes, args.max_time, args.out)
        return
    rows = []
    for n in args.sizes:
        for mode in ("auto", "1"):
            if mode == "1" and n > 1_000:
                rows.append({"elements": n + 2, "mode": "1 per token", "error": "not run (attention memory)"})
                continue
            steps = args.steps if mode == "auto" or n <= 100 else max(20, args.steps // 10)
            draws = args.draws if mode == "auto" or n <= 100 else max(10, args.draws // 10)
            row = run(n, mode, steps, draws)
            row["mode"] = "default" if mode == "auto" else "1 per token"
            rows.append(row)
            print(row, flush=True)
    header = ("| data elements + 2 | tokens | mode | reading the model s | steps | steps/s | s per 10,000 draws "
              "| peak memory MiB |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['elements']} | | {row['mode']} | {row['error']} | | | | |")
            continue
        lines.append(f"| {row['elements']} | {row['tokens']} | {row['mode']} ({row['elements_per_token']} per token) "
                     f"| {row['read_s']:.1f} | {row['steps']} | {row['steps_per_s']:.1f} | "
                     f"{row['s_per_10k_draws']:.1f} | {row['peak_rss_mib']:.0f} |")
    text = (f"# High-dimensional data sites: cost\n\nMachine: {_machine()}. Command: `python benchmarks/high_dim.py "
            f"--sizes {' '.join(map(str, args.sizes))} --steps {args.steps} --draws {args.draws}`. "
            "2,000 simulations, default network and sampler; each row a fresh process. Rows with one element "
            "per token above 100 elements train and draw a tenth as many steps and draws (rates scaled). Steps/s "
            "include compiling the training step; draws are timed on a second call of the same size (compiled).\n\n"
            + "\n".join(lines) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "high_dim.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
