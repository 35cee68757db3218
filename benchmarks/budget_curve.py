"""C2ST against the training time budget (issue 32): what 1, 2, 5 and 10 minutes buy.

Each budget is one ``benchmarks/run.py`` invocation with ``--training max_time=SECONDS``
and otherwise the library's defaults (so its rows land in ``budget_curve.csv`` beside
other runs', resumable, each fit in its own subprocess, and ``run.py``'s per-run table in
``budget_curve.md``); with a budget the learning-rate schedule runs to the budget's end
(``TrainingConfig.max_time``). This script then averages C2ST per task and budget, writes
``benchmarks/results/budget_curve_summary.md`` and plots ``docs/images/budget_curve.png``.

    python benchmarks/budget_curve.py                                   # Two Moons, 1/2/5/10 min, seeds 0-2
    python benchmarks/budget_curve.py --tasks two_moons slcp --seeds 0 1 2
    python benchmarks/budget_curve.py --minutes 0.25 --seeds 0 --observations 1 --num-samples 500 \\
        --num-simulations 1000 --name budget_smoke --skip-mlp --no-plot      # a smoke run (about a minute)

Not a test: the full curve takes hours on 2 cores (budget x seeds x tasks fits, plus
sampling and C2ST). Times are wall-clock on a shared machine: run it on an idle one.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
IMAGES = HERE.parent / "docs" / "images"

sys.path.insert(0, str(HERE))
from run import machine  # benchmarks/run.py, beside this script  # noqa: E402


def budget_of(settings: str) -> float | None:
    """The ``max_time`` (seconds) in a run's settings label, e.g. ``training.max_time=60.0``."""
    for part in settings.split():
        if part.startswith("training.max_time="):
            return float(part.split("=", 1)[1])
    return None


def summarise(csv_path: Path, num_simulations: int) -> dict:
    """``{(task, seconds): {"mlp": [...], "rf": [...], "steps": [...], "training_s": [...]}}``."""
    table = defaultdict(lambda: defaultdict(list))
    with open(csv_path) as handle:
        for row in csv.DictReader(handle):
            seconds = budget_of(row["settings"])
            if seconds is None or int(row["num_simulations"]) != num_simulations:
                continue
            cell = table[(row["task"], seconds)]
            if row["c2st_mlp"]:
                cell["mlp"].append(float(row["c2st_mlp"]))
            cell["rf"].append(float(row["c2st_rf"]))
            cell["steps"].append(int(row["steps"]))
            cell["training_s"].append(float(row["training_s"]))
    return table


def write_markdown(table: dict, path: Path, args) -> None:
    lines = [f"# C2ST against the training budget ({args.num_simulations:,} simulations)", "",
             f"`python benchmarks/budget_curve.py {' '.join(sys.argv[1:])}`; {time.strftime('%Y-%m-%d')}; "
             f"{machine()}. Library defaults except `TrainingConfig(max_time=...)`; mean over seeds "
             "and observations (C2ST: 0.5 is perfect).", "",
             "| task | budget (min) | C2ST MLP | C2ST RF | steps (mean) | training s (mean) | runs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (task, seconds), cell in sorted(table.items()):
        mlp = f"{statistics.mean(cell['mlp']):.3f}" if cell["mlp"] else "-"
        lines.append(f"| {task} | {seconds / 60:g} | {mlp} | {statistics.mean(cell['rf']):.3f} | "
                     f"{statistics.mean(cell['steps']):,.0f} | {statistics.mean(cell['training_s']):.0f} | "
                     f"{len(cell['rf'])} |")
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for task in sorted({task for task, _ in table}):
        budgets = sorted(seconds for name, seconds in table if name == task)
        for kind, style in (("mlp", "-o"), ("rf", "--s")):
            values = [table[(task, s)][kind] for s in budgets]
            if all(values):
                ax.plot([s / 60 for s in budgets], [statistics.mean(v) for v in values], style,
                        label=f"{task} ({kind.upper()})")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training budget (minutes, max_time)")
    ax.set_ylabel("C2ST")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["two_moons"])
    parser.add_argument("--minutes", nargs="+", type=float, default=[1, 2, 5, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)))
    parser.add_argument("--num-simulations", type=int, default=10_000)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--skip-mlp", action="store_true", help="random-forest C2ST only (fast)")
    parser.add_argument("--name", default="budget_curve", help="results file stem under benchmarks/results/")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    for minutes in args.minutes:
        command = [sys.executable, str(HERE / "run.py"), "--name", args.name, "--tasks", *args.tasks,
                   "--budgets", str(args.num_simulations), "--seeds", *map(str, args.seeds),
                   "--observations", *map(str, args.observations), "--num-samples", str(args.num_samples),
                   "--num-c2st-samples", str(args.num_samples), "--training", f"max_time={60.0 * minutes}"]
        if args.skip_mlp:
            command.append("--skip-mlp")
        print(f"budget {minutes:g} min:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)

    table = summarise(RESULTS / f"{args.name}.csv", args.num_simulations)
    write_markdown(table, RESULTS / f"{args.name}_summary.md", args)
    if not args.no_plot:
        plot(table, IMAGES / f"{args.name}.png")


if __name__ == "__main__":
    main()
