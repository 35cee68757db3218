"""Data parallelism and memory: steps/s against device count, peak memory against simulations.

Each measurement runs in a fresh subprocess (device count is fixed when JAX starts; peak
RSS is per process). Devices here are CPU devices forced with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: they share the same cores, so on
a 2-core machine the point is that sharding works and costs little, not a speed-up.

    python benchmarks/parallel.py                    # writes benchmarks/results/parallel.md
    python benchmarks/parallel.py --skip-throughput  # the memory table only (e.g. on a busy machine)

Not a test.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = r"""
import json, resource, sys, time
import jax, numpy as np, numpyro, numpyro.distributions as dist
from numpyro_simformer import Simformer, TrainingConfig

import numpyro_simformer.training.fit as fit_module

mode, num_simulations, max_steps, stream = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "stream"

def rss_mib(field):  # "VmRSS" (now) or "VmHWM" (peak since start or the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

training_memory = {}
library_train = fit_module.train

def measured_train(*args, **kwargs):  # the training loop alone: RSS on entry, peak inside
    training_memory["entry"] = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (Linux >= 4.0)
        f.write("5")
    result = library_train(*args, **kwargs)
    training_memory["peak"] = rss_mib("VmHWM")
    return result

fit_module.train = measured_train

def model():  # the Linear Gaussian task: 20 tokens
    theta = numpyro.sample("theta", dist.Normal(0.0, 0.1 ** 0.5).expand([10]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.1 ** 0.5).to_event(1))

sf = Simformer(model, num_simulations=num_simulations, progress_bar=False,
               training=TrainingConfig(max_steps=max_steps, patience=None, validation_interval=max_steps,
                                       data_parallel=(mode == "parallel"), stream_data=stream))
start = time.perf_counter()
sf.fit(jax.random.key(0))
print(json.dumps({
    "devices": jax.device_count(),
    "num_simulations": num_simulations,
    "steps": int(sf.history.step[-1]),
    "training_s": sf.training_time,
    "simulation_s": sf.simulation_time,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "training_entry_mib": training_memory["entry"],
    "training_peak_mib": training_memory["peak"],
}))
"""


def run(devices: int, mode: str, num_simulations: int, max_steps: int, stream: bool = False) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", WORKER, mode, str(num_simulations), str(max_steps),
                             "stream" if stream else "resident"],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-throughput", action="store_true",
                        help="only the memory table (its numbers do not depend on load; the timings do)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.", ""]

    # Throughput: the same 1,000 steps (plus compilation) on 1 and 2 devices; 3 repeats, median.
    out = RESULTS / "parallel.md"
    if args.skip_throughput and out.exists():  # keep the previous run's table, dated
        previous = out.read_text().split("\n\n")
        lines = [previous[0].rstrip(".") + " (throughput table); memory table: " + time.strftime("%Y-%m-%d") + ".",
                 "", previous[1]]
    else:
        lines += ["| devices | data parallel | steps | training s (median of 3) | steps/s | ratio to 1 device |",
                  "|---|---|---|---|---|---|"]
    baseline = None
    for devices, mode in () if args.skip_throughput else ((1, "single"), (2, "parallel")):
        times = [run(devices, mode, 10_000, 1_000)["training_s"] for _ in range(3)]
        median = statistics.median(times)
        baseline = baseline or median
        lines.append(f"| {devices} | {mode == 'parallel'} | 1000 | {median:.1f} | {1000 / median:.1f} | "
                     f"{baseline / median:.2f} |")
        print(lines[-1], flush=True)

    # Memory: 200 training steps after simulating 1e4, 1e5, 1e6 draws of the 20-token model,
    # with the training set on the device and streamed from the host (on a CPU both are the
    # same memory; on a GPU streaming keeps only the batches on the device).
    # "peak RSS" is the whole process's (simulation, tokenisation, training); "training
    # peak - entry" is what the training loop itself adds to the RSS it starts with.
    lines += ["", "| simulations | training set | simulation s | training s (200 steps) | peak RSS MiB | "
              "RSS entering training MiB | training peak - entry MiB | token data MiB (float32) |",
              "|---|---|---|---|---|---|---|---|"]
    for num_simulations in (10_000, 100_000, 1_000_000):
        for stream in (False, True):
            row = run(1, "single", num_simulations, 200, stream)
            lines.append(f"| {num_simulations:,} | {'streamed' if stream else 'on device'} | "
                         f"{row['simulation_s']:.1f} | {row['training_s']:.1f} | {row['peak_rss_mib']:.0f} | "
                         f"{row['training_entry_mib']:.0f} | "
                         f"{row['training_peak_mib'] - row['training_entry_mib']:.0f} | "
                         f"{num_simulations * 20 * 4 / 2**20:.0f} |")
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
