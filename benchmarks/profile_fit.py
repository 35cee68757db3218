"""Where a fit's time goes (issue 32): shares of wall time, and the validation pause the bar shows.

One fit with the library's defaults except ``max_steps`` (the quickstart's model and
settings unless told otherwise), instrumented from outside: the training step's jitted
calls are timed from when they are handed over to when the loop sees them finished, the
validation's compiled function and its setup are wrapped, checkpoint writes are timed,
and a recording progress bar notes when the bar moves. Nothing is blocked that the loop
does not block itself, so the fit runs as it would without the profile.

With ``--before REF`` the loop module as it was at that commit (default ``bb6184f``, the
last one before the fix) is run first in the same process, on the same simulations and
key: the bar's view of each validation pause is compared, before and after.

    python benchmarks/profile_fit.py                           # quickstart: 5,000 simulations, 2,500 steps
    python benchmarks/profile_fit.py --task two_moons --num-simulations 10000 --max-steps 5000
    python benchmarks/profile_fit.py --before bb6184f          # also the loop before the fix

Writes ``benchmarks/results/profile_fit.md`` (``--out``). Not a test: a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import tqdm.auto

import numpyro_simformer.training.fit as fit_module
import numpyro_simformer.training.loop as loop_module
from numpyro_simformer import Simformer, TrainingConfig
from numpyro_simformer.training.checkpoint import TrainingCheckpointer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import machine  # benchmarks/run.py, beside this script  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def quickstart_model():
    """examples/quickstart.py's model: theta ~ N(0, 1)^3, x ~ N(theta, 0.5^2)."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


def simformer(task: str, num_simulations: int, training: TrainingConfig) -> Simformer:
    if task == "quickstart":
        return Simformer(quickstart_model, num_simulations=num_simulations, training=training, progress_bar=True)
    from numpyro_simformer import tasks

    spec = getattr(tasks, task)()
    return Simformer(spec.model, num_simulations=num_simulations, token_sites=list(spec.token_sites),
                     exclude_sites=list(spec.exclude_sites), training=training, progress_bar=True)


def loop_at(ref: str) -> types.ModuleType:
    """``numpyro_simformer/training/loop.py`` as it was at git ``ref``, as a module."""
    source = subprocess.run(["git", "show", f"{ref}:numpyro_simformer/training/loop.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"loop_at_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"loop.py@{ref}", "exec"), module.__dict__)
    return module


class Timeline:
    """Timestamps of one fit: the bar's moves, the jitted calls, validations, checkpoints."""

    def __init__(self):
        self.bar_updates, self.postfix = [], []  # (time, steps shown)
        self.handed = []  # (before, after) each training call is handed over
        self.validation_build, self.validations, self.checkpoints = [], [], []
        self.train = None  # (start, end) of the training loop function


def instrument(loop, timeline: Timeline, monkeypatches: list) -> None:
    """Wrap ``loop``'s pieces and the bar so that they record into ``timeline``."""
    clock = time.perf_counter

    class Bar:
        def __init__(self, iterable=None, *args, initial=0, **kwargs):
            self.iterable, self.n = iterable, initial

        def __iter__(self):  # the simulation's bar over chunks
            return iter(self.iterable)

        def update(self, steps):
            self.n += steps
            timeline.bar_updates.append((clock(), self.n))

        def set_postfix(self, **kwargs):
            timeline.postfix.append((clock(), self.n))

        def close(self):
            pass

    def patch(owner, name, value):
        monkeypatches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    build_train_fn, validation_fn, train = loop.build_train_fn, loop._validation_fn, loop.train
    save = TrainingCheckpointer.save

    def timed_build_train_fn(*args, **kwargs):
        train_fn = build_train_fn(*args, **kwargs)

        def handed_over(*inner):
            before = clock()
            result = train_fn(*inner)
            timeline.handed.append((before, clock()))
            return result

        return handed_over

    def timed_validation_fn(*args, **kwargs):
        before = clock()
        evaluate = validation_fn(*args, **kwargs)
        timeline.validation_build.append(clock() - before)

        def timed(params):  # the loop has waited for every call: this is the validation alone
            before = clock()
            value = float(evaluate(params))
            timeline.validations.append(clock() - before)
            return value

        return timed

    def timed_save(self, state):
        before = clock()
        path = save(self, state)
        timeline.checkpoints.append(clock() - before)
        return path

    def timed_train(*args, **kwargs):
        start = clock()
        result = train(*args, **kwargs)
        timeline.train = (start, clock())
        return result

    patch(tqdm.auto, "tqdm", Bar)
    patch(loop, "build_train_fn", timed_build_train_fn)
    patch(loop, "_validation_fn", timed_validation_fn)
    patch(TrainingCheckpointer, "save", timed_save)
    patch(fit_module, "train", timed_train)


def run_fit(loop, args) -> tuple[Simformer, Timeline, float, TrainingConfig]:
    timeline, patches = Timeline(), []
    instrument(loop, timeline, patches)
    training = TrainingConfig(max_steps=args.max_steps,
                              checkpoint_dir=None if args.checkpoint_dir is None else
                              f"{args.checkpoint_dir}/{loop.__name__}-{time.time_ns()}")
    sf = simformer(args.task, args.num_simulations, training)
    try:
        start = time.perf_counter()
        sf.fit(jax.random.key(args.seed))
        total = time.perf_counter() - start
    finally:
        for owner, name, value in reversed(patches):
            setattr(owner, name, value)
    return sf, timeline, total, training


def bar_view(timeline: Timeline) -> dict:
    """What the progress bar shows: how long it stands still at each validation (from its
    last move before the validation's result to the result), and its speed in between."""
    pauses, rates = [], []
    previous = timeline.bar_updates[0][0]
    for when, steps in timeline.postfix:
        moves = [(t, n) for t, n in timeline.bar_updates if t <= when]
        last_move, shown = moves[-1]
        pauses.append(when - last_move)
        since = [(t, n) for t, n in moves if t > previous]
        if len(since) > 1:
            rates.append((since[-1][1] - since[0][1]) / max(since[-1][0] - since[0][0], 1e-9))
        previous = when
    return {"first_pause": pauses[0], "pause": statistics.median(pauses[1:]) if len(pauses) > 1 else float("nan"),
            "bar_rate": statistics.median(rates[1:]) if len(rates) > 1 else float("nan"),
            "validations": len(pauses)}


def ema_seconds_per_call(params, decay: float, steps: int, repeats: int = 15) -> float:
    """The EMA update of ``steps`` steps alone, as the train step writes it, in one jitted scan."""

    def ema(average, params):
        def step(average, _):
            return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, average, params), None

        return jax.lax.scan(step, average, None, length=steps)[0]

    ema = jax.jit(ema)
    shifted = jax.tree.map(lambda p: p + 1.0, params)
    jax.block_until_ready(ema(params, shifted))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(ema(params, shifted))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shares(sf: Simformer, timeline: Timeline, total: float, training: TrainingConfig) -> tuple[list, dict]:
    """Seconds per part of a fit whose bar moves when a call has finished (the fixed loop)."""
    finished = [t for t, _ in timeline.bar_updates]
    if len(finished) != len(timeline.handed):
        raise RuntimeError("the bar did not move once per finished call: profile the loop after the fix")
    runs = []
    for k, ((_, handed), done) in enumerate(zip(timeline.handed, finished)):
        begin = handed if k == 0 else max(handed, finished[k - 1])
        runs.append(done - begin)
    median_call = statistics.median(runs[1:])
    train_start, train_end = timeline.train
    loop_total = train_end - train_start
    first_dispatch = timeline.handed[0][0]
    compile_train = timeline.handed[0][1] - timeline.handed[0][0]
    steps = sum(runs)
    steps_per_call = training.steps_per_call
    ema = ema_seconds_per_call(sf.state.params, training.ema_decay, steps_per_call) / median_call * steps
    validation_runs = timeline.validations
    validation_median = statistics.median(validation_runs[1:]) if len(validation_runs) > 1 else 0.0
    validation_compile = (sum(timeline.validation_build) + validation_runs[0] - validation_median
                          if validation_runs else sum(timeline.validation_build))
    validation = sum(validation_runs) - (validation_runs[0] - validation_median if validation_runs else 0.0)
    checkpoints = sum(timeline.checkpoints)
    setup = first_dispatch - train_start - sum(timeline.validation_build)
    rest = loop_total - (setup + sum(timeline.validation_build) + compile_train + steps + sum(validation_runs)
                         + checkpoints)
    rows = [
        ("simulation (its compilation included)", sf.simulation_time),
        ("reading the model, tokenising, building the network", total - sf.simulation_time - loop_total),
        ("training setup (data to the device, the loss and step built)", setup),
        ("compilation of the training step (first call handed over)", compile_train),
        ("training steps, EMA excluded", steps - ema),
        ("EMA of the weights (standalone scan, scaled to the steps)", ema),
        ("validation: compilation (mask draws, first forward pass over a median one)", validation_compile),
        (f"validation: forward passes ({len(validation_runs)} validations)", validation),
        (f"checkpointing ({len(timeline.checkpoints)} writes)", checkpoints),
        ("host round trips and loop overhead (syncs, keys, bar; device idle)", rest),
    ]
    facts = {"total": total, "loop": loop_total, "median_call": median_call, "calls": len(runs),
             "steps_per_s": steps_per_call / median_call, "validation_median": validation_median,
             "steps": int(sf.history.step[-1])}
    return rows, facts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="quickstart", help="'quickstart' or a numpyro_simformer.tasks name")
    parser.add_argument("--num-simulations", type=int, default=5_000)
    parser.add_argument("--max-steps", type=int, default=2_500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before", default=None, metavar="REF",
                        help="also run the training loop as it was at this commit (bb6184f: before the fix)")
    parser.add_argument("--checkpoint-dir", default=None, help="write training checkpoints under this folder")
    parser.add_argument("--out", default=str(RESULTS / "profile_fit.md"))
    args = parser.parse_args()
    load = os.getloadavg()[0]

    views = {}
    if args.before:
        _, before_timeline, before_total, _ = run_fit(loop_at(args.before), args)
        views[f"before ({args.before})"] = (bar_view(before_timeline), before_total)
    sf, timeline, total, training = run_fit(loop_module, args)
    views["after (this checkout)"] = (bar_view(timeline), total)
    rows, facts = shares(sf, timeline, total, training)

    lines = [f"# Where a fit's time goes ({args.task}, {args.num_simulations:,} simulations, "
             f"{facts['steps']:,} steps)", "",
             f"`python benchmarks/profile_fit.py --task {args.task} --num-simulations {args.num_simulations} "
             f"--max-steps {args.max_steps}{' --before ' + args.before if args.before else ''}`; "
             f"{time.strftime('%Y-%m-%d')}; {machine()}; load average {load:.1f} at start "
             "(a shared machine: seconds are upper bounds, shares within one run are comparable).", "",
             "| part of the fit | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.2f} | {100 * seconds / total:.1f} % |" for name, seconds in rows]
    lines += [f"| **total (fit)** | {total:.2f} | 100 % |", "",
              f"Training step: {facts['median_call']:.3f} s per call of {training.steps_per_call} steps "
              f"(median; {facts['steps_per_s']:.0f} steps/s); one validation {facts['validation_median']:.3f} s "
              f"(median after the first) = {facts['validation_median'] * facts['steps_per_s']:.1f} steps' worth.", "",
              "What the progress bar shows at each validation (median over validations after the first):", "",
              "| loop | bar stands still at a validation (s) | first validation (s) | bar speed between (steps/s) "
              "| fit (s) |", "|---|---:|---:|---:|---:|"]
    for name, (view, seconds) in views.items():
        lines.append(f"| {name} | {view['pause']:.2f} | {view['first_pause']:.2f} | {view['bar_rate']:.0f} "
                     f"| {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
