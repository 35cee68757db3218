"""The training loop's learning-rate control: plateau reductions and when early stopping fires."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_simformer.training.loop as train_module
from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diffusion.masks import ConditionMaskDistribution


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


def test_lr_scale_is_a_lower_learning_rate():
    """The loop lowers the rate by scaling Adam's update; that must be the same as training
    with the lower rate from the start (Adam's step is linear in its rate)."""
    data = jax.random.normal(jax.random.key(0), (64, 4))
    data_mask = np.array([False, False, True, True])

    def loss_fn(params, rng_key, x0, condition_mask, structure=None):
        prediction = jnp.tanh(x0 @ params["w"]) + params["b"]
        return jnp.mean(jnp.where(condition_mask, 0.0, (prediction - x0[:, ::-1]) ** 2))

    params = {"w": jax.random.normal(jax.random.key(1), (4, 4)) * 0.3, "b": jnp.zeros(4)}
    results = []
    for rate, scale in ((1e-2, 0.3), (3e-3, 1.0)):
        config = TrainingConfig(learning_rate=rate, warmup_steps=1, max_steps=100)
        optimizer = train_module.build_optimizer(config)
        train_fn = train_module.build_train_fn(loss_fn, optimizer, ConditionMaskDistribution(), data_mask,
                                               batch_size=16, ema_decay=0.9, steps_per_call=20)
        state = train_module.TrainState(params, params, optimizer.init(params), jnp.zeros((), jnp.int32),
                                        jnp.float32(scale))
        state, _ = train_fn(state, jax.random.key(2), (data, jnp.arange(64, dtype=jnp.int32)))
        results.append(state.params)
    for name in params:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-7)
    assert not np.allclose(results[0]["w"], params["w"])  # it trained


def test_weight_decay_shrinks_matrices_only():
    """With a loss that ignores the parameters, AdamW's only move is the decay: each step
    multiplies a weight matrix by (1 - rate * weight_decay) and leaves vectors alone."""
    data = jnp.zeros((8, 2))
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}

    def loss_fn(params, rng_key, x0, condition_mask, structure=None):
        return 0.0 * (jnp.sum(params["w"]) + jnp.sum(params["b"]))

    rate, decay, steps = 1e-2, 0.5, 10
    config = TrainingConfig(learning_rate=rate, warmup_steps=1, max_steps=1000, decay_fraction=0.0,
                            weight_decay=decay)
    optimizer = train_module.build_optimizer(config)
    train_fn = train_module.build_train_fn(loss_fn, optimizer, ConditionMaskDistribution(),
                                           np.array([False, True]), batch_size=4, ema_decay=0.9,
                                           steps_per_call=steps)
    state = train_module.TrainState(params, params, optimizer.init(params), jnp.zeros((), jnp.int32),
                                    jnp.float32(1.0))
    state, _ = train_fn(state, jax.random.key(0), (data, jnp.arange(8, dtype=jnp.int32)))
    # step 0 runs at the warm-up's start rate (1 % of the peak), the other steps at the peak
    expected = (1 - 0.01 * rate * decay) * (1 - rate * decay) ** (steps - 1)
    np.testing.assert_allclose(state.params["w"], expected * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_array_equal(state.params["b"], np.ones(2))
    with pytest.raises(ValueError, match="weight_decay"):
        TrainingConfig(weight_decay=-1e-3)


@pytest.fixture
def scripted_validation(monkeypatch):
    """Replace the validation loss by a scripted sequence, to drive the loop's decisions."""

    def install(losses):
        sequence = itertools.chain(losses, itertools.repeat(losses[-1]))
        monkeypatch.setattr(train_module, "_validation_fn", lambda *args, **kwargs: lambda params: next(sequence))

    return install


def tiny(**training):
    return Simformer(
        model, num_simulations=200,
        network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=16, num_time_features=8),
        training=TrainingConfig(**(dict(batch_size=16, steps_per_call=5, validation_interval=10, warmup_steps=5,
                                        max_steps=400) | training)),
        progress_bar=False,
    )


def test_plateaus_lower_the_rate_before_early_stopping(scripted_validation):
    # best at validation 1; stale at 2, 3 -> reduce; best at 4; stale 5, 6 -> reduce (the last);
    # stale 7, 8, 9 -> patience 3 stops at validation 9.
    scripted_validation([1.0, 1.0, 1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6])
    sf = tiny(learning_rate=1e-3, plateau_patience=2, plateau_factor=0.25, max_plateau_reductions=2, patience=3)
    sf.fit(jax.random.key(0))
    history = sf.history
    np.testing.assert_array_equal(history.step, np.arange(1, 10) * 10)
    expected = 1e-3 * np.array([1, 1, 1, 0.25, 0.25, 0.25, 0.0625, 0.0625, 0.0625])
    np.testing.assert_allclose(history.learning_rate, expected, rtol=1e-6)
    assert history.stopped_early and history.best_step == 40


def test_without_plateau_reductions_patience_stops_at_the_constant_rate(scripted_validation):
    scripted_validation([1.0, 1.0, 1.0, 1.0])
    sf = tiny(learning_rate=1e-3, plateau_patience=None, patience=3)
    sf.fit(jax.random.key(0))
    np.testing.assert_array_equal(sf.history.step, [10, 20, 30, 40])
    np.testing.assert_allclose(sf.history.learning_rate, 1e-3, rtol=1e-6)
    assert sf.history.stopped_early and sf.history.best_step == 10


@pytest.mark.parametrize("field, value", [("plateau_factor", 1.0), ("plateau_factor", 0.0),
                                          ("plateau_patience", 0), ("max_plateau_reductions", -1)])
def test_bad_plateau_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"TrainingConfig.{field}"):
        TrainingConfig(**{field: value})


def test_history_plot_draws_the_learning_rate():
    import matplotlib

    matplotlib.use("Agg")
    from numpyro_simformer.plot import plot_history

    history = train_module.TrainingHistory(np.array([10, 20, 30]), np.array([1.0, 0.8, 0.7]),
                                           np.array([1.1, 0.9, 0.95]), np.array([1.0, 2.0, 3.0]), 20, False,
                                           np.array([1e-3, 1e-3, 3e-4]))
    ax = plot_history(history)
    (rate_ax,) = [other for other in ax.figure.axes if other is not ax]
    np.testing.assert_allclose(rate_ax.lines[0].get_ydata(), history.learning_rate)
    assert rate_ax.get_ylabel() == "learning rate"


def test_more_validation_draws_lower_the_spread_of_the_validation_loss():
    """Each held-out row scored under 16 masks and noise draws: over validation keys the loss
    spreads about 1/sqrt(16) as much as with one draw when the noise dominates (here the
    rows' own spread is small), and its mean is the same expectation."""
    def example_losses(params, keys, x0, condition_mask, structure=None):
        noise = jax.vmap(lambda key, x: jax.random.normal(key, x.shape))(keys, x0)
        return jnp.mean((params * x0 + noise) ** 2 * (1.0 + condition_mask), axis=1)

    data = 0.1 * jax.random.normal(jax.random.key(1), (50, 4))
    data_mask = np.array([False, False, True, True])
    distribution = ConditionMaskDistribution()
    # Eagerly: under jit each of the 80 validation functions would compile its own program.
    with jax.disable_jit():
        values = {
            draws: np.array([float(train_module._validation_fn(example_losses, distribution, data_mask,
                                                               jax.random.key(seed), data, 64, draws=draws)(1.0))
                             for seed in range(40)])
            for draws in (1, 16)
        }
    ratio = values[16].std() / values[1].std()
    # 1/4 expected; the ratio of two 40-sample stds is within about +-25 % of it.
    assert 0.15 < ratio < 0.4, ratio
    # Means agree within 4 standard errors of their difference.
    error = np.sqrt(values[1].var() / 40 + values[16].var() / 40)
    assert abs(values[1].mean() - values[16].mean()) < 4 * error


def test_validation_draws_must_be_positive():
    with pytest.raises(ValueError, match="validation_draws"):
        TrainingConfig(validation_draws=0)


@pytest.mark.parametrize("held_out, draws", [(500, 8), (50, 81), (4096, 1), (6000, 1), (0, 4096)])
def test_default_validation_draws_score_about_4096_examples(held_out, draws):
    assert TrainingConfig().resolved_validation_draws(held_out) == draws
    assert TrainingConfig(validation_draws=3).resolved_validation_draws(held_out) == 3


@pytest.mark.parametrize("validation_draws, expected", [(None, 409), (2, 2)])
def test_train_scores_the_resolved_validation_draws(monkeypatch, validation_draws, expected):
    """200 simulations hold out 10 (5 %): the default scores each under 4096 // 10 draws."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[-1])
        return lambda params: 1.0

    monkeypatch.setattr(train_module, "_validation_fn", spy)
    tiny(validation_draws=validation_draws, patience=1, plateau_patience=1,
         max_plateau_reductions=0).fit(jax.random.key(0))
    assert seen == [expected]


def test_the_progress_bar_counts_executed_steps(monkeypatch):
    """Issue 32: the bar advanced as calls were dispatched (asynchronously), so the wait at
    each validation for the queued steps looked like a slow validation. The loop waits for
    each call's predecessor: when the bar counts a call, that call's losses are ready."""
    import tqdm.auto

    returned, unready = [], []

    class Bar:
        def __init__(self, *args, initial=0, **kwargs):
            self.n = initial

        def update(self, steps):
            self.n += steps
            losses = returned[self.n // 5 - 1]
            if not losses.is_ready():
                unready.append(self.n)

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    original = train_module.build_train_fn

    def recording_build_train_fn(*args, **kwargs):
        train_fn = original(*args, **kwargs)

        def recorded(*inner):
            state, losses = train_fn(*inner)
            returned.append(losses)
            return state, losses

        return recorded

    monkeypatch.setattr(train_module, "build_train_fn", recording_build_train_fn)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    losses = train_module.train(
        jax.random.key(0), lambda params, keys, x0, mask, structure=None: jnp.mean((x0 * params) ** 2, axis=1),
        jnp.float32(1.0), np.random.default_rng(0).normal(size=(200, 3)), np.array([False, True, True]),
        TrainingConfig(batch_size=8, steps_per_call=5, validation_interval=20, max_steps=60, warmup_steps=1),
        ConditionMaskDistribution(), progress_bar=True)
    assert len(returned) == 12 and unready == []
    assert losses is not None


def test_validation_compiles_once_per_fit(caplog):
    """Validation after the first costs a forward pass, not a compilation: its jitted
    function is traced once however many validations a fit runs."""
    import logging

    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        sf = tiny(patience=None, plateau_patience=None, max_steps=50)
        sf.fit(jax.random.key(0))
    assert len(sf.history.step) == 5
    compiled = [record.getMessage() for record in caplog.records if "Compiling" in record.getMessage()]
    assert sum("evaluate" in message for message in compiled) == 1, compiled
    assert sum("train_fn" in message for message in compiled) == 1, compiled


# The time budget (issue 32): the schedule runs to the budget's end.

def test_budget_schedule_decays_to_the_final_rate_at_the_budget_end():
    config = TrainingConfig(learning_rate=1e-3, warmup_steps=100, decay_fraction=0.2, max_time=60.0)
    rate = train_module.budget_schedule(config)
    progress = np.linspace(0.0, 1.0, 1001)
    after_warmup = rate(np.full(progress.shape, 10_000), progress)
    np.testing.assert_allclose(after_warmup[progress <= 0.8], 1e-3, rtol=1e-12)  # constant
    assert np.all(np.diff(after_warmup) <= 0.0)  # then a monotone decay...
    np.testing.assert_allclose(after_warmup[-1], 1e-4, rtol=1e-12)  # ...that ends at 10 % at progress 1
    np.testing.assert_allclose(rate(10_000, 0.9), 1e-3 * 0.55, rtol=1e-12)  # linear: halfway at 0.9
    # the warm-up counts steps, as without a budget: 1 % at step 0, the peak from warmup_steps on
    np.testing.assert_allclose(rate(np.array([0, 50, 100, 5_000]), 0.0), [1e-5, 1e-3 * 0.505, 1e-3, 1e-3])
    # the step schedule has the same shape: at the same fraction of max_steps the same rate
    steps = TrainingConfig(learning_rate=1e-3, warmup_steps=100, decay_fraction=0.2, max_steps=10_000)
    schedule = train_module.build_schedule(steps)
    for step in (50, 5_000, 8_500, 9_999):
        np.testing.assert_allclose(float(schedule(step)), rate(step, step / 10_000), rtol=2e-3)
    flat = TrainingConfig(learning_rate=1e-3, decay_fraction=0.0, max_time=60.0)
    np.testing.assert_allclose(train_module.budget_schedule(flat)(10_000, 1.0), 1e-3)


def _simulate_budget(config, call_seconds, first_call_seconds=0.0):
    """Plan calls as the loop does on a machine whose calls take ``call_seconds``: the
    progress and rate of every step, and the time the last call ends."""
    rate = train_module.budget_schedule(config)
    steps, rates, progress_all = 0, [], []
    clock = first_call_seconds
    while True:
        progress, last = train_module.budget_progress(config, steps, clock, call_seconds)
        rates.append(rate(steps + np.arange(config.steps_per_call), progress))
        progress_all.append(progress)
        steps += config.steps_per_call
        clock += call_seconds
        if last:
            return np.concatenate(progress_all), np.concatenate(rates), clock, steps


@pytest.mark.parametrize("call_seconds", [0.7, 0.33, 2.9])
def test_a_budget_schedule_ends_at_the_final_rate_when_the_time_is_up(call_seconds):
    config = TrainingConfig(learning_rate=1e-3, warmup_steps=200, max_time=300.0)
    progress, rates, end, steps = _simulate_budget(config, call_seconds, first_call_seconds=8.0)
    assert abs(end - 300.0) <= call_seconds / 2 + 1e-9  # the last call ends within half a call
    assert np.all(np.diff(progress) >= 0) and progress[-1] == 1.0
    np.testing.assert_allclose(rates[-1], 1e-4, rtol=1e-12)  # not cut off at the constant rate
    after = rates[200:]
    assert np.all(np.diff(after) <= 1e-18)  # after the warm-up: constant, then down to the end
    decaying = progress > 0.8
    assert np.all(after[decaying[200:]] < 1e-3) and np.all(rates[(progress <= 0.8) & (np.arange(steps) >= 200)] == 1e-3)
    # the decay takes the last fifth of the time, so about a fifth of the steps
    assert abs(decaying.mean() - (1 - (0.8 * 300 - 8.0) / (300 - 8.0))) < 0.02


def test_a_budget_longer_than_max_steps_ends_at_max_steps():
    config = TrainingConfig(learning_rate=1e-3, warmup_steps=10, max_steps=1_000, steps_per_call=50, max_time=1e6)
    progress, rates, _, steps = _simulate_budget(config, 0.5)
    assert steps == 1_000 and progress[-1] == 1.0
    np.testing.assert_allclose(progress, np.arange(1, 1_001) / 1_000)
    np.testing.assert_allclose(rates[-1], 1e-4)


def test_a_call_planned_after_the_budget_is_the_last_and_runs_at_the_final_rate():
    config = TrainingConfig(learning_rate=1e-3, max_time=5.0, steps_per_call=10)
    progress, last = train_module.budget_progress(config, 500, 7.5, None)  # e.g. compilation ate the budget
    assert last and np.all(progress == 1.0)
    progress, last = train_module.budget_progress(config, 500, 1.0, None)  # pace not yet known
    assert not last and np.all(progress == 0.2)


def test_a_short_time_budget_ends_training_at_the_final_rate():
    sf = tiny(learning_rate=1e-3, max_time=3.0, max_steps=1_000_000, patience=None, plateau_patience=None)
    sf.fit(jax.random.key(0))
    history = sf.history
    np.testing.assert_allclose(history.learning_rate[-1], 1e-4, rtol=1e-6)
    assert history.step[-1] < 1_000_000 and not history.stopped_early
    assert np.all(np.diff(history.learning_rate) <= 0)  # warm-up done by the first validation (step 10)
