"""Benchmark: accuracy (C2ST) against cost (network evaluations per sample) of the samplers.

For each task, one Simformer is trained (library defaults, 10,000 simulations), then the
posterior of sbibm's observation(s) is drawn with every sampler below, 10,000 samples
each: Euler–Maruyama at 500/200/100/50 steps (500 is the paper's setting and the
baseline), the probability-flow ODE with fixed Heun steps and with adaptive Tsit5, and
EDM Heun steps on Karras et al.'s schedule, deterministic and with churn. Per sampler it reports

- network evaluations per sample, *measured*: a callback counts the score calls of one
  run (each call evaluates the network once for every sample of the batch);
- samples per second for 10,000 samples (compiled ahead of time, so compilation is not
  counted);
- C2ST against sbibm's reference posterior samples, and its difference to 500-step EM;
- C2ST against 500-step EM's own samples (0.5: the sampler reproduces what 500 EM steps
  draw from the same network; EM's run-to-run differences measure the noise floor).

It prints a table and writes ``benchmarks/results/samplers.csv`` and ``samplers.md``,
with the machine. Not a test: it takes tens of minutes on 2 cores.

    python benchmarks/samplers.py                       # full settings
    python benchmarks/samplers.py --max-training-time 300 --c2st mlp-early --num-c2st-samples 5000
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "task", "observation", "sampler", "nominal_evaluations", "measured_evaluations", "c2st", "c2st_minus_em500",
    "c2st_against_em500",
    "samples_per_s", "sampling_s", "num_samples", "num_c2st_samples", "c2st_kind", "training_s", "steps",
    "machine", "date",
]


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
            f"Python {platform.python_version()}, load average {load:.1f} at start")


def samplers(quick: bool):
    import diffrax

    from numpyro_simformer.samplers import EDMHeun, EulerMaruyama, ProbabilityFlowODE

    chosen = [
        ("EM 500", EulerMaruyama(num_steps=500)),
        ("EM 200", EulerMaruyama(num_steps=200)),
        ("EM 100", EulerMaruyama(num_steps=100)),
        ("EM 50", EulerMaruyama(num_steps=50)),
        ("ODE Heun 50", ProbabilityFlowODE(solver=diffrax.Heun(), num_steps=50)),
        ("ODE Heun 25", ProbabilityFlowODE(solver=diffrax.Heun(), num_steps=25)),
        ("ODE Heun 12", ProbabilityFlowODE(solver=diffrax.Heun(), num_steps=12)),
        ("ODE Tsit5 tol 1e-3", ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None, rtol=1e-3, atol=1e-3)),
        ("ODE Tsit5 tol 1e-2", ProbabilityFlowODE(solver=diffrax.Tsit5(), num_steps=None, rtol=1e-2, atol=1e-2)),
        ("EDM Heun 25", EDMHeun(num_steps=25)),
        ("EDM Heun 18", EDMHeun(num_steps=18)),
        ("EDM Heun 13", EDMHeun(num_steps=13)),
        ("EDM Heun 9", EDMHeun(num_steps=9)),
        ("EDM Heun 5", EDMHeun(num_steps=5)),
        ("EDM Heun 25 churn", EDMHeun(num_steps=25, churn=10.0)),
        ("EDM Heun 13 churn", EDMHeun(num_steps=13, churn=10.0)),
    ]
    if quick:
        keep = {"EM 500", "EM 200", "EM 100", "EM 50", "ODE Heun 25", "ODE Heun 12", "ODE Tsit5 tol 1e-3",
                "EDM Heun 25", "EDM Heun 13", "EDM Heun 9", "EDM Heun 5", "EDM Heun 25 churn", "EDM Heun 13 churn"}
        chosen = [item for item in chosen if item[0] in keep]
    return chosen


def measured_evaluations(sf, sampler, observed, num_samples: int = 256) -> float:
    """Network evaluations per sample, counted with a host callback on the score function."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from numpyro_simformer.inference.query import observed_tokens, to_z_checked

    calls = []

    def counting_score_fn(params, x, time, condition_mask):
        jax.debug.callback(lambda: calls.append(1))
        return sf.state.score_fn(params, x, time, condition_mask)

    values, mask = observed_tokens(sf.layout, observed)
    z_observed = to_z_checked(sf.layout, sf.transform, values, mask)
    sample_fn = jax.jit(sampler.build(counting_score_fn, sf.sde), static_argnums=4)
    jax.block_until_ready(sample_fn(jax.random.key(0), sf.params, jnp.asarray(z_observed), jnp.asarray(mask), num_samples))
    jax.effects_barrier()
    return float(np.sum(calls))


def compile_only(sf, sampler, observed, chunk: int):
    """Compile the query's jitted sampling call ahead of time, without running it."""
    import jax
    import jax.numpy as jnp

    from numpyro_simformer.inference.query import observed_tokens, to_z_checked

    values, mask = observed_tokens(sf.layout, observed)
    z_observed = to_z_checked(sf.layout, sf.transform, values, mask)
    sample_fn = sf.query_space().sample_fn(sampler, chunk)
    sample_fn.lower(jax.random.key(0), sf.params, jnp.asarray(z_observed), jnp.asarray(mask)).compile()


def posterior_draws(tree, task, num_parameter_tokens):
    import numpy as np

    draws = {name: np.asarray(value.values).reshape((-1,) + value.shape[2:])
             for name, value in tree["posterior"].data_vars.items()}
    return np.concatenate([draws[name].reshape(len(draws[name]), -1) for name in task.parameter_sites], axis=1)


def run_task(name, args, writer, rows, saved):
    import jax
    import numpy as np

    from numpyro_simformer import Simformer, TrainingConfig
    from numpyro_simformer import tasks as task_module
    from numpyro_simformer.diagnostics import c2st

    task = getattr(task_module, name)()
    training = TrainingConfig(max_time=args.max_training_time)
    sf = Simformer(task.model, num_simulations=args.num_simulations, token_sites=list(task.token_sites),
                   exclude_sites=list(task.exclude_sites), training=training, progress_bar=False)
    start = time.perf_counter()
    sf.fit(jax.random.key(args.seed))
    print(f"{name}: trained in {time.perf_counter() - start:.0f} s, {int(sf.history.step[-1])} steps", flush=True)
    for number in args.observations:
        observed = task.observation(number)
        reference = task.reference_posterior_samples(number)
        baseline = None
        for label, sampler in samplers(args.quick):
            key = jax.random.fold_in(jax.random.key(args.seed + 1), number)
            compile_only(sf, sampler, observed, min(args.num_samples, args.batch_size))
            start = time.perf_counter()
            tree = sf.sample(key, observed=observed, num_samples=args.num_samples, sampler=sampler,
                             batch_size=args.batch_size)
            sampling_s = time.perf_counter() - start
            estimate = posterior_draws(tree, task, reference.shape[1])
            if args.save_samples:
                saved[f"{name}/{number}/{label}"] = estimate.astype(np.float32)
            n = min(args.num_c2st_samples, len(estimate), len(reference))
            if args.c2st == "rf":
                score = c2st(reference[:n], estimate[:n], classifier="rf")
            else:
                score = c2st(reference[:n], estimate[:n], early_stopping=args.c2st == "mlp-early")
            if baseline is None:
                baseline, baseline_draws, against = score, estimate[:n], float("nan")  # not against itself
            elif args.c2st == "rf":
                against = c2st(baseline_draws, estimate[:n], classifier="rf")
            else:
                against = c2st(baseline_draws, estimate[:n], early_stopping=args.c2st == "mlp-early")
            row = {
                "task": name, "observation": number, "sampler": label,
                "nominal_evaluations": sampler.network_evaluations if sampler.network_evaluations else "",
                "measured_evaluations": round(measured_evaluations(sf, sampler, observed), 1),
                "c2st": round(score, 4), "c2st_minus_em500": round(score - baseline, 4),
                "c2st_against_em500": round(against, 4),
                "samples_per_s": round(args.num_samples / sampling_s, 1), "sampling_s": round(sampling_s, 2),
                "num_samples": args.num_samples, "num_c2st_samples": n, "c2st_kind": args.c2st,
                "training_s": round(sf.training_time, 1), "steps": int(sf.history.step[-1]),
                "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            }
            writer.writerow(row)
            rows.append(row)
            print(f"  obs {number} {label:>20}: evals {row['measured_evaluations']:>6}  C2ST {score:.3f} "
                  f"({score - baseline:+.3f} vs EM 500; {against:.3f} against its samples)  "
                  f"{row['samples_per_s']:>8} samples/s", flush=True)


def write_markdown(rows, path: Path, args):
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["sampler"]), []).append(row)
    lines = [
        "| task | sampler | network evaluations / sample (measured) | C2ST | C2ST − EM 500 | C2ST against EM 500's samples | samples / s |",
        "|---|---|---|---|---|---|---|",
    ]
    for (task, label), group in groups.items():
        mean = lambda key: float(np.mean([float(r[key]) for r in group]))
        against = "—" if label == "EM 500" else f"{mean('c2st_against_em500'):.3f}"
        lines.append(f"| {task} | {label} | {mean('measured_evaluations'):.0f} | {mean('c2st'):.3f} | "
                     f"{mean('c2st_minus_em500'):+.3f} | {against} | {mean('samples_per_s'):,.0f} |")
    kind = {"mlp": "sbibm's MLP C2ST (no early stopping)", "mlp-early": "MLP C2ST with early stopping",
            "rf": "random-forest C2ST (sbi's)"}[args.c2st]
    lines += [
        "",
        f"Machine: {rows[0]['machine'] if rows else machine()}.",
        f"Settings: {args.num_simulations:,} simulations, training "
        f"{'to the default stopping rule' if args.max_training_time is None else f'capped at {args.max_training_time:.0f} s'}"
        f" ({', '.join(sorted({f'{r['task']}: {r['steps']} steps' for r in rows}))}), observation(s) "
        f"{', '.join(map(str, args.observations))}, {args.num_samples:,} samples per sampler, {kind} on "
        f"{rows[0]['num_c2st_samples'] if rows else '?'} samples per side, seed {args.seed}.",
        "Mean over observations. Samples per second excluding compilation, batch size "
        f"{args.batch_size:,}. Adaptive solvers' evaluations vary with the batch.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons", "linear_gaussian"])
    parser.add_argument("--num-simulations", type=int, default=10_000)
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--num-c2st-samples", type=int, default=10_000)
    parser.add_argument("--c2st", choices=["mlp", "mlp-early", "rf"], default="mlp")
    parser.add_argument("--max-training-time", type=float, default=None, help="seconds; default: no cap")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="13 of the 16 samplers")
    parser.add_argument("--name", default="samplers")
    parser.add_argument("--save-samples", default=None, help="write every sampler's draws to this .npz")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the markdown table from the CSV of an earlier run (same settings flags)")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"{args.name}.csv"
    if args.markdown_only:
        with csv_path.open() as handle:
            rows = list(csv.DictReader(handle))
        write_markdown(rows, csv_path.with_suffix(".md"), args)
        print(csv_path.with_suffix(".md").read_text())
        return
    rows: list[dict] = []
    saved: dict = {}
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for name in args.tasks:
            run_task(name, args, writer, rows, saved)
            handle.flush()
            if args.save_samples:
                import numpy as np

                np.savez_compressed(args.save_samples, **saved)
    write_markdown(rows, csv_path.with_suffix(".md"), args)
    print(csv_path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
