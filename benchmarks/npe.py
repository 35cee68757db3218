"""NPE baseline: C2ST of neural posterior estimation with a conditional normalizing flow.

The reference point the Simformer is compared against in the paper: a masked autoregressive
flow q(θ | x) (``flowjax``, equinox-based JAX) trained by maximum likelihood on simulations
of the same task and budget, with sbi's defaults for NPE:

- MAF with 5 autoregressive transforms, each a MADE with 2 hidden layers of 50 tanh units
  (flowjax ``masked_autoregressive_flow(flow_layers=5, nn_width=50, nn_depth=2,
  nn_activation=tanh)``), a random permutation between transforms, standard normal base;
- θ and x z-scored per dimension with the training simulations' mean and std;
- Adam, learning rate 5e-4, gradient norm clipped at 5, batch 200, 10 % of the simulations
  held out for validation, training stopped 20 epochs after the best validation loss and
  the best parameters kept (flowjax ``fit_to_data``);
- 10,000 posterior samples per observation, samples outside the prior's support rejected
  and redrawn (sbi's leakage correction), read from the NumPyro model's prior sites.

Then C2ST against sbibm's reference posterior samples, exactly as ``benchmarks/run.py``
scores the Simformer (MLP as sbibm, random forest as sbi/the paper). Each (task, budget,
seed) runs in a fresh subprocess; rows are appended to ``benchmarks/results/<name>.csv``
(``method`` = "npe"), an interrupted run resumes, and a markdown table is written beside it.

    python benchmarks/npe.py --tasks linear_gaussian two_moons --budgets 1000 10000 \\
        --observations 1 2 3 --mlp-early-stopping-min-dim 8

Simulations use ``task.simulate`` with the same seed split as ``run.py``; they are draws
from the same joint, not the identical draws the Simformer trained on. Needs the
``benchmarks`` extra (``pip install -e .[benchmarks]``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "task", "num_simulations", "method", "seed", "query", "c2st_mlp", "mlp_early_stopping", "c2st_rf",
    "num_c2st_samples", "training_s", "steps", "epochs", "stopped_early", "sampling_s", "acceptance",
    "peak_rss_mib", "simulations_invalid", "flow", "machine", "date",
]


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}"


def prior_support_check(task):
    """fn(theta_flat (n, d)) -> bool (n,): inside the support of every parameter site's prior."""
    import jax
    import numpy as np
    from numpyro import handlers

    trace = handlers.trace(handlers.seed(task.model, jax.random.key(0))).get_trace()

    def check(theta_flat):
        inside = np.ones(len(theta_flat), dtype=bool)
        start = 0
        for name in task.parameter_sites:
            shape = task.site_shapes[name]
            size = int(np.prod(shape, dtype=int))
            value = theta_flat[:, start : start + size].reshape((len(theta_flat),) + shape)
            support = trace[name]["fn"].support
            ok = np.asarray(support.check(value))
            inside &= ok.reshape(len(theta_flat), -1).all(axis=1)
            start += size
        return inside

    return check


def train_npe(rng_key, theta, x, args):
    """Fit q(θ | x) on z-scored simulations by maximum likelihood; returns (flow, stats dict).

    The loop is flowjax's ``fit_to_data`` (shuffle each epoch, drop the last partial batch,
    validation loss after each epoch, stop ``patience`` epochs after the best one, keep the
    best parameters) with each epoch's steps in one jitted ``lax.scan``: the per-step
    Python dispatch of ``fit_to_data`` dominated training time on CPU for these small flows.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import paramax
    from flowjax.distributions import Normal
    from flowjax.flows import masked_autoregressive_flow
    from flowjax.train.losses import MaximumLikelihoodLoss
    from flowjax.train.train_utils import train_val_split

    key_flow, key_split, key_epochs = jax.random.split(rng_key, 3)
    flow = masked_autoregressive_flow(
        key_flow, base_dist=Normal(jnp.zeros(theta.shape[1])), cond_dim=x.shape[1],
        flow_layers=args.flow_layers, nn_width=args.hidden, nn_depth=args.depth, nn_activation=jax.nn.tanh,
    )
    params, static = eqx.partition(flow, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable))
    optimizer = optax.chain(optax.clip_by_global_norm(5.0), optax.adam(args.learning_rate))
    opt_state = optimizer.init(params)
    loss_fn = MaximumLikelihoodLoss()
    data = (jnp.asarray(theta, jnp.float32), jnp.asarray(x, jnp.float32))
    (theta_train, x_train), (theta_val, x_val) = train_val_split(key_split, data, val_prop=0.1)
    batch_size = min(args.batch_size, len(theta_train))
    num_batches = len(theta_train) // batch_size

    @eqx.filter_jit
    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, len(theta_train))[: num_batches * batch_size].reshape(num_batches, batch_size)

        def step(carry, index):
            params, opt_state = carry
            loss, grads = eqx.filter_value_and_grad(loss_fn)(params, static, theta_train[index], x_train[index])
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (eqx.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, losses.mean(), loss_fn(params, static, theta_val, x_val)

    start = time.perf_counter()
    best_params, best_val, best_epoch, epochs = params, np.inf, 0, 0
    for epochs in range(1, args.max_epochs + 1):
        params, opt_state, _train_loss, val_loss = epoch(params, opt_state, jax.random.fold_in(key_epochs, epochs))
        val_loss = float(val_loss)
        if val_loss < best_val:
            best_params, best_val, best_epoch = params, val_loss, epochs
        elif epochs - best_epoch > args.patience:
            break
    training_s = time.perf_counter() - start
    return eqx.combine(best_params, static), {
        "training_s": training_s, "epochs": epochs, "steps": epochs * num_batches,
        "stopped_early": epochs < args.max_epochs, "best_val": best_val}


def sample_posterior(flow, rng_key, x_z, theta_mean, theta_std, inside, num_samples, max_rounds=200):
    """num_samples draws of θ ~ q(θ | x_o) inside the prior support; returns (draws, acceptance)."""
    import equinox as eqx
    import jax
    import numpy as np

    sample = eqx.filter_jit(lambda key, cond: flow.sample(key, (num_samples,), condition=cond))
    kept, drawn = [], 0
    for round_ in range(max_rounds):
        draws = np.asarray(sample(jax.random.fold_in(rng_key, round_), x_z), dtype=np.float64)
        draws = draws * theta_std + theta_mean
        drawn += len(draws)
        kept.append(draws[inside(draws) & np.all(np.isfinite(draws), axis=1)])
        if sum(len(k) for k in kept) >= num_samples:
            break
    draws = np.concatenate(kept)
    if len(draws) < num_samples:
        raise RuntimeError(f"only {len(draws)} of {drawn} NPE samples inside the prior support")
    return draws[:num_samples], sum(len(k) for k in kept) / drawn


def single_run(args) -> list[dict]:
    """Simulate, train one flow, sample and score each observation (runs in the subprocess)."""
    import jax
    import numpy as np

    from numpyro_simformer import tasks as task_module
    from numpyro_simformer.diagnostics import c2st

    task = getattr(task_module, args.task)()
    key_fit, _key_queries, key_sample = jax.random.split(jax.random.key(args.seed), 3)  # as run.py
    key_simulate, key_train = jax.random.split(key_fit)
    sims = task.simulate(key_simulate, args.num_simulations)
    flat = lambda sites: np.concatenate(  # noqa: E731  (row-major per site, as task.flatten)
        [np.asarray(sims[name], np.float64).reshape(args.num_simulations, -1) for name in sites], axis=1)
    theta, x = flat(task.parameter_sites), flat(task.data_sites)
    valid = np.all(np.isfinite(theta), axis=1) & np.all(np.isfinite(x), axis=1)
    theta, x = theta[valid], x[valid]
    theta_mean, theta_std = theta.mean(0), np.where(theta.std(0) > 0, theta.std(0), 1.0)
    x_mean, x_std = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
    flow, stats = train_npe(key_train, (theta - theta_mean) / theta_std, (x - x_mean) / x_std, args)
    inside = prior_support_check(task)
    flow_name = f"MAF {args.flow_layers}x{args.depth}x{args.hidden} tanh, batch {args.batch_size}"

    rows = []
    for index, number in enumerate(args.observations):
        observed = task.observation(number)
        x_o = np.concatenate([np.asarray(observed[name], np.float64).reshape(-1) for name in task.data_sites])
        reference = task.reference_posterior_samples(number)
        start = time.perf_counter()
        estimate, acceptance = sample_posterior(
            flow, jax.random.fold_in(key_sample, index), (x_o - x_mean) / x_std, theta_mean, theta_std, inside,
            args.num_samples)
        sampling_s = time.perf_counter() - start
        n = min(args.num_c2st_samples, len(estimate), len(reference))
        early = args.mlp_early_stopping or reference.shape[1] >= args.mlp_early_stopping_min_dim
        rows.append({
            "task": args.task, "num_simulations": args.num_simulations, "method": "npe", "seed": args.seed,
            "query": f"observation {number}",
            "c2st_mlp": "" if args.skip_mlp else round(c2st(reference[:n], estimate[:n], early_stopping=early), 4),
            "mlp_early_stopping": "" if args.skip_mlp else early,
            "c2st_rf": round(c2st(reference[:n], estimate[:n], classifier="rf"), 4),
            "num_c2st_samples": n, "training_s": round(stats["training_s"], 1), "steps": stats["steps"],
            "epochs": stats["epochs"], "stopped_early": stats["stopped_early"], "sampling_s": round(sampling_s, 2),
            "acceptance": round(acceptance, 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "simulations_invalid": int((~valid).sum()), "flow": flow_name, "machine": machine(),
            "date": time.strftime("%Y-%m-%d"),
        })
    return rows


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    with path.open() as handle:
        return {(r["task"], int(r["num_simulations"]), int(r["seed"])) for r in csv.DictReader(handle)}


def write_markdown(csv_path: Path) -> Path:
    """Mean C2ST per (task, budget) over observations and seeds."""
    import numpy as np

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], int(row["num_simulations"])), []).append(row)

    def mean(group, key):
        values = [float(r[key]) for r in group if r.get(key, "") != ""]
        return float(np.mean(values)) if values else float("nan")

    lines = [
        "| task | simulations | C2ST MLP (sbibm) | MLP early-stopped | C2ST RF | queries | training s | epochs | "
        "steps | sampling s / query | acceptance | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, budget), group in sorted(groups.items()):
        early = {r["mlp_early_stopping"] for r in group if r["c2st_mlp"] != ""}
        early_text = "yes" if early == {"True"} else "no" if early == {"False"} else "mixed" if early else ""
        lines.append(
            f"| {task} | {budget:,} | {mean(group, 'c2st_mlp'):.3f} | {early_text} | {mean(group, 'c2st_rf'):.3f} | "
            f"{len(group)} | {mean(group, 'training_s'):.0f} | {mean(group, 'epochs'):.0f} | {mean(group, 'steps'):.0f} | "
            f"{mean(group, 'sampling_s'):.1f} | {mean(group, 'acceptance'):.3f} | {mean(group, 'peak_rss_mib'):.0f} |"
        )
    flows = sorted({r["flow"] for r in rows})
    machines = sorted({r["machine"] for r in rows}) or [machine()]
    samples = sorted({r["num_c2st_samples"] for r in rows})
    lines += ["", f"NPE: {'; '.join(flows)}. Machine: {'; '.join(machines)}. "
              f"C2ST on {', '.join(samples) or '?'} samples per side; \"MLP early-stopped\" = sklearn validation "
              "early stopping (faster, less sensitive than sbibm's exact MLP)."]
    out = csv_path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="npe", help="results file stem under --results-dir")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--tasks", nargs="+", default=["linear_gaussian", "gaussian_mixture", "two_moons", "slcp"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[1_000, 10_000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--observations", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--num-c2st-samples", type=int, default=10_000)
    parser.add_argument("--skip-mlp", action="store_true", help="random-forest C2ST only (fast)")
    parser.add_argument("--mlp-early-stopping", action="store_true", help="early-stopped MLP C2ST for every task")
    parser.add_argument("--mlp-early-stopping-min-dim", type=int, default=10**9,
                        help="early-stopped MLP C2ST for posteriors of at least this many dimensions")
    parser.add_argument("--flow-layers", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--patience", type=int, default=20, help="epochs without validation improvement")
    parser.add_argument("--max-epochs", type=int, default=5000)
    parser.add_argument("--single", nargs=3, metavar=("TASK", "BUDGET", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        args.task, budget, seed = args.single
        args.num_simulations, args.seed = int(budget), int(seed)
        print(json.dumps(single_run(args)))
        return

    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.results_dir / f"{args.name}.csv"
    done = _done(csv_path)
    runs = [(t, b, s) for t in args.tasks for b in args.budgets for s in args.seeds]
    passthrough = sys.argv[1:]
    for number, (task, budget, seed) in enumerate(runs, 1):
        if (task, budget, seed) in done:
            print(f"[{number}/{len(runs)}] {task} {budget} seed {seed}: done already")
            continue
        print(f"[{number}/{len(runs)}] {task} {budget} seed {seed} ...", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, *passthrough, "--single", task, str(budget), str(seed)],
                                capture_output=True, text=True)
        if result.returncode:
            print(result.stderr[-3000:])
            raise SystemExit(f"run {task} {budget} {seed} failed")
        rows = json.loads(result.stdout.strip().splitlines()[-1])
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        summary = ", ".join(f"{r['query']}: {r['c2st_mlp']}/{r['c2st_rf']}" for r in rows)
        print(f"    {time.perf_counter() - start:.0f} s (training {rows[0]['training_s']} s, "
              f"{rows[0]['epochs']} epochs); C2ST MLP/RF {summary}", flush=True)
    if csv_path.exists():
        print(write_markdown(csv_path).read_text())


if __name__ == "__main__":
    main()
