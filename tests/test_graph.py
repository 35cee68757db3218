"""Element-level dependency graphs against hand-derived ones, attention masks, and plotting."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.contrib.control_flow import scan

from numpyro_simformer.model import graph as graph_module
from numpyro_simformer.model.graph import attention_mask, dependency_matrix, element_parents


def _expected(labels: list[str], edges: dict[str, list[str]]) -> np.ndarray:
    """Parents matrix from ``{child: [parents]}``, checking every label exists."""
    index = {label: i for i, label in enumerate(labels)}
    parents = np.zeros((len(labels), len(labels)), dtype=bool)
    for child, parent_labels in edges.items():
        for parent in parent_labels:
            parents[index[child], index[parent]] = True
    return parents


def _assert_graph(labels, parents, edges, expected_labels=None):
    if expected_labels is not None:
        assert labels == expected_labels
    assert parents.dtype == bool and parents.shape == (len(labels), len(labels))
    expected = _expected(labels, edges)
    missing = [(labels[i], labels[j]) for i, j in zip(*np.nonzero(expected & ~parents))]
    extra = [(labels[i], labels[j]) for i, j in zip(*np.nonzero(parents & ~expected))]
    assert not missing and not extra, f"missing (child, parent): {missing}; extra: {extra}"


def _vector(name, n):
    return [f"{name}[{i}]" for i in range(n)]


# --- models -------------------------------------------------------------------------------


def linear_gaussian():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([10]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.1).to_event(1))


def tree():
    theta0 = numpyro.sample("theta0", dist.Normal(0, 1))
    theta1 = numpyro.sample("theta1", dist.Normal(theta0, 1))
    theta2 = numpyro.sample("theta2", dist.Normal(theta0, 1))
    numpyro.sample("x1", dist.Normal(jnp.sin(theta1) ** 2, 0.2))
    numpyro.sample("x2", dist.Normal(0.1 * theta1**2, 0.2))
    numpyro.sample("x3", dist.Normal(0.1 * theta2**2, 0.6))
    numpyro.sample("x4", dist.Normal(jnp.cos(theta2) ** 2, 0.1))


def hmm_loop(num_steps=10):
    theta = 0.0
    for i in range(num_steps):
        theta = numpyro.sample(f"theta{i}", dist.Normal(theta, 0.5))
        numpyro.sample(f"x{i}", dist.Normal(theta**2, 0.5))


def hmm_scan(num_steps=10):
    def step(previous, _):
        theta = numpyro.sample("theta", dist.Normal(previous, 0.5))
        numpyro.sample("x", dist.Normal(theta**2, 0.5))
        return theta, None

    scan(step, 0.0, None, length=num_steps)


def slcp():
    theta = numpyro.sample("theta", dist.Uniform(-3, 3).expand([5]).to_event(1))
    scale1, scale2, rho = theta[2] ** 2, theta[3] ** 2, jnp.tanh(theta[4])
    covariance = jnp.array(
        [[scale1**2, rho * scale1 * scale2], [rho * scale1 * scale2, scale2**2]]
    )
    block = dist.MultivariateNormal(theta[:2], covariance)
    numpyro.sample("x", block.expand([4]).to_event(1))


def hierarchical():
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    with numpyro.plate("groups", 3, dim=-1):
        group_mean = numpyro.sample("m", dist.Normal(mu, tau))
        with numpyro.plate("units", 2, dim=-2):
            numpyro.sample("x", dist.Normal(group_mean, 1))


def with_deterministic():
    with numpyro.plate("p", 3):
        theta = numpyro.sample("theta", dist.Normal(0, 1))
    shifted = numpyro.deterministic("shifted", 2 * theta + 1)
    reversed_ = numpyro.deterministic("reversed", shifted[::-1])
    with numpyro.plate("p", 3):
        numpyro.sample("x", dist.Normal(reversed_, 1))


def two_moons():
    theta = numpyro.sample("theta", dist.Uniform(-1, 1).expand([2]).to_event(1))
    angle = numpyro.sample("a", dist.Uniform(-jnp.pi / 2, jnp.pi / 2))
    radius = numpyro.sample("r", dist.Normal(0.1, 0.01))
    mean = jnp.stack([
        radius * jnp.cos(angle) + 0.25 - jnp.abs(theta[0] + theta[1]) / jnp.sqrt(2.0),
        radius * jnp.sin(angle) + (-theta[0] + theta[1]) / jnp.sqrt(2.0),
    ])
    numpyro.sample("x", dist.Normal(mean, 1e-3).to_event(1))


def poisson_observation():
    with numpyro.plate("p", 3):
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        numpyro.sample("x", dist.Poisson(jnp.exp(theta)))


def plate_sum():
    with numpyro.plate("p", 4):
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        numpyro.sample("x", dist.Normal(theta.sum(), 1))


def discrete_parent():
    z = numpyro.sample("z", dist.Bernoulli(0.5).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta * (1 + z), 1).to_event(1))


def non_differentiable():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
    loc = jnp.stack([
        jnp.floor(3 * theta[0]),
        jax.lax.stop_gradient(theta[1]),
        jnp.where(theta[2] > 0, 1.0, -1.0),
    ])
    numpyro.sample("x", dist.Normal(loc, 1).to_event(1))


def observed_factor_auxiliary():
    a = numpyro.sample("a", dist.Normal(0, 1))
    b = numpyro.sample("b", dist.Normal(0, 1))
    c = numpyro.sample("c", dist.Normal(0, 1))
    numpyro.sample("y", dist.Normal(a + b, 1), obs=1.0)  # couples a and b
    numpyro.factor("penalty", -((b - c) ** 2))  # couples b and c
    helper = numpyro.sample("helper", dist.Normal(a, 1), infer={"is_auxiliary": True})
    numpyro.sample("d", dist.Normal(helper, 1))


# --- graphs against hand-derived ones ----------------------------------------------------


def test_linear_gaussian(rng_key):
    labels, parents = element_parents(linear_gaussian, rng_key=rng_key)
    edges = {f"x[{i}]": [f"theta[{i}]"] for i in range(10)}
    _assert_graph(labels, parents, edges, _vector("theta", 10) + _vector("x", 10))


def test_tree(rng_key):
    labels, parents = element_parents(tree, rng_key=rng_key)
    edges = {"theta1": ["theta0"], "theta2": ["theta0"], "x1": ["theta1"],
             "x2": ["theta1"], "x3": ["theta2"], "x4": ["theta2"]}
    _assert_graph(labels, parents, edges, ["theta0", "theta1", "theta2", "x1", "x2", "x3", "x4"])


def test_hmm_python_loop(rng_key):
    labels, parents = element_parents(hmm_loop, rng_key=rng_key)
    edges = {f"x{i}": [f"theta{i}"] for i in range(10)}
    edges.update({f"theta{i}": [f"theta{i - 1}"] for i in range(1, 10)})
    _assert_graph(labels, parents, edges, [f"{n}{i}" for i in range(10) for n in ("theta", "x")])


def test_hmm_scan(rng_key):
    labels, parents = element_parents(hmm_scan, rng_key=rng_key)
    edges = {f"x[{i}]": [f"theta[{i}]"] for i in range(10)}
    edges.update({f"theta[{i}]": [f"theta[{i - 1}]"] for i in range(1, 10)})
    _assert_graph(labels, parents, edges, _vector("theta", 10) + _vector("x", 10))


def test_slcp_blocks_depend_on_all_theta_and_link_within(rng_key):
    labels, parents = element_parents(slcp, rng_key=rng_key)
    theta = _vector("theta", 5)
    edges = {}
    for block in range(4):
        edges[f"x[{block},0]"] = theta
        edges[f"x[{block},1]"] = theta + [f"x[{block},0]"]
    _assert_graph(labels, parents, edges, theta + [f"x[{b},{k}]" for b in range(4) for k in range(2)])


def test_nested_plates(rng_key):
    labels, parents = element_parents(hierarchical, rng_key=rng_key)
    edges = {f"m[{g}]": ["mu", "tau"] for g in range(3)}
    edges.update({f"x[{u},{g}]": [f"m[{g}]"] for u in range(2) for g in range(3)})
    expected_labels = ["mu", "tau"] + _vector("m", 3) + [f"x[{u},{g}]" for u in range(2) for g in range(3)]
    _assert_graph(labels, parents, edges, expected_labels)


def test_edges_pass_through_deterministic_sites(rng_key):
    labels, parents = element_parents(with_deterministic, rng_key=rng_key)
    edges = {f"x[{i}]": [f"theta[{2 - i}]"] for i in range(3)}
    _assert_graph(labels, parents, edges, _vector("theta", 3) + _vector("x", 3))


def test_excluded_noise_is_marginalised(rng_key):
    labels, parents = element_parents(two_moons, exclude_sites=["a", "r"], rng_key=rng_key)
    theta = _vector("theta", 2)
    edges = {"x[0]": theta, "x[1]": theta + ["x[0]"]}
    _assert_graph(labels, parents, edges, theta + ["x[0]", "x[1]"])
    # kept as tokens, the noise sites are ordinary parents
    labels, parents = element_parents(two_moons, rng_key=rng_key)
    edges = {"x[0]": theta + ["a", "r"], "x[1]": theta + ["a", "r"]}
    _assert_graph(labels, parents, edges, theta + ["a", "r", "x[0]", "x[1]"])


def test_token_sites_choose_and_order_tokens(rng_key):
    labels, parents = element_parents(two_moons, token_sites=["x", "theta"], rng_key=rng_key)
    theta = _vector("theta", 2)
    _assert_graph(labels, parents, {"x[0]": theta, "x[1]": theta + ["x[0]"]}, ["x[0]", "x[1]"] + theta)


def test_poisson_child_is_element_wise(rng_key):
    labels, parents = element_parents(poisson_observation, rng_key=rng_key)
    _assert_graph(labels, parents, {f"x[{i}]": [f"theta[{i}]"] for i in range(3)})


def test_sum_over_plate_links_every_element(rng_key):
    labels, parents = element_parents(plate_sum, rng_key=rng_key)
    _assert_graph(labels, parents, {f"x[{i}]": _vector("theta", 4) for i in range(4)})


def test_discrete_parent_falls_back_to_site_level(rng_key):
    labels, parents = element_parents(discrete_parent, rng_key=rng_key)
    edges = {f"x[{i}]": ["z[0]", "z[1]", f"theta[{i}]"] for i in range(2)}
    _assert_graph(labels, parents, edges, _vector("z", 2) + _vector("theta", 2) + _vector("x", 2))


def test_non_differentiable_paths_are_found(rng_key):
    labels, parents = element_parents(non_differentiable, rng_key=rng_key)
    _assert_graph(labels, parents, {f"x[{i}]": [f"theta[{i}]"] for i in range(3)})


def test_observed_factor_and_auxiliary_sites(rng_key):
    labels, parents = dependency_matrix(observed_factor_auxiliary)
    # observed y and the factor marry their parents; the auxiliary helper is marginalised
    _assert_graph(labels, parents, {"b": ["a"], "c": ["b"], "d": ["a"]}, ["a", "b", "c", "d"])


def test_dependency_matrix_passes_model_arguments():
    labels, parents = dependency_matrix(hmm_loop, 3)
    edges = {"theta1": ["theta0"], "theta2": ["theta1"], "x0": ["theta0"], "x1": ["theta1"], "x2": ["theta2"]}
    _assert_graph(labels, parents, edges, ["theta0", "x0", "theta1", "x1", "theta2", "x2"])


def test_deterministic_given_key(rng_key):
    first = element_parents(tree, rng_key=rng_key, num_draws=2)
    second = element_parents(tree, rng_key=rng_key, num_draws=2)
    assert first[0] == second[0] and np.array_equal(first[1], second[1])


class _Untraceable(dist.Normal):
    """A log-density that only works on concrete values, so the Jacobian route fails."""

    def log_prob(self, value):
        float(jnp.sum(self.loc))
        return super().log_prob(value)


def untraceable():
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", _Untraceable(theta[::-1], 1).to_event(1))


def test_failing_site_falls_back_to_site_level_with_warning(rng_key):
    with pytest.warns(UserWarning, match="'x'"):
        labels, parents = element_parents(untraceable, rng_key=rng_key)
    edges = {f"x[{i}]": _vector("theta", 2) for i in range(2)}
    expected = _expected(labels, edges)
    assert np.all(parents[expected]), "a site-level fallback must keep every true edge"
    assert not parents[:2].any(), "theta has no parents"


# --- multivariate events -------------------------------------------------------------------


def slcp_flat():
    """sbibm's SLCP as one 8-d event: a block-diagonal covariance (the task module's form)."""
    theta = numpyro.sample("theta", dist.Uniform(-3, 3).expand([5]).to_event(1))
    scale1, scale2, rho = theta[2] ** 2, theta[3] ** 2, jnp.tanh(theta[4])
    tril = jnp.array([[scale1, 0.0], [rho * scale2, jnp.sqrt(1 - rho**2) * scale2]])
    numpyro.sample("x", dist.MultivariateNormal(jnp.tile(theta[:2], 4), scale_tril=jnp.kron(jnp.eye(4), tril)))


def test_block_diagonal_event_splits_into_independent_blocks(rng_key):
    labels, parents = element_parents(slcp_flat, rng_key=rng_key)
    theta = _vector("theta", 5)
    edges = {f"x[{i}]": theta + ([f"x[{i - 1}]"] if i % 2 else []) for i in range(8)}
    _assert_graph(labels, parents, edges, theta + _vector("x", 8))


def test_dense_covariance_keeps_the_event_one_clique(rng_key):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        covariance = 0.5 * jnp.eye(3) + 0.5  # every pair correlated
        numpyro.sample("x", dist.MultivariateNormal(theta * jnp.ones(3), covariance))

    labels, parents = element_parents(model, rng_key=rng_key)
    edges = {f"x[{i}]": ["theta"] + _vector("x", i) for i in range(3)}
    _assert_graph(labels, parents, edges, ["theta"] + _vector("x", 3))


class _AbsCoupled(dist.Distribution):
    """Real 2-vector whose elements are coupled only through ``|x0 - x1|``: the Hessian of
    its log-density is zero almost everywhere, yet x0 and x1 are dependent."""

    support = dist.constraints.real_vector

    def __init__(self, loc):
        super().__init__(batch_shape=jnp.shape(loc)[:-1], event_shape=(2,))
        self.loc = loc

    def sample(self, key, sample_shape=()):
        return self.loc + jax.random.normal(key, sample_shape + self.batch_shape + (2,))

    def log_prob(self, value):
        return -jnp.sum((value - self.loc) ** 2, -1) - jnp.abs(value[..., 0] - value[..., 1])


def test_coupling_without_derivative_keeps_the_edge(rng_key):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        numpyro.sample("x", _AbsCoupled(theta * jnp.ones(2)))

    labels, parents = element_parents(model, rng_key=rng_key)
    _assert_graph(labels, parents, {"x[0]": ["theta"], "x[1]": ["theta", "x[0]"]}, ["theta", "x[0]", "x[1]"])


def test_simplex_event_stays_one_clique(rng_key):
    def model():
        concentration = numpyro.sample("c", dist.LogNormal(0, 1))
        numpyro.sample("p", dist.Dirichlet(concentration * jnp.ones(3)))  # diagonal Hessian

    labels, parents = element_parents(model, rng_key=rng_key)
    edges = {f"p[{i}]": ["c"] + _vector("p", i) for i in range(3)}
    _assert_graph(labels, parents, edges, ["c"] + _vector("p", 3))


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token_sites": ["theta", "nope"]}, "'nope'.*not a site"),
        ({"exclude_sites": ["y"]}, "'y'.*observed"),
        ({"exclude_sites": ["s"]}, "'s'.*deterministic"),
        ({"token_sites": ["theta", "theta"]}, "more than once"),
        ({"exclude_sites": ["theta"], "token_sites": ["theta"]}, "No token is left"),
        ({"num_draws": 0}, "num_draws"),
    ],
)
def test_clear_errors(kwargs, message):
    def model():
        theta = numpyro.sample("theta", dist.Normal(0, 1))
        numpyro.deterministic("s", 2 * theta)
        numpyro.sample("y", dist.Normal(theta, 1), obs=0.5)

    with pytest.raises(ValueError, match=message):
        element_parents(model, **kwargs)


def large_elementwise():  # more than _MAX_ROWS terms and latent elements: the chunked probe
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
    index = np.arange(700) % 3
    step = jnp.where(theta[index] > 0, 1.0, -1.0)  # no derivative: found by perturbation only
    tiny = 1e-30 * theta[(index + 1) % 3]  # below rounding: found by the derivative only
    numpyro.sample("x", dist.Normal(jnp.where(np.arange(700) % 2 == 0, theta[index], step + tiny), 1.0))


def large_events():  # more latent elements than terms: the chunked reverse-mode Jacobian
    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([3]).to_event(1))
    loc = jnp.stack([theta[np.arange(600) % 3], jnp.zeros(600)], axis=-1)
    numpyro.sample("x", dist.MultivariateNormal(loc, jnp.eye(2)))


def test_large_sites_give_the_exact_graph(rng_key):
    labels, parents = element_parents(large_elementwise, rng_key=rng_key)
    edges = {f"x[{i}]": [f"theta[{i % 3}]"] + [f"theta[{(i + 1) % 3}]"] * (i % 2) for i in range(700)}
    _assert_graph(labels, parents, edges,
                  _vector("theta", 3) + _vector("x", 700))


@pytest.mark.parametrize("model", [large_elementwise, large_events])
def test_chunked_probe_finds_what_the_whole_probe_finds(rng_key, model, monkeypatch):
    labels, chunked = element_parents(model, rng_key=rng_key)
    monkeypatch.setattr(graph_module, "_MAX_ROWS", 10**6)  # every copy and basis vector at once
    whole_labels, whole = element_parents(model, rng_key=rng_key)
    assert whole_labels == labels
    np.testing.assert_array_equal(chunked, whole)
    if model is large_events:  # x[i, 0] <- theta[i % 3]; x[i, 1] <- x[i, 0] within its event
        assert chunked[labels.index("x[5,0]"), labels.index("theta[2]")]
        assert chunked[labels.index("x[5,1]"), labels.index("x[5,0]")]
        assert chunked[labels.index("x[5,0]")].sum() == 1 and chunked[labels.index("x[5,1]")].sum() == 2


# --- attention masks ---------------------------------------------------------------------


def test_undirected_mask_is_the_moral_graph():
    # v-structure a -> c <- b, and c -> d
    parents = _expected(["a", "b", "c", "d"], {"c": ["a", "b"], "d": ["c"]})
    mask = attention_mask(parents)
    assert mask.dtype == bool and np.all(np.diag(mask))
    assert mask[0, 1] and mask[1, 0], "co-parents a, b must see each other"
    assert mask[2, 0] and mask[0, 2] and mask[3, 2] and mask[2, 3]
    assert not mask[0, 3] and not mask[3, 1]
    np.testing.assert_array_equal(mask, mask.T)


def test_sparse_and_dense_moral_graphs_agree():
    rng = np.random.default_rng(0)
    for density in (0.002, 0.2):  # either side of the switch to sparse products
        parents = np.tril(rng.random((400, 400)) < density, -1)
        graph = (parents | np.eye(400, dtype=bool)).astype(np.int64)
        expected = (graph | graph.T | (graph.T @ graph > 0)).astype(bool)
        np.testing.assert_array_equal(attention_mask(parents), expected)


def test_directed_dense_and_callable_masks():
    parents = _expected(["a", "b", "c"], {"c": ["a", "b"]})
    np.testing.assert_array_equal(attention_mask(parents, "directed"), parents | np.eye(3, dtype=bool))
    assert attention_mask(parents, "dense").all()
    custom = attention_mask(parents, lambda graph: graph.T)
    np.testing.assert_array_equal(custom, parents.T | np.eye(3, dtype=bool))


def test_mask_errors():
    with pytest.raises(ValueError, match="undirected.*directed.*dense"):
        attention_mask(np.zeros((2, 2), bool), "moral")
    with pytest.raises(ValueError, match="square"):
        attention_mask(np.zeros((2, 3), bool))


def test_plot_dependencies_runs_with_agg():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from numpyro_simformer.plot import plot_dependencies

    labels = ["a", "b", "c"]
    parents = _expected(labels, {"c": ["a", "b"]})
    ax = plot_dependencies(labels, attention_mask(parents), title="moral graph")
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert ax.get_title() == "moral graph"
    with pytest.raises(ValueError, match="3 labels"):
        plot_dependencies(labels, np.zeros((2, 2), bool))
    plt.close(ax.figure)


def test_dependency_matrix_is_exported_at_the_top_level():
    import numpyro_simformer
    from numpyro_simformer.model import graph

    assert numpyro_simformer.dependency_matrix is graph.dependency_matrix


def test_draws_with_nan_do_not_fake_edges_or_cycles():
    # x's density is NaN wherever theta < 0; such a draw's NaN step once leaked into every
    # coordinate, giving theta <- x and a "cyclic graph" warning
    def sometimes_nan():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        numpyro.sample("x", dist.Normal(jnp.log(theta), 1.0).to_event(1))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for seed in range(3):
            labels, parents = element_parents(sometimes_nan, rng_key=jax.random.key(seed), num_draws=8)
            assert labels == ["theta[0]", "theta[1]", "x[0]", "x[1]"]
            np.testing.assert_array_equal(parents, [[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
