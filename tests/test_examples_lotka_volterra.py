"""The Lotka–Volterra example runs with tiny settings: shapes, coordinates, figure."""

import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_lotka_volterra_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("lotka_volterra", EXAMPLES / "lotka_volterra.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(tiny=True, output=str(tmp_path))
    assert results["figure"].exists()
    for count in (4, 12):
        tree = results[count]
        theta = tree.posterior["theta"].values
        assert theta.shape == (1, 50, 4) and np.all((theta >= 1) & (theta <= 3))  # the support (closed in float32)
        u = tree.posterior_predictive["u"]
        num_observed = len(range(0, count, 2))
        assert u.shape == (1, 50, num_observed + 12) and u.dims == ("chain", "draw", "time_u")
        assert np.all(np.diff(u["time_u"].values[num_observed:]) > 0)  # the prediction times, as coordinates
        np.testing.assert_allclose(tree.observed_data["u"].values[:num_observed],
                                   u.values[0, 0, :num_observed])  # observed elements returned as given
