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
        training=TrainingConfig(batch_size=16, steps_per_call=5, validation_interval=10, warmup_steps=5,
                                max_steps=400, **training),
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
