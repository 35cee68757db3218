"""Every example runs, with tiny settings."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs(capsys):
    results = load("quickstart").main(tiny=True)
    assert results["posterior"].posterior["theta"].shape == (1, 200, 3)
    assert results["likelihood"].posterior_predictive["x"].shape == (1, 200, 3)
    assert "Posterior p(theta | x_o)" in capsys.readouterr().out


def test_diagnostics_runs(capsys, tmp_path):
    results = load("diagnostics").main(tiny=True, output=str(tmp_path))
    assert results["identical"]
    assert results["calibration"]["sbc_ranks"]["theta"].shape == (1, 20, 2)
    assert {"history.png", "coverage.png", "pit_ecdf.png"} <= {path.name for path in tmp_path.iterdir()}
    out = capsys.readouterr().out
    assert "identical samples: True" in out and "MCMCCheck: C2ST" in out
