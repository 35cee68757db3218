"""Benchmark runner: C2ST of the Simformer on the paper's tasks, one table for all.

Each run (task, simulation budget, attention, seed) trains one Simformer with the
library's defaults in a fresh subprocess (so its peak memory is its own), then answers
posterior queries for sbibm observations, or random conditionals, and scores them with
C2ST against the task's reference samples: the MLP classifier exactly as sbibm defines it
and the random forest the paper used. Rows are appended to a CSV as they finish; an
interrupted benchmark resumes where it stopped. A markdown table is written beside it.

    python benchmarks/run.py --name core --tasks linear_gaussian two_moons \\
        --budgets 10000 --attention dense --observations 1 2 3

Not a test: it takes minutes to hours on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_CACHE = RESULTS / "reference_cache"  # not committed (.gitignore)
FIELDS = [
    "task", "num_simulations", "attention", "seed", "query", "c2st_mlp", "mlp_early_stopping", "c2st_rf", "num_c2st_samples",
    "training_s", "steps", "stopped_early", "sampling_s", "network_evaluations", "peak_rss_mib",
    "simulations_invalid", "settings", "machine", "date",
]

# The paper's C2ST (random forest), read from the authors' figures; 1e3 / 1e4 / 1e5 simulations.
PAPER = {
    ("linear_gaussian", "dense"): {1_000: 0.732, 10_000: 0.635, 100_000: 0.505},
    ("linear_gaussian", "undirected"): {1_000: 0.540, 10_000: 0.507, 100_000: 0.503},
    ("gaussian_mixture", "dense"): {1_000: 0.574, 10_000: 0.515, 100_000: 0.506},
    ("gaussian_mixture", "undirected"): {1_000: 0.572, 10_000: 0.515, 100_000: 0.504},
    ("two_moons", "dense"): {1_000: 0.611, 10_000: 0.525, 100_000: 0.506},
    ("two_moons", "undirected"): {1_000: 0.611, 10_000: 0.525, 100_000: 0.505},
    ("slcp", "dense"): {1_000: 0.924, 10_000: 0.784, 100_000: 0.703},
    ("slcp", "undirected"): {1_000: 0.831, 10_000: 0.646, 100_000: 0.569},
    ("tree", "undirected", "random"): {1_000: 0.590, 10_000: 0.541, 100_000: 0.527},
    ("hmm", "undirected", "random"): {1_000: 0.601, 10_000: 0.541, 100_000: 0.526},
    ("two_moons", "undirected", "random"): {1_000: 0.601, 10_000: 0.526, 100_000: 0.510},
    ("slcp", "undirected", "random"): {1_000: 0.729, 10_000: 0.600, 100_000: 0.555},
    # All conditionals of the paper's Lotka–Volterra (20 random times per species, dense attention).
    ("lotka_volterra", "dense", "random"): {1_000: 0.850, 10_000: 0.668, 100_000: 0.623},
}


def query_kind(query: str) -> str:
    """"random" for a random-conditional query ("random 3"), else "posterior" ("observation 1")."""
    return "random" if str(query).startswith("random") else "posterior"


def paper_key(kind: str, task: str, attention: str) -> tuple:
    """The key of ``PAPER`` for a task's posterior or random-conditional curve under one mask."""
    return (task, attention, "random") if kind == "random" else (task, attention)


def machine() -> str:
    """The host, and the accelerator when JAX runs on one (call it where the network ran)."""
    import jax

    device = jax.devices()[0]
    accelerator = "" if device.platform == "cpu" else f", {jax.device_count()}x {device.device_kind}"
    return f"{platform.machine()} {os.cpu_count()} cores{accelerator}, {platform.python_version()}"


def graph_is_complete(task_name: str) -> bool:
    """True when the task's moral graph links every pair of tokens (Two Moons, Gaussian Mixture).

    Its undirected attention mask is then the dense one, the network and its training are the
    same, and a second run would only repeat the dense run: the runner skips it and the table
    shows the dense row for both.
    """
    from numpyro_simformer import tasks as task_module
    from numpyro_simformer.model.graph import attention_mask, element_parents

    task = getattr(task_module, task_name)()
    _, parents = element_parents(task.model, token_sites=list(task.token_sites), exclude_sites=list(task.exclude_sites))
    return bool(attention_mask(parents, "undirected").all())


def _queries(task, args, rng_key):
    """(name, observed, reference samples as a flat array over the latent tokens)."""
    import jax
    import numpy as np

    from numpyro_simformer.tasks import random_condition_masks

    if args.conditionals == "posterior":
        for number in args.observations:
            observed = task.observation(number)
            reference = task.reference_posterior_samples(number)
            yield f"observation {number}", observed, reference
        return
    from numpyro_simformer.tasks import ReferenceNotConvergedError

    key_masks, key_joint, key_reference = jax.random.split(rng_key, 3)
    masks = random_condition_masks(key_masks, task, args.num_conditionals)
    joint = task.flatten(task.simulate(key_joint, args.num_conditionals))
    for index, mask in enumerate(masks):
        observed = task.observed_from_mask(joint[index], mask)
        # The conditionals depend on the seed only: every budget and attention kind of a task
        # shares them, so their references (NUTS can take minutes) are computed once.
        cache = REFERENCE_CACHE / f"{task.name}_seed{args.seed}_{index}_of_{args.num_conditionals}_{args.num_samples}.npz"
        cached = np.load(cache) if cache.exists() else None
        if cached is not None and np.array_equal(cached["mask"], mask):
            reference = cached["reference"]
        else:
            try:
                draws = task.reference_conditional(jax.random.fold_in(key_reference, index), observed, args.num_samples)
            except ReferenceNotConvergedError as error:  # no trusted reference: not scored, and said so
                print(f"    random {index}: skipped, its reference did not converge ({error})", flush=True)
                continue
            reference = task.flatten({name: draws.get(name, np.asarray(observed[name])[None].repeat(args.num_samples, 0))
                                      for name in task.token_sites})[:, ~mask]
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, reference=reference, mask=mask)
        yield f"random {index}", observed, reference


def single_run(args) -> list[dict]:
    """Train one Simformer and score its queries (runs inside the subprocess)."""
    import jax
    import numpy as np

    from numpyro_simformer import NetworkConfig, Simformer, SimformerEnsemble, TrainingConfig
    from numpyro_simformer.diagnostics import c2st
    from numpyro_simformer import tasks as task_module

    task = getattr(task_module, args.task)()
    key_fit, key_queries, key_sample = jax.random.split(jax.random.key(args.seed), 3)
    training = dict(args.training)
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    options = dict(num_simulations=args.num_simulations, attention=args.attention_kind,
                   token_sites=list(task.token_sites), exclude_sites=list(task.exclude_sites), progress_bar=False,
                   training=TrainingConfig(**training), network=NetworkConfig(**dict(args.network)),
                   interval_sites=args.interval_sites)
    kind, extra = (Simformer, {}) if args.members == 1 else (SimformerEnsemble, {"num_members": args.members})
    checkpoint = None if args.checkpoints is None else Path(args.checkpoints) / run_label(
        args.task, args.num_simulations, args.attention_kind, args.seed, settings_label(args))
    if checkpoint is not None and checkpoint.exists():
        sf = kind.load(checkpoint, task.model)
    else:
        sf = kind(task.model, **extra, **options).fit(key_fit)
        if checkpoint is not None:
            sf.save(checkpoint)
    members = [sf] if args.members == 1 else sf.members
    rows = []
    for index, (query, observed, reference) in enumerate(_queries(task, args, key_queries)):
        start = time.perf_counter()
        tree = sf.sample(jax.random.fold_in(key_sample, index), observed=observed, num_samples=args.num_samples)
        sampling_s = time.perf_counter() - start
        draws = {}
        for group in ("posterior", "posterior_predictive"):
            if group in tree.children:
                for name, value in tree[group].data_vars.items():
                    draws[name] = np.asarray(value.values).reshape((-1,) + value.shape[2:])
        flat = task.flatten({name: draws.get(name, np.asarray(observed.get(name))[None].repeat(args.num_samples, 0))
                             for name in task.token_sites})
        latent = np.isnan(task.flatten({name: observed.get(name, np.full(task.site_shapes[name], np.nan))
                                        for name in task.token_sites}))
        estimate = flat[:, latent] if args.conditionals == "random" else flat[:, : reference.shape[1]]
        n = min(args.num_c2st_samples, len(estimate), len(reference))
        rows.append({
            "task": args.task, "num_simulations": args.num_simulations, "attention": args.attention_kind,
            "seed": args.seed, "query": query,
            "c2st_mlp": "" if args.skip_mlp else round(
                c2st(reference[:n], estimate[:n], early_stopping=args.mlp_early_stopping), 4),
            "mlp_early_stopping": args.mlp_early_stopping,
            "c2st_rf": round(c2st(reference[:n], estimate[:n], classifier="rf"), 4),
            # Summed over an ensemble's members: its training cost.
            "num_c2st_samples": n, "training_s": round(sum(m.training_time for m in members), 1),
            "steps": sum(int(m.history.step[-1]) for m in members),
            "stopped_early": all(bool(m.history.stopped_early) for m in members), "sampling_s": round(sampling_s, 2),
            "network_evaluations": members[0].sampler.network_evaluations,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "simulations_invalid": members[0].simulation_info.num_invalid, "settings": settings_label(args),
            "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
        })
    return rows


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line, the value read as a Python literal (or kept a string)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. batch_size=256), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def settings_label(args) -> str:
    """What the run changed from the library's defaults, e.g. ``training.batch_size=256``."""
    changed = [f"training.{k}={v}" for k, v in args.training] + [f"network.{k}={v}" for k, v in args.network]
    if args.max_steps is not None:
        changed.append(f"training.max_steps={args.max_steps}")
    if args.members != 1:
        changed.append(f"members={args.members}")
    if args.interval_sites != "transform":
        changed.append(f"interval_sites={args.interval_sites}")
    return " ".join(changed) or "defaults"


def run_label(task: str, budget: int, attention: str, seed: int, settings: str) -> str:
    """A file-name-safe name of one run, for its checkpoint folder."""
    return "_".join([task, str(budget), attention, f"seed{seed}", settings.replace(" ", "_").replace("=", "-")])


def _append(csv_path: Path, rows: list[dict]):
    """Append rows; a file written before a column existed is rewritten with it (left blank)."""
    old, header = [], None
    if csv_path.exists():
        with csv_path.open() as handle:
            reader = csv.DictReader(handle)
            old, header = list(reader), reader.fieldnames
    if header == FIELDS:
        with csv_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=FIELDS).writerows(rows)
        return
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(old + rows)


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open() as handle:
        return {(r["task"], int(r["num_simulations"]), r["attention"], int(r["seed"]), _row_settings(r))
                for r in csv.DictReader(handle)}


def _row_settings(row: dict) -> str:
    """A row's settings label; rows written before the column existed ran with the defaults."""
    return row.get("settings") or "defaults"


def write_markdown(csv_path: Path) -> Path:
    """Mean C2ST per (task, budget, attention, kind of query, settings) with the paper's number beside it.

    A file may hold posterior and random-conditional rows of one task (six_layers.csv does):
    each row's kind comes from its query name, so each group gets its own paper number.
    Rows run with other settings are other groups.
    """
    import numpy as np

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["task"], int(row["num_simulations"]), row["attention"], query_kind(row["query"]),
               _row_settings(row))
        groups.setdefault(key, []).append(row)
    lines = [
        f"| task | simulations | attention | conditionals | C2ST MLP (sbibm) | MLP early-stopped | C2ST RF | paper (RF) | "
        "C2ST samples per side | queries | training s | steps | sampling s / query | peak RSS MiB | settings |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, budget, attention, kind, settings), group in sorted(groups.items()):
        mean = lambda key: np.mean([float(r[key]) for r in group if r[key] != ""]) if any(r[key] != "" for r in group) else float("nan")
        paper = PAPER.get(paper_key(kind, task, attention), {}).get(budget)
        lines.append(
            f"| {task} | {budget:,} | {attention} | {kind} | {mean('c2st_mlp'):.3f} | "
            f"{group[0].get('mlp_early_stopping', '')} | {mean('c2st_rf'):.3f} | "
            f"{'' if paper is None else f'{paper:.3f}'} | {group[0]['num_c2st_samples']} | {len(group)} | "
            f"{mean('training_s'):.0f} | "
            f"{mean('steps'):.0f} | {mean('sampling_s'):.1f} | {mean('peak_rss_mib'):.0f} | {settings} |"
        )
    machine_line = rows[0]["machine"] if rows else machine()
    lines += ["", f"Machine: {machine_line} (shared with other jobs while these ran: times are upper bounds)."]
    out = csv_path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="results", help="results file stem under benchmarks/results/")
    parser.add_argument("--tasks", nargs="+", default=["linear_gaussian", "two_moons"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[10_000])
    parser.add_argument("--attention", nargs="+", default=["undirected"], choices=["dense", "undirected"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--conditionals", choices=["posterior", "random"], default="posterior")
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--num-conditionals", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--num-c2st-samples", type=int, default=10_000)
    parser.add_argument("--skip-mlp", action="store_true", help="random-forest C2ST only (fast)")
    parser.add_argument("--mlp-early-stopping", action="store_true",
                        help="MLP C2ST with validation early stopping (fast; agrees with exact in >= 10-d)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps at most (default: the library's TrainingConfig default); recorded "
                             "in the CSV's settings column, which with task, budget, mask and seed identifies a run")
    parser.add_argument("--training", nargs="+", type=_setting, default=[], metavar="KEY=VALUE",
                        help="TrainingConfig fields to change (e.g. batch_size=256); recorded in the CSV's settings "
                             "column: a run with other settings is another run, even in the same file")
    parser.add_argument("--network", nargs="+", type=_setting, default=[], metavar="KEY=VALUE",
                        help="NetworkConfig fields to change (e.g. num_layers=4); as --training")
    parser.add_argument("--members", type=int, default=1,
                        help="train a SimformerEnsemble of this many networks on the run's simulations and score the "
                             "mixture of their answers (recorded as members=K in the settings column; training time "
                             "and steps are the members' sums)")
    parser.add_argument("--interval-sites", choices=["transform", "reflect", "reject"], default="transform",
                        help="Simformer(interval_sites=...): bounded-interval sites on a logit scale (default) or in "
                             "their own coordinates, draws outside mirrored back or redrawn (recorded as interval_sites=...)")
    parser.add_argument("--checkpoints", default=None, metavar="DIR",
                        help="save each run's fitted networks under DIR and load them when a run is repeated, so that "
                             "a rerun with other queries or C2ST settings does not retrain")
    parser.add_argument("--single", nargs=4, metavar=("TASK", "BUDGET", "ATTENTION", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        args.task, budget, args.attention_kind, seed = args.single
        args.num_simulations, args.seed = int(budget), int(seed)
        print(json.dumps(single_run(args)))
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"{args.name}.csv"
    done, settings = _done(csv_path), settings_label(args)
    runs = [(t, b, a, s) for t in args.tasks for b in args.budgets for a in args.attention for s in args.seeds]
    passthrough = sys.argv[1:]
    for number, (task, budget, attention, seed) in enumerate(runs, 1):
        if (task, budget, attention, seed, settings) in done:
            print(f"[{number}/{len(runs)}] {task} {budget} {attention} seed {seed}: done already")
            continue
        if attention == "undirected" and "dense" in args.attention and graph_is_complete(task):
            print(f"[{number}/{len(runs)}] {task} {budget} undirected seed {seed}: the task's graph is complete, "
                  "so its undirected mask is the dense one; the dense run stands for both")
            continue
        print(f"[{number}/{len(runs)}] {task} {budget} {attention} seed {seed} ...", flush=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, __file__, *passthrough, "--single", task, str(budget), attention, str(seed)],
            capture_output=True, text=True,
        )
        if result.returncode:
            print(result.stderr[-3000:])
            raise SystemExit(f"run {task} {budget} {attention} {seed} failed")
        rows = json.loads(result.stdout.strip().splitlines()[-1])
        _append(csv_path, rows)
        summary = ", ".join(f"{r['query']}: {r['c2st_mlp']}/{r['c2st_rf']}" for r in rows)
        print(f"    {time.perf_counter() - start:.0f} s; C2ST MLP/RF {summary}", flush=True)
    table = write_markdown(csv_path)
    print(table.read_text())


if __name__ == "__main__":
    main()
