"""The default depth grows with the model's token count (``NetworkConfig(num_layers=None)``)."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.nn import default_num_layers
from numpyro_simformer.samplers import EulerMaruyama

# tiny width: these tests check the depth a fit builds, not what it learns
TINY_UNRESOLVED = dict(
    num_simulations=200,
    network=NetworkConfig(width=8, num_heads=1, mlp_width=8, num_time_features=8),
    training=TrainingConfig(max_steps=10, steps_per_call=5, batch_size=16, validation_interval=5, warmup_steps=0),
    sampler=EulerMaruyama(num_steps=5),
    progress_bar=False,
)


def linear_model(num_theta, num_x):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([num_theta]).to_event(1))
        numpyro.sample("x", dist.Normal(theta.sum() * np.ones(num_x), 0.5).to_event(1))
    return model


def built_layers(sf) -> int:
    return len(sf.state.params["blocks"])


def test_rule_and_explicit_depth():
    assert [default_num_layers(n) for n in (1, 4, 8, 9, 13, 200)] == [3, 3, 3, 6, 6, 6]
    assert NetworkConfig().num_layers is None
    assert NetworkConfig().for_tokens(8).num_layers == 3
    assert NetworkConfig().for_tokens(9).num_layers == 6
    explicit = NetworkConfig(num_layers=2)
    assert explicit.for_tokens(100) is explicit
    with pytest.raises(ValueError, match="num_layers"):
        NetworkConfig(num_layers=0)


@pytest.fixture(scope="module")
def nine_tokens():
    return Simformer(linear_model(3, 6), **TINY_UNRESOLVED).fit(jax.random.key(0))


def test_fit_builds_the_depth_of_its_token_count(nine_tokens):
    assert nine_tokens.network_config.num_layers is None  # the user's configuration is kept as given
    assert nine_tokens.state.network.num_layers == 6
    assert built_layers(nine_tokens) == 6


def test_grouped_tokens_are_what_counts():
    # 2 + 60 elements, but the data in 2 tokens of 30: 4 tokens, so 3 layers
    sf = Simformer(linear_model(2, 60), elements_per_token={"x": 30}, **TINY_UNRESOLVED).fit(jax.random.key(0))
    assert sf.state.spec.grouping.num_tokens == 4
    assert sf.state.network.num_layers == 3
    assert built_layers(sf) == 3


@pytest.mark.filterwarnings("ignore:Draws of:UserWarning")  # ten training steps: far from the data
def test_checkpoint_records_the_resolved_depth(nine_tokens, tmp_path, rng_key):
    sf = nine_tokens
    sf.save(tmp_path / "fitted")
    loaded = Simformer.load(tmp_path / "fitted", linear_model(3, 6))
    assert loaded.network_config.num_layers is None
    assert loaded.state.network == sf.state.network
    observed = {"x": np.linspace(-1.0, 1.0, 6)}
    expected = sf.sample(rng_key, observed=observed, num_samples=16).posterior["theta"].values
    np.testing.assert_array_equal(loaded.sample(rng_key, observed=observed, num_samples=16).posterior["theta"].values,
                                  expected)
