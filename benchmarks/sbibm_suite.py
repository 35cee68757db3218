"""The sbibm suite through `Simulator`: each task's prior and simulator, wrapped as a user would.

The tasks, observations and reference posteriors come from ``sbibm-jax`` (the MIT-licensed
JAX/NumPyro port of sbibm), not from this library. Each task becomes the two-line model a
user writes::

    theta = numpyro.sample("theta", task.get_prior_dist())
    numpyro.sample("x", Simulator(lambda key, theta: simulator(key, theta[None])[0], theta))

and ``Simformer(model, num_simulations=budget)`` is fitted with **default settings**.
sbibm-jax's Lotka-Volterra simulator raises (diffrax: maximum number of solver steps) for
about one parameter draw in a thousand, and a raising simulator fails its whole chunk; so
that task is wrapped as the docs tell a user to ("return NaN for inputs your simulator
cannot handle"): ``Simulator.from_numpy(..., vectorized=False)`` around the same jitted
simulator, NaN where it raises (those draws are dropped and counted). Where a task's
outputs are binary (``bernoulli_glm_raw``) the wrapper declares it, as the library's
warning about integer-valued sites tells a user to: ``Simulator(..., support=constraints.boolean)``.
NPE
(``benchmarks/npe.py``'s flow and training) runs on the same simulator, prior and
observations. Each (task, budget, method, seed) runs in a fresh subprocess (its peak
memory is its own); rows are appended to ``benchmarks/results/<name>.csv`` as they finish,
an interrupted run resumes, and a markdown table is written beside it with the published
numbers (the paper's Simformer, GenSBI's Flux1Joint at 10^4). Each Simformer fit is saved
(git-ignored, under ``results/checkpoints/``); ``--reuse-fits`` scores more observations of
it at the same commit, and ``--fits-from COMMIT`` adds rows to an older commit's, with its
fits, when the code a row runs is unchanged since (``same_code_as``).

    python benchmarks/sbibm_suite.py --tasks slcp_distractors two_moons --budgets 10000 \\
        --methods simformer npe --observations 1 2 3

Not a test: hours on 2 cores for the whole suite. Needs the ``benchmarks`` extra.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHECKPOINTS = RESULTS / "checkpoints"  # fitted networks, git-ignored
TASKS = ["two_moons", "gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture", "slcp", "slcp_distractors",
         "bernoulli_glm", "bernoulli_glm_raw", "sir", "lotka_volterra"]
FIELDS = [
    "task", "num_simulations", "method", "seed", "query", "c2st_mlp", "mlp_early_stopping", "num_c2st_samples",
    "tokens", "layers", "simulation_s", "training_s", "steps", "num_samples", "sampling_s", "peak_rss_mib", "simulations_invalid", "code",
    "machine", "date",
]
# The paper's Simformer (random forest C2ST, read from its figures; the graph-masked variant)
# and GenSBI's Flux1Joint (its README, 10^4 simulations), for the tasks they report.
PAPER = {"two_moons": {1_000: 0.611, 10_000: 0.525}, "gaussian_linear": {1_000: 0.540, 10_000: 0.507},
         "gaussian_mixture": {1_000: 0.572, 10_000: 0.515}, "slcp": {1_000: 0.831, 10_000: 0.646}}
GENSBI = {"two_moons": 0.522, "slcp": 0.663, "bernoulli_glm": 0.630}
RAISING = {"lotka_volterra"}  # tasks whose simulator raises for some parameters (see the docstring)
BINARY = {"bernoulli_glm_raw"}  # tasks whose outputs are 0 or 1


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores"


# What a row runs: the library (fit, sampling, C2ST), NPE's flow, and the parts of this
# script that wrap a task, fit and score (the rest only loops over runs and writes files).
ROW_CODE = ("numpyro_simformer", "benchmarks/npe.py")
ROW_PARTS = ("RAISING", "BINARY", "user_model", "nan_where_raising", "_simformer", "_npe", "single_run")


def _git(repository: Path, *arguments: str) -> str:
    """git's output, run at the top of ``repository`` (so paths are the repository's)."""
    def run(*command: str, cwd: Path) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=cwd).stdout.strip()

    return run(*arguments, cwd=Path(run("rev-parse", "--show-toplevel", cwd=repository) or repository))


def code_version(repository: Path = HERE) -> str:
    """The commit a row runs, ``+dirty`` when the code a row runs differs from it (:func:`_changed_since`)."""
    head = _git(repository, "rev-parse", "--short", "HEAD")
    return head + ("+dirty" if _changed_since(head, repository) else "")


def _row_parts(source: str) -> dict[str, str]:
    """The source of this script's :data:`ROW_PARTS` (functions and constants), by name."""
    parts = {}
    for node in ast.parse(source).body:
        names = [node.name] if isinstance(node, ast.FunctionDef) else \
            [target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
        parts.update({name: ast.get_source_segment(source, node) for name in names if name in ROW_PARTS})
    return parts


def _changed_since(commit: str, repository: Path) -> list[str]:
    """What of the code a row runs differs in the working tree from ``commit``: files of
    :data:`ROW_CODE` (modified or untracked) and this script's :data:`ROW_PARTS`."""
    changed = _git(repository, "diff", "--name-only", commit, "--", *ROW_CODE).split()
    changed += _git(repository, "ls-files", "--others", "--exclude-standard", "--", *ROW_CODE).split()
    script = Path(_git(repository, "rev-parse", "--show-toplevel")) / "benchmarks" / "sbibm_suite.py"
    then, now = _row_parts(_git(repository, "show", f"{commit}:benchmarks/sbibm_suite.py")), _row_parts(script.read_text())
    return changed + [f"sbibm_suite.py:{name}" for name in ROW_PARTS if then.get(name) != now.get(name)]


def same_code_as(commit: str, repository: Path = HERE) -> str:
    """``commit``'s short hash, if the code a row runs is the same now as there: the files of
    :data:`ROW_CODE` and this script's :data:`ROW_PARTS`.

    Lets ``--fits-from`` add observations to rows made at an older commit, with the fits it
    saved, after commits that changed only docs, tests or results. Raises ``SystemExit``
    naming the changed files otherwise.
    """
    short = _git(repository, "rev-parse", "--short", "--verify", "--quiet", f"{commit}^{{commit}}")
    if not short:
        raise SystemExit(f"--fits-from {commit}: not a commit of this repository.")
    changed = _changed_since(short, repository)
    if changed:
        raise SystemExit(f"--fits-from {commit}: the code a row runs has changed since ({', '.join(changed[:5])}), "
                         "so rows labelled with it would misstate what ran. Run without --fits-from.")
    return short


def user_model(task, declare_support: bool = True):
    """The model a user writes around sbibm's batched simulator: prior site, Simulator site.

    ``declare_support=False`` leaves a binary task's outputs real-valued (as before the
    library warned about integer-valued sites).
    """
    import jax
    import numpyro
    from numpyro.distributions import constraints

    from numpyro_simformer import Simulator

    batched = task.get_simulator(jax.random.key(0))  # its key argument is unused: each call passes its own
    one_draw = nan_where_raising(task) if task.name in RAISING else None  # built once, outside any trace
    support = constraints.boolean if declare_support and task.name in BINARY else None

    def model():
        theta = numpyro.sample("theta", task.get_prior_dist())
        if one_draw is not None:
            x = Simulator.from_numpy(one_draw, theta, event_shape=(task.dim_x,), vectorized=False)
        else:
            x = Simulator(lambda key, theta: batched(key, theta[None])[0], theta, support=support)
        numpyro.sample("x", x)

    return model


def nan_where_raising(task):
    """``fn(rng, theta) -> x``: one draw of the task's simulator, NaN where it raises."""
    import jax
    import numpy as np

    batched = task.get_simulator(jax.random.key(0))
    one = jax.jit(lambda key, theta: batched(key, theta[None])[0])

    def simulator(rng, theta):
        key = jax.random.key(int(rng.integers(2**32, dtype=np.uint64)))
        try:
            return np.asarray(one(key, np.asarray(theta, np.float32)))
        except Exception:  # noqa: BLE001 - any failure of the third-party simulator is a failed draw
            return np.full(task.dim_x, np.nan, np.float32)

    return simulator


def _simformer(args, task, key_fit):
    """(sample(key, x_o, n) -> theta draws, info dict) from a default-settings Simformer."""
    import numpy as np

    from numpyro_simformer import Simformer

    # Each fit is saved (not committed) so that more observations of it can be scored later
    # with --reuse-fits: same network, rows with the same code; a reused row's peak RSS then
    # covers sampling and the C2ST only (its training time and steps are the checkpoint's).
    path = CHECKPOINTS / f"{args.task}_{args.num_simulations}_seed{args.seed}_{args.code}"
    clean = args.code is not None and not args.code.endswith("+dirty")
    if args.reuse_fits and clean and path.exists():
        sf = Simformer.load(path, user_model(task))
    else:
        sf = Simformer(user_model(task), num_simulations=args.num_simulations, progress_bar=False).fit(key_fit)
        if clean:
            sf.save(path, overwrite=True)
    grouping = sf.spec.grouping
    info = {"tokens": grouping.num_tokens if grouping is not None else len(sf.spec.layout.labels),
            "layers": sf.state.network.num_layers,
            "simulation_s": round(sf.simulation_time, 1), "training_s": round(sf.training_time, 1),
            "steps": int(sf.history.step[-1]), "simulations_invalid": sf.simulation_info.num_invalid}

    def sample(key, x_o, num_samples):
        tree = sf.sample(key, observed={"x": x_o}, num_samples=num_samples)
        return np.asarray(tree.posterior["theta"].values).reshape(num_samples, -1)

    return sample, info


def _npe(args, task, key_fit):
    """The same (sample, info) from ``benchmarks/npe.py``'s flow, on the same prior and simulator."""
    import jax
    import numpy as np

    sys.path.insert(0, str(HERE))
    from npe import sample_posterior, train_npe

    key_simulate, key_train = jax.random.split(key_fit)
    key_prior, key_data = jax.random.split(key_simulate)
    prior = task.get_prior_dist()
    start = time.perf_counter()
    theta = prior.sample(key_prior, (args.num_simulations,))
    if task.name in RAISING:
        rng, simulator = np.random.default_rng(np.asarray(jax.random.key_data(key_data))), nan_where_raising(task)
        x = np.stack([simulator(rng, row) for row in np.asarray(theta)])
    else:
        x = task.get_simulator(key_data)(key_data, theta)
    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    simulation_s = time.perf_counter() - start
    valid = np.all(np.isfinite(theta), axis=1) & np.all(np.isfinite(x), axis=1)
    theta, x = theta[valid], x[valid]
    theta_mean, theta_std = theta.mean(0), np.where(theta.std(0) > 0, theta.std(0), 1.0)
    x_mean, x_std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    flow, stats = train_npe(key_train, (theta - theta_mean) / theta_std, (x - x_mean) / x_std, args)

    def inside(draws):
        return np.asarray(prior.support.check(draws)).reshape(len(draws), -1).all(axis=1)

    def sample(key, x_o, num_samples):
        draws, _ = sample_posterior(flow, key, (x_o - x_mean) / x_std, theta_mean, theta_std, inside, num_samples)
        return draws

    info = {"tokens": "", "simulation_s": round(simulation_s, 1), "training_s": round(stats["training_s"], 1),
            "steps": stats["steps"], "simulations_invalid": int((~valid).sum())}
    return sample, info


def single_run(args) -> list[dict]:
    """Fit one method on one task and budget, score each observation (inside the subprocess)."""
    import jax
    import numpy as np
    import sbibm_jax

    from numpyro_simformer.diagnostics import c2st

    task = sbibm_jax.get_task(args.task)
    key_fit, key_sample = jax.random.split(jax.random.key(args.seed))
    sample, info = (_simformer if args.method == "simformer" else _npe)(args, task, key_fit)
    rows = []
    for number in args.observations:
        x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)
        reference = np.asarray(task.get_reference_posterior_samples(number), np.float64)
        start = time.perf_counter()
        estimate = sample(jax.random.fold_in(key_sample, number), x_o, args.num_samples)
        sampling_s = time.perf_counter() - start
        n = min(args.num_c2st_samples, len(estimate), len(reference))
        rows.append({
            "task": args.task, "num_simulations": args.num_simulations, "method": args.method, "seed": args.seed,
            "query": f"observation {number}",
            "c2st_mlp": round(c2st(reference[:n], estimate[:n], early_stopping=args.mlp_early_stopping), 4),
            "mlp_early_stopping": args.mlp_early_stopping, "num_c2st_samples": n, **info,
            "num_samples": args.num_samples, "sampling_s": round(sampling_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "code": args.code, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        })
    return rows


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_markdown(csv_path: Path) -> Path:
    """Mean C2ST per (task, budget, method) over its observations, published numbers beside it."""
    import numpy as np

    rows = _rows(csv_path)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], int(row["num_simulations"]), row["method"], row["code"]), []).append(row)
    lines = [
        "| task | simulations | method | C2ST (sbibm MLP) | MLP early-stopped | observations | paper Simformer (RF) | GenSBI Flux1Joint | "
        "tokens | layers | simulation s | training s | steps | s per 10,000 draws | peak RSS MiB | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: index for index, name in enumerate(TASKS)}
    for (task, budget, method, code), group in sorted(groups.items(), key=lambda item: (order.get(item[0][0], 99),
                                                                                       item[0][1:])):
        mean = lambda key: np.mean([float(r[key]) for r in group])  # noqa: E731
        paper = PAPER.get(task, {}).get(budget) if method == "simformer" else None
        gensbi = GENSBI.get(task) if budget == 10_000 and method == "simformer" else None
        numbers = ", ".join(r["query"].split()[-1] for r in group)
        early = "yes" if all(r["mlp_early_stopping"] == "True" for r in group) else "no"
        per_10k = np.mean([float(r["sampling_s"]) * 10_000 / int(r["num_samples"]) for r in group])
        lines.append(
            f"| {task} | {budget:,} | {method} | {mean('c2st_mlp'):.3f} | {early} | {numbers} | "
            f"{'' if paper is None else f'{paper:.3f}'} | {'' if gensbi is None else f'{gensbi:.3f}'} | "
            f"{group[0]['tokens']} | {group[0].get('layers') or ''} | {mean('simulation_s'):.0f} | {mean('training_s'):.0f} | {mean('steps'):.0f} | "
            f"{per_10k:.0f} | {mean('peak_rss_mib'):.0f} | {code} |")
    lines += ["", f"Machine: {rows[0]['machine'] if rows else machine()}. C2ST with "
              f"{rows[0]['num_c2st_samples'] if rows else 10_000} samples per side; the paper's column is its "
              "random-forest C2ST, GenSBI's its own. 'code' is the commit each row ran; 'MLP early-stopped' marks "
              "rows whose C2ST classifier stopped on a validation split (faster) instead of sbibm's fixed epochs."]
    out = csv_path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="sbibm_suite", help="results file stem under benchmarks/results/")
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--budgets", nargs="+", type=int, default=[1_000, 10_000])
    parser.add_argument("--methods", nargs="+", default=["simformer", "npe"], choices=["simformer", "npe"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--num-c2st-samples", type=int, default=10_000)
    parser.add_argument("--mlp-early-stopping", action="store_true", help="early-stopped MLP C2ST (faster)")
    # NPE's flow and training: benchmarks/npe.py's defaults (sbi's NPE defaults)
    parser.add_argument("--flow-layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--max-epochs", type=int, default=5000)
    parser.add_argument("--reuse-fits", action="store_true",
                        help="load a fit saved by an earlier run at the same commit instead of training again")
    parser.add_argument("--fits-from", metavar="COMMIT",
                        help="add rows to COMMIT's: label them with it and load the fits it saved (implies "
                             "--reuse-fits); refused unless the code a row runs is unchanged since")
    parser.add_argument("--single", nargs=4, metavar=("TASK", "BUDGET", "METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--code", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.reuse_fits = args.reuse_fits or args.fits_from is not None

    if args.single:
        args.task, budget, args.method, seed = args.single
        args.num_simulations, args.seed = int(budget), int(seed)
        print(json.dumps(single_run(args)))
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / f"{args.name}.csv"
    code = code_version() if args.fits_from is None else same_code_as(args.fits_from)
    done = {}  # (task, budget, method, seed, code) -> observations scored
    for r in _rows(csv_path):
        key = (r["task"], int(r["num_simulations"]), r["method"], int(r["seed"]), r["code"])
        done.setdefault(key, set()).add(int(r["query"].split()[-1]))
    runs = [(t, b, m, s) for t in args.tasks for b in args.budgets for m in args.methods for s in args.seeds]
    for number, (task, budget, method, seed) in enumerate(runs, 1):
        missing = [n for n in args.observations if n not in done.get((task, budget, method, seed, code), set())]
        if not missing:
            print(f"[{number}/{len(runs)}] {task} {budget} {method} seed {seed}: done already at {code}")
            continue
        print(f"[{number}/{len(runs)}] {task} {budget} {method} seed {seed}, observations {missing} ...", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--code", code, "--observations",
                                 *map(str, missing), "--single", task, str(budget), method, str(seed)],
                                capture_output=True, text=True)
        if result.returncode:
            print(result.stderr[-3000:])
            raise SystemExit(f"run {task} {budget} {method} {seed} failed")
        rows = json.loads(result.stdout.strip().splitlines()[-1])
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        summary = ", ".join(f"{r['query'].split()[-1]}: {r['c2st_mlp']}" for r in rows)
        print(f"    {time.perf_counter() - start:.0f} s (training {rows[0]['training_s']} s); C2ST {summary}",
              flush=True)
    if csv_path.exists():
        print(write_markdown(csv_path).read_text())


if __name__ == "__main__":
    main()
