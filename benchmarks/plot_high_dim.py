"""Plot the cost tables of large data sites: ``results/high_dim.md`` and ``results/read_model.md``.

Four log-log panels against the number of elements: training steps/s, seconds per 10,000
posterior draws and peak memory, default grouping against one element per token
(``high_dim.py``), and the time to read the model, per way of writing it (``read_model.py``).

    python benchmarks/plot_high_dim.py               # -> docs/images/high_dim_cost.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "images" / "high_dim_cost.png"


def table_rows(path: Path) -> list[list[str]]:
    """The body rows of the markdown table in ``path``, as lists of cell strings."""
    rows = [line.strip().strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", ""))
    except ValueError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cost: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in table_rows(RESULTS / "high_dim.md"):
        elements, mode = _number(row[0]), row[2].split(" (")[0]
        for column, name in ((5, "steps/s (training)"), (6, "s per 10,000 posterior draws"), (7, "peak memory (MiB)")):
            value = _number(row[column])
            if elements is not None and value is not None:
                cost.setdefault(name, {}).setdefault(mode, []).append((elements, value))
    for row in table_rows(RESULTS / "read_model.md"):
        elements, value = _number(row[0]), _number(row[3])
        if elements is not None and value is not None:
            cost.setdefault("s to read the model", {}).setdefault(row[1], []).append((elements, value))
    figure, axes = plt.subplots(1, len(cost), figsize=(4 * len(cost), 3.4))
    for axis, (name, series) in zip(axes, cost.items()):
        for label, points in series.items():
            x, y = zip(*sorted(points))
            axis.plot(x, y, marker="o", label=label)
        xlabel = "data elements" if name.startswith("s to read") else "data elements + 2"
        axis.set(xscale="log", yscale="log", xlabel=xlabel, title=name)
        axis.legend(fontsize=8)
    figure.suptitle("Large data sites on 2 CPU cores (benchmarks/results/high_dim.md, read_model.md)", fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
