"""A masked-out token cannot change another token's output (one layer), and mask reaches sampling."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpyro_simformer.model.graph import attention_mask
from numpyro_simformer.nn import NetworkConfig, SimformerNetwork, build_denoiser_fn


def one_layer_denoiser(mask, rng_key):
    num_tokens = mask.shape[0]
    network = SimformerNetwork(num_tokens, NetworkConfig(width=16, num_layers=1, num_heads=2, mlp_width=16),
                               rngs=nnx.Rngs(params=rng_key))
    graphdef, params, constants = nnx.split(network, nnx.Param, ...)
    fn = build_denoiser_fn(graphdef, constants, np.arange(num_tokens), np.zeros(num_tokens), mask)
    return fn, params


def test_masked_out_token_cannot_change_output(rng_key):
    key_mask, key_net, key_values = jax.random.split(rng_key, 3)
    num_tokens = 8
    mask = np.asarray(jax.random.bernoulli(key_mask, 0.4, (num_tokens, num_tokens))) | np.eye(num_tokens, dtype=bool)
    fn, params = one_layer_denoiser(mask, key_net)
    values = jax.random.normal(key_values, (1, num_tokens))
    time = jnp.array([0.3])
    condition = jnp.zeros((1, num_tokens), bool)
    base = np.asarray(fn(params, values, time, condition))[0]
    for j in range(num_tokens):
        # Change token j's value and its condition state.
        moved = np.asarray(fn(params, values.at[0, j].add(3.0), time, condition.at[0, j].set(True)))[0]
        changed = np.abs(moved - base) > 1e-6
        blocked = ~mask[:, j]
        assert not changed[blocked].any(), f"token {j} leaked into tokens {np.where(changed & blocked)[0]}"
        assert changed[j], f"token {j} did not affect itself"


def test_graph_mask_blocks_across_independent_blocks(rng_key):
    """x_i <- theta_i only (Linear Gaussian): with the moral mask, pair (theta_i, x_i) is isolated."""
    parents = np.zeros((6, 6), bool)
    for i in range(3):
        parents[3 + i, i] = True
    mask = attention_mask(parents, "undirected")
    fn, params = one_layer_denoiser(mask, rng_key)
    values = jnp.zeros((1, 6))
    base = np.asarray(fn(params, values, jnp.array([0.5]), jnp.zeros((1, 6), bool)))[0]
    moved = np.asarray(fn(params, values.at[0, 0].set(2.0), jnp.array([0.5]), jnp.zeros((1, 6), bool)))[0]
    np.testing.assert_array_equal(moved[[1, 2, 4, 5]], base[[1, 2, 4, 5]])
    assert np.all(moved[[0, 3]] != base[[0, 3]])
