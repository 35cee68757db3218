"""Simulation over executors: wall time of an expensive NumPy simulator on 1 and 2 workers and on Dask.

The simulator costs 20 ms per draw. By default it **sleeps** (``time.sleep``): a sleeping
worker holds no core, so the ratios measure the fan-out machinery (pickling the model,
starting and compiling in the workers, moving chunks back, writing them), not how many
cores happen to be free on a shared machine; ``--cost compute`` busy-waits instead, which
needs a free core per worker to scale. 2,000 draws in chunks of 50 (40 chunks) are
simulated: in this process, on a local pool of 1 and of 2 worker processes
(``simulation_executor=1`` / ``2``: the wall time includes starting the workers and
compiling the model in each), and on a Dask ``LocalCluster`` of 2 worker processes (one
thread each), started before the clock starts (a cluster is kept running between
simulations; its start-up time is printed). Each time is also a ratio to the one-worker
pool of the same run, and every run's draws are checked bit for bit against the
in-process ones. The chunks are written to a temporary simulation directory, as a fit
with ``simulation_dir`` does.

    python benchmarks/executors.py                  # ~2 minutes; writes benchmarks/results/executors.md
    python benchmarks/executors.py --quick          # 200 draws; prints, writes nothing

Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_simformer import Simulator
from numpyro_simformer.model.executors import simulate_chunks

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import machine  # noqa: E402  benchmarks/run.py, beside this script

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SITES = ("theta", "x")


def expensive_simulator(rng, theta, seconds_per_draw, cost):
    """A 5-parameter, 10-output simulator costing ``seconds_per_draw`` per draw (vectorized)."""
    wait = seconds_per_draw * len(theta)
    if cost == "sleep":
        time.sleep(wait)
    else:
        end = time.perf_counter() + wait
        while time.perf_counter() < end:
            pass
    signal = np.concatenate([theta, np.sin(theta)], axis=1)
    return signal + 0.1 * rng.normal(size=signal.shape)


def model(seconds_per_draw=0.02, cost="sleep"):
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([5]).to_event(1))

    def simulator(rng, theta):
        return expensive_simulator(rng, theta, seconds_per_draw, cost)

    numpyro.sample("x", Simulator.from_numpy(simulator, theta, event_shape=(10,)))


def timed(executor, args, directory):
    start = time.perf_counter()
    draws, info, report = simulate_chunks(jax.random.key(args.seed), model, args.num_simulations, SITES,
                                          model_kwargs={"seconds_per_draw": args.seconds_per_draw, "cost": args.cost},
                                          chunk_size=args.chunk_size, executor=executor, directory=directory)
    seconds = time.perf_counter() - start
    assert report.chunks_simulated == report.num_chunks and info.num_valid == args.num_simulations
    return seconds, draws


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-simulations", type=int, default=2_000)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--seconds-per-draw", type=float, default=0.02)
    parser.add_argument("--cost", choices=("sleep", "compute"), default="sleep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200 draws; results not written")
    args = parser.parse_args()
    if args.quick:
        args.num_simulations = 200
    load = os.getloadavg()[0]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as scratch:
        runs = [("in this process", None), ("local pool, 1 worker", 1), ("local pool, 2 workers", 2)]
        cluster_note = ""
        if not args.skip_dask:
            from dask.distributed import Client, LocalCluster

            start = time.perf_counter()
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None)
            client = Client(cluster)
            cluster_note = f"; the Dask cluster took {time.perf_counter() - start:.1f} s to start (not in its time)"
            runs.append(("Dask LocalCluster, 2 workers", client.get_executor()))
        for index, (name, executor) in enumerate(runs):
            seconds, draws = timed(executor, args, pathlib.Path(scratch) / str(index))
            if reference is None:
                reference = draws
            same = all(np.array_equal(draws[site], reference[site]) for site in SITES)
            rows.append((name, seconds, same))
            print(f"{name}: {seconds:.1f} s, draws identical to in-process: {same}", flush=True)
        if not args.skip_dask:
            client.close()
            cluster.close()
    one_worker = rows[1][1]
    serial = args.num_simulations * args.seconds_per_draw
    lines = [
        f"{args.num_simulations:,} draws of a NumPy simulator costing {args.seconds_per_draw * 1e3:.0f} ms per draw "
        f"({'time.sleep' if args.cost == 'sleep' else 'a busy wait'}; {serial:.0f} s of simulator time in all), "
        f"chunks of {args.chunk_size}, written to a simulation directory.",
        "",
        "| where | wall s | ratio to 1 worker | draws identical to in-process |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {seconds:.1f} | {one_worker / seconds:.2f} | {'yes' if same else 'NO'} |"
              for name, seconds, same in rows]
    lines += ["", f"Ratio: 1-worker wall time / this wall time (above 1 is faster). Local pools include starting "
                  f"their workers and compiling the model in each{cluster_note}.",
              f"Machine: {machine()}; load average {load:.1f} at start (a machine shared with other people's jobs, "
              f"which may have run meanwhile: times are upper bounds); {datetime.date.today()}. Command: `python benchmarks/executors.py"
              f"{'' if args.cost == 'sleep' else ' --cost compute'}`."]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "executors.md").write_text(table)
    if not all(same for _, _, same in rows):
        raise SystemExit("the draws differ between executors")


if __name__ == "__main__":
    main()
