"""Simulation over executors, kept on disk: same draws anywhere, resume, faults.

A real ``ProcessPoolExecutor`` and a real Dask ``LocalCluster`` (two worker processes each)
run tiny NumPy-simulator models; every result is compared bit for bit with the in-process
``simulate`` for the same key. The pool and the cluster are started once for the module.
"""

import functools
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import Simformer, SimulationError, Simulator, read_simulations
from numpyro_simformer.model.executors import check_executor, simulate_chunks
from numpyro_simformer.model.simulate import simulate
from numpyro_simformer.model.simulation_store import SimulationDirectoryError

NUM_SIMULATIONS, CHUNK_SIZE = 40, 8  # 5 chunks
SITES = ("theta", "x")


def numpy_simulator(rng, theta):  # vectorized: theta (n, 2) -> (n, 3)
    signal_ = np.stack([theta[:, 0], theta[:, 1], theta[:, 0] * theta[:, 1]], axis=1)
    return signal_ + 0.1 * rng.normal(size=(len(theta), 3))


def raising_simulator(rng, theta):  # fails for some inputs, as an ODE solver might
    if np.any(theta[:, 0] > 1.0):
        raise ValueError("cannot simulate theta[0] > 1")
    return numpy_simulator(rng, theta)


def nan_simulator(rng, theta):  # NaN for some inputs: those rows are dropped and counted
    x = numpy_simulator(rng, theta)
    x[theta[:, 0] > 1.0] = np.nan
    return x


def slow_simulator(rng, theta, seconds):
    time.sleep(seconds)
    return numpy_simulator(rng, theta)


def dying_simulator(rng, theta, marker, always=False):
    """Kills its own process the first time it runs (or every time): a worker dying mid-chunk."""
    if always or not os.path.exists(marker):
        pathlib.Path(marker).touch()
        os._exit(1)
    return numpy_simulator(rng, theta)


def model(simulator=numpy_simulator):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", Simulator.from_numpy(simulator, theta, event_shape=(3,)))


def in_process(rng_key, num_simulations=NUM_SIMULATIONS, chunk_size=CHUNK_SIZE):
    return simulate(rng_key, model, num_simulations, SITES, chunk_size=chunk_size)


def assert_same_draws(draws, reference):
    assert set(draws) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(draws[name], reference[name])  # bit for bit


def chunk_files(directory):
    return sorted(path.name for path in pathlib.Path(directory).glob("chunk-*.npz"))


@pytest.fixture(scope="module")
def process_pool():
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def dask_executor():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client.get_executor()


# --- the same draws anywhere ---------------------------------------------------------------
def test_in_process_chunks_on_disk_equal_simulate(rng_key, tmp_path):
    reference, reference_info = in_process(rng_key)
    draws, info, report = simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                                          directory=tmp_path)
    assert_same_draws(draws, reference)
    assert info == reference_info
    assert (report.num_chunks, report.chunks_simulated, report.chunks_reused) == (5, 5, 0)
    assert chunk_files(tmp_path) == [f"chunk-{i:05d}.npz" for i in range(5)]
    with np.load(tmp_path / "chunk-00001.npz") as chunk:  # readable without the library, by site name
        np.testing.assert_array_equal(chunk["x"], reference["x"][8:16])
    assert_same_draws(read_simulations(tmp_path), reference)
    assert json.loads((tmp_path / "report.json").read_text())["chunks"][0]["status"] == "simulated"


def test_a_process_pool_executor_gives_the_in_process_draws(rng_key, process_pool):
    draws, _, report = simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                                       executor=process_pool)
    assert_same_draws(draws, in_process(rng_key)[0])
    assert report.chunks_simulated == 5 and report.directory is None


def test_a_dask_local_cluster_gives_the_in_process_draws(rng_key, dask_executor, tmp_path):
    draws, _, report = simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                                       executor=dask_executor, directory=tmp_path)
    assert_same_draws(draws, in_process(rng_key)[0])
    assert report.chunks_simulated == 5
    assert_same_draws(read_simulations(tmp_path), in_process(rng_key)[0])


def test_the_worker_count_does_not_change_a_jax_models_draws(rng_key, process_pool):
    def jax_model(scale):  # a closure: travels by value (cloudpickle)
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        numpyro.sample("x", dist.Normal(theta, scale).to_event(1))

    reference, _ = simulate(rng_key, jax_model, 30, SITES, model_args=(0.5,), chunk_size=7)
    draws, _, _ = simulate_chunks(rng_key, jax_model, 30, SITES, model_args=(0.5,), chunk_size=7,
                                  executor=process_pool)
    assert_same_draws(draws, reference)
    raw_key = jax.random.key_data(rng_key)  # an old-style uint32 key gives the typed key's draws, in workers too
    draws, _, _ = simulate_chunks(raw_key, jax_model, 30, SITES, model_args=(0.5,), chunk_size=7,
                                  executor=process_pool)
    assert_same_draws(draws, reference)


def branching_model():  # Python control flow on a sampled value: cannot be vmapped
    theta = numpyro.sample("theta", dist.Normal(0, 1))
    scale = 0.1 if float(theta) > 0 else 1.0
    numpyro.sample("x", dist.Normal(theta, scale))


def test_a_model_that_cannot_be_vmapped_runs_draw_by_draw_in_workers_too(rng_key, process_pool):
    with pytest.warns(UserWarning, match="could not be vmapped"):
        reference, reference_info = simulate(rng_key, branching_model, 12, SITES, chunk_size=6)
    with pytest.warns(UserWarning, match="could not be vmapped"):
        draws, info, _ = simulate_chunks(rng_key, branching_model, 12, SITES, chunk_size=6, executor=process_pool)
    assert_same_draws(draws, reference)
    assert info == reference_info and not info.vectorized


# --- kept on disk, resumed ---------------------------------------------------------------------
RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import functools
import jax, numpy as np
from numpyro_simformer.model.executors import simulate_chunks
from test_executors import model, slow_simulator
key = jax.random.wrap_key_data(np.array({key_data}, dtype=np.uint32))
simulate_chunks(key, functools.partial(model, functools.partial(slow_simulator, seconds=0.3)), 40, ("theta", "x"),
                chunk_size=4, directory={directory!r})
"""


def test_a_killed_run_resumes_with_only_the_unfinished_chunks(rng_key, tmp_path):
    directory = tmp_path / "sims"
    script = RESUME_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), directory=str(directory),
                                  key_data=np.asarray(jax.random.key_data(rng_key)).tolist())
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while (directory.exists() and len(chunk_files(directory)) >= 3) is False and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(chunk_files(directory))
    assert 3 <= finished < 10

    draws, _, report = simulate_chunks(rng_key, model, 40, SITES, chunk_size=4, directory=directory)
    assert report.chunks_reused == finished
    assert report.chunks_simulated == 10 - finished
    assert_same_draws(draws, in_process(rng_key, 40, 4)[0])


def test_a_stray_temporary_file_is_not_data_and_a_damaged_chunk_is_simulated_again(rng_key, tmp_path):
    simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE, directory=tmp_path)
    (tmp_path / "chunk-00002.npz").unlink()  # killed before its rename: only the temporary file is left
    stray = tmp_path / ".chunk-00002.npz.k2j3h4.tmp"
    stray.write_bytes(b"PK\x03\x04 half a zip file")
    damaged = tmp_path / "chunk-00003.npz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # damaged on disk after it was written
    with pytest.raises(SimulationDirectoryError, match="incomplete"):
        read_simulations(tmp_path)
    with pytest.warns(UserWarning, match="damaged"):
        draws, _, report = simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                                           directory=tmp_path)
    assert [chunk.status for chunk in report.chunks] == ["reused", "reused", "simulated", "simulated", "reused"]
    assert not stray.exists()
    assert_same_draws(draws, in_process(rng_key)[0])
    assert_same_draws(read_simulations(tmp_path), in_process(rng_key)[0])


def test_a_directory_of_another_simulation_set_is_refused(rng_key, tmp_path):
    simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE, directory=tmp_path)
    with pytest.raises(SimulationDirectoryError, match="rng_key"):
        simulate_chunks(jax.random.fold_in(rng_key, 1), model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                        directory=tmp_path)
    with pytest.raises(SimulationDirectoryError, match="chunk_size"):
        simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=10, directory=tmp_path)
    (tmp_path.parent / "other").mkdir()
    (tmp_path.parent / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SimulationDirectoryError, match="not a simulation directory"):
        simulate_chunks(rng_key, model, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE, directory=tmp_path.parent / "other")


# --- faults ------------------------------------------------------------------------------------
def failing_chunks(rng_key):
    theta = in_process(rng_key)[0]["theta"]
    return [index for index in range(5) if np.any(theta[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE, 0] > 1.0)]


def test_a_simulator_raising_fails_only_its_chunks(rng_key, tmp_path, process_pool):
    expected = failing_chunks(rng_key)
    assert 0 < len(expected) < 5  # the test's key gives both kinds of chunk
    with pytest.raises(SimulationError, match="cannot simulate theta") as raised:
        simulate_chunks(rng_key, functools.partial(model, raising_simulator), NUM_SIMULATIONS, SITES,
                        chunk_size=CHUNK_SIZE, executor=process_pool, directory=tmp_path)
    report = raised.value.report
    assert [chunk.index for chunk in report.chunks if chunk.status == "failed"] == expected
    assert all(chunk.attempts == 1 and chunk.worker_deaths == 0 for chunk in report.chunks)  # raising is not rerun
    assert chunk_files(tmp_path) == [f"chunk-{i:05d}.npz" for i in range(5) if i not in expected]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [chunk["status"] for chunk in saved["chunks"]].count("failed") == len(expected)


def test_nan_simulations_are_counted_per_chunk(rng_key, process_pool):
    draws, info, report = simulate_chunks(rng_key, functools.partial(model, nan_simulator), NUM_SIMULATIONS, SITES,
                                          chunk_size=CHUNK_SIZE, executor=process_pool)
    theta = in_process(rng_key)[0]["theta"]
    bad = theta[:, 0] > 1.0
    assert info.num_invalid == bad.sum() > 0 and info.num_valid == len(draws["x"]) == (~bad).sum()
    assert [chunk.num_invalid for chunk in report.chunks] == [int(bad[i:i + CHUNK_SIZE].sum())
                                                              for i in range(0, NUM_SIMULATIONS, CHUNK_SIZE)]


@pytest.mark.slow
def test_a_dying_worker_has_its_chunk_rerun_on_the_librarys_restarted_pool(rng_key, tmp_path):
    dying = functools.partial(model, functools.partial(dying_simulator, marker=str(tmp_path / "died")))
    with pytest.warns(UserWarning, match="rerun after their worker died"):
        draws, _, report = simulate_chunks(rng_key, dying, NUM_SIMULATIONS, SITES, chunk_size=CHUNK_SIZE,
                                           executor=2, directory=tmp_path / "sims")
    assert report.executor == "local process pool, 2 workers"
    assert report.chunks_rerun >= 1 and report.chunks_failed == 0
    assert all(chunk.attempts == chunk.worker_deaths + 1 for chunk in report.chunks)
    reference = in_process(rng_key)[0]
    assert_same_draws(draws, reference)
    assert_same_draws(read_simulations(tmp_path / "sims"), reference)


@pytest.mark.slow


def test_a_chunk_whose_worker_always_dies_fails_after_max_attempts(rng_key, tmp_path):
    dying = functools.partial(model, functools.partial(dying_simulator, marker=str(tmp_path / "died"), always=True))
    with pytest.raises(SimulationError, match="worker died 2 time") as raised:
        simulate_chunks(rng_key, dying, 8, SITES, chunk_size=8, executor=1, max_attempts=2)
    (chunk,) = raised.value.report.chunks
    assert (chunk.status, chunk.attempts, chunk.worker_deaths) == ("failed", 2, 2)


def test_an_executor_must_be_an_executor():
    with pytest.raises(TypeError, match="get_executor"):
        check_executor(object())
    with pytest.raises(TypeError, match="number of local worker processes"):
        check_executor(0)
    assert check_executor(3) == 3 and check_executor(None) is None


# --- through the front object ------------------------------------------------------------------
def test_simformer_simulates_over_an_executor_into_a_directory_and_reuses_it(rng_key, tmp_path, process_pool):
    options = dict(num_simulations=NUM_SIMULATIONS, simulation_chunk_size=CHUNK_SIZE, progress_bar=False)
    plain = Simformer(model, **options)
    spec = plain.read_model(rng_key)
    reference, reference_info, _ = plain.simulate(rng_key, spec)
    assert plain.simulation_report is None

    sf = Simformer(model, simulation_executor=process_pool, simulation_dir=tmp_path,
                   **{**options, "progress_bar": True})  # the bar over chunks runs too
    draws, info, _ = sf.simulate(rng_key, spec)
    assert_same_draws(draws, reference)
    assert info == reference_info
    assert sf.simulation_report.chunks_simulated == 5
    draws, _, _ = sf.simulate(rng_key, spec)  # a second run reads the directory
    assert sf.simulation_report.chunks_reused == 5
    assert_same_draws(draws, reference)

    # what fit_simulations takes for another fit (training itself is tested in test_simformer.py)
    assert_same_draws(read_simulations(tmp_path), reference)
