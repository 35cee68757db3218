"""Several elements per token: which elements share a token, the token masks, and that
grouping changes the cost of a query, never its answer."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st_fast
from numpyro_simformer.diagnostics.c2st import c2st_null_std
from numpyro_simformer.nn import reachable_tokens
from numpyro_simformer.tokens.grouping import AUTO_GROUPING_THRESHOLD

from helpers import TINY


def elementwise_model(size=20):
    """x[i] depends on theta[i] only."""
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([size]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 1.0).to_event(1))


def distractor_model():
    """x[j] for odd j depends on theta; the even ones depend on nothing (distractors)."""
    theta = numpyro.sample("theta", dist.Normal(0, 1))
    noise = numpyro.sample("noise", dist.Normal(0, 1).expand([12]).to_event(1))
    numpyro.sample("x", dist.Normal(jnp.where(jnp.arange(12) % 2 == 1, theta, 0.0), 1.0).to_event(1))


# --- which elements share a token ----------------------------------------------------------


def test_small_sites_keep_one_element_per_token(rng_key):
    spec = Simformer(elementwise_model, **TINY).read_model(rng_key)
    assert spec.grouping is None


@pytest.mark.parametrize("size", [AUTO_GROUPING_THRESHOLD + 1, 100, 1_000])
def test_large_sites_are_grouped_into_at_most_the_threshold_in_tokens(rng_key, size):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        numpyro.sample("x", dist.Normal(theta[0] + theta[1] * jnp.linspace(0, 1, size), 1.0).to_event(1))

    grouping = Simformer(model, **TINY).read_model(rng_key).grouping
    k = -(-size // AUTO_GROUPING_THRESHOLD)
    assert grouping.elements_per_token == {"theta": 1, "x": k}
    assert grouping.num_tokens == 2 + -(-size // k) <= 2 + AUTO_GROUPING_THRESHOLD
    members = grouping.members[grouping.members >= 0]
    np.testing.assert_array_equal(np.sort(members), np.arange(2 + size))  # every element once
    # iid elements with the same parents: C order, runs of k
    np.testing.assert_array_equal(grouping.members[2, :k], 2 + np.arange(k))


def test_elements_per_token_overrides_per_site_and_for_all(rng_key):
    per_site = Simformer(elementwise_model, elements_per_token={"x": 4}, **TINY).read_model(rng_key).grouping
    assert per_site.elements_per_token == {"theta": 1, "x": 4}
    assert per_site.num_tokens == 20 + 5 and per_site.slots == 4
    everywhere = Simformer(elementwise_model, elements_per_token=5, **TINY).read_model(rng_key).grouping
    assert everywhere.elements_per_token == {"theta": 5, "x": 5} and everywhere.num_tokens == 8
    off = Simformer(elementwise_model, elements_per_token=1, **TINY).read_model(rng_key)
    assert off.grouping is None
    whole = Simformer(elementwise_model, elements_per_token={"x": 1_000}, **TINY).read_model(rng_key).grouping
    assert whole.elements_per_token["x"] == 20 and whole.num_tokens == 21  # clipped to the site


@pytest.mark.parametrize("value, match", [({"y": 2}, "not token sites"), ({"x": 0}, "positive int"),
                                          ({"x": 2.5}, "positive int")])
def test_bad_elements_per_token_names_the_site(rng_key, value, match):
    with pytest.raises(ValueError, match=match):
        Simformer(elementwise_model, elements_per_token=value, **TINY).read_model(rng_key)


def test_elements_per_token_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="elements_per_token"):
        Simformer(elementwise_model, elements_per_token="x", **TINY)


def test_a_model_with_variable_dims_is_not_grouped(rng_key):
    def series(t):
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        with numpyro.plate("time", len(t)):
            numpyro.sample("x", dist.Normal(theta * t, 0.1))

    t = jnp.linspace(0, 1, 50)
    assert Simformer(series, coordinates={"time": "t"}, **TINY).read_model(rng_key, t=t).grouping is None
    with pytest.raises(ValueError, match="coordinate or exchangeable"):
        Simformer(series, coordinates={"time": "t"}, elements_per_token={"x": 5}, **TINY).read_model(rng_key, t=t)


# --- masks from the element graph ----------------------------------------------------------


@pytest.mark.parametrize("attention", ["undirected", "directed"])
def test_token_masks_follow_the_element_graph(rng_key, attention):
    """x[i] depends on theta[i] only: token a of x attends to token a of theta and itself."""
    spec = Simformer(elementwise_model, elements_per_token=5, attention=attention, **TINY).read_model(rng_key)
    grouping = spec.grouping
    np.testing.assert_array_equal(grouping.members[:4], np.arange(20).reshape(4, 5))
    np.testing.assert_array_equal(grouping.members[4:], 20 + np.arange(20).reshape(4, 5))
    expected = np.eye(8, dtype=bool)
    expected[4 + np.arange(4), np.arange(4)] = True  # x token a reads theta token a
    if attention == "undirected":
        expected[np.arange(4), 4 + np.arange(4)] = True
    np.testing.assert_array_equal(grouping.attention_mask, expected)


def test_distractors_share_tokens_and_stay_unlinked(rng_key):
    spec = Simformer(distractor_model, elements_per_token={"x": 3, "noise": 4}, **TINY).read_model(rng_key)
    grouping = spec.grouping
    x_start = spec.layout.slices()["x"].start
    x_tokens = [row[row >= 0] - x_start for row in grouping.members if row[0] >= x_start]
    # the six distractors (even j, no parents) first, then the six that read theta: never mixed
    assert [list(token) for token in x_tokens] == [[0, 2, 4], [6, 8, 10], [1, 3, 5], [7, 9, 11]]
    theta_token = 0
    linked = grouping.attention_mask[theta_token]
    x_rows = np.flatnonzero(grouping.members[:, 0] >= x_start)
    assert list(linked[x_rows]) == [False, False, True, True]
    assert not linked[1:x_rows[0]].any()  # the noise site reads nothing and is read by nothing


def random_walk_distractors(rng_key, theta):
    """x[0:6]: a random walk (its elements share noise, no parameter); x[6:8]: theta + own noise."""
    key_walk, key_signal = jax.random.split(rng_key)
    walk = jnp.cumsum(jax.random.normal(key_walk, (6,)))
    return jnp.concatenate([walk, theta + 0.1 * jax.random.normal(key_signal, (2,))])


def test_distractors_linked_among_themselves_do_not_share_tokens_with_the_signal(rng_key):
    """The walk's first element has no parent at all, the others only walk elements before
    them; the signal reads theta. Ordered by outside parents first, the walk fills two
    tokens and the signal one, so theta's token attends to the signal's token alone."""
    from numpyro_simformer import Simulator

    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        numpyro.sample("x", Simulator(random_walk_distractors, theta))

    spec = Simformer(model, elements_per_token={"x": 3, "theta": 2}, **TINY).read_model(rng_key)
    grouping = spec.grouping
    x_start = spec.layout.slices()["x"].start
    assert [list(row[row >= 0] - x_start) for row in grouping.members[1:]] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    np.testing.assert_array_equal(grouping.attention_mask[0], [True, False, False, True])


# Four pairs (a_i, b_i) that share noise, as SLCP's coordinates do: a_i = theta0 + z_i reads
# theta0, b_i = theta0 * theta1 + z_i + w_i reads both. The simulator returns them in a
# scrambled order (as slcp_distractors does), with b_2 before its partner a_2.
PAIR_ORDER = np.array(["b2", "a0", "a1", "b0", "a3", "b3", "a2", "b1"])


def scrambled_pairs(rng_key, theta):
    z, w = jax.random.normal(rng_key, (2, 4))
    a = theta[0] + z
    b = theta[0] * theta[1] + z + w
    outputs = {f"a{i}": a[i] for i in range(4)} | {f"b{i}": b[i] for i in range(4)}
    return jnp.stack([outputs[name] for name in PAIR_ORDER])


def test_outputs_that_share_noise_take_parents_and_slots_by_role_not_by_position(rng_key):
    """Wherever the simulator puts a pair, the output with fewer parents (a) comes first in
    the marginalisation, so every a reads theta0 alone and every b reads both and its a. The
    tokens of four are then the a's and the b's, with each pair at the same slot of both."""
    from numpyro_simformer import Simulator

    def model():
        theta = numpyro.sample("theta", dist.Normal(1, 1).expand([2]).to_event(1))
        numpyro.sample("x", Simulator(scrambled_pairs, theta))

    spec = Simformer(model, elements_per_token={"x": 4}, **TINY).read_model(rng_key)
    x_start = spec.layout.slices()["x"].start
    parents = np.asarray(spec.parents)
    for position, name in enumerate(PAIR_ORDER):
        found = {f"theta{j}" for j in np.flatnonzero(parents[x_start + position, :x_start])}
        found |= set(PAIR_ORDER[np.flatnonzero(parents[x_start + position, x_start:])])
        assert found == ({"theta0"} if name[0] == "a" else {"theta0", "theta1", "a" + name[1]}), name
    tokens = [PAIR_ORDER[row[row >= 0] - x_start] for row in spec.grouping.members if row[0] >= x_start]
    assert sorted({name[0] for name in token}.pop() for token in tokens) == ["a", "b"]  # one role per token
    assert [name[1] for name in tokens[0]] == [name[1] for name in tokens[1]]  # partners share a slot


# --- the network over grouped tokens -------------------------------------------------------


def test_a_grouped_network_reads_only_the_elements_its_tokens_attend_to(rng_key):
    """With elementwise attention, token a's output depends on the elements of the tokens it attends to."""
    sf = Simformer(elementwise_model, elements_per_token=5, **TINY)
    sf.fit(rng_key)
    values = jax.random.normal(rng_key, (1, 40))
    mask = jnp.zeros((1, 40), bool)
    denoiser = lambda v: sf.state.denoiser_fn(sf.params, v, jnp.array([0.5]), mask)[0]
    jacobian = np.asarray(jax.jacfwd(denoiser)(values[0][None].reshape(1, 40)).reshape(40, 40))
    reads = np.abs(jacobian) > 0
    element_token = np.empty(40, int)
    for token, row in enumerate(sf.spec.grouping.members):
        element_token[row[row >= 0]] = token
    allowed = sf.spec.grouping.attention_mask[np.ix_(element_token, element_token)]
    assert not (reads & ~allowed).any()
    assert reads[20:25, 0:5].any() and not reads[20:25, 5:20].any()  # x token 0 reads theta token 0 only


@pytest.mark.filterwarnings("ignore:Draws of")  # a network of 10 steps extrapolates
def test_observed_elements_inside_a_token_are_returned_as_given(rng_key):
    sf = Simformer(elementwise_model, elements_per_token=5, **TINY)
    sf.fit(rng_key)
    x = np.linspace(-1, 1, 20)
    partly = x.copy()
    partly[1::2] = np.nan  # every token of x partly observed
    tree = sf.sample(rng_key, observed={"x": partly}, num_samples=7)
    predicted = tree.posterior_predictive["x"].values.reshape(7, 20)
    np.testing.assert_array_equal(predicted[:, ::2], np.broadcast_to(x[::2], (7, 10)))
    assert np.isfinite(predicted[:, 1::2]).all() and np.ptp(predicted[:, 1::2], axis=0).min() > 0


@pytest.mark.filterwarnings("ignore:Draws of")
def test_a_grouped_checkpoint_loads_with_its_grouping_and_answers_identically(rng_key, tmp_path):
    sf = Simformer(elementwise_model, elements_per_token={"x": 3}, **TINY)
    sf.fit(rng_key)
    sf.save(tmp_path / "grouped")
    loaded = Simformer.load(tmp_path / "grouped", elementwise_model)
    np.testing.assert_array_equal(loaded.spec.grouping.members, sf.spec.grouping.members)
    np.testing.assert_array_equal(loaded.spec.grouping.attention_mask, sf.spec.grouping.attention_mask)
    observed = {"x": np.linspace(-1, 1, 20)}
    before = sf.sample(rng_key, observed=observed, num_samples=5).posterior["theta"].values
    after = loaded.sample(rng_key, observed=observed, num_samples=5).posterior["theta"].values
    np.testing.assert_array_equal(before, after)


# --- sampling passes leave out the tokens no latent token reaches ---------------------------


def test_reachable_tokens_walk_the_attention_mask_one_link_per_layer():
    chain = np.eye(5, dtype=bool) | np.eye(5, k=1, dtype=bool) | np.eye(5, k=-1, dtype=bool)
    start = np.array([True, False, False, False, False])
    for layers, expected in [(0, [0]), (1, [0, 1]), (2, [0, 1, 2]), (10, [0, 1, 2, 3, 4])]:
        assert list(np.flatnonzero(reachable_tokens(chain, start, layers))) == expected


@pytest.mark.filterwarnings("ignore:Draws of")
@pytest.mark.parametrize("elements_per_token", [None, 5])
def test_a_pruned_sampling_pass_gives_the_unpruned_draws(rng_key, elements_per_token):
    """theta[i] - x[i] pairs are independent: a query on a few pairs runs on their tokens only."""
    options = {} if elements_per_token is None else {"elements_per_token": elements_per_token}
    sf = Simformer(elementwise_model, **options, **TINY).fit(rng_key)
    theta, x = np.full(20, np.nan), np.linspace(-1, 1, 20)
    theta[:7] = 0.3  # pairs 0..6 fully observed: their tokens are left out of the pass
    x[17:] = np.nan
    observed = {"theta": theta, "x": x}
    space = sf.query_space(None)
    mask = np.isfinite(np.concatenate([theta, x]))[None]
    kept = space.relevant_tokens(mask)
    num_tokens = 40 if elements_per_token is None else 8
    assert kept is not None and len(kept) < num_tokens
    if elements_per_token is None:  # the latent elements and the x elements of their pairs
        assert list(kept) == list(range(7, 20)) + list(range(27, 40))
    pruned = sf.sample(jax.random.key(3), observed=observed, num_samples=64)
    space.num_layers = None  # the whole network, every token
    full = sf.sample(jax.random.key(3), observed=observed, num_samples=64)
    for group in ("posterior", "posterior_predictive"):
        for name in pruned[group].data_vars:
            np.testing.assert_allclose(pruned[group][name].values, full[group][name].values, rtol=1e-4, atol=1e-4)


# --- grouping leaves exact answers exact ----------------------------------------------------

NUM_PARAMETERS, CHILDREN, SIGMA = 4, 50, 7.0  # x[j] ~ N(theta[j // 50], 7^2): 200 data elements


def many_children_model():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([NUM_PARAMETERS]).to_event(1))
    numpyro.sample("x", dist.Normal(jnp.repeat(theta, CHILDREN), SIGMA).to_event(1))


@pytest.fixture(scope="module")
def grouped_gaussian():
    sf = Simformer(many_children_model, num_simulations=4_000, elements_per_token={"x": 10}, progress_bar=False,
                   network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   training=TrainingConfig(max_steps=2_000, batch_size=256, validation_interval=250))
    return sf.fit(jax.random.key(0))


@pytest.mark.slow
def test_grouped_tokens_keep_the_linear_gaussian_posterior_exact(grouped_gaussian, rng_key):
    """theta ~ N(0, I), 50 children each: posterior N(sum(x_block) / (49 * 2.02), 1 / 2.02) per theta.

    Its information is spread thinly over five tokens per parameter: before the loss
    counted tokens rather than elements (the 200 data elements outweighed the 4 parameters
    50 to 1), this gave 0.67.

    Threshold: 4 null standard deviations of the C2ST accuracy at this sample size plus a
    fixed approximation budget of 0.05 for a small network trained briefly.
    """
    sf, num_samples = grouped_gaussian, 2_000
    assert sf.spec.grouping.num_tokens == NUM_PARAMETERS + 200 // 10
    key_x, key_sample, key_reference = jax.random.split(rng_key, 3)
    theta_true = np.array([1.0, -0.5, 0.3, 0.0])
    x_o = np.repeat(theta_true, CHILDREN) + SIGMA * np.asarray(jax.random.normal(key_x, (200,)))
    samples = sf.sample(key_sample, observed={"x": x_o}, num_samples=num_samples).posterior["theta"].values
    samples = samples.reshape(-1, NUM_PARAMETERS)
    precision = 1 + CHILDREN / SIGMA**2
    mean = x_o.reshape(NUM_PARAMETERS, CHILDREN).sum(axis=1) / SIGMA**2 / precision
    seed = int(jax.random.randint(key_reference, (), 0, 2**30))
    reference = mean + np.random.default_rng(seed).normal(size=(num_samples, NUM_PARAMETERS)) / np.sqrt(precision)
    accuracy = c2st_fast(reference, samples)
    assert accuracy < 0.5 + 4 * c2st_null_std(num_samples, num_samples) + 0.05, accuracy


@pytest.mark.slow
def test_grouped_tokens_keep_the_linear_gaussian_likelihood_exact(grouped_gaussian, rng_key):
    """x | theta ~ N(repeat(theta, 50), 49 I) over all 200 elements, 20 tokens of 10.

    Every element's standardized mean and spread, and a C2ST over the 20 elements of two
    tokens (pairs inside one token and across two; a classifier over all 200 takes minutes).
    """
    sf, num_samples = grouped_gaussian, 2_000
    key_sample, key_reference = jax.random.split(rng_key)
    theta_o = np.array([0.8, -1.2, 0.0, 1.5])
    samples = sf.sample(key_sample, observed={"theta": theta_o}, num_samples=num_samples)
    samples = samples.posterior_predictive["x"].values.reshape(-1, 200)
    residual = (samples - np.repeat(theta_o, CHILDREN)) / SIGMA
    np.testing.assert_array_less(np.abs(residual.mean(axis=0)), 5 / np.sqrt(num_samples) + 0.1)
    np.testing.assert_array_less(np.abs(residual.std(axis=0) - 1), 5 / np.sqrt(2 * num_samples) + 0.1)
    seed = int(jax.random.randint(key_reference, (), 0, 2**30))
    reference = np.random.default_rng(seed).normal(size=(num_samples, 20))
    accuracy = c2st_fast(reference, residual[:, 40:60])
    assert accuracy < 0.5 + 4 * c2st_null_std(num_samples, num_samples) + 0.05, accuracy


def test_the_loss_of_a_grouped_layout_counts_each_token_once(rng_key):
    """Weights 1/k: the loss is the mean over tokens of each token's mean squared error."""
    from numpyro_simformer.diffusion.loss import example_loss
    from numpyro_simformer.training.fit import _token_weights

    grouping = Simformer(many_children_model, elements_per_token={"x": 10}, **TINY).read_model(rng_key).grouping
    weights = _token_weights(grouping)
    error = np.asarray(jax.random.normal(rng_key, (grouping.num_elements,)))
    latent_everywhere = jnp.zeros(grouping.num_elements, bool)
    per_token = [np.mean(error[row[row >= 0]] ** 2) for row in grouping.members]
    loss = example_loss(jnp.asarray(error), jnp.zeros_like(error), latent_everywhere, jnp.asarray(weights))
    np.testing.assert_allclose(float(loss), np.mean(per_token), rtol=1e-5)
    observed_x = latent_everywhere.at[NUM_PARAMETERS:].set(True)  # observed elements add nothing
    loss = example_loss(jnp.asarray(error), jnp.zeros_like(error), observed_x, jnp.asarray(weights))
    np.testing.assert_allclose(float(loss), np.sum(error[:NUM_PARAMETERS] ** 2) / len(per_token), rtol=1e-5)


@pytest.mark.slow
def test_repr_of_a_grouped_fit_counts_tokens_and_elements(grouped_gaussian):
    grouping = grouped_gaussian.spec.grouping
    text = repr(grouped_gaussian)
    elements = NUM_PARAMETERS * (1 + CHILDREN)
    assert f"tokens       {grouping.num_tokens} for {elements} elements (x 10 per token)" in text, text
    assert f"{int(grouping.attention_mask.sum())} of {grouping.num_tokens ** 2} token pairs" in text, text
