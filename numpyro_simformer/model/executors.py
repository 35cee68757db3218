"""Simulation in chunks over a ``concurrent.futures.Executor``, kept on disk, resumable.

For simulators that cost seconds per call (an ODE or PDE solver, an agent-based model,
compiled code behind :meth:`Simulator.from_numpy <numpyro_simformer.Simulator.from_numpy>`),
:func:`simulate_chunks` fans the chunks of a simulation out over workers and keeps every
finished chunk on disk.

The design, and why:

- **A worker runs the whole model for its chunk.** Each chunk is the same jitted ``vmap``
  over the same keys that the in-process loop of
  :func:`~numpyro_simformer.model.simulate.simulate` runs (:func:`build_chunk_fn`): the
  model, its arguments and the site names travel to the worker once, pickled with
  ``cloudpickle`` (so models defined in a script or a notebook work), and the worker
  compiles the chunk function once and keeps it for the next chunks of the same job. The
  NumPy callbacks then run in the worker that runs the chunk. Splitting instead (JAX in
  this process, only the NumPy function in workers) would leave the host callback blocking
  a jitted call per chunk, serialise chunks on a GPU stream and need global state to find
  the executor; it would also not fan out an expensive JAX simulator.
- **Draws do not depend on the executor.** Chunk ``i`` holds the simulations
  ``i * chunk_size ...`` of ``jax.random.split(rng_key, num_simulations)``, exactly as in
  the in-process loop, and each chunk's draws are a function of its keys alone: the same
  key and chunk size give bit-identical simulations in this process, on any number of
  local workers, or on a Dask cluster (on the same kind of CPU). The JAX settings that
  change draws (``jax_enable_x64``, ``jax_threefry_partitionable``,
  ``jax_default_prng_impl``) travel with the job.
- **Chunks are kept.** With ``directory``, each finished chunk is written as
  ``chunk-00007.npz`` (:mod:`~numpyro_simformer.model.simulation_store`) as it arrives, by
  this process, atomically; a run with the same key, sizes and directory reuses every
  complete chunk and simulates only the others.
- **Faults.** A simulator that raises fails its chunk (no rerun: it would raise again),
  the other chunks go on and are kept, and :class:`SimulationError` names the failed
  chunks and their errors at the end. A worker that dies (the chunk's future raises,
  e.g. ``BrokenProcessPool`` or Dask's ``KilledWorker``) has its chunk rerun, alone, up to
  ``max_attempts`` times in all; a pool the library started is restarted. NaN or inf rows
  are counted per chunk and dropped, as in-process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import multiprocessing
import os
import socket
import threading
import time
import warnings
from typing import Callable, NamedTuple, Sequence

import cloudpickle
import jax
import numpy as np

from numpyro_simformer.model.simulate import (
    NOT_VECTORIZABLE_WARNING,
    SimulationInfo,
    build_chunk_fn,
    draw_shapes,
    filter_finite,
)
from numpyro_simformer.model.simulation_store import SimulationStore

__all__ = [
    "simulate_chunks",
    "ChunkReport",
    "SimulationReport",
    "SimulationError",
    "run_chunk",
    "local_process_pool",
    "check_executor",
    "MAX_ATTEMPTS",
    "MAX_IN_FLIGHT",
]

# Submissions of one chunk in one run (the first and two reruns after worker deaths).
MAX_ATTEMPTS = 3
# JAX settings that change the draws: a worker takes the caller's.
_JAX_SETTINGS = ("jax_enable_x64", "jax_threefry_partitionable", "jax_default_prng_impl")
# Chunks submitted at once to an executor of the caller's (a Dask scheduler holds each
# submitted chunk's arguments); the library's own pool gets one per worker.
MAX_IN_FLIGHT = 1_024
_WORKER_CACHE_SIZE = 4  # compiled chunk functions kept per worker process (one per job)
_ERROR_CHARS = 4_000


class ChunkReport(NamedTuple):
    """What happened to one chunk in one run.

    Attributes:
        index: the chunk's index; it holds simulations ``index * chunk_size`` onwards.
        num_simulations: rows in the chunk.
        status: ``"reused"`` (read from the directory), ``"simulated"`` or ``"failed"``.
        num_invalid: rows with a NaN or inf (dropped from the returned draws).
        attempts: submissions in this run (0 when reused).
        worker_deaths: attempts whose worker died (each one rerun, up to ``max_attempts``).
        seconds: the worker's time for the chunk's last attempt.
        error: why it failed (the simulator's error, or the last worker death).
    """

    index: int
    num_simulations: int
    status: str
    num_invalid: int = 0
    attempts: int = 0
    worker_deaths: int = 0
    seconds: float = 0.0
    error: str | None = None


class SimulationReport(NamedTuple):
    """What a :func:`simulate_chunks` run did, chunk by chunk; also written to ``report.json``."""

    num_simulations: int
    chunk_size: int
    directory: str | None
    executor: str
    chunks: tuple[ChunkReport, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def chunks_reused(self) -> int:
        """Chunks read from the directory instead of simulated."""
        return sum(chunk.status == "reused" for chunk in self.chunks)

    @property
    def chunks_simulated(self) -> int:
        return sum(chunk.status == "simulated" for chunk in self.chunks)

    @property
    def chunks_failed(self) -> int:
        return sum(chunk.status == "failed" for chunk in self.chunks)

    @property
    def chunks_rerun(self) -> int:
        """Chunks submitted again after a worker died."""
        return sum(chunk.worker_deaths > 0 for chunk in self.chunks)

    @property
    def num_invalid(self) -> int:
        return sum(chunk.num_invalid for chunk in self.chunks)

    def summary(self) -> str:
        """One paragraph: chunks reused, simulated, rerun and failed, invalid rows, errors."""
        text = (f"{self.num_simulations} simulations in {self.num_chunks} chunks of {self.chunk_size} "
                f"({self.executor}): {self.chunks_reused} reused, {self.chunks_simulated} simulated, "
                f"{self.chunks_rerun} rerun after a worker died, {self.chunks_failed} failed; "
                f"{self.num_invalid} rows with NaN or inf.")
        for chunk in self.chunks:
            if chunk.status == "failed":
                text += f"\n  chunk {chunk.index} failed after {chunk.attempts} attempt(s): {_last_line(chunk.error)}"
        return text

    def to_json(self) -> dict:
        return {**self._asdict(), "chunks": [chunk._asdict() for chunk in self.chunks]}


class SimulationError(RuntimeError):
    """Chunks of a simulation failed; the others are kept on disk. ``.report`` says which and why."""

    def __init__(self, message: str, report: SimulationReport):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------------------- in the worker
_worker_cache: collections.OrderedDict = collections.OrderedDict()
_worker_lock = threading.Lock()


def _chunk_fn_of(payload: bytes, digest: str) -> dict:
    """The job's compiled chunk function in this worker process, built on its first chunk."""
    with _worker_lock:
        entry = _worker_cache.get(digest)
        if entry is None:
            job = cloudpickle.loads(payload)
            for name, value in job["jax_settings"].items():
                if getattr(jax.config, name) != value:
                    jax.config.update(name, value)
            entry = {"simulate_chunk": build_chunk_fn(job["model"], job["model_args"], job["model_kwargs"],
                                                      job["site_names"]),
                     "vectorized": True}
            _worker_cache[digest] = entry
            while len(_worker_cache) > _WORKER_CACHE_SIZE:
                _worker_cache.popitem(last=False)
        _worker_cache.move_to_end(digest)
        return entry


def run_chunk(payload: bytes, digest: str, key_data: np.ndarray, key_impl: str | None) -> dict:
    """Simulate one chunk in a worker: what an executor runs.

    Parameters:
        payload: ``cloudpickle`` bytes of ``{"model", "model_args", "model_kwargs",
            "site_names", "jax_settings"}``.
        digest: the payload's SHA-256, the worker's cache key for the compiled function.
        key_data: the chunk's keys: uint32 ``(n, 2)`` key data (or raw keys when
            ``key_impl`` is None).
        key_impl: the keys' PRNG implementation (``"threefry2x32"``), None for raw keys.

    Returns:
        ``{"draws", "vectorized", "seconds", "worker"}``, or ``{"error", "seconds",
        "worker"}`` when the model or simulator raised: an error of the simulation is an
        answer, not a dead worker, and is not rerun.
    """
    start = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    try:
        entry = _chunk_fn_of(payload, digest)
        keys = key_data if key_impl is None else jax.random.wrap_key_data(key_data, impl=key_impl)
        draws, vectorized = entry["simulate_chunk"](keys, entry["vectorized"])
        entry["vectorized"] = vectorized
    except Exception as error:  # noqa: BLE001 - the user's model can raise anything
        return {"error": _describe(error), "seconds": time.perf_counter() - start, "worker": worker}
    return {"draws": draws, "vectorized": vectorized, "seconds": time.perf_counter() - start, "worker": worker}


def _init_local_worker() -> None:
    # Simulation workers compute on the host: N processes must not each claim an accelerator.
    jax.config.update("jax_platforms", "cpu")


def local_process_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``num_workers`` fresh processes whose JAX runs on the CPU.

    The processes are spawned, not forked (a forked JAX process can deadlock). What
    ``simulate_chunks(..., executor=num_workers)`` starts, and restarts when a worker dies.
    """
    return concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_init_local_worker)


def check_executor(executor, argument: str = "executor"):
    """``None``, a positive int (workers of a local process pool), or a ``concurrent.futures.Executor``."""
    if executor is None or isinstance(executor, concurrent.futures.Executor):
        return executor
    if isinstance(executor, (int, np.integer)) and not isinstance(executor, bool) and executor >= 1:
        return int(executor)
    raise TypeError(
        f"`{argument}` must be None (simulate in this process), a number of local worker processes, or a "
        f"concurrent.futures.Executor; received {executor!r}. For Dask pass `client.get_executor()`; for "
        "another engine, an Executor whose submit runs a function in a worker."
    )


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS // 2] + " ... " + text[-_ERROR_CHARS // 2:]


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------- the driver
def simulate_chunks(
    rng_key,
    model: Callable,
    num_simulations: int,
    site_names: Sequence[str],
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    chunk_size: int = 10_000,
    executor=None,
    directory=None,
    max_attempts: int = MAX_ATTEMPTS,
    progress_bar: bool = False,
    data_parallel=None,
) -> tuple[dict[str, np.ndarray], SimulationInfo, SimulationReport]:
    """Draw ``num_simulations`` joint samples of ``site_names``, chunk by chunk, over workers, kept on disk.

    The draws equal :func:`~numpyro_simformer.model.simulate.simulate`'s for the same key
    and ``chunk_size``, whatever the executor and however many workers it has.

    Args:
        rng_key: a JAX PRNG key; chunk ``i`` is simulated from the keys ``i * chunk_size``
            onwards of ``jax.random.split(rng_key, num_simulations)``.
        model, num_simulations, site_names, model_args, model_kwargs: as for ``simulate``.
        chunk_size: simulations per chunk: the unit of work, of fault and of storage.
            Several chunks per worker keep the workers busy; a vectorized NumPy simulator's
            draws depend on it.
        executor: ``None`` (this process), a number of local worker processes
            (:func:`local_process_pool`, restarted when a worker dies), or any
            ``concurrent.futures.Executor``, e.g. a Dask ``client.get_executor()``. Its
            workers need ``numpyro_simformer`` and whatever the model imports.
        directory: a folder to keep the chunks in (created if missing); finished chunks
            of an earlier run with the same key, ``num_simulations``, ``chunk_size`` and
            sites are reused. One run per directory at a time.
        max_attempts: submissions of a chunk whose worker keeps dying before it fails.
        progress_bar: a tqdm bar over chunks, with the time left.
        data_parallel: shards each chunk over devices (in-process runs only).

    Returns:
        ``(draws, info, report)``: finite draws only, their
        :class:`~numpyro_simformer.model.simulate.SimulationInfo`, and a
        :class:`SimulationReport` (also in ``directory/report.json``).

    Raises:
        SimulationError: chunks failed (the simulator raised, or their workers died
            ``max_attempts`` times); the finished chunks are kept in ``directory``.
        ~numpyro_simformer.model.simulation_store.SimulationDirectoryError: ``directory``
            holds another simulation set.
    """
    model_kwargs = dict(model_kwargs or {})
    site_names = tuple(site_names)
    executor = check_executor(executor)
    for value, name in ((num_simulations, "num_simulations"), (chunk_size, "chunk_size"), (max_attempts, "max_attempts")):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int; received {value!r}.")
    num_simulations, chunk_size = int(num_simulations), int(chunk_size)
    keys = jax.random.split(rng_key, num_simulations)
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    key_impl = str(jax.random.key_impl(keys)) if typed else None
    key_data = np.asarray(jax.random.key_data(keys) if typed else keys)
    shapes = draw_shapes(keys[0], model, site_names, model_args, model_kwargs)
    num_chunks = -(-num_simulations // chunk_size)
    bounds = [(index * chunk_size, min((index + 1) * chunk_size, num_simulations)) for index in range(num_chunks)]

    store = None
    if directory is not None:
        root = np.asarray(jax.random.key_data(rng_key) if typed else rng_key)
        key_record = {"impl": str(jax.random.key_impl(rng_key)) if typed else None, "data": root.ravel().tolist()}
        store = SimulationStore.open(directory, SimulationStore.manifest_for(key_record, num_simulations,
                                                                             chunk_size, shapes))
    draws = {name: np.empty((num_simulations, *shape), np.float32) for name, shape in shapes.items()}
    reports: list[ChunkReport | None] = [None] * num_chunks
    pending, damaged = [], []
    for index, (start, stop) in enumerate(bounds):
        chunk, why = (None, "absent") if store is None else store.read_chunk(index)
        if chunk is None:
            pending.append(index)
            if why != "absent":
                damaged.append(why)
            continue
        for name in site_names:
            draws[name][start:stop] = chunk[name]
        reports[index] = ChunkReport(index, stop - start, "reused", num_invalid=_num_invalid(chunk))
    if damaged:
        warnings.warn(f"{len(damaged)} chunk file(s) in {directory} are damaged and are simulated again: "
                      f"{'; '.join(damaged[:3])}.", stacklevel=2)

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_chunks, initial=num_chunks - len(pending), desc="simulating", unit="chunk")
    vectorized = [True]

    def finish(index: int, outcome: dict, attempts: int, deaths: int) -> None:
        start, stop = bounds[index]
        if "error" in outcome:
            reports[index] = ChunkReport(index, stop - start, "failed", attempts=attempts, worker_deaths=deaths,
                                         seconds=outcome["seconds"], error=outcome["error"])
        else:
            chunk = outcome["draws"]
            if store is not None:
                store.write_chunk(index, chunk)
            for name in site_names:
                draws[name][start:stop] = chunk[name]
            vectorized[0] = vectorized[0] and outcome["vectorized"]
            reports[index] = ChunkReport(index, stop - start, "simulated", _num_invalid(chunk), attempts, deaths,
                                         outcome["seconds"])
        if bar is not None:
            done = [report for report in reports if report is not None]
            bar.set_postfix({name: value for name, value in (
                ("reused", sum(r.status == "reused" for r in done)), ("rerun", sum(r.worker_deaths > 0 for r in done)),
                ("invalid", sum(r.num_invalid for r in done)), ("failed", sum(r.status == "failed" for r in done)),
            ) if value}, refresh=False)
            bar.update(1)

    try:
        if pending and executor is None:
            _run_in_process(model, model_args, model_kwargs, site_names, keys, bounds, pending, data_parallel, finish)
        elif pending:
            job = {"model": model, "model_args": model_args, "model_kwargs": model_kwargs, "site_names": site_names,
                   "jax_settings": {name: getattr(jax.config, name) for name in _JAX_SETTINGS}}
            try:
                payload = cloudpickle.dumps(job)
            except Exception as error:  # noqa: BLE001 - whatever the model holds
                raise TypeError(
                    f"The model and its arguments cannot be pickled for the workers ({type(error).__name__}: "
                    f"{error}). Pass the model's data as arrays, or simulate in this process (executor=None)."
                ) from error
            digest = hashlib.sha256(payload).hexdigest()

            def submit(pool, index):
                start, stop = bounds[index]
                return pool.submit(run_chunk, payload, digest, key_data[start:stop], key_impl)

            _run_on_executor(executor, submit, pending, max_attempts, finish)
    finally:
        if bar is not None:
            bar.close()
        report = SimulationReport(num_simulations, chunk_size, None if directory is None else str(directory),
                                  _describe_executor(executor),
                                  tuple(r if r is not None else ChunkReport(i, stop - start, "failed",
                                                                            error="not run: interrupted")
                                        for i, (r, (start, stop)) in enumerate(zip(reports, bounds))))
        if store is not None:
            try:
                store.write_report(report.to_json())
            except OSError as error:  # a full disk: say so, without hiding the error that may be under way
                warnings.warn(f"The simulation report could not be written to {directory}: {error}.", stacklevel=2)

    if not vectorized[0]:
        warnings.warn(NOT_VECTORIZABLE_WARNING, stacklevel=2)
    if report.chunks_rerun:
        warnings.warn(f"{report.chunks_rerun} chunk(s) were rerun after their worker died: "
                      f"{[c.index for c in report.chunks if c.worker_deaths]}.", stacklevel=2)
    if report.chunks_failed:
        if store is None:
            again = ("Fix it and run again; pass a directory (Simformer(simulation_dir=...)) to keep the finished "
                     "chunks of a run.")
        else:
            again = (f"The {report.num_chunks - report.chunks_failed} finished chunks are kept in {directory}: fix it "
                     "and run again with the same key and directory, and only the missing chunks are simulated.")
        raise SimulationError(
            f"{report.chunks_failed} of {report.num_chunks} simulation chunks failed. A simulator that cannot "
            f"simulate some inputs can return NaN for them instead: such rows are dropped and counted. {again}\n"
            + report.summary(), report)
    draws, finite = filter_finite(draws)
    info = SimulationInfo(num_simulations, int(finite.sum()), int((~finite).sum()), vectorized[0])
    return draws, info, report


def _num_invalid(chunk: dict) -> int:
    rows = None
    for value in chunk.values():
        value = np.asarray(value)
        bad = ~np.all(np.isfinite(value.reshape(len(value), -1)), axis=1)
        rows = bad if rows is None else rows | bad
    return int(rows.sum()) if rows is not None else 0


def _describe_executor(executor) -> str:
    if executor is None:
        return "in this process"
    if isinstance(executor, int):
        return f"local process pool, {executor} worker{'s' if executor > 1 else ''}"
    return type(executor).__name__


def _run_in_process(model, model_args, model_kwargs, site_names, keys, bounds, pending, data_parallel, finish):
    simulate_chunk = build_chunk_fn(model, model_args, model_kwargs, site_names, data_parallel)
    vectorized = True
    for index in pending:
        start, stop = bounds[index]
        began = time.perf_counter()
        try:
            chunk, vectorized = simulate_chunk(keys[start:stop], vectorized)
            outcome = {"draws": chunk, "vectorized": vectorized, "seconds": time.perf_counter() - began}
        except Exception as error:  # noqa: BLE001 - the user's model can raise anything
            outcome = {"error": _describe(error), "seconds": time.perf_counter() - began}
        finish(index, outcome, 1, 0)


def _run_on_executor(executor, submit, pending, max_attempts, finish):
    """Keep the executor busy with ``pending`` chunks; rerun those whose worker died, each alone.

    A chunk whose future raises (its worker died, or it was cancelled) is a suspect: it is
    rerun alone, with nothing else in flight, so that a chunk that kills its worker cannot
    charge its deaths to innocent chunks that shared a broken pool with it. A pool this
    function started is restarted when it breaks; a broken executor of the caller's fails
    the chunks left (they stay missing on disk, for a later run).
    """
    owned = isinstance(executor, int)
    pool = local_process_pool(executor) if owned else executor
    window = executor if owned else MAX_IN_FLIGHT  # our pool holds only what it runs: a death fails only those
    generation = 0
    queue, suspects = collections.deque(pending), collections.deque()
    attempts = collections.Counter()
    deaths = collections.Counter()
    in_flight: dict = {}
    broken = None

    def restart():
        nonlocal pool, generation, needs_restart
        pool.shutdown(wait=False, cancel_futures=True)
        pool, generation, needs_restart = local_process_pool(executor), generation + 1, False

    needs_restart = False  # a pool of ours broke: restarted before its next submission, not before

    finished = False
    try:
        while queue or suspects or in_flight:
            while broken is None:
                if suspects and not in_flight:
                    index, alone = suspects.popleft(), True
                elif not suspects and queue and len(in_flight) < window:
                    index, alone = queue.popleft(), False
                else:
                    break
                if needs_restart:
                    restart()
                try:
                    future = submit(pool, index)
                except concurrent.futures.BrokenExecutor as error:
                    (suspects if alone else queue).appendleft(index)
                    if owned:
                        restart()
                        continue
                    broken = _describe(error)
                    break
                attempts[index] += 1
                in_flight[future] = (index, generation)
                if alone:
                    break
            if broken is not None:  # the caller's executor cannot run anything more
                for index in list(queue) + list(suspects):
                    finish(index, {"error": f"not run: the executor broke ({broken}); a pool of "
                                            "the library's (executor=<number of workers>) is restarted instead",
                                   "seconds": 0.0}, attempts[index], deaths[index])
                queue.clear()
                suspects.clear()
            if not in_flight:
                continue
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                index, submitted_in = in_flight.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - a dead worker, as each engine says it
                    deaths[index] += 1
                    if owned and isinstance(error, concurrent.futures.BrokenExecutor) and submitted_in == generation:
                        needs_restart = True
                    if attempts[index] >= max_attempts or broken is not None:
                        finish(index, {"error": f"the worker died {deaths[index]} time(s); last: {_describe(error)}",
                                       "seconds": 0.0}, attempts[index], deaths[index])
                    else:
                        suspects.append(index)
                    continue
                finish(index, outcome, attempts[index], deaths[index])
        finished = True
    finally:
        for future in in_flight:
            future.cancel()
        if owned:  # interrupted: do not wait for the chunks still running
            pool.shutdown(wait=finished, cancel_futures=True)
