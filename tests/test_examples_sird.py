"""The SIRD example (a GP-valued beta(t) queried at new times) runs, with tiny settings."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
