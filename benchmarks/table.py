"""Combined benchmark table: every results CSV in one markdown page.

Reads all ``*.csv`` under the results directory: Simformer rows written by ``run.py``
(method "simformer", one line per attention kind) and NPE rows written by ``npe.py``
(``method`` column "npe"). Writes one row per (queries, task, budget, method, results file)
with the mean C2ST over queries and seeds, the paper's Simformer number (random forest,
read from its figures: ``PAPER`` in ``run.py``) in its own column, the NPE C2ST at the same
task and budget beside it, and cost: training time, steps, sampling time, peak memory.

    python benchmarks/table.py                      # benchmarks/results -> docs/benchmarks-table.md
    python benchmarks/table.py --results-dir R --out T.md
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = HERE.parent / "docs" / "benchmarks-table.md"

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from run import PAPER, graph_is_complete, paper_key, query_kind  # noqa: E402


def load_rows(results_dir: Path) -> list[dict]:
    """All rows of all CSVs under ``results_dir``, each with ``source``, ``method``, ``label``,
    ``base_label`` (the label without changed settings) and ``kind``.

    ``method`` is "npe" for NPE rows and "simformer" for run.py's rows; ``label`` adds the
    attention kind ("simformer dense") and a ``sampler`` column where a file has one;
    ``kind`` is "posterior" or "random" (the queries).
    """
    rows = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if not row.get("task") or not row.get("num_simulations"):
                    continue
                row["source"] = path.name
                row["method"] = row.get("method") or "simformer"
                attention = row.get("attention") or ""
                row["label"] = f"{row['method']} {attention}".strip() if row["method"] == "simformer" else row["method"]
                if row.get("sampler"):  # a results file comparing samplers: keep them apart
                    row["label"] += f" {row['sampler']}"
                row["base_label"] = row["label"]  # without the settings: the method's colour in the plot
                settings = row.get("settings") or ""
                if settings and not settings.startswith("defaults"):  # a run that changed the defaults says how
                    row["label"] += f" ({settings})"
                # A file that records the commit each row ran (sbibm_suite.py) holds rows of different
                # defaults (the depth rule changed them): never average rows of different code or depth.
                if row.get("code"):
                    depth = f"{row['layers']} layers, " if row.get("layers") else ""
                    row["label"] += f" ({depth}code {row['code']})"
                row["kind"] = query_kind(row.get("query", ""))
                row["num_simulations"] = int(row["num_simulations"])
                rows.append(row)
    return rows


def _complete_graph(task: str, cache: dict = {}) -> bool:
    """Whether a task's moral graph is complete (its undirected mask is the dense one; see ``run.py``)."""
    if task not in cache:
        from numpyro_simformer import tasks as task_module

        cache[task] = hasattr(task_module, task) and graph_is_complete(task)
    return cache[task]


def mean(rows: list[dict], key: str) -> float:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key, "")))
        except (TypeError, ValueError):
            continue
    return sum(values) / len(values) if values else math.nan


def groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(kind, task, budget, label, source) -> rows."""
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["kind"], row["task"], row["num_simulations"], row["label"], row["source"])
        out.setdefault(key, []).append(row)
    return out


def paper_value(paper: dict, kind: str, task: str, attention: str, budget: int) -> float | None:
    return paper.get(paper_key(kind, task, attention), {}).get(budget)


def _fmt(value: float, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _early(group: list[dict]) -> str:
    flags = {str(r.get("mlp_early_stopping", "")) for r in group if r.get("c2st_mlp", "") != ""}
    if not flags:
        return ""
    if flags == {"True"}:
        return "yes"
    if flags <= {"False", ""}:
        return "no"
    return "mixed"


def _same_queries(npe_rows: list[dict], group: list[dict]) -> list[dict]:
    """The NPE rows of the queries ``group`` answered (observations 1-3 beside a row over
    1-3, 1-10 beside one over 1-10), one per (query, seed) where several files hold it."""
    queries = {row["query"] for row in group}
    chosen = {}
    for row in npe_rows:
        if row["query"] in queries:
            chosen.setdefault((row["query"], row.get("seed")), row)
    return list(chosen.values())


def build_table(rows: list[dict], paper: dict) -> str:
    grouped = groups(rows)
    npe = {}
    for (kind, task, budget, _label, _source), group in grouped.items():
        if group[0]["method"] == "npe":
            npe.setdefault((kind, task, budget), []).extend(group)
    lines = [
        "| queries | task | simulations | method | C2ST MLP (sbibm) | MLP early-stopped | C2ST RF | "
        "paper Simformer (RF) | NPE C2ST RF | NPE C2ST MLP | n | training s | steps | sampling s / query | "
        "peak RSS MiB | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, task, budget, label, source), group in sorted(grouped.items()):
        attention = group[0].get("attention", "") if group[0]["method"] == "simformer" else ""
        if attention == "dense" and _complete_graph(task):
            label += " (= undirected: complete graph)"
        paper_rf = _fmt(paper_value(paper, kind, task, attention, budget) if attention else None)
        if attention and not paper_rf:  # the paper ran this task with the other mask only: say which
            other = "dense" if attention == "undirected" else "undirected"
            other_rf = paper_value(paper, kind, task, other, budget)
            paper_rf = f"{_fmt(other_rf)} ({other})" if other_rf is not None else ""
        npe_group = _same_queries(npe.get((kind, task, budget), []), group) if group[0]["method"] != "npe" else []
        lines.append(
            f"| {kind} | {task} | {budget:,} | {label} | {_fmt(mean(group, 'c2st_mlp'))} | {_early(group)} | "
            f"{_fmt(mean(group, 'c2st_rf'))} | {paper_rf} | {_fmt(mean(npe_group, 'c2st_rf'))} | "
            f"{_fmt(mean(npe_group, 'c2st_mlp'))} | {len(group)} | {_fmt(mean(group, 'training_s'), 0)} | "
            f"{_fmt(mean(group, 'steps'), 0)} | {_fmt(mean(group, 'sampling_s'), 1)} | "
            f"{_fmt(mean(group, 'peak_rss_mib'), 0)} | {source} |"
        )
    machines = sorted({r.get("machine", "") for r in rows if r.get("machine")})
    samples = sorted({str(r.get("num_c2st_samples", "")) for r in rows if r.get("num_c2st_samples")}, key=int)
    dates = sorted({r.get("date", "") for r in rows if r.get("date")})
    notes = [
        "",
        "C2ST: mean held-out accuracy of a classifier telling the method's samples from the reference "
        "(0.5 = indistinguishable), averaged over the n queries (observations or random conditionals) and seeds. "
        "MLP = sbibm's definition; RF = sbi's random forest, which the paper's figures use. "
        "\"MLP early-stopped\" = sklearn validation early stopping (faster, less sensitive). "
        "paper Simformer (RF) = the paper's figure for the same attention kind and budget (the other "
        "kind, named, where the paper ran only that one); "
        "NPE = `benchmarks/npe.py` at the same task and budget, on the same queries. "
        "\"= undirected: complete graph\": the task's moral graph links every pair of tokens (Two Moons, "
        "Gaussian Mixture), so its undirected mask is the dense mask and one run stands for both.",
        "",
        f"Samples per side: {', '.join(samples) if samples else 'none'}. "
        f"Machine: {'; '.join(machines) if machines else 'no results yet'}. "
        f"Dates: {', '.join(dates) if dates else '-'}.",
    ]
    if not rows:
        lines.append("| | | | no results yet | | | | | | | | | | | | |")
    return "\n".join(lines + notes) + "\n"


def write_table(results_dir: Path = RESULTS, out: Path = OUT) -> Path:
    rows = load_rows(results_dir)
    text = "# Benchmark results\n\nGenerated by `benchmarks/table.py` from the CSVs in `benchmarks/results/`.\n\n"
    text += build_table(rows, PAPER)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    print(write_table(args.results_dir, args.out).read_text())


if __name__ == "__main__":
    main()
