"""Every example runs, with tiny settings."""

import importlib.util
import pathlib

import numpy as np
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


@pytest.mark.slow
def test_multihost_runs_on_two_forced_devices():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(EXAMPLES / "multihost.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices on 1 processes" in result.stdout


@pytest.mark.slow
def test_lotka_volterra_runs(tmp_path):
    results = load("lotka_volterra").main(tiny=True, output=str(tmp_path))
    assert results["figure"].exists()
    for count in (12,):  # tiny settings query with 12 observations only
        tree = results[count]
        theta = tree.posterior["theta"].values
        assert theta.shape == (1, 50, 4) and np.all((theta >= 1) & (theta <= 3))  # the support (closed in float32)
        u = tree.posterior_predictive["u"]
        num_observed = len(range(0, count, 2))
        assert u.shape == (1, 50, num_observed + 12) and u.dims == ("chain", "draw", "time_u")
        assert np.all(np.diff(u["time_u"].values[num_observed:]) > 0)  # the prediction times, as coordinates
        np.testing.assert_allclose(tree.observed_data["u"].values[:num_observed],
                                   u.values[0, 0, :num_observed])  # observed elements returned as given


@pytest.mark.slow
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


@pytest.mark.slow
def test_sird_runs(tmp_path):
    results = load("sird").main(tiny=True, output=str(tmp_path))
    tree, t_query = results["posterior"], np.linspace(0.0, 50.0, 100)
    f = tree.posterior["f"]
    assert f.dims == ("chain", "draw", "f_dim_0") and f.shape == (1, 100, 100)
    np.testing.assert_allclose(f["f_dim_0"].values, t_query, rtol=1e-6)
    beta = results["beta"]
    assert beta.shape == (1, 100, 100) and np.all((beta.values >= 0) & (beta.values <= 1))
    np.testing.assert_allclose(beta["f_dim_0"].values, t_query, rtol=1e-6)
    for name in ("gamma", "delta", "i0"):
        assert tree.posterior[name].shape == (1, 100)
    # the observations keep their 15 unsorted times as coordinates
    np.testing.assert_allclose(tree.observed_data["time"].values, results["t_observed"])
    assert tree.observed_data["I"].shape == (15,)
    assert (tmp_path / "sird.png").exists()


def test_every_example_has_a_test():
    tested = {name[len("test_"):].split("_runs")[0] for name in globals() if name.startswith("test_") and "_runs" in name}
    examples = {path.stem for path in EXAMPLES.glob("*.py")}
    assert examples <= tested, f"examples without a test: {sorted(examples - tested)}"
