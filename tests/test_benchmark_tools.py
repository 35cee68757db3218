"""benchmarks/table.py and benchmarks/plot.py on tiny synthetic result CSVs (no training)."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, fields, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def results_dir(tmp_path):
    directory = tmp_path / "results"
    directory.mkdir()
    # run.py's columns as of an older header (no mlp_early_stopping): must still be read.
    simformer_fields = ["task", "num_simulations", "attention", "seed", "query", "c2st_mlp", "c2st_rf",
                        "num_c2st_samples", "training_s", "steps", "stopped_early", "sampling_s",
                        "network_evaluations", "peak_rss_mib", "simulations_invalid", "machine", "date"]
    base = {"seed": 0, "num_c2st_samples": 1000, "training_s": 10.0, "steps": 500, "stopped_early": True,
            "sampling_s": 1.5, "network_evaluations": 100, "peak_rss_mib": 700, "simulations_invalid": 0,
            "machine": "test-machine 2 cores", "date": "2026-01-01"}
    _write(directory / "core.csv", simformer_fields, [
        base | {"task": "two_moons", "num_simulations": 1000, "attention": "dense", "query": "observation 1",
                "c2st_mlp": 0.70, "c2st_rf": 0.72},
        base | {"task": "two_moons", "num_simulations": 1000, "attention": "dense", "query": "observation 2",
                "c2st_mlp": 0.60, "c2st_rf": 0.62},
        base | {"task": "two_moons", "num_simulations": 10000, "attention": "undirected", "query": "observation 1",
                "c2st_mlp": "", "c2st_rf": 0.55},
        base | {"task": "tree", "num_simulations": 1000, "attention": "undirected", "query": "random 0",
                "c2st_mlp": 0.58, "c2st_rf": 0.60},
        base | {"task": "lotka_volterra", "num_simulations": 1000, "attention": "undirected", "query": "random 0",
                "c2st_mlp": 0.75, "c2st_rf": 0.70},
    ])
    npe = _load("npe")
    _write(directory / "npe.csv", npe.FIELDS, [
        base | {"task": "two_moons", "num_simulations": 1000, "method": "npe", "query": "observation 1",
                "c2st_mlp": 0.80, "mlp_early_stopping": False, "c2st_rf": 0.84, "epochs": 100,
                "acceptance": 0.99, "flow": "MAF"},
    ])
    (directory / "notes.txt").write_text("not a csv")
    return directory


def test_table_on_synthetic_results(results_dir, tmp_path):
    table = _load("table")
    out = table.write_table(results_dir, tmp_path / "docs" / "table.md")
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| posterior | two_moons | 1,000 | simformer dense")]
    assert len(lines) == 1
    cells = [cell.strip() for cell in lines[0].strip("|").split("|")]
    header = [cell.strip() for cell in text.splitlines()[4].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["C2ST MLP (sbibm)"] == "0.650" and row["C2ST RF"] == "0.670"
    assert row["paper Simformer (RF)"] == "0.611"  # PAPER[("two_moons", "dense")][1000]
    assert row["NPE C2ST RF"] == "0.840" and row["n"] == "2"
    assert "| posterior | two_moons | 1,000 | npe |" in text
    assert "| random | tree | 1,000 | simformer undirected |" in text
    assert "0.590" in text  # the paper's tree (random conditionals) number at 1,000
    # The paper ran Lotka–Volterra with dense attention only: its number is shown, named as such.
    assert "| random | lotka_volterra | 1,000 | simformer undirected | 0.750 |" in text
    assert "| 0.700 | 0.850 (dense) |" in text
    assert "test-machine 2 cores" in text


def test_table_with_no_results(tmp_path):
    table = _load("table")
    empty = tmp_path / "empty"
    empty.mkdir()
    text = table.write_table(empty, tmp_path / "table.md").read_text()
    assert "no results yet" in text


@pytest.mark.parametrize("metric", ["both", "rf"])
def test_plot_on_synthetic_results(results_dir, tmp_path, metric):
    plot = _load("plot")
    out = plot.write_plot(results_dir, tmp_path / "images" / "plot.png", metric)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_with_no_results_shows_paper_curves(tmp_path):
    plot = _load("plot")
    empty = tmp_path / "empty"
    empty.mkdir()
    paper = plot.PAPER
    fig = plot.make_figure(plot.load_rows(empty), paper, ["rf"])
    cells = {(key[0], key[2] if len(key) > 2 else "posterior") for key in paper}
    assert len(cells) == 9  # 4 posterior tasks + 5 random-conditional tasks (Lotka–Volterra's too)
    assert len(fig.axes) == len(cells)
    assert any("paper (RF)" in text for ax in fig.axes for text in ax.get_legend_handles_labels()[1])


def test_runner_settings_and_appending_to_an_older_csv(tmp_path):
    run = _load("run")
    assert run._setting("batch_size=256") == ("batch_size", 256)
    assert run._setting("learning_rate=3e-4") == ("learning_rate", 3e-4)
    assert run._setting("checkpoint_dir=runs/a") == ("checkpoint_dir", "runs/a")
    with pytest.raises(Exception, match="KEY=VALUE"):
        run._setting("batch_size")
    args = run.argparse.Namespace(training=[("batch_size", 256)], network=[("num_layers", 4)], max_steps=40_000,
                                  members=1, interval_sites="transform")
    assert run.settings_label(args) == "training.batch_size=256 network.num_layers=4 training.max_steps=40000"
    ensemble = run.argparse.Namespace(training=[], network=[], max_steps=None, members=3, interval_sites="reject")
    assert run.settings_label(ensemble) == "members=3 interval_sites=reject"
    assert run.run_label("two_moons", 10_000, "dense", 1, "members=3 training.batch_size=256") == (
        "two_moons_10000_dense_seed1_members-3_training.batch_size-256")

    # A CSV written before the settings column existed keeps its rows and gains the column.
    path = tmp_path / "old.csv"
    old_fields = [f for f in run.FIELDS if f != "settings"]
    old_row = {f: "1" for f in old_fields}
    _write(path, old_fields, [old_row])
    new_row = {f: "2" for f in run.FIELDS}
    run._append(path, [new_row])
    run._append(path, [new_row])
    with path.open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert reader.fieldnames == run.FIELDS
    assert [r["settings"] for r in rows] == ["", "2", "2"] and rows[0]["task"] == "1"

    # The combined table names a run's changed settings; default runs keep the plain label.
    table = _load("table")
    labels = {r["settings"]: r["label"] for r in table.load_rows(tmp_path) if r["source"] == "old.csv"}
    assert labels["2"] == "simformer 2 (2)" and labels[""] == "simformer 1"


def test_table_keeps_rows_of_different_code_and_depth_apart(tmp_path):
    # sbibm_suite.py's rows name the commit and depth they ran: the table must not average them.
    suite = _load("sbibm_suite")
    base = {f: "" for f in suite.FIELDS} | {"task": "sir", "num_simulations": 10000, "method": "simformer",
                                            "seed": 0, "c2st_mlp": 0.6, "num_c2st_samples": 10000,
                                            "training_s": 1, "steps": 1, "sampling_s": 1, "peak_rss_mib": 1}
    _write(tmp_path / "suite.csv", suite.FIELDS, [
        base | {"query": "observation 1", "layers": 3, "code": "aaa", "c2st_mlp": 0.60},
        base | {"query": "observation 1", "layers": 6, "code": "bbb", "c2st_mlp": 0.58},
        base | {"query": "observation 2", "layers": 6, "code": "bbb", "c2st_mlp": 0.56},
        base | {"query": "observation 1", "method": "npe", "code": "aaa", "c2st_mlp": 0.65},
    ])
    table = _load("table")
    labels = [r["label"] for r in table.load_rows(tmp_path)]
    assert labels == ["simformer (3 layers, code aaa)", "simformer (6 layers, code bbb)",
                      "simformer (6 layers, code bbb)", "npe (code aaa)"]
    text = table.write_table(tmp_path, tmp_path / "table.md").read_text()
    # each Simformer row with its own mean, and NPE's C2ST on the same observation beside it
    assert "| simformer (3 layers, code aaa) | 0.600 | no |  |  |  | 0.650 | 1 |" in text
    assert "| simformer (6 layers, code bbb) | 0.570 | no |  |  |  | 0.650 | 2 |" in text


def test_fits_from_an_older_commit_only_while_the_code_a_row_runs_is_unchanged(tmp_path):
    suite = _load("sbibm_suite")

    def git(*arguments):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *arguments], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    (tmp_path / "numpyro_simformer").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "numpyro_simformer" / "fit.py").write_text("steps = 1\n")
    (tmp_path / "benchmarks" / "npe.py").write_text("flow = 1\n")
    script = tmp_path / "benchmarks" / "sbibm_suite.py"
    script.write_text("BINARY = {'a'}\n\n\ndef _npe():\n    return 1\n\n\ndef main():\n    pass\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "fits")
    fits = git("rev-parse", "--short", "HEAD")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("commit", "-qm", "docs only")
    here = tmp_path / "benchmarks"  # where the script runs: paths must still be the repository's
    assert suite.same_code_as(fits, here) == fits
    with pytest.raises(SystemExit, match="not a commit"):
        suite.same_code_as("0123abc", here)
    (tmp_path / "numpyro_simformer" / "new.py").write_text("")  # untracked library code counts
    with pytest.raises(SystemExit, match="new.py"):
        suite.same_code_as(fits, here)
    (tmp_path / "numpyro_simformer" / "new.py").unlink()
    script.write_text(script.read_text().replace("    pass", "    print()"))  # the loop may change
    assert suite.same_code_as(fits, here) == fits
    head = git("rev-parse", "--short", "HEAD")
    assert suite.code_version(here) == head  # the same rule labels a run's rows
    script.write_text(script.read_text().replace("return 1", "return 2"))  # how NPE is fitted may not
    with pytest.raises(SystemExit, match="sbibm_suite.py:_npe"):
        suite.same_code_as(fits, here)
    assert suite.code_version(here) == head + "+dirty"
    script.write_text(script.read_text().replace("return 2", "return 1").replace("{'a'}", "{'b'}"))
    with pytest.raises(SystemExit, match="sbibm_suite.py:BINARY"):
        suite.same_code_as(fits, here)
    script.write_text(script.read_text().replace("{'b'}", "{'a'}"))
    (tmp_path / "benchmarks" / "npe.py").write_text("flow = 2\n")
    git("commit", "-qam", "npe changed")
    with pytest.raises(SystemExit, match="benchmarks/npe.py"):
        suite.same_code_as(fits, here)


def test_runner_markdown_gives_posterior_and_random_rows_of_one_task_their_own_paper_numbers(tmp_path):
    run = _load("run")
    path = tmp_path / "mixed.csv"
    base = {f: "" for f in run.FIELDS}
    base.update(task="slcp", num_simulations="10000", attention="undirected", seed="0", num_c2st_samples="10000",
                training_s="1", steps="1", sampling_s="1", peak_rss_mib="1", machine="test")
    rows = [dict(base, query="observation 1", c2st_rf="0.6"), dict(base, query="random 0", c2st_rf="0.7"),
            dict(base, query="random 1", c2st_rf="0.8")]
    _write(path, run.FIELDS, rows)
    lines = run.write_markdown(path).read_text().splitlines()
    posterior = next(line for line in lines if "| posterior |" in line)
    random = next(line for line in lines if "| random |" in line)
    paper = run.PAPER
    assert f"| 0.600 | {paper[('slcp', 'undirected')][10_000]:.3f} |" in posterior
    assert f"| 0.750 | {paper[('slcp', 'undirected', 'random')][10_000]:.3f} |" in random


def test_npe_beside_a_row_is_scored_on_the_same_queries(results_dir, tmp_path):
    """NPE over observations 1-3 in two files beside a Simformer row over observation 1 only:
    the NPE column is observation 1's, counted once."""
    table = _load("table")
    npe = _load("npe")
    base = {"seed": 0, "num_c2st_samples": 1000, "task": "two_moons", "num_simulations": 10000, "method": "npe",
            "machine": "test-machine 2 cores", "date": "2026-01-01"}
    rows = [base | {"query": f"observation {n}", "c2st_rf": rf} for n, rf in ((1, 0.60), (2, 0.90), (3, 0.90))]
    _write(results_dir / "npe_more.csv", npe.FIELDS, rows)
    _write(results_dir / "npe_again.csv", npe.FIELDS, rows[:1])
    text = table.write_table(results_dir, tmp_path / "table.md").read_text()
    header = [cell.strip() for cell in text.splitlines()[4].strip("|").split("|")]
    line = next(line for line in text.splitlines() if line.startswith("| posterior | two_moons | 10,000 | simformer"))
    row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
    assert row["NPE C2ST RF"] == "0.600"


def test_runner_tells_runs_apart_by_their_settings(tmp_path):
    """A finished run is one with the same task, budget, mask, seed and settings: a rerun
    with other settings into the same file is a new run, not 'done already', and the file's
    markdown averages each settings apart."""
    run = _load("run")
    path = tmp_path / "runs.csv"
    row = {f: "1" for f in run.FIELDS} | {"task": "two_moons", "num_simulations": "10000", "attention": "dense",
                                          "seed": "0", "query": "observation 1", "c2st_rf": "0.6",
                                          "settings": "training.validation_draws=1"}
    run._append(path, [row, row | {"seed": "1", "settings": "", "c2st_rf": "0.8"}])
    assert run._done(path) == {("two_moons", 10000, "dense", 0, "training.validation_draws=1"),
                               ("two_moons", 10000, "dense", 1, "defaults")}
    lines = [line for line in run.write_markdown(path).read_text().splitlines() if line.startswith("| two_moons")]
    assert len(lines) == 2
    assert any("| 0.600 |" in line and line.endswith("| training.validation_draws=1 |") for line in lines)
    assert any("| 0.800 |" in line and line.endswith("| defaults |") for line in lines)


@pytest.mark.slow
def test_bounded_sites_benchmark_runs_on_tiny_settings():
    """The script behind docs/bounded-sites.md runs end to end (tiny settings, nothing written)."""
    import subprocess

    result = subprocess.run([sys.executable, str(BENCHMARKS / "bounded_sites.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "c2st_rf" not in line]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == ["transform", "reflect", "reject"]
    for row in rows:
        assert 0.4 < float(row.split(" | ")[1]) <= 1.0  # a C2ST accuracy
