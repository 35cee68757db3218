"""Plot C2ST against the number of simulations, per task: ours, NPE and the paper's curves.

One panel per task (posterior queries) and per task with random conditionals, one row
per C2ST classifier (random forest, as the paper; MLP, as sbibm). Lines: the Simformer per
attention kind and results file (mean over queries and seeds, bars = min..max over the
queries), NPE (``npe.py``), and the paper's Simformer curves (random forest, ``PAPER`` in
``run.py``) dashed, labelled "paper (RF)". Works with whatever rows exist.

    python benchmarks/plot.py                        # -> docs/images/benchmarks.png
    python benchmarks/plot.py --metric rf --results-dir R --out F.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "docs" / "images" / "benchmarks.png"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from table import PAPER, RESULTS, load_rows  # noqa: E402

METRICS = {"rf": ("c2st_rf", "C2ST (random forest)"), "mlp": ("c2st_mlp", "C2ST (MLP, sbibm)")}
COLORS = {"simformer dense": "tab:blue", "simformer undirected": "tab:orange", "simformer directed": "tab:purple",
          "npe": "tab:green"}


def _series(rows: list[dict], key: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in rows:
        try:
            value = float(row.get(key, ""))
        except (TypeError, ValueError):
            continue
        if not math.isnan(value):
            out.setdefault(row["num_simulations"], []).append(value)
    return out


def panels(rows: list[dict], paper: dict) -> list[tuple[str, str]]:
    """(kind, task) panels: those with rows, else the paper's."""
    present = sorted({(r["kind"], r["task"]) for r in rows})
    if present:
        return present
    return sorted({("random" if len(key) == 3 else "posterior", key[0]) for key in paper})


def make_figure(rows: list[dict], paper: dict, metrics: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = panels(rows, paper)
    fig, axes = plt.subplots(len(metrics), len(cells), figsize=(3.2 * len(cells) + 0.6, 3.0 * len(metrics)),
                             squeeze=False, sharex=True)
    for row_index, metric in enumerate(metrics):
        key, ylabel = METRICS[metric]
        for col, (kind, task) in enumerate(cells):
            ax = axes[row_index][col]
            subset = [r for r in rows if r["kind"] == kind and r["task"] == task]
            lines = sorted({(r["label"], r["source"]) for r in subset})
            labels_per_file = {}
            for label, source in lines:
                labels_per_file.setdefault(label, set()).add(source)
            for label, source in lines:
                series = _series([r for r in subset if r["label"] == label and r["source"] == source], key)
                if not series:
                    continue
                budgets = sorted(series)
                means = [sum(series[b]) / len(series[b]) for b in budgets]
                low = [m - min(series[b]) for m, b in zip(means, budgets)]
                high = [max(series[b]) - m for m, b in zip(means, budgets)]
                name = label if len(labels_per_file[label]) == 1 else f"{label} ({Path(source).stem})"
                base = next(r["base_label"] for r in subset if r["label"] == label)
                changed = base != label  # a run with changed settings: its method's colour, square markers
                ax.errorbar(budgets, means, yerr=[low, high], marker="s" if changed else "o", ms=5 if changed else 4,
                            capsize=2, color=COLORS.get(base), mfc="white" if changed else None, label=name)
            if metric == "rf" or metrics == ["mlp"]:
                for paper_key, curve in sorted(paper.items()):
                    paper_kind = "random" if len(paper_key) == 3 else "posterior"
                    if paper_key[0] != task or paper_kind != kind:
                        continue
                    attention = paper_key[1]
                    budgets = sorted(curve)
                    dashes = (0, (4, 2)) if attention == "dense" else (0, (1, 1.5))
                    ax.plot(budgets, [curve[b] for b in budgets], ls=dashes, lw=1.4, alpha=0.8,
                            color=COLORS.get(f"simformer {attention}", "gray"), label=f"paper (RF) {attention}")
            ax.axhline(0.5, color="black", lw=0.6, alpha=0.4)
            ax.set_xscale("log")
            ax.set_ylim(0.45, 1.02)
            if row_index == 0:
                ax.set_title(task if kind == "posterior" else f"{task} (random conditionals)", fontsize=10)
            if row_index == len(metrics) - 1:
                ax.set_xlabel("simulations")
            if col == 0:
                ax.set_ylabel(ylabel)
    fig.tight_layout()
    for col in range(len(cells)):  # one legend per column, below it: none covers a curve
        entries = {}
        for row_index in range(len(metrics)):
            for handle, label in zip(*axes[row_index][col].get_legend_handles_labels()):
                entries.setdefault(_short(label), handle)
        if entries:
            axes[-1][col].legend(list(entries.values()), list(entries), fontsize=6, loc="upper center",
                                 bbox_to_anchor=(0.5, -0.28), frameon=False)
    return fig


def _short(label: str) -> str:
    """A legend entry without the settings' long prefixes."""
    return label.replace("training.validation_draws=", "val. draws ").replace("network.num_layers=", "layers ")


def write_plot(results_dir: Path = RESULTS, out: Path = OUT, metric: str = "both") -> Path:
    metrics = ["rf", "mlp"] if metric == "both" else [metric]
    fig = make_figure(load_rows(results_dir), PAPER, metrics)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the legends sit below the axes
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--metric", choices=["both", "rf", "mlp"], default="both")
    args = parser.parse_args(argv)
    print(write_plot(args.results_dir, args.out, args.metric))


if __name__ == "__main__":
    main()
