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
