"""Training: a pure multi-step train function, and the loop around it.

``build_train_fn`` returns one jitted function that runs ``steps_per_call`` optimiser
steps as a ``lax.scan`` (several steps per call doubled throughput on 2 cores against one
step per call). The loop around it validates on held-out simulations with fixed noise,
keeps the best exponential moving average (EMA) of the weights, stops early, shows a
progress bar and records the loss history.
"""

from __future__ import annotations

import collections
import time as _time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_simformer.diffusion.loss import batch_loss
from numpyro_simformer.diffusion.masks import ConditionMaskDistribution, sample_condition_mask
from numpyro_simformer.training.parallel import resolve_devices
from numpyro_simformer.training.checkpoint import TrainingCheckpointer, run_fingerprint

__all__ = [
    "TrainingConfig", "TrainState", "TrainingHistory", "LoopState", "build_schedule", "build_optimizer",
    "budget_schedule", "budget_progress", "build_train_fn", "train",
]

# Examples scored per validation: the cap on held-out simulations, and what the default
# ``validation_draws`` fills up to.
_VALIDATION_EXAMPLES = 4096


@dataclass(frozen=True)
class TrainingConfig:
    """How the network is trained.

    Defaults are sized for a 2-core CPU: a few-token problem trains in a few minutes.
    On a GPU raise ``batch_size`` (the reference uses 1000) and ``max_steps``.

    Attributes:
        batch_size: examples per step, drawn with replacement. ``None`` (default) sizes
            the batch by the number of tokens, ``clip(tokens_per_batch // num_tokens, 64,
            256)``, so a step costs about the same for 4 tokens as for 20: at a fixed time
            budget more steps beat bigger batches (measured in the design notes).
        tokens_per_batch: the token budget of one batch when ``batch_size`` is ``None``.
        max_steps: upper bound on optimiser steps, rounded up to whole jitted calls (a multiple of
            ``steps_per_call``).
        learning_rate: Adam's peak learning rate.
        warmup_steps: linear warm-up at the start (in steps, with or without ``max_time``).
        decay_fraction: the last fraction of ``max_steps`` (of the time budget with
            ``max_time``) decays the rate linearly to 10 % (a constant rate elsewhere: safe
            for training that may stop at any time).
        plateau_patience: validations without improvement after which the learning rate
            is multiplied by ``plateau_factor`` (reduce on plateau); ``None`` never lowers it.
            A constant rate stalls well above the loss a lower one reaches: on Two Moons an
            early stop at the constant rate gave a worse posterior than the final decay.
        plateau_factor: the factor of each plateau reduction.
        max_plateau_reductions: reductions before ``patience`` may stop training: early
            stopping waits until the rate has been lowered this many times.
        ema_decay: decay of the weights' moving average used for validation and sampling.
        weight_decay: decoupled weight decay (AdamW) of the weight matrices, scaled by the
            learning rate like the update; biases and LayerNorm scales are not decayed.
            ``0`` (default) is plain Adam.
        gradient_clip_norm: global-norm gradient clipping.
        validation_fraction: share of simulations held out for early stopping.
        validation_interval: steps between validations.
        validation_draws: condition masks and noise draws scored per held-out simulation
            (each draw its own mask, time and noise, fixed for the run). More draws lower
            the variance of the validation loss that lowers the rate and stops training, at
            the cost of that many forward passes over the validation split per validation.
            ``None`` (default): ``max(1, 4096 // held-out simulations)``, so every
            validation scores about 4,096 examples (8 draws of the 500 held out from 10,000
            simulations, one draw from 81,920 simulations on). On Two Moons 8 draws instead
            of one let training run on to a lower loss and improved every seed (C2ST 0.553
            to 0.533, ``docs/benchmarks.md``).
        patience: validations without improvement before stopping, counted once every
            plateau reduction is spent; ``None`` never stops early.
        steps_per_call: optimiser steps per jitted call.
        max_time: optional wall-clock budget in seconds for the training loop (makes the
            run depend on the machine's speed; off by default so that a run is a function
            of its key). With a budget the schedule runs to the budget's end: the rate
            follows the run's progress, the larger of the fraction of ``max_steps`` done
            and the fraction of ``max_time`` spent, so the final decay ends at the final
            rate (10 %) when the time is up, or at ``max_steps`` if that comes first
            (:func:`budget_schedule`). The loop measures its pace (seconds per jitted call)
            and plans its last call to end as near ``max_time`` as it can, within half a
            call; if the time is up before a call was planned last (compilation took the
            budget), one more call decays to the final rate. The final validation (with
            the validation's one-time compilation when none ran before) comes on top.
            Plateau reductions and early stopping apply on top, as without a budget.
        checkpoint_dir: optional folder for periodic training checkpoints. When it holds a
            checkpoint of the same run (same key, simulations and configuration), training
            resumes from it and ends in the state an uninterrupted run would reach; a
            checkpoint of a different run is refused. ``None`` (default): no checkpoints.
        data_parallel: shard each batch over all devices, parameters replicated
            (``None``: automatically when more than one device is visible; ``False``: one
            device). ``batch_size`` must be a multiple of the device count. Results equal
            a single-device run up to floating-point reduction order.
        checkpoint_every: steps between checkpoints (rounded up to a multiple of
            ``steps_per_call``): an interruption loses at most this much work.
        stream_data: keep the training set in host memory and send each jitted call only
            its ``steps_per_call`` batches, so the device holds batches, not simulations
            (``None``: stream when the training set exceeds ``stream_threshold_bytes``).
            The batches are drawn from the same keys either way: streaming changes where
            the data lives, not the result.
        stream_threshold_bytes: training-set size above which ``stream_data=None`` streams.
    """

    batch_size: int | None = None
    tokens_per_batch: int = 1024
    max_steps: int = 60_000
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    decay_fraction: float = 0.2
    ema_decay: float = 0.999
    weight_decay: float = 0.0
    gradient_clip_norm: float = 1.0
    validation_fraction: float = 0.05
    validation_interval: int = 500
    validation_draws: int | None = None
    patience: int | None = 8
    plateau_patience: int | None = 4
    plateau_factor: float = 0.3
    max_plateau_reductions: int = 3
    steps_per_call: int = 50
    max_time: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1_000
    data_parallel: bool | None = None
    stream_data: bool | None = None
    stream_threshold_bytes: int = 1 << 30

    def __post_init__(self):
        for name in ("batch_size", "tokens_per_batch", "max_steps", "steps_per_call", "validation_interval",
                     "validation_draws", "checkpoint_every", "stream_threshold_bytes", "patience", "plateau_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"TrainingConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0 < self.learning_rate:
            raise ValueError(f"TrainingConfig.learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"TrainingConfig.validation_fraction must lie in [0, 1), got {self.validation_fraction}."
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainingConfig.ema_decay must lie in [0, 1), got {self.ema_decay}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainingConfig.weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"TrainingConfig.decay_fraction must lie in [0, 1], got {self.decay_fraction}.")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"TrainingConfig.plateau_factor must lie in (0, 1), got {self.plateau_factor}.")
        if self.max_plateau_reductions < 0:
            raise ValueError(
                f"TrainingConfig.max_plateau_reductions must be >= 0, got {self.max_plateau_reductions}."
            )


    def num_validation(self, num_simulations: int) -> int:
        """Simulations held out for validation: ``validation_fraction`` of them, at most 4,096."""
        return min(int(round(num_simulations * self.validation_fraction)), _VALIDATION_EXAMPLES)

    def resolved_validation_draws(self, num_validation: int) -> int:
        """``validation_draws``, or the draws that score about 4,096 examples per validation."""
        if self.validation_draws is not None:
            return self.validation_draws
        return max(1, _VALIDATION_EXAMPLES // max(num_validation, 1))

    def resolved_batch_size(self, num_tokens: int, num_devices: int = 1) -> int:
        """``batch_size``, or the token-budget default rounded up to a multiple of the devices."""
        if self.batch_size is not None:
            return self.batch_size
        size = int(np.clip(self.tokens_per_batch // max(num_tokens, 1), 64, 256))
        return -(-size // num_devices) * num_devices


class TrainState(NamedTuple):
    """What the train function carries from step to step."""

    params: object
    ema_params: object
    opt_state: object
    step: jnp.ndarray
    lr_scale: jnp.ndarray  # multiplies the schedule's rate; lowered on validation plateaus


class TrainingHistory(NamedTuple):
    """Loss history: one row per validation."""

    step: np.ndarray
    train_loss: np.ndarray
    validation_loss: np.ndarray
    elapsed: np.ndarray
    best_step: int
    stopped_early: bool
    learning_rate: np.ndarray | None = None  # the rate at each validation (None: saved by an older version)


class LoopState(NamedTuple):
    """Everything the fit loop carries between jitted calls: what a training checkpoint holds.

    ``calls_done`` is also the loop's position in its key sequence: call ``c`` uses the
    ``c``-th of ``jax.random.split(key_train, num_calls)``, so a resumed loop draws the
    keys an uninterrupted one would.
    """

    train_state: TrainState
    calls_done: int
    rows: tuple  # (step, train_loss, validation_loss, elapsed, learning_rate) per validation
    recent_losses: np.ndarray  # training losses since the last validation
    best_loss: float
    best_params: object
    best_step: int
    stale: int
    stopped_early: bool
    finished: bool
    elapsed: float
    plateau_reductions: int = 0


def build_schedule(config: TrainingConfig) -> optax.Schedule:
    """Warm-up, a constant rate and a final decay over the last ``decay_fraction`` of the steps.

    The schedule of a run without ``max_time``; a time-budgeted run follows
    :func:`budget_schedule` instead.
    """
    decay_steps = int(config.max_steps * config.decay_fraction)
    constant_steps = max(config.max_steps - decay_steps - config.warmup_steps, 0)
    return optax.join_schedules(
        [
            optax.linear_schedule(config.learning_rate * 0.01, config.learning_rate, max(config.warmup_steps, 1)),
            optax.constant_schedule(config.learning_rate),
            optax.linear_schedule(config.learning_rate, config.learning_rate * 0.1, max(decay_steps, 1)),
        ],
        boundaries=[max(config.warmup_steps, 1), max(config.warmup_steps, 1) + constant_steps],
    )


def budget_schedule(config: TrainingConfig):
    """``rate(step, progress)``: the learning rate of a run with a time budget (``max_time``).

    ``step`` is the optimiser's step count before the update (0 for the first step) and
    ``progress`` the fraction of the run done at the end of that step, in [0, 1] (the
    loop's :func:`budget_progress`). The same shape as :func:`build_schedule` with the
    steps replaced by progress after the warm-up: a linear warm-up from 1 % over
    ``warmup_steps`` steps, ``learning_rate`` until ``1 - decay_fraction``, then a linear
    decay that reaches 10 % at progress 1, the end of the budget. Works on NumPy arrays.
    """
    warmup = max(config.warmup_steps, 1)
    peak, start = config.learning_rate, 1.0 - config.decay_fraction

    def rate(step, progress):
        step, progress = np.asarray(step, np.float64), np.asarray(progress, np.float64)
        ramp = 0.01 + 0.99 * np.minimum(step, warmup) / warmup
        if config.decay_fraction > 0:
            decay = 1.0 - 0.9 * np.clip((progress - start) / config.decay_fraction, 0.0, 1.0)
        else:
            decay = np.ones_like(progress)
        return peak * ramp * decay

    return rate


def budget_progress(config: TrainingConfig, first_step: int, start: float, call_seconds: float | None):
    """``(progress, last)``: the run's progress at the end of each step of one jitted call.

    Args:
        config: a configuration with ``max_time``.
        first_step: the optimiser's step count when the call begins.
        start: the training time (seconds, all sessions) at which the call is expected to
            begin running.
        call_seconds: the expected run time of one call (``None``: not yet measured,
            taken as 0).

    Returns:
        ``progress``, (steps_per_call,): the larger of the fraction of ``max_steps`` and the
        fraction of ``max_time`` done after each step; and ``last``: whether this call
        should be the run's last, because it reaches ``max_steps`` or because it ends
        nearer ``max_time`` than another call would (it ends within half a call of the
        budget). The last call's progress runs linearly up to exactly 1, so training ends
        at the schedule's final rate.
    """
    steps = config.steps_per_call
    done = np.arange(1, steps + 1, dtype=np.float64)
    seconds = 0.0 if call_seconds is None else float(call_seconds)
    by_steps = (first_step + done) / config.max_steps
    by_time = (start + done * seconds / steps) / config.max_time
    progress = np.maximum(by_steps, by_time)
    last = bool(by_steps[-1] >= 1.0 or start + 1.5 * seconds >= config.max_time)
    if last:
        first = min(progress[0], 1.0)
        progress = first + (1.0 - first) * (done - 1) / max(steps - 1, 1)
        progress[-1] = 1.0
    return np.minimum(progress, 1.0), last


class _Pace:
    """The loop's clock under a time budget: how long a jitted call runs, and when the next
    one dispatched now will begin (times in seconds of training, all sessions)."""

    def __init__(self):
        self.dispatched = collections.deque()  # when each call in flight was handed over
        self.done_at = None  # when the last call known finished
        self.seconds = collections.deque(maxlen=5)  # run times of the last calls

    def handed_over(self, now: float) -> None:
        self.dispatched.append(now)

    def finished(self, now: float) -> None:
        """A call finished (the oldest in flight): its run time is from when it was handed
        over (after any compilation) or its predecessor finished, whichever is later."""
        begin = self.dispatched.popleft()
        if self.done_at is not None:
            begin = max(begin, self.done_at)
        self.seconds.append(now - begin)
        self.done_at = now

    def call_seconds(self) -> float | None:
        return float(np.median(self.seconds)) if self.seconds else None

    def next_start(self, now: float) -> float:
        seconds = self.call_seconds()
        if seconds is None or self.done_at is None:
            return now
        return max(now, self.done_at + len(self.dispatched) * seconds)


def build_optimizer(config: TrainingConfig) -> optax.GradientTransformation:
    """Adam (AdamW with ``weight_decay``) on :func:`build_schedule` after global-norm clipping.

    Plateau reductions are not part of it: the train step multiplies Adam's update by
    ``TrainState.lr_scale``, which the loop lowers between jitted calls. With ``max_time``
    the optimiser's rate is the constant ``learning_rate`` and the train step multiplies the
    update by the :func:`budget_schedule` factors the loop passes each call.
    """
    if config.max_time is None:
        schedule = build_schedule(config)
    else:  # a schedule, not a float: the optimiser state has the same structure either way
        schedule = optax.constant_schedule(config.learning_rate)
    if config.weight_decay > 0:
        matrices = lambda params: jax.tree.map(lambda leaf: jnp.ndim(leaf) > 1, params)
        adam = optax.adamw(schedule, weight_decay=config.weight_decay, mask=matrices)
    else:
        adam = optax.adam(schedule)
    return optax.chain(optax.clip_by_global_norm(config.gradient_clip_norm), adam)


def _draw_batch(rng_key, rows, data_mask, mask_distribution, subsample, shard=lambda x: x):
    """Condition masks for ``rows`` and, with ``subsample``, each row's random subset.

    Returns ``(batch, condition_mask, structure)``; ``structure`` is ``None`` or the
    per-example ``(coordinates, attention_mask, present)``. Padding positions of a subset count as
    observed: they carry no loss, and no token attends to them.
    """
    key_mask, key_subsample = jax.random.split(rng_key)
    structure = None
    if subsample is not None:
        rows, present, coordinates, attention = jax.vmap(subsample)(
            jax.random.split(key_subsample, rows.shape[0]), rows)
        structure = (shard(coordinates), shard(attention), shard(present))
    condition_mask = jax.vmap(lambda key: sample_condition_mask(key, data_mask, mask_distribution))(
        jax.random.split(key_mask, rows.shape[0])
    )
    if subsample is not None:
        condition_mask = condition_mask | ~present
    return shard(rows), shard(condition_mask), structure


def _split_step_key(rng_key):
    """(batch, mask, loss) keys of one step: shared by the device and the streamed paths."""
    return jax.random.split(rng_key, 3)


def batch_indices(rng_key, num_rows: int, batch_size: int, steps_per_call: int):
    """The training rows of one call's steps, (steps_per_call, batch_size): the indices
    ``train_fn`` draws itself when the data lives on the device."""
    keys = jax.random.split(rng_key, steps_per_call)
    return jax.vmap(lambda key: jax.random.randint(_split_step_key(key)[0], (batch_size,), 0, num_rows))(keys)


def build_train_fn(loss_fn, optimizer, mask_distribution: ConditionMaskDistribution, data_mask, batch_size: int,
                   ema_decay: float, steps_per_call: int, batch_sharding=None, subsample=None,
                   streamed: bool = False):
    """``train_fn(state, rng_key, data, factors=None) -> (state, losses)``: ``steps_per_call`` steps, jitted.

    ``data`` is ``(table, train_rows)``: all simulations in z-space, (num, num_tokens), and
    the indices of the training rows among them; an argument, not a constant, so the
    compiled function does not embed the training set. With ``streamed``, ``data`` is
    instead the call's own batches, (steps_per_call, batch_size, num_tokens), gathered on
    the host at :func:`batch_indices` (the rows the device path would draw). With
    ``batch_sharding`` (a ``NamedSharding`` over a ``"data"`` axis) each batch is split over
    the devices and ``jit`` all-reduces the gradients. With ``subsample`` (a
    :class:`~numpyro_simformer.model.variable.Subsampler`) each example is a random subset of
    its row along the variable-size dims, and ``data_mask`` is over the subset's tokens.
    ``factors``, (steps_per_call,), multiplies each step's update (the learning rate of a
    time-budgeted run, :func:`budget_schedule`, over the optimiser's constant rate).
    """
    data_mask = jnp.asarray(data_mask, dtype=bool)
    shard = (lambda x: x) if batch_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, batch_sharding))

    def step(carry, inputs):
        state, data = carry
        inputs, factor = inputs
        rng_key, rows = inputs if streamed else (inputs, None)
        key_batch, key_mask, key_loss = _split_step_key(rng_key)
        if rows is None:
            table, train_rows = data
            rows = table[train_rows[jax.random.randint(key_batch, (batch_size,), 0, train_rows.shape[0])]]
        batch, condition_mask, structure = _draw_batch(key_mask, rows, data_mask, mask_distribution,
                                                       subsample, shard)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, key_loss, batch, condition_mask, structure)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        scale = state.lr_scale if factor is None else state.lr_scale * factor
        updates = jax.tree.map(lambda u: u * scale, updates)  # Adam's step is linear in its rate
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        return (TrainState(params, ema_params, opt_state, state.step + 1, state.lr_scale), data), loss

    @jax.jit
    def train_fn(state, rng_key, data, factors=None):
        keys = jax.random.split(rng_key, steps_per_call)
        if streamed:
            (state, _), losses = jax.lax.scan(step, (state, None), ((keys, data), factors))
        else:
            (state, _), losses = jax.lax.scan(step, (state, data), (keys, factors))
        return state, losses

    return train_fn


def _host_stream(data: np.ndarray, train_rows: np.ndarray, batch_size: int, steps_per_call: int, parallel=None):
    """``call_key -> batches`` for streamed training: rows ``data[train_rows[...]]`` gathered
    from host memory.

    The indices come from :func:`batch_indices` (a small jitted function on the host's
    CPU), so the batches are the rows the device path draws from the same keys. With
    ``parallel`` each batch arrives split over the devices (batch axis on ``"data"``).
    """
    cpu = jax.devices("cpu")[0]
    indices = jax.jit(batch_indices, static_argnums=(1, 2, 3))
    sharding = None
    if parallel is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(parallel.mesh, PartitionSpec(None, "data"))

    def call_data(rng_key):
        index = np.asarray(indices(jax.device_put(rng_key, cpu), train_rows.shape[0], batch_size, steps_per_call))
        batches = data[train_rows[index]]
        if sharding is None:
            return jax.device_put(batches)
        # Each process puts only its own devices' slices (every process holds the same batches).
        return jax.make_array_from_callback(batches.shape, sharding, lambda slices: batches[slices])

    return call_data


def _validation_fn(example_losses_fn, mask_distribution, data_mask, rng_key, validation_data, chunk_size: int,
                   subsample=None, draws: int = 1):
    """``evaluate(params) -> loss`` on the held-out rows, with masks and noise fixed once.

    With ``draws > 1`` every row is scored under that many masks and noise draws (the rows
    repeated, then drawn for as one batch).

    The masks and the per-example keys are drawn for all rows at once, exactly as one
    batch of ``validation_data`` would draw them; only the network's forward pass runs
    ``chunk_size`` rows at a time (under one ``lax.map``), so validation needs a training
    batch's activation memory whatever the size of the validation set, and its value is
    that of the one-pass loss up to the order of the final sum.
    """
    key_mask, key_loss = jax.random.split(rng_key)
    if draws > 1:
        validation_data = jnp.tile(validation_data, (draws,) + (1,) * (validation_data.ndim - 1))
    batch, masks, structure = jax.jit(_draw_batch, static_argnums=(3, 4))(
        key_mask, validation_data, jnp.asarray(data_mask), mask_distribution, subsample)
    num = batch.shape[0]
    keys = jax.random.split(key_loss, num)
    chunk_size = max(1, min(chunk_size, num))
    num_chunks = -(-num // chunk_size)
    # Pad to whole chunks by repeating the last row; the padded losses are dropped.
    index = jnp.minimum(jnp.arange(num_chunks * chunk_size), num - 1).reshape(num_chunks, chunk_size)
    chunks = jax.tree.map(lambda leaf: leaf[index], (keys, batch, masks, structure))

    @jax.jit
    def evaluate(params, chunks):  # the chunks are an argument: not constants in the program
        losses = jax.lax.map(lambda inputs: example_losses_fn(params, *inputs), chunks)
        return jnp.mean(losses.reshape(-1)[:num])

    return lambda params: evaluate(params, chunks)


def train(rng_key, example_losses_fn, params, data, data_mask, config: TrainingConfig,
          mask_distribution: ConditionMaskDistribution, *, progress_bar: bool = True,
          checkpoint_tag: str = "", subsample=None):
    """Train ``params`` on ``data`` (num_simulations, num_tokens) in z-space.

    With ``config.checkpoint_dir`` set, the loop's whole state (:class:`LoopState`) is
    written every ``config.checkpoint_every`` steps and when training ends, and a later
    call with the same arguments resumes from the newest checkpoint: the result is the
    one an uninterrupted call returns.

    Args:
        example_losses_fn: ``(params, keys, x0, condition_mask, structure) -> (batch,)``,
            one loss per example (:func:`~numpyro_simformer.diffusion.loss.build_example_losses_fn`);
            training minimises its batch mean.
        checkpoint_tag: a string that identifies everything else the run depends on (the
            model and network, which ``example_losses_fn`` hides); part of the run's fingerprint.
        subsample: optional :class:`~numpyro_simformer.model.variable.Subsampler`: train on random
            subsets of each row along its variable-size dims (``data_mask`` is then over
            the subset's tokens).

    Returns:
        ``(best_ema_params, history)``: the EMA weights at the best validation loss (the
        last ones when there is no validation set) and a :class:`TrainingHistory`.
    """
    key_split, key_validation, key_train = jax.random.split(rng_key, 3)
    data = np.asarray(data)
    num = data.shape[0]
    num_validation = config.num_validation(num)
    order = np.asarray(jax.random.permutation(key_split, num))
    validation_data = jnp.asarray(data[order[:num_validation]])
    # The training rows are indices into ``data``, not a copy of it: the simulations sit in
    # memory once whatever their number.
    train_rows = order[num_validation:].astype(np.int32)
    streamed = config.stream_data
    if streamed is None:
        streamed = data.nbytes > config.stream_threshold_bytes

    parallel = resolve_devices(config.data_parallel)
    num_tokens = data.shape[1] if subsample is None else subsample.template.num_tokens
    batch_size = config.resolved_batch_size(num_tokens, 1 if parallel is None else parallel.num_devices)
    if parallel is not None:
        if batch_size % parallel.num_devices:
            raise ValueError(
                f"TrainingConfig.batch_size ({batch_size}) must be a multiple of the "
                f"{parallel.num_devices} devices for data-parallel training; change it or set "
                "data_parallel=False."
            )
        params = jax.device_put(params, parallel.replicated)
    if not streamed:
        train_data = jax.device_put((data, train_rows), None if parallel is None else parallel.replicated)
    optimizer = build_optimizer(config)
    train_fn = build_train_fn(batch_loss(example_losses_fn), optimizer, mask_distribution, data_mask, batch_size,
                              config.ema_decay, config.steps_per_call,
                              None if parallel is None else parallel.batch, subsample, streamed)
    call_data = (lambda key: train_data) if not streamed else _host_stream(
        data, train_rows, batch_size, config.steps_per_call, None if parallel is None else parallel)
    evaluate = (_validation_fn(example_losses_fn, mask_distribution, data_mask, key_validation, validation_data,
                               batch_size, subsample, config.resolved_validation_draws(num_validation))
                if num_validation > 0 else None)
    state = TrainState(params, params, optimizer.init(params), jnp.zeros((), jnp.int32), jnp.ones((), jnp.float32))
    schedule = build_schedule(config)

    interval = max(config.validation_interval // config.steps_per_call, 1)
    num_calls = -(-config.max_steps // config.steps_per_call)
    loop = LoopState(state, 0, (), np.zeros(0, np.float32), np.inf, params, 0, 0, False, False, 0.0, 0)
    checkpointer = None
    if config.checkpoint_dir is not None:
        checkpointer = TrainingCheckpointer(
            config.checkpoint_dir, run_fingerprint(rng_key, data, data_mask, config, mask_distribution, checkpoint_tag)
        )
        loop = checkpointer.restore(loop)
        if loop.calls_done or loop.finished:  # a fit that looks fresh but is not should say so
            warnings.warn(f"Resuming training from step {int(loop.train_state.step)} (of max_steps={config.max_steps}) "
                          f"from the checkpoint in {str(config.checkpoint_dir)!r}.", stacklevel=4)
    checkpoint_calls = -(-config.checkpoint_every // config.steps_per_call)
    state, rows = loop.train_state, list(loop.rows)
    recent = [loop.recent_losses] if loop.recent_losses.size else []
    best, stale, stopped_early = (loop.best_loss, loop.best_params, loop.best_step), loop.stale, loop.stopped_early
    reductions = loop.plateau_reductions
    calls_done = num_calls if loop.finished else loop.calls_done

    def snapshot(finished: bool) -> LoopState:
        pending = np.concatenate([np.asarray(losses) for losses in recent]) if recent else np.zeros(0, np.float32)
        return LoopState(state, calls_done, tuple(rows), pending, best[0], best[1], best[2], stale, stopped_early,
                         finished, clock(), reductions)

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_calls * config.steps_per_call, initial=calls_done * config.steps_per_call,
                   desc="training", unit="step")
    elapsed_before, start = loop.elapsed, _time.perf_counter()
    call_keys = jax.random.split(key_train, num_calls)
    # Calls are dispatched asynchronously: a loop that never waits runs ahead of the device
    # by up to a validation interval, its bar and clock count dispatched steps, and the wait
    # at the next validation looks like a slow validation. It waits for each call's
    # predecessor instead: one call queued behind the running one keeps the device busy,
    # and the bar, ``max_time`` and the elapsed times follow executed steps.
    in_flight = None
    clock = lambda: elapsed_before + _time.perf_counter() - start
    # With a time budget the rate follows the run's progress: each call gets its steps'
    # rates, planned from the pace measured so far (budget_progress).
    pace = _Pace() if config.max_time is not None else None
    budget_rate = budget_schedule(config) if pace is not None else None
    planned_last, rate_now = False, None

    def wait_for(losses):
        if losses is not None:
            jax.block_until_ready(losses)
            if pace is not None:
                pace.finished(clock())
            if bar is not None:
                bar.update(config.steps_per_call)

    for call in range(calls_done, num_calls):
        rates = ()
        if pace is not None:
            first_step = call * config.steps_per_call
            progress, planned_last = budget_progress(config, first_step, pace.next_start(clock()),
                                                     pace.call_seconds())
            factors = budget_rate(first_step + np.arange(config.steps_per_call), progress) / config.learning_rate
            rates, rate_now = (jnp.asarray(factors, jnp.float32),), float(np.float32(factors[-1]))
        state, losses = train_fn(state, call_keys[call], call_data(call_keys[call]), *rates)
        if pace is not None:
            pace.handed_over(clock())
        calls_done = call + 1
        recent.append(losses)
        wait_for(in_flight)
        in_flight = losses
        last_call = call == num_calls - 1 or planned_last
        # A budgeted run ends with a planned last call: once the time is up, the next call is
        # planned as the last (it cannot begin before the budget's end), so the run still ends
        # at the final rate; without a budget the run stops here.
        out_of_time = pace is None and config.max_time is not None and clock() > config.max_time
        if (call + 1) % interval == 0 or last_call or out_of_time:
            wait_for(in_flight)
            in_flight = None
            train_loss = float(jnp.mean(jnp.concatenate(recent)))
            if not np.isfinite(train_loss):
                raise FloatingPointError(
                    f"The training loss became {train_loss} at step {int(state.step)}. Lower "
                    "`TrainingConfig.learning_rate` or `gradient_clip_norm`, or check the "
                    "simulations for extreme values."
                )
            recent = []
            validation_loss = float(evaluate(state.ema_params)) if evaluate else train_loss
            step = int(state.step)
            rate = (float(schedule(step - 1)) if rate_now is None else config.learning_rate * rate_now) * float(
                state.lr_scale)
            rows.append((step, train_loss, validation_loss, clock(), rate))
            if validation_loss < best[0]:
                best, stale = (validation_loss, state.ema_params, step), 0
            else:
                stale += 1
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{validation_loss:.4f}", lr=f"{rate:.1e}")
            can_reduce = config.plateau_patience is not None and reductions < config.max_plateau_reductions
            if evaluate is not None and can_reduce and stale >= config.plateau_patience:
                state = state._replace(lr_scale=state.lr_scale * jnp.float32(config.plateau_factor))
                reductions, stale = reductions + 1, 0
            elif evaluate is not None and not can_reduce and config.patience is not None and stale >= config.patience:
                stopped_early = True
                break
            if out_of_time or last_call:
                break
        if checkpointer is not None and calls_done % checkpoint_calls == 0 and calls_done < num_calls:
            checkpointer.save(snapshot(finished=False))
    if checkpointer is not None and not loop.finished:
        checkpointer.save(snapshot(finished=True))
    if bar is not None:
        bar.close()
    columns = np.array(rows, dtype=np.float64).reshape(-1, 5).T
    best_params = best[1] if evaluate is not None else state.ema_params
    history = TrainingHistory(columns[0].astype(int), columns[1], columns[2], columns[3],
                              best[2] if evaluate is not None else int(state.step), stopped_early, columns[4])
    return best_params, history
