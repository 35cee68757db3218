"""Cost of reading a model with a large data site: the element graph at 100 to 10,000 outputs.

One model family, written three ways: theta (2,) ~ N(0, I) and x (n,) = theta_0 +
theta_1 t + sigma eps on n points, as a NumPyro distribution (log-density terms), as a JAX
``Simulator`` (its draws read from the function) and as a NumPy ``Simulator.from_numpy``
(its draws unreadable: every output shares noise). For each, a fresh process times
``Simformer(model).read_model`` (prior draws, derivatives and perturbations, noise links,
the element graph and its grouping into tokens) and reports its peak memory.

    python benchmarks/read_model.py                        # writes benchmarks/results/read_model.md
    python benchmarks/read_model.py --sizes 100 1000       # a subset

Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from high_dim import _code, _machine  # the same machine and code lines as the cost table

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
from numpyro_simformer import Simformer, Simulator

kind, n = sys.argv[1], int(sys.argv[2])
t = np.linspace(-1, 1, n)
sigma = 0.2 * np.sqrt(n)

def jax_fn(key, theta):
    return theta[0] + theta[1] * jnp.asarray(t) + sigma * jax.random.normal(key, (n,))

def numpy_fn(rng, theta):
    theta = np.asarray(theta)
    return theta[..., :1] + theta[..., 1:2] * t + sigma * rng.standard_normal(theta.shape[:-1] + (n,))

def model():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    if kind == "distribution":
        numpyro.sample("x", dist.Normal(theta[0] + theta[1] * jnp.asarray(t), sigma).to_event(1))
    elif kind == "jax":
        numpyro.sample("x", Simulator(jax_fn, theta, event_shape=(n,)))
    else:
        numpyro.sample("x", Simulator.from_numpy(numpy_fn, theta, event_shape=(n,)))

start = time.perf_counter()
spec = Simformer(model, num_simulations=1_000, progress_bar=False).read_model(jax.random.key(0))
print(json.dumps({"read_s": time.perf_counter() - start,
                  "tokens": spec.grouping.num_tokens if spec.grouping is not None else n + 2,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

KINDS = ("distribution", "jax", "numpy")


def run(kind: str, n: int) -> dict:

    result = subprocess.run([sys.executable, "-W", "ignore", "-c", WORKER, kind, str(n)], capture_output=True, text=True)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1][:120]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    args = parser.parse_args()
    lines = ["| data elements | written as | tokens | reading the model s | peak memory MiB |", "|---|---|---|---|---|"]
    for n in args.sizes:
        for kind in KINDS:
            row = run(kind, n)
            print(n, kind, row, flush=True)
            if "error" in row:
                lines.append(f"| {n} | {kind} | | {row['error']} | |")
            else:
                lines.append(f"| {n} | {kind} | {row['tokens']} | {row['read_s']:.1f} | {row['peak_rss_mib']:.0f} |")
    text = (f"# Reading a model with a large data site\n\nMachine: {_machine()}. Code: {_code()}. Command: "
            f"`python benchmarks/read_model.py --sizes {' '.join(map(str, args.sizes))}`. One fresh process per "
            "row; the time includes compiling the probes; peak memory is the process's.\n\n" + "\n".join(lines) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "read_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
