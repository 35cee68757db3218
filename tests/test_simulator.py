"""The Simulator site: draws, shapes, errors, its element-level graph, and a fit against
an exact posterior.

The graph tests use simulators with a known sparse structure, so the extracted matrix is
checked exactly; the statistical test fits a linear-Gaussian simulator written as a black
box and compares the posterior with the exact one by C2ST.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.distributions import constraints

from numpyro_simformer import NetworkConfig, Simformer, Simulator, TrainingConfig, attention_mask, dependency_matrix
from numpyro_simformer.diagnostics import c2st_fast
from numpyro_simformer.diagnostics.c2st import c2st_null_std
from numpyro_simformer.model.simulate import simulate

# --- simulators with a known structure -----------------------------------------------------
# x[0] <- theta[0]; x[1] <- theta[1] through floor (no derivative); x[2] <- theta[0], theta[2];
# x[3] is noise only (a distractor).


def sparse_jax(rng_key, theta):
    noise = jax.random.normal(rng_key, (4,))
    return jnp.stack([theta[0] + noise[0], jnp.floor(theta[1]) + noise[1], theta[0] * theta[2] + noise[2], noise[3]])


def sparse_numpy(rng, theta):  # vectorized: theta (n, 3) -> (n, 4)
    noise = rng.normal(size=(len(theta), 4))
    columns = [theta[:, 0], np.floor(theta[:, 1]), theta[:, 0] * theta[:, 2], np.zeros(len(theta))]
    return np.stack(columns, axis=1) + noise


def sparse_numpy_one(rng, theta):  # one simulation: theta (3,) -> (4,)
    return sparse_numpy(rng, theta[None])[0]


SPARSE_EDGES = {"x[0]": ["theta[0]"], "x[1]": ["theta[1]"], "x[2]": ["theta[0]", "theta[2]"]}
LABELS = ["theta[0]", "theta[1]", "theta[2]", "x[0]", "x[1]", "x[2]", "x[3]"]


def expected(labels, edges):
    index = {label: i for i, label in enumerate(labels)}
    parents = np.zeros((len(labels), len(labels)), dtype=bool)
    for child, parent_labels in edges.items():
        for parent in parent_labels:
            parents[index[child], index[parent]] = True
    return parents


def sparse_model(make_site):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.sample("x", make_site(2.0 * theta))

    return model


SITES = {
    "jax": lambda theta, **kw: Simulator(sparse_jax, theta, **kw),
    "numpy": lambda theta, **kw: Simulator.from_numpy(sparse_numpy, theta, event_shape=(4,), **kw),
    "numpy_per_draw": lambda theta, **kw: Simulator.from_numpy(
        sparse_numpy_one, theta, event_shape=(4,), vectorized=False, **kw),
}


# --- draws and shapes -------------------------------------------------------------------------


def test_event_shape_is_inferred_and_sample_shapes_follow():
    site = Simulator(sparse_jax, jnp.zeros(3))
    assert site.event_shape == (4,) and site.batch_shape == () and not site.is_discrete
    assert site.sample(jax.random.key(0)).shape == (4,)
    assert site.sample(jax.random.key(0), (5, 2)).shape == (5, 2, 4)
    batched = Simulator(sparse_jax, jnp.zeros((6, 3)), batch_ndims=1)
    assert batched.batch_shape == (6,)
    draws = batched.sample(jax.random.key(0), (5,))
    assert draws.shape == (5, 6, 4)
    assert len(np.unique(np.asarray(draws[..., 3]))) == 30, "every simulation has its own noise"


@pytest.mark.parametrize("kind", SITES)
def test_same_key_same_draws_and_different_keys_differ(kind, rng_key):
    site = SITES[kind](jnp.array([0.5, -1.0, 2.0]))
    first = np.asarray(site.sample(rng_key, (7,)))
    again = np.asarray(site.sample(rng_key, (7,)))
    other = np.asarray(site.sample(jax.random.fold_in(rng_key, 1), (7,)))
    assert first.shape == (7, 4) and np.array_equal(first, again)
    assert not np.any(first[:, 3] == other[:, 3])
    assert first.dtype == np.float32


def test_per_draw_numpy_draws_depend_on_each_draws_key_alone(rng_key):
    """``vectorized=False`` seeds each simulation from its own key, so a draw does not depend
    on the batch it was made in; a vectorized function draws its batch from one generator
    (same keys, same batch: same draws), and agrees with the per-draw one on a batch of one."""
    theta = jnp.array([0.5, -1.0, 2.0])
    per_draw = SITES["numpy_per_draw"](theta)
    vectorized = SITES["numpy"](theta)
    keys = jax.random.split(rng_key, 5)
    batch = np.asarray(jax.vmap(per_draw.output_given)(keys))
    alone = np.stack([np.asarray(per_draw.output_given(key)) for key in keys])
    np.testing.assert_array_equal(batch, alone)
    alone_vectorized = np.stack([np.asarray(vectorized.output_given(key)) for key in keys])
    np.testing.assert_array_equal(alone_vectorized, alone)
    batch_vectorized = np.asarray(jax.vmap(vectorized.output_given)(keys))
    assert not np.array_equal(batch_vectorized, alone)


def test_site_under_a_plate_and_with_batched_inputs(rng_key):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        with numpyro.plate("trials", 4):
            numpyro.sample("x", Simulator(sparse_jax, theta))
            scale = numpyro.sample("scale", dist.HalfNormal(1.0))
            numpyro.sample("y", Simulator.from_numpy(sparse_numpy, theta * scale[:, None], event_shape=(4,),
                                                     batch_ndims=1))

    trace = handlers.trace(handlers.seed(model, rng_key)).get_trace()
    assert trace["x"]["value"].shape == (4, 4) and trace["y"]["value"].shape == (4, 4)
    assert len(np.unique(np.asarray(trace["x"]["value"][:, 3]))) == 4


def test_model_simulates_in_one_vectorized_call_per_chunk(rng_key):
    calls = []

    def counted(rng, theta):
        calls.append(len(theta))
        return sparse_numpy(rng, theta)

    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.sample("x", Simulator.from_numpy(counted, theta, event_shape=(4,)))

    draws, info = simulate(rng_key, model, 250, ["theta", "x"], chunk_size=100)
    assert info.vectorized and info.num_valid == 250 and calls == [100, 100, 50]
    again, _ = simulate(rng_key, model, 250, ["theta", "x"], chunk_size=100)
    np.testing.assert_array_equal(draws["x"], again["x"])


def test_nan_outputs_are_allowed_and_counted(rng_key):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        numpyro.sample("x", Simulator(lambda key, t: jnp.where(t > 0, jnp.nan, t) + jax.random.normal(key), theta))

    _, info = simulate(rng_key, model, 200, ["theta", "x"])
    assert 0 < info.num_invalid < 200 and info.num_valid + info.num_invalid == 200


def test_simulators_pass_through_jit_as_pytrees(rng_key):
    draw = jax.jit(lambda site, key: site.sample(key))
    first = draw(Simulator(sparse_jax, jnp.zeros(3)), rng_key)
    second = draw(Simulator(sparse_jax, jnp.ones(3), shared_noise=False), rng_key)
    np.testing.assert_allclose(second[0] - first[0], 1.0, rtol=1e-5)


def test_discrete_support_makes_a_discrete_site():
    def counts(rng_key, rate):
        return jax.random.poisson(rng_key, rate, (3,))

    site = Simulator(counts, 2.0, support=constraints.nonnegative_integer)
    assert site.is_discrete and site.event_shape == (3,)
    assert jnp.issubdtype(site.sample(jax.random.key(0)).dtype, jnp.integer)


# --- errors -------------------------------------------------------------------------------------


def test_log_prob_says_the_site_is_sample_only():
    with pytest.raises(NotImplementedError, match="sparse_jax.*sample-only"):
        Simulator(sparse_jax, jnp.zeros(3)).log_prob(jnp.zeros(4))


def test_wrong_shape_or_dtype_from_a_jax_function_names_it():
    with pytest.raises(ValueError, match=r"sparse_jax.*shape \(4,\); expected \(5,\)"):
        Simulator(sparse_jax, jnp.zeros(3), event_shape=(5,))

    def complex_output(rng_key, theta):
        return theta * 1j

    with pytest.raises(TypeError, match="complex_output.*complex"):
        Simulator(complex_output, jnp.zeros(3))


def test_raising_jax_function_is_named():
    def broken(rng_key, theta):
        raise ValueError("bad parameters")

    with pytest.raises(RuntimeError, match="broken.*ValueError: bad parameters"):
        Simulator(broken, jnp.zeros(3))


def test_numpy_function_needs_event_shape():
    with pytest.raises(ValueError, match="sparse_numpy.*event_shape"):
        Simulator.from_numpy(sparse_numpy, jnp.zeros(3), event_shape=None)


def _first_error(fn, **kwargs):
    site = Simulator.from_numpy(fn, jnp.zeros(3), **kwargs)
    with pytest.raises(Exception) as caught:
        np.asarray(jax.jit(site.sample)(jax.random.key(0)))
    return str(caught.value)


def test_wrong_numpy_output_is_named_in_the_callback():
    message = _first_error(sparse_numpy, event_shape=(5,))
    assert "sparse_numpy" in message and "shape (1, 4); expected (1, 5)" in message

    def floats(rng, theta):
        return rng.normal(size=(len(theta), 4))

    message = _first_error(floats, event_shape=(4,), dtype=jnp.int32)
    assert "floats" in message and "float64" in message and "int32" in message

    def raising(rng, theta):
        raise FloatingPointError("the solver diverged")

    message = _first_error(raising, event_shape=(4,))
    assert "raising" in message and "the solver diverged" in message


def test_shared_noise_matrix_is_checked():
    with pytest.raises(ValueError, match=r"shared_noise.*\(4, 4\)"):
        Simulator(sparse_jax, jnp.zeros(3), shared_noise=np.eye(3, dtype=bool))


# --- element-level graph ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SITES)
def test_black_box_edges_are_found_exactly(kind):
    model = sparse_model(lambda theta: SITES[kind](theta, shared_noise=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no site-level fallback
        labels, parents = dependency_matrix(model)
    assert labels == LABELS
    np.testing.assert_array_equal(parents, expected(labels, SPARSE_EDGES))


@pytest.mark.parametrize("kind, stated", [("jax", True), ("numpy", None), ("numpy_per_draw", None)])
def test_shared_noise_is_marginalised(kind, stated):
    """Noise shared by every output (stated, or assumed where the draws cannot be read: a
    NumPy function) is a hidden parent of every output, removed by arc reversal. The
    noise-only x[3] goes first and keeps no parent; each later output gains the earlier ones
    and their parents."""
    extra = {} if stated is None else {"shared_noise": stated}
    labels, parents = dependency_matrix(sparse_model(lambda theta: SITES[kind](theta, **extra)))
    edges = {"x[0]": ["theta[0]", "x[3]"], "x[1]": ["theta[1]", "x[3]", "x[0]", "theta[0]"],
             "x[2]": ["theta[0]", "theta[2]", "x[3]", "x[0]", "x[1]", "theta[1]"]}
    np.testing.assert_array_equal(parents, expected(labels, edges))
    mask = attention_mask(parents)
    assert mask[labels.index("x[3]"), :3].all(), "given the other outputs, a distractor with shared noise informs theta"


def test_default_reads_which_draws_a_jax_simulator_shares():
    """sparse_jax gives each output its own normal draw: by default that is read from the
    function, and the graph is the one stated with shared_noise=False."""
    labels, parents = dependency_matrix(sparse_model(SITES["jax"]))
    np.testing.assert_array_equal(parents, expected(labels, SPARSE_EDGES))


def shared_draws(rng_key, theta):
    """x[0] and x[1] share the draw e[0]; x[2] and x[4] share a categorical index (a
    threshold on random bits); x[3] has its own gamma variate; x[5] its own normal."""
    key_normal, key_index, key_gamma = jax.random.split(rng_key, 3)
    e = jax.random.normal(key_normal, (3,))
    index = jax.random.categorical(key_index, jnp.zeros(4))
    levels = jnp.array([0.0, 1.0, 2.0, 3.0])
    return jnp.stack([theta[0] + e[0], theta[1] + e[0] + e[1], levels[index] + theta[0],
                      jax.random.gamma(key_gamma, 2.0), 2.0 * levels[index], e[2]])


def test_noise_links_found_from_the_draws():
    site = Simulator(shared_draws, jnp.array([0.3, -1.0]))
    links, reason = site.noise_links(jax.random.key(3))
    assert reason == ""
    expected_links = np.eye(6, dtype=bool)
    for i, j in [(0, 1), (2, 4)]:
        expected_links[i, j] = expected_links[j, i] = True
    np.testing.assert_array_equal(links, expected_links)


def many_draws(key, theta):  # 300 normal draws, each shared by two of 600 outputs, and one by all
    z = jax.random.normal(key, (300,))
    return theta + z[np.arange(600) // 2] + 1e-3 * jax.random.normal(jax.random.fold_in(key, 1))


@pytest.mark.parametrize("shared_by_all", [False, True])
def test_noise_links_of_many_draws_are_exact(shared_by_all):
    # Several chunks of draws, and both the sparse and the dense product of the uses.
    fn = many_draws if shared_by_all else (lambda key, theta: theta + jax.random.normal(key, (300,))[np.arange(600) // 2])
    links, reason = Simulator(fn, jnp.float32(0.5)).noise_links(jax.random.key(1))
    assert reason == ""
    pairs = np.kron(np.eye(300, dtype=bool), np.ones((2, 2), dtype=bool))
    np.testing.assert_array_equal(links, np.ones((600, 600), dtype=bool) if shared_by_all else pairs)


def random_walk(key, scale):
    def step(position, step_key):
        position = position + scale * jax.random.normal(step_key)
        return position, position

    return jax.lax.scan(step, 0.0, jax.random.split(key, 3))[1]


def test_draws_in_a_loop_are_not_read_and_every_output_is_linked():
    links, reason = Simulator(random_walk, jnp.float32(2.0)).noise_links(jax.random.key(0))
    assert links.all() and "scan" in reason
    numpy_site = SITES["numpy"](jnp.zeros(3))
    links, reason = numpy_site.noise_links(jax.random.key(0))
    assert links.all() and "NumPy" in reason
    stated = Simulator(sparse_jax, jnp.zeros(3), shared_noise=False).noise_links(jax.random.key(0))
    np.testing.assert_array_equal(stated[0], np.eye(4, dtype=bool))


def shared_poisson(key, rate):
    counts = jax.random.poisson(key, rate, (2,)).astype(jnp.float32)
    return jnp.concatenate([counts, counts[:1] + 1.0])


def test_poisson_draws_are_read_where_jax_draws_them_in_one_primitive():
    # Recent JAX draws Poisson variates with one `random_poisson` primitive; older JAX in a
    # `while` loop, which cannot be read (every output linked).
    links, reason = Simulator(shared_poisson, jnp.float32(3.0)).noise_links(jax.random.key(0))
    if reason:
        assert links.all() and "while" in reason
    else:
        np.testing.assert_array_equal(links, [[1, 0, 1], [0, 1, 0], [1, 0, 1]])


def test_a_sampler_the_probe_does_not_know_links_every_output(monkeypatch):
    from numpyro_simformer.model import noise

    # Forgetting `random_poisson` stands for a sampling primitive added by a later JAX.
    monkeypatch.setattr(noise, "_SOURCES", noise._SOURCES - {"random_poisson"})
    links, reason = Simulator(shared_poisson, jnp.float32(3.0)).noise_links(jax.random.key(0))
    assert links.all() and ("random_poisson" in reason or "while" in reason)


def test_shared_noise_must_be_auto_a_bool_or_a_matrix():
    with pytest.raises(ValueError, match="'auto', True, False"):
        Simulator(sparse_jax, jnp.zeros(3), shared_noise="yes")


def distractor_model(shared_noise):
    """A small slcp-distractors-like model: 2 informative outputs among 6 noise-only ones."""

    def simulator(rng_key, theta):
        key_signal, key_distractors = jax.random.split(rng_key)
        signal = theta**2 + 0.1 * jax.random.normal(key_signal, (2,))
        distractors = jax.random.t(key_distractors, 3.0, (6,))
        return jnp.concatenate([distractors[:3], signal, distractors[3:]])

    def model():
        theta = numpyro.sample("theta", dist.Uniform(-3, 3).expand([2]).to_event(1))
        numpyro.sample("x", Simulator(simulator, theta, shared_noise=shared_noise))

    return model


@pytest.mark.parametrize("shared_noise", [False, "auto"])
def test_distractors_have_no_parents_and_are_masked_from_the_parameters(shared_noise):
    labels, parents = dependency_matrix(distractor_model(shared_noise=shared_noise))
    edges = {"x[3]": ["theta[0]"], "x[4]": ["theta[1]"]}
    np.testing.assert_array_equal(parents, expected(labels, edges))
    mask = attention_mask(parents)
    distractors = [labels.index(f"x[{i}]") for i in (0, 1, 2, 5, 6, 7)]
    assert not mask[np.ix_(distractors, [0, 1])].any()
    np.testing.assert_array_equal(mask[np.ix_(distractors, distractors)], np.eye(6, dtype=bool))


def test_stated_noise_blocks_keep_distractors_apart():
    """The informative outputs share noise with each other, the distractors with each other:
    a block matrix keeps the two groups, and so distractors and parameters, apart."""
    block = np.zeros((8, 8), dtype=bool)
    informative = [3, 4]
    block[np.ix_(informative, informative)] = True
    others = [0, 1, 2, 5, 6, 7]
    block[np.ix_(others, others)] = True
    labels, parents = dependency_matrix(distractor_model(shared_noise=block))
    mask = attention_mask(parents)
    distractors = [labels.index(f"x[{i}]") for i in others]
    assert not parents[distractors][:, :2].any() and not mask[np.ix_(distractors, [0, 1])].any()
    assert parents[labels.index("x[4]")].tolist() == [label in ("theta[0]", "theta[1]", "x[3]") for label in labels]


def test_plate_with_batched_inputs_links_each_simulation_to_its_own_inputs():
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        with numpyro.plate("trials", 2):
            scale = numpyro.sample("scale", dist.LogNormal(0, 1))
            numpyro.sample("x", Simulator(lambda key, t: t + jax.random.normal(key, (2,)), theta * scale[:, None],
                                          batch_ndims=1, shared_noise=False))

    labels, parents = dependency_matrix(model)
    assert labels == ["theta[0]", "theta[1]", "scale[0]", "scale[1]", "x[0,0]", "x[0,1]", "x[1,0]", "x[1,1]"]
    edges = {"x[0,0]": ["theta[0]", "scale[0]"], "x[0,1]": ["theta[1]", "scale[0]"],
             "x[1,0]": ["theta[0]", "scale[1]"], "x[1,1]": ["theta[1]", "scale[1]"]}
    np.testing.assert_array_equal(parents, expected(labels, edges))


def test_downstream_sites_of_a_simulator_output():
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        x = numpyro.sample("x", Simulator(sparse_jax, theta, shared_noise=False))
        numpyro.sample("y", dist.Normal(x[2], 1.0))

    labels, parents = dependency_matrix(model)
    np.testing.assert_array_equal(parents, expected(labels, {**SPARSE_EDGES, "y": ["x[2]"]}))


class _Unreadable(Simulator):
    def dependence(self, rng_key, num_keys=2):
        raise RuntimeError("cannot be probed")


def test_unreadable_simulator_falls_back_to_site_level_edges_with_a_warning():
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.sample("x", _Unreadable(sparse_jax, theta, shared_noise=False))

    with pytest.warns(UserWarning, match="'x'.*cannot be probed"):
        labels, parents = dependency_matrix(model)
    assert parents[3:, :3].all(), "every output <- every parameter"
    assert not parents[3:, 3:].any(), "shared_noise=False still holds"



# --- end to end ---------------------------------------------------------------------------------


def test_fit_and_sample_with_a_numpy_simulator(rng_key):
    model = sparse_model(SITES["numpy"])
    sf = Simformer(model, num_simulations=300, progress_bar=False,
                   network=NetworkConfig(width=16, num_layers=1, num_heads=1, mlp_width=16),
                   training=TrainingConfig(max_steps=20, batch_size=64, validation_interval=20))
    sf.fit(rng_key)
    assert sf.simulation_info.vectorized and sf.simulation_info.num_valid == 300
    tree = sf.sample(rng_key, observed={"x": np.array([0.5, 1.0, -0.3, 0.0])}, num_samples=6)
    assert tree.posterior["theta"].shape == (1, 6, 3)


NOISE = 0.5


def linear_gaussian_simulator(rng_key, theta):
    return theta + NOISE * jax.random.normal(rng_key, theta.shape)


def black_box_gaussian():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", Simulator(linear_gaussian_simulator, theta))


@pytest.mark.slow
def test_black_box_posterior_matches_exact(rng_key):
    """theta ~ N(0, I), x = theta + 0.5 eps: the posterior is N(x / 1.25, 0.2 I).

    Threshold: 4 null standard deviations of the C2ST accuracy for this sample size plus a
    fixed approximation budget of 0.05 for a small network trained briefly. Measured on 2
    CPU cores: accuracy 0.503 against a threshold of 0.582, about 45 s.
    """
    num_samples = 2_000
    sf = Simformer(black_box_gaussian, num_simulations=4_000, progress_bar=False,
                   network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   training=TrainingConfig(max_steps=2_000, batch_size=256, validation_interval=250))
    key_fit, key_sample, key_reference = jax.random.split(rng_key, 3)
    sf.fit(key_fit)
    assert sf.simulation_info.vectorized
    x_o = np.array([1.0, -0.5])
    tree = sf.sample(key_sample, observed={"x": x_o}, num_samples=num_samples)
    samples = tree.posterior["theta"].values.reshape(-1, 2)
    variance = NOISE**2 / (1 + NOISE**2)
    seed = int(jax.random.randint(key_reference, (), 0, 2**30))
    reference = x_o / (1 + NOISE**2) + np.sqrt(variance) * np.random.default_rng(seed).normal(size=(num_samples, 2))
    accuracy = c2st_fast(reference, samples)
    assert accuracy < 0.5 + 4 * c2st_null_std(num_samples, num_samples) + 0.05, accuracy


@pytest.mark.parametrize("shared_noise, married", [(False, {("theta[2]", "theta[0]")}),
                                                   ("auto", {("theta[2]", "theta[0]")}),
                                                   (True, {("theta[1]", "theta[0]"), ("theta[2]", "theta[0]"),
                                                           ("theta[2]", "theta[1]")})])
def test_observed_simulator_marries_the_parents_it_couples(shared_noise, married):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
        numpyro.sample("x", Simulator(sparse_jax, theta, shared_noise=shared_noise), obs=jnp.zeros(4))

    labels, parents = dependency_matrix(model)
    assert labels == ["theta[0]", "theta[1]", "theta[2]"]
    assert {(labels[i], labels[j]) for i, j in zip(*np.nonzero(parents))} == married
