"""Fixed-key answers of the public API, recorded to prove that a refactoring changes no number.

Each case fits a small Simformer with a fixed key and returns every array its queries give
(samples of each DataTree group, log densities, training losses). ``python tests/golden.py``
records them into ``tests/data/golden_{case}.npz``; ``tests/test_golden.py`` recomputes them
and requires the arrays to be identical, bit for bit, on the machine that recorded them.

Only public names are used here, so the cases survive a reshaping of the package.
"""

from __future__ import annotations

import pathlib
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_simformer import (
    EDMHeun,
    NetworkConfig,
    ProbabilityFlowLogDensity,
    ProbabilityFlowODE,
    Simformer,
    SimformerEnsemble,
    TrainingConfig,
)
from numpyro_simformer.tasks import two_moons

DATA = pathlib.Path(__file__).parent / "data"

# A network trained briefly: enough for non-trivial weights, fast enough for the suite.
SMALL = dict(
    num_simulations=200,
    network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=8),
    training=TrainingConfig(max_steps=20, steps_per_call=5, validation_interval=10),
    progress_bar=False,
)


def _tree_arrays(prefix: str, tree) -> dict[str, np.ndarray]:
    """Every data variable and coordinate of every group of a DataTree, by ``prefix/group/name``."""
    arrays = {}
    for group in sorted(tree.children):
        dataset = tree[group].to_dataset()
        for name in sorted(dataset.variables):
            arrays[f"{prefix}/{group}/{name}"] = np.asarray(dataset[name].values)
    return arrays


def _history(prefix: str, sf) -> dict[str, np.ndarray]:
    """The training record, less its wall-clock times."""
    return {f"{prefix}/history/{name}": np.asarray(value) for name, value in sf.history._asdict().items()
            if name != "elapsed" and value is not None}


def quickstart() -> dict[str, np.ndarray]:
    def model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
        numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))

    sf = Simformer(model, **SMALL).fit(jax.random.key(0))
    x_o = np.array([1.0, -0.5, 0.3])
    out = _history("fit", sf)
    out |= _tree_arrays("posterior", sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=16))
    out |= _tree_arrays("likelihood", sf.sample(jax.random.key(2), observed={"theta": np.zeros(3)}, num_samples=16))
    out |= _tree_arrays("mixed", sf.sample(jax.random.key(3), num_samples=16, observed={
        "theta": np.array([0.8, np.nan, np.nan]), "x": np.array([1.2, np.nan, -0.7])}))
    out |= _tree_arrays("batch", sf.sample(jax.random.key(4), observed={"x": np.stack([x_o, -x_o])}, num_samples=8,
                                           batch_size=8))
    out |= _tree_arrays("chunks", sf.sample(jax.random.key(5), observed={"x": x_o}, num_samples=10, batch_size=4))
    out |= _tree_arrays("edm", sf.sample(jax.random.key(6), observed={"x": x_o}, num_samples=8,
                                         sampler=EDMHeun(num_steps=6)))
    out |= _tree_arrays("ode", sf.sample(jax.random.key(7), observed={"x": x_o}, num_samples=8,
                                         sampler=ProbabilityFlowODE(num_steps=8)))
    out |= _tree_arrays("interval", sf.sample(jax.random.key(8), observed={"theta": np.zeros(3)}, num_samples=8,
                                              intervals={"x": (np.array([0.0, -np.inf, -1.0]), 1.0)}))
    points = {"theta": np.array([[0.5, 0.0, 0.1], [1.0, -0.2, 0.4]])}
    out["log_prob"] = sf.log_prob(points, observed={"x": x_o}, density=ProbabilityFlowLogDensity(num_steps=8))
    out["log_prob_hutchinson"] = sf.log_prob(
        points, observed={"x": x_o}, rng_key=jax.random.key(9),
        density=ProbabilityFlowLogDensity(num_steps=8, exact_trace_max_dim=1, num_probes=2))
    with tempfile.TemporaryDirectory() as directory:
        loaded = Simformer.load(sf.save(pathlib.Path(directory) / "fitted"), model)
        out |= _tree_arrays("loaded", loaded.sample(jax.random.key(1), observed={"x": x_o}, num_samples=16))
    return out


def two_moons_cases() -> dict[str, np.ndarray]:
    task = two_moons()
    out = {}
    x_o = np.array([0.05, -0.1])
    # trained long enough that rejection keeps some draws inside the prior's box
    longer = SMALL | dict(num_simulations=1_000, training=TrainingConfig(max_steps=300, steps_per_call=50,
                                                                          validation_interval=100))
    for mode in ("transform", "reject"):
        sf = Simformer(task.model, exclude_sites=task.exclude_sites, attention="dense", interval_sites=mode,
                       **longer).fit(jax.random.key(0))
        out |= _history(mode, sf)
        out |= _tree_arrays(f"{mode}/posterior", sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=16))
        out[f"{mode}/log_prob"] = sf.log_prob({"theta": np.array([[0.1, 0.2], [-0.3, 0.5]])}, observed={"x": x_o},
                                              rng_key=jax.random.key(2), support_draws=50,
                                              density=ProbabilityFlowLogDensity(num_steps=8))
    ensemble = SimformerEnsemble(task.model, num_members=2, exclude_sites=task.exclude_sites, **SMALL)
    ensemble.fit(jax.random.key(3))
    out |= _tree_arrays("ensemble", ensemble.sample(jax.random.key(4), observed={"x": x_o}, num_samples=9))
    return out


def mixed_sites() -> dict[str, np.ndarray]:
    """Bounded, discrete, positive and deterministic sites; a partly observed query."""

    def model():
        rate = numpyro.sample("rate", dist.Uniform(0.5, 4.0))
        scale = numpyro.sample("scale", dist.HalfNormal(1.0))
        count = numpyro.sample("count", dist.Poisson(rate))
        with numpyro.plate("obs", 3):
            mean = numpyro.sample("mean", dist.Normal(0.0, 1.0))
            numpyro.deterministic("scaled", scale * mean)
            x = numpyro.sample("x", dist.Normal(scale * mean + 0.1 * count, 1.0))
        numpyro.deterministic("total", jnp.sum(x) + count)

    # Recorded before discrete sites were dequantized in training: the old way, kept as an option.
    sf = Simformer(model, discrete_sites="integers", **SMALL).fit(jax.random.key(0))
    out = _history("fit", sf)
    out |= _tree_arrays("partial", sf.sample(jax.random.key(1), num_samples=16, observed={
        "x": np.array([0.5, np.nan, 2.0]), "count": 2.0, "rate": np.nan}))
    out |= _tree_arrays("joint", sf.sample(jax.random.key(2), num_samples=16))
    out["log_prob"] = sf.log_prob({"scale": np.array([0.5, 1.5]), "rate": np.array([1.0, 3.0])},
                                  observed={"x": np.array([0.5, 0.1, 2.0]), "count": 2.0,
                                            "mean": np.zeros(3)},
                                  density=ProbabilityFlowLogDensity(num_steps=8))
    return out


def series() -> dict[str, np.ndarray]:
    """A coordinate-indexed series trained on a grid, queried at new times (and split)."""

    def line(t):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        with numpyro.plate("time", len(t)):
            numpyro.sample("x", dist.Normal(theta[0] + theta[1] * t, 0.5))

    def trials(n):
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        with numpyro.plate("trials", n):
            numpyro.sample("x", dist.Normal(theta, 1.0))

    grid = np.linspace(0.0, 1.0, 12)
    sf = Simformer(line, coordinates={"time": "t"}, points_per_dim=5, **SMALL).fit(jax.random.key(0), t=grid)
    out = _history("line", sf)
    t_new = np.array([0.13, 0.52, 0.91])
    out |= _tree_arrays("new_times", sf.sample(jax.random.key(1), observed={"x": np.array([0.4, 1.2, 2.1])},
                                               num_samples=16, model_kwargs={"t": t_new}))
    out |= _tree_arrays("predict", sf.sample(jax.random.key(2), observed={"theta": np.array([0.3, 1.0])},
                                             num_samples=8, model_kwargs={"t": np.linspace(0.0, 2.0, 13)}))
    sf = Simformer(trials, exchangeable=["trials"], points_per_dim=4, **SMALL).fit(jax.random.key(3), n=4)
    out |= _history("trials", sf)
    out |= _tree_arrays("trials", sf.sample(jax.random.key(4), observed={"x": np.array([0.1, 0.5, -0.2, 1.0, 0.3, 0.0])},
                                            num_samples=16, model_kwargs={"n": 6}))
    return out


CASES = {"quickstart": quickstart, "two_moons": two_moons_cases, "mixed_sites": mixed_sites, "series": series}


def machine() -> str:
    """What bit-identity depends on: the processor, the JAX build and the Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | jax {jax.__version__} | numpyro {numpyro.__version__} | python {sys.version.split()[0]}"


def assert_reproduced(actual, recorded, recorded_on: str, *, rtol: float, atol: float, strict: bool = False,
                      err_msg: str = "") -> None:
    """``actual`` equals ``recorded`` bit for bit on the machine kind ``recorded_on`` (a
    :func:`machine` string), and to ``rtol``/``atol`` elsewhere: another processor or JAX
    build may round XLA's reductions differently."""
    if machine() == recorded_on:
        np.testing.assert_array_equal(actual, recorded, err_msg=err_msg, strict=strict)
    else:
        np.testing.assert_allclose(actual, recorded, rtol=rtol, atol=atol, err_msg=err_msg)


def record(names) -> None:
    DATA.mkdir(exist_ok=True)
    for name in names:
        arrays = CASES[name]()
        np.savez_compressed(DATA / f"golden_{name}.npz", __machine__=np.array(machine()), **arrays)
        print(f"recorded {name}: {len(arrays)} arrays")


if __name__ == "__main__":
    record(sys.argv[1:] or list(CASES))
