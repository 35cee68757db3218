"""Data-parallel training and sharded simulation on 2 forced CPU devices (in a subprocess).

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before JAX starts, so
each check runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, numpyro, numpyro.distributions as dist
    from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
    from numpyro_simformer.model.simulate import simulate
    from numpyro_simformer.training.parallel import data_parallel

    assert jax.device_count() == 2, jax.devices()

    def model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))

    # Sharded simulation gives the same draws as unsharded for the same key.
    plain, _ = simulate(jax.random.key(3), model, 1_000, ["theta", "x"], chunk_size=300)
    sharded, _ = simulate(jax.random.key(3), model, 1_000, ["theta", "x"], chunk_size=300,
                          data_parallel=data_parallel())
    for name in plain:
        np.testing.assert_array_equal(plain[name], sharded[name])

    # Sharded training follows the single-device loss curve.
    def fit(option, stream=False):
        sf = Simformer(model, num_simulations=500, progress_bar=False,
                       network=NetworkConfig(width=16, num_layers=1, num_heads=1, mlp_width=16),
                       training=TrainingConfig(max_steps=100, batch_size=64, steps_per_call=25,
                                               validation_interval=50, data_parallel=option,
                                               stream_data=stream))
        return sf.fit(jax.random.key(0))

    single, double = fit(False), fit(True)
    np.testing.assert_allclose(single.history.train_loss, double.history.train_loss, rtol=2e-3)
    np.testing.assert_allclose(single.history.validation_loss, double.history.validation_loss, rtol=2e-3)
    # Batches streamed from the host, each split over the two devices: the same curve again.
    streamed = fit(True, stream=True)
    np.testing.assert_allclose(single.history.train_loss, streamed.history.train_loss, rtol=2e-3)
    print("PARALLEL OK", single.history.train_loss[-1], double.history.train_loss[-1])
    """
)


@pytest.mark.slow
def test_two_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "PARALLEL OK" in result.stdout


def test_streamed_training_equals_device_resident():
    """Host-streamed batches are the rows the device path draws: the same run, bit for bit
    up to the order of float operations."""
    import jax
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig

    def model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))

    def fit(stream):
        sf = Simformer(model, num_simulations=400, progress_bar=False,
                       network=NetworkConfig(width=16, num_layers=1, num_heads=1, mlp_width=16),
                       training=TrainingConfig(max_steps=60, batch_size=32, steps_per_call=20,
                                               validation_interval=20, stream_data=stream))
        return sf.fit(jax.random.key(0))

    resident, streamed = fit(False), fit(True)
    np.testing.assert_allclose(resident.history.train_loss, streamed.history.train_loss, rtol=1e-5)
    np.testing.assert_allclose(resident.history.validation_loss, streamed.history.validation_loss, rtol=1e-5)
    leaves = zip(jax.tree.leaves(resident.params), jax.tree.leaves(streamed.params))
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in leaves)


def test_validation_in_chunks_equals_the_one_pass_loss():
    """Validation runs the network a batch at a time (bounded memory) but must score the same
    masks and noise as one pass over all rows: chunking may not change which weights win.
    Checked against the one-pass batch loss, for chunks that divide the rows and chunks that
    leave a shorter last one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from numpyro_simformer.diffusion.loss import batch_loss
    from numpyro_simformer.diffusion.masks import ConditionMaskDistribution
    from numpyro_simformer.training.loop import _draw_batch, _validation_fn

    def example_losses(params, keys, x0, condition_mask, structure=None):  # depends on every input
        noise = jax.vmap(lambda key, x: jax.random.normal(key, x.shape))(keys, x0)
        return jnp.mean((params * x0 + noise) ** 2 * (1.0 + condition_mask), axis=1)

    data = jax.random.normal(jax.random.key(1), (23, 4))
    data_mask = np.array([False, False, True, True])
    distribution = ConditionMaskDistribution()
    key = jax.random.key(2)
    key_mask, key_loss = jax.random.split(key)
    batch, masks, _ = _draw_batch(key_mask, data, jnp.asarray(data_mask), distribution, None)
    one_pass = float(batch_loss(example_losses)(1.5, key_loss, batch, masks))
    values = {chunk_size: float(_validation_fn(example_losses, distribution, data_mask, key, data, chunk_size)(1.5))
              for chunk_size in (1, 5, 23, 100)}
    for chunk_size, value in values.items():
        np.testing.assert_allclose(value, one_pass, rtol=1e-6, err_msg=f"chunk_size={chunk_size}")
