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


def test_multihost_runs_on_two_forced_devices():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(EXAMPLES / "multihost.py"), "--tiny"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 devices on 1 processes" in result.stdout


def test_every_example_has_a_test():
    """Each ``examples/NAME.py`` has a ``test_NAME_runs`` here or in a ``test_examples_*.py`` beside this file."""
    names = set(globals())
    for path in pathlib.Path(__file__).parent.glob("test_examples_*.py"):
        names |= {line.split("(")[0][len("def "):] for line in path.read_text().splitlines() if line.startswith("def test_")}
    tested = {name[len("test_"):].split("_runs")[0] for name in names if name.startswith("test_") and "_runs" in name}
    examples = {path.stem for path in EXAMPLES.glob("*.py")}
    assert examples <= tested, f"examples without a test: {sorted(examples - tested)}"
