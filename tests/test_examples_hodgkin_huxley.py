"""The Hodgkin–Huxley example (issue 7) runs with tiny settings."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hodgkin_huxley_runs(tmp_path, capsys):
    results = load("hodgkin_huxley").main(tiny=True, output=str(tmp_path))
    assert results["posterior"].posterior["theta"].shape == (1, 100, 7)
    assert results["constrained"].posterior["theta"].shape == (1, 100, 7)
    assert results["constrained"].posterior_predictive["x"].shape == (1, 100, 8)
    assert "x" not in results["posterior"].get("posterior_predictive", {})  # every statistic was observed
    low, high = results["interval"]
    bounds = results["constrained"]["observed_data"]
    np.testing.assert_array_equal(bounds["x_upper"].values, high)
    assert np.isnan(bounds["x"].values[7]) and np.isfinite(high[7]) and np.isneginf(low[7])
    theta = results["constrained"].posterior["theta"].values
    low_prior, high_prior = [1.0, 60.0, 10.0, 0.1, 40.0, -100.0, -90.0], [2.0, 120.0, 30.0, 0.5, 70.0, -60.0, -60.0]
    assert np.all((theta >= low_prior) & (theta <= high_prior))
    # guidance puts the predicted energy below the bound even for a barely trained network
    assert results["fraction_inside"] > 0.5
    assert (tmp_path / "hodgkin_huxley.png").stat().st_size > 10_000
    assert "energy inside the bound" in capsys.readouterr().out
