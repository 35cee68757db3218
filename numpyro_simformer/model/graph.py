"""Element-level dependency graph of a NumPyro model, and the attention masks built from it.

The Simformer gives one token per scalar element of the model's latent sample sites. This
module finds each token's direct parents from the model itself (notes, section 6):

1. Trace the model ``num_draws`` times from its prior.
2. Write each sample site's log-density as one term per independent event: ``to_event``,
   ``expand`` and ``mask`` are peeled off, so ``Normal(theta, 1).to_event(1)`` gives a term
   per element and a ``MultivariateNormal`` one per event. An event's elements form a
   lower-triangular clique (later <- earlier), split into independent blocks where its
   density on R^n is a sum over disjoint blocks (a block-diagonal covariance, say).
3. Jacobian sparsity of the terms with respect to every continuous latent element (a term's
   own event held fixed), OR-ed over the draws, gives the differentiable edges; moving each
   element by a large amount (vmapped) and seeing which terms change catches
   non-differentiable paths (``floor``, ``stop_gradient``, ``where``).
4. A sample-only :class:`~numpyro_simformer.model.simulator.Simulator` site has no log-density:
   its terms are its output elements, and their edges compose two parts: which latent
   elements move the simulator's inputs (step 3, applied to the inputs) and which inputs
   move which outputs with the noise held fixed (:meth:`Simulator.dependence`). Noise that
   output elements of one simulation share (read from a JAX function's random draws by
   :meth:`Simulator.noise_links`, or stated with ``shared_noise``; all of them where it
   cannot be read) is a hidden parent, marginalised by arc reversal like any non-token site.
5. Discrete parents and sites that cannot be traced get conservative site-level edges found
   by NumPyro's provenance tracking. A missing edge is a wrong answer; an extra one costs speed.
6. Parents of an ``obs=`` or ``numpyro.factor`` site are married; latent non-token sites
   (excluded noise, auxiliary, improper) are marginalised out by arc reversal.
"""

from __future__ import annotations

import functools
import heapq
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import init_to_uniform
from numpyro.ops.provenance import eval_provenance

from numpyro_simformer.model.noise import changed_beyond_rounding, gram_nonzero
from numpyro_simformer.model.simulator import Simulator

__all__ = ["attention_mask", "dependency_matrix", "element_parents"]

_MASK_KINDS = ("undirected", "directed", "dense")
_PEELED = (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)
# XLA compile time grows with program size; a Python loop writing many sample sites runs
# faster op by op (measured on 2 CPU cores: 60 sites, 10 s eager against 19 s jitted).
_JIT_MAX_SITES = 32
# The probe runs once, so compile it fast rather than run it fast (30% less time measured).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
_MAX_ROWS = 512  # perturbed copies of the model evaluated at once
_MAX_EVENT_SITE = 512  # larger multivariate sites keep each event one clique
# Log-densities computed in a batch may differ in their last bits from one copy to the
# next; a change below this many machine epsilons (relative) is rounding, not an edge.
_ROUNDING_EPS = 256


class _Site(NamedTuple):
    name: str
    shape: tuple[int, ...]  # shape of the value
    term_shape: tuple[int, ...]  # shape of its log-density terms (one per independent event)
    observed: bool
    discrete: bool
    default_token: bool  # latent, not auxiliary, not improper
    control_flow: bool  # recorded by numpyro.contrib.control_flow (scan / cond)
    offset: int  # first index among all latent elements; -1 when observed
    free_event: bool  # event support is all of R^n (independent real), not a simplex etc.
    simulator: bool = False  # a sample-only Simulator: one term per output element

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def event_size(self) -> int:
        return self.size // max(math.prod(self.term_shape), 1)


def _peel(fn: dist.Distribution) -> dist.Distribution:
    while isinstance(fn, _PEELED):
        fn = fn.base_dist
    return fn


def _labels(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _prior_draws(model: Callable, args: tuple, kwargs: dict, rng_key, num_draws: int):
    """Sites, site types and latent values ``{name: (num_draws, *shape)}`` of prior draws.

    One jitted, vmapped call (one compile beats compiling every small op eagerly); models
    that need concrete values (a Python ``if`` on a sample) are traced eagerly instead.
    """

    def improper_init(msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            if isinstance(_peel(msg["fn"]), dist.ImproperUniform):
                return init_to_uniform(msg)
        return None

    record = {}

    def draw(key):
        trace = handlers.trace(
            handlers.substitute(handlers.seed(model, key), substitute_fn=improper_init)
        ).get_trace(*args, **kwargs)
        record["sites"] = _collect_sites(trace)
        record["types"] = {name: msg["type"] for name, msg in trace.items()}
        return {s.name: trace[s.name]["value"] for s in record["sites"] if not s.observed}

    keys = jax.random.split(rng_key, num_draws)
    try:
        traced = jax.jit(jax.vmap(draw), compiler_options=_FAST_COMPILE).trace(keys)
        run = traced.lower().compile() if len(record["sites"]) <= _JIT_MAX_SITES else jax.vmap(draw)
        values = run(keys)
    except Exception:  # noqa: BLE001 - needs concrete values
        values = [draw(key) for key in keys]
        values = {name: np.stack([v[name] for v in values]) for name in values[0]}
    return record["sites"], record["types"], {k: np.asarray(v) for k, v in values.items()}


def _finite_draws(draws: dict) -> dict:
    """The draws whose every latent value is finite (a NaN draw fakes edges); all if none is."""
    if not draws:
        return draws
    num = len(next(iter(draws.values())))
    finite = np.ones(num, dtype=bool)
    for value in draws.values():
        finite &= np.all(np.isfinite(np.reshape(value, (num, -1))), axis=1)
    if finite.all() or not finite.any():
        return draws
    return {name: value[finite] for name, value in draws.items()}


def _collect_sites(trace: dict) -> list[_Site]:
    sites, offset = [], 0  # offset: running count of latent elements
    for name, msg in trace.items():
        if msg["type"] != "sample":
            continue
        fn, value = msg["fn"], msg["value"]
        base, shape = _peel(fn), tuple(jnp.shape(value))
        batch_shape = shape[: len(shape) - min(base.event_dim, len(shape))]
        observed = bool(msg["is_observed"])
        simulator = isinstance(base, Simulator)
        term_shape = shape if simulator else batch_shape
        if observed and not simulator:  # an observation may be broadcast against a larger batch
            try:
                term_shape = jnp.broadcast_shapes(jnp.shape(base.log_prob(value)), batch_shape)
            except Exception:  # noqa: BLE001 - reported later as a site-level fallback
                pass
        discrete = fn.is_discrete or not jnp.issubdtype(jnp.result_type(value), jnp.floating)
        auxiliary = (msg.get("infer") or {}).get("is_auxiliary", False)
        default_token = not (observed or auxiliary or isinstance(base, dist.ImproperUniform))
        control_flow = bool(msg.get("_control_flow_done", False))
        support = base.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        free_event = base.event_dim > 0 and support is constraints.real
        sites.append(_Site(name, shape, tuple(term_shape), observed, bool(discrete),
                           default_token, control_flow, -1 if observed else offset, free_event, simulator))
        offset += 0 if observed else math.prod(shape)
    return sites


def _resolve_tokens(
    types: dict[str, str], sites: list[_Site], token_sites: Sequence[str] | None, exclude_sites: Sequence[str]
) -> list[str]:
    latent = [s.name for s in sites if not s.observed]

    def check(name: Any, argument: str) -> None:
        if name in latent:
            return
        if not isinstance(name, str):
            raise ValueError(f"`{argument}` must hold site names (str); received {name!r}.")
        if types.get(name) == "sample":
            reason = "is observed (given with `obs=`), so its value is fixed data, not a token"
            fix = "drop it from the list, or remove `obs=` from the model"
        elif name in types:
            reason = f"is a {types[name]} site, not a sample site"
            fix = "only latent sample sites can be tokens; list the sample sites it is computed from"
        else:
            reason, fix = "is not a site of the model", "check the spelling"
        raise ValueError(
            f"`{argument}` names site {name!r}, which {reason}; {fix}. "
            f"Latent sample sites of this model: {latent}."
        )

    chosen = [s.name for s in sites if s.default_token] if token_sites is None else list(token_sites)
    for name in chosen:
        check(name, "token_sites")
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ValueError(f"`token_sites` lists {duplicates} more than once; list each site once.")
    for name in exclude_sites:
        check(name, "exclude_sites")
    tokens = [name for name in chosen if name not in set(exclude_sites)]
    if not tokens or all(math.prod(next(s.shape for s in sites if s.name == n)) == 0 for n in tokens):
        raise ValueError(
            f"No token is left: token_sites={chosen}, exclude_sites={list(exclude_sites)}. "
            f"Keep at least one non-empty latent sample site as a token (latent sites: {latent})."
        )
    return tokens


def _log_density_terms(
    model: Callable, args: tuple, kwargs: dict, sites: list[_Site], values: dict, failed: dict,
    simulator_inputs: dict | None = None,
) -> dict[str, jax.Array]:
    """One log-density term per independent event of every sample site, flattened.

    A Simulator site has no log-density: its terms are zeros that carry the provenance of
    its inputs, and its inputs are written to ``simulator_inputs`` when given.
    """
    trace = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=values)).get_trace(
        *args, **kwargs
    )
    terms = {}
    for site in sites:
        size = math.prod(site.term_shape)
        try:
            msg = trace[site.name]
            if site.simulator:
                inputs = _peel(msg["fn"]).flat_inputs()
                if simulator_inputs is not None:
                    simulator_inputs[site.name] = inputs
                terms[site.name] = jnp.broadcast_to(0.0 * jnp.sum(inputs), (size,))
                continue
            log_prob = _peel(msg["fn"]).log_prob(msg["value"])
            terms[site.name] = jnp.broadcast_to(log_prob, site.term_shape).reshape(size)
        except Exception as error:  # noqa: BLE001 - this site falls back to site-level edges
            failed.setdefault(site.name, f"{type(error).__name__}: {error}")
            terms[site.name] = jnp.zeros(size)
    return terms


def _probe(model, args, kwargs, sites, draws: dict, rng_key, failed: dict) -> tuple[np.ndarray, dict]:
    """Element edges found by Jacobians and perturbations: ``(term_edges, input_edges)``.

    ``term_edges`` is (num_terms, num_latent) bool; ``input_edges`` is ``{simulator site:
    (num_inputs, num_latent) bool}``, which latent elements move each Simulator's inputs.
    """
    latent = [s for s in sites if not s.observed]
    num_terms = sum(math.prod(s.term_shape) for s in sites)
    continuous = [s for s in latent if not s.discrete and s.size > 0]
    starts = np.cumsum([0] + [s.size for s in continuous])
    slices = {s.name: slice(start, start + s.size) for s, start in zip(continuous, starts)}
    columns = np.concatenate([np.arange(s.offset, s.offset + s.size) for s in continuous] or [[]])
    edges = np.zeros((num_terms, sum(s.size for s in latent)), dtype=bool)
    if not continuous:
        return edges, {}
    dtype = jnp.result_type(float)
    num_draws = len(next(iter(draws.values())))
    z = np.concatenate([draws[s.name].reshape(num_draws, -1) for s in continuous], axis=1)
    z = z.astype(dtype)
    discrete = {s.name: draws[s.name] for s in latent if s.discrete}

    simulators = [s.name for s in sites if s.simulator]

    def terms_fn(flat, discrete_values):  # log-density terms, then every Simulator's inputs
        values = {s.name: flat[slices[s.name]].reshape(s.shape) for s in continuous}
        inputs: dict[str, jax.Array] = {}
        terms = _log_density_terms(model, args, kwargs, sites, {**values, **discrete_values}, failed, inputs)
        return jnp.concatenate([terms[s.name] for s in sites] + [inputs.get(n, jnp.zeros(0)) for n in simulators])

    def changed_fn(flat, discrete_values, delta):  # delta: (2, num_continuous)
        size = flat.shape[0]
        if size > _MAX_ROWS:  # bound memory: build and compare the moved copies a chunk at a time
            base = terms_fn(flat, discrete_values)

            def changed(index):
                # .at[].add, not a product: a non-finite step must not reach the other coordinates
                moved = jax.vmap(lambda step: terms_fn(flat.at[index].add(step), discrete_values))(delta[:, index])
                return jnp.any(changed_beyond_rounding(moved, base), axis=0)

            return jax.lax.map(changed, jnp.arange(size), batch_size=_MAX_ROWS // 2).T
        # where, not a product: a non-finite step must not reach the other coordinates
        moved = flat[None, None] + jnp.where(jnp.eye(size, dtype=bool)[None], delta[:, :, None], 0.0)
        rows = jnp.concatenate([flat[None], moved.reshape(2 * size, size)])
        terms = jax.vmap(terms_fn, in_axes=(0, None))(rows, discrete_values)
        base, moved_terms = terms[0], terms[1:].reshape(2, size, -1)
        return jnp.any(changed_beyond_rounding(moved_terms, base), axis=0).T

    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    seed = np.asarray(rng_key).ravel()
    magnitude = np.random.default_rng(seed).uniform(1.0, 3.0, size=(num_draws, 2, z.shape[1]))
    delta = (magnitude * (1.0 + np.abs(z))[:, None] * np.array([1.0, -1.0])[:, None]).astype(dtype)
    input_sizes: dict[str, int] = {}
    if simulators:

        def inputs_fn(values):
            inputs: dict[str, jax.Array] = {}
            _log_density_terms(model, args, kwargs, sites, values, {}, inputs)
            return inputs

        try:
            shapes = jax.eval_shape(inputs_fn, {name: value[0] for name, value in draws.items()})
        except Exception as error:  # noqa: BLE001 - these sites fall back to site-level edges
            shapes = {}
            for name in simulators:
                failed.setdefault(name, f"its inputs could not be traced ({type(error).__name__}: {error})")
        input_sizes = {n: shapes[n].shape[0] if n in shapes else 0 for n in simulators}
    num_rows = num_terms + sum(input_sizes.values())
    edges = np.zeros((num_rows, edges.shape[1]), dtype=bool)
    jacobians = (jax.jacfwd, jax.jacrev) if z.shape[1] <= num_rows else (jax.jacrev, jax.jacfwd)
    # A Jacobian with more than _MAX_ROWS rows and columns (a site of thousands of elements
    # that are each a term) is built in chunks, one draw at a time: held whole and for every
    # draw at once, with its basis vectors, it took 3.9 GB at 10,002 elements.
    large = min(z.shape[1], num_rows) > _MAX_ROWS
    if large:
        jacobians = tuple(functools.partial(_chunked_jacobian, forward=j is jax.jacfwd) for j in jacobians)
    use_jit = len(sites) <= _JIT_MAX_SITES
    # the large probe's run time outgrows its compile time: optimise it (6.7 s against 12.7 s)
    attempts = [(jacobians[0], None if large else _FAST_COMPILE)] * use_jit + [(j, None) for j in jacobians]
    error = None
    for jacobian, options in attempts:

        def edges_fn(flat, discrete_values, delta, jacobian=jacobian):
            nonzero = jacobian(terms_fn)(flat, discrete_values) != 0
            return nonzero | changed_fn(flat, discrete_values, delta)

        run = edges_fn if large else jax.vmap(edges_fn)
        run = jax.jit(run, compiler_options=options) if use_jit else run
        try:
            if large:
                found = np.zeros((num_rows, z.shape[1]), dtype=bool)
                for draw in range(len(z)):
                    found |= np.asarray(run(z[draw], {n: v[draw] for n, v in discrete.items()}, delta[draw]))
                edges[:, columns] = found
            else:
                edges[:, columns] = np.asarray(jnp.any(run(z, discrete, delta), axis=0))
            break
        except Exception as caught:  # noqa: BLE001 - the whole model falls back below
            error = caught
    else:
        for site in sites:
            failed.setdefault(site.name, f"the model could not be traced ({type(error).__name__}: {error})")
    input_starts = np.cumsum([num_terms] + [input_sizes[n] for n in simulators])
    input_edges = {n: edges[start : start + input_sizes[n]] for n, start in zip(simulators, input_starts)}
    return edges[:num_terms], input_edges


def _chunked_jacobian(fn: Callable, *, forward: bool) -> Callable:
    """Where ``jax.jacfwd(fn)`` or ``jax.jacrev(fn)`` (argument 0) is not zero, as bool.

    Built from _MAX_ROWS basis vectors at a time, and compared with zero chunk by chunk.
    """

    def jacobian(x, *rest):
        if forward:
            def column(index):
                return jax.jvp(lambda y: fn(y, *rest), (x,), (jnp.zeros_like(x).at[index].set(1.0),))[1] != 0

            return jax.lax.map(column, jnp.arange(x.shape[0]), batch_size=_MAX_ROWS).T
        out, pullback = jax.vjp(lambda y: fn(y, *rest), x)

        def row(index):
            return pullback(jnp.zeros_like(out).at[index].set(1.0))[0] != 0

        return jax.lax.map(row, jnp.arange(out.shape[0]), batch_size=_MAX_ROWS)

    return jacobian


def _simulator_edges(
    model, args, kwargs, sites, draws: dict, rng_key, failed: dict, term_edges: np.ndarray, input_edges: dict
) -> dict[str, np.ndarray]:
    """Write the edges of every Simulator site's output elements into ``term_edges``.

    An output element's parents are the latent elements that move an input it depends on:
    ``(outputs <- inputs)`` from :meth:`Simulator.dependence` at each prior draw (OR-ed),
    times ``(inputs <- latent elements)`` from the probe. Returns the groups of each
    Simulator site's elements that may share noise, ``{site: (size,) int labels}``: the
    connected components of its ``shared_noise`` within one simulation, never across
    simulations (each has its own key); one group for a site that cannot be read.
    """
    from scipy import sparse  # scipy comes with scikit-learn
    from scipy.sparse.csgraph import connected_components

    simulators = [s for s in sites if s.simulator]
    if not simulators:
        return {}
    num_draws = len(next(iter(draws.values()))) if draws else 1
    rows = dict(zip([s.name for s in sites], np.cumsum([0] + [math.prod(s.term_shape) for s in sites])))
    found: dict[str, np.ndarray] = {}
    links: dict[str, np.ndarray] = {}  # output elements of one simulation that share noise, OR-ed over draws
    for draw in range(num_draws):
        values = {name: value[draw] for name, value in draws.items()}
        try:  # eager: a Simulator's dependence runs the user's function on concrete inputs
            trace = handlers.trace(handlers.substitute(handlers.seed(model, 0), data=values)).get_trace(
                *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - these sites fall back to site-level edges
            for site in simulators:
                failed.setdefault(site.name, f"the model could not be run eagerly ({type(error).__name__}: {error})")
            break
        for site in simulators:
            simulator = _peel(trace[site.name]["fn"])
            try:
                shared, _ = simulator.noise_links(jax.random.fold_in(rng_key, num_draws + draw))
                links[site.name] = links.get(site.name, False) | shared
                if site.name in failed:
                    continue
                dependence = simulator.dependence(jax.random.fold_in(rng_key, draw))
                index = np.broadcast_to(
                    np.arange(dependence.shape[0]).reshape(simulator.batch_shape + simulator.event_shape), site.shape
                ).ravel()
                found[site.name] = found.get(site.name, False) | dependence[index]
            except Exception as error:  # noqa: BLE001 - this site falls back to site-level edges
                failed.setdefault(site.name, f"{type(error).__name__}: {error}")
    groups = {s.name: np.zeros(s.size, dtype=int) for s in simulators}
    for site in simulators:
        if site.name in links:
            if links[site.name].all():  # a NumPy simulator's: one group (dense csgraph input took seconds)
                num_groups, label = 1, np.zeros(len(links[site.name]), dtype=np.int32)
            else:
                num_groups, label = connected_components(sparse.csr_array(links[site.name]), directed=False)
            calls = site.size // len(label)
            groups[site.name] = (np.arange(calls)[:, None] * num_groups + label[None]).ravel()
        if site.name in failed or site.name not in found:
            continue
        from_inputs = input_edges.get(site.name)
        if from_inputs is None or from_inputs.shape[0] != found[site.name].shape[1]:
            failed.setdefault(site.name, "its inputs changed size between prior draws")
            continue
        composed = (found[site.name].astype(np.int32) @ from_inputs.astype(np.int32)) > 0
        term_edges[rows[site.name] : rows[site.name] + site.size] = composed
    return groups


def _share_noise(graph: np.ndarray, members: np.ndarray) -> None:
    """Marginalise a hidden noise shared by ``members`` (arc reversal, as in :func:`_marginalise`).

    Each member, in order, gains every earlier member and their parents. Members go in
    the order of how many parents they have outside the group, fewest first, then of those
    parents, then of position. So a noise-only output (a distractor) keeps no parameter
    among its parents and the informative members inherit the distractors; the graph stays
    as sparse as the order allows; and the order follows what each output depends on, not
    where the simulator put it: two outputs with the same role (the first coordinates of
    SLCP's pairs) get the same parents wherever they sit, and grouping can keep them in one
    token (:func:`~numpyro_simformer.tokens.grouping.group_tokens`).
    """
    outside = graph[members].copy()
    outside[:, members] = False
    order = sorted(range(len(members)), key=lambda index: (
        int(outside[index].sum()), tuple(np.flatnonzero(outside[index])), int(members[index])))
    running = np.zeros(len(graph), dtype=bool)
    for member in members[order]:
        graph[member] |= running
        running |= graph[member]
        running[member] = True


def _event_links(model, args, kwargs, sites, draws: dict, rng_key, failed: dict) -> dict[str, np.ndarray]:
    """Which elements of one multivariate event depend on each other: ``{site: (size, size)}``.

    A density on R^n that is a sum of functions of disjoint blocks of its elements makes the
    blocks independent. The blocks start as the connected components of the Hessian's
    sparsity, OR-ed over the draws (exact zeros: a block-diagonal covariance gives them);
    then two blocks whose large-step second difference ``f(x+a+b) - f(x+a) - f(x+b) + f(x)``
    is not zero beyond rounding are merged, which catches couplings with no derivative.
    Within a block every element stays linked. Only latent continuous sites whose event
    support is all of R^n and with at most ``_MAX_EVENT_SITE`` elements are refined: a
    simplex or an ordered vector couples its elements through the support itself.
    """
    from scipy.sparse.csgraph import connected_components  # scipy comes with scikit-learn

    dtype = jnp.result_type(float)
    tolerance = _ROUNDING_EPS * float(jnp.finfo(dtype).eps)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(rng_key)).ravel())
    links = {}
    for site in sites:
        if (site.observed or site.discrete or site.event_size < 2 or not site.free_event
                or site.size > _MAX_EVENT_SITE or site.name in failed):
            continue
        num_terms, event = math.prod(site.term_shape), site.event_size
        same_term = np.kron(np.eye(num_terms, dtype=bool), np.ones((event, event), dtype=bool))
        others = {name: value for name, value in draws.items() if name != site.name}
        local_failed: dict[str, str] = {}

        def log_density(flat, others, site=site, failed=local_failed):
            values = {**others, site.name: flat.reshape(site.shape)}
            return _log_density_terms(model, args, kwargs, [site], values, failed)[site.name].sum()

        z = draws[site.name].reshape(len(draws[site.name]), -1).astype(dtype)
        try:
            hessians = jax.jit(jax.vmap(jax.hessian(log_density)), compiler_options=_FAST_COMPILE)(z, others)
            linked = np.asarray(jnp.any(hessians != 0, axis=0)) & same_term
            _, block = connected_components(linked | linked.T, directed=False)
            steps = rng.uniform(1.0, 3.0, z.shape) * (1.0 + np.abs(z)) * rng.choice([-1.0, 1.0], z.shape)
            block_links = np.zeros((block.max() + 1,) * 2, dtype=bool)
            pairs = [(a, b) for a in range(block.max() + 1) for b in range(a)
                     if same_term[np.argmax(block == a), np.argmax(block == b)]]
            if pairs:
                f = jax.jit(jax.vmap(jax.vmap(log_density, in_axes=(0, None))), compiler_options=_FAST_COMPILE)
                member = (block[None, :] == np.arange(block.max() + 1)[:, None]).astype(dtype)
                both = np.stack([member[a] + member[b] for a, b in pairs])
                rows = np.concatenate([np.zeros((1, z.shape[1])), member, both])  # (rows, size)
                moved = np.asarray(f(z[:, None, :] + rows[None] * steps[:, None, :], others))
                base, single, double = moved[:, :1], moved[:, 1 : 1 + len(member)], moved[:, 1 + len(member) :]
                a, b = np.array(pairs).T
                with np.errstate(invalid="ignore"):  # -inf - -inf: a Delta, say
                    second = double - single[:, a] - single[:, b] + base
                    scale = np.abs(double) + np.abs(single[:, a]) + np.abs(single[:, b]) + np.abs(base)
                    coupled = ~(np.abs(second) <= tolerance * (1.0 + scale))  # NaN counts as coupled
                block_links[a[coupled.any(axis=0)], b[coupled.any(axis=0)]] = True
            _, merged = connected_components(block_links | block_links.T, directed=False)
            label = merged[block]
        except Exception:  # noqa: BLE001 - keep the whole event one clique
            continue
        if local_failed:
            continue
        links[site.name] = (label[:, None] == label[None, :]) & same_term
    return links


def _site_parents(model, args, kwargs, sites, values: dict) -> tuple[dict[str, set[str]], str | None]:
    """Latent sites each site's log-density reads (itself included), by provenance tracking."""
    latent = [s for s in sites if not s.observed]
    failed: dict[str, str] = {}
    try:
        provenance = eval_provenance(
            lambda **values: _log_density_terms(model, args, kwargs, sites, values, failed),
            **values,
        )
        error = None
    except Exception as caught:  # noqa: BLE001 - conservative fallback below
        provenance, error = {}, f"{type(caught).__name__}: {caught}"
    parents = {}
    for position, site in enumerate(sites):
        if site.name in provenance and site.name not in failed:
            parents[site.name] = set(provenance[site.name])
        else:  # every earlier latent site, plus the sites of the same control flow
            parents[site.name] = {s.name for s in latent if sites.index(s) < position}
            if site.control_flow:
                parents[site.name] |= {s.name for s in latent if s.control_flow}
            if not site.observed:
                parents[site.name].add(site.name)
    return parents, error


def _topological_order(parents: np.ndarray) -> np.ndarray | None:
    """Kahn's algorithm, taking the earliest available element first; None on a cycle."""
    indegree = parents.sum(axis=1)
    children = np.ascontiguousarray(parents.T)  # row j: the children of j
    heap = [i for i in range(len(parents)) if indegree[i] == 0]
    order = []
    while heap:  # one numpy update per element: a clique of 10,000 took 17 s child by child
        j = heapq.heappop(heap)
        order.append(j)
        kids = np.flatnonzero(children[j])
        indegree[kids] -= 1
        for child in kids[indegree[kids] == 0]:
            heapq.heappush(heap, int(child))
    return np.array(order, dtype=int) if len(order) == len(parents) else None


def _merge_cycles(graph: np.ndarray) -> np.ndarray:
    """Make each strongly connected set one block: a clique (later <- earlier) whose members
    share every parent of any member. Sound for any true DAG inside ``graph``."""
    from scipy.sparse.csgraph import connected_components  # scipy comes with scikit-learn

    graph = graph.copy()
    _, component = connected_components(graph, directed=True, connection="strong")
    for label in np.unique(component):
        members = np.flatnonzero(component == label)
        if len(members) > 1:
            outside = graph[members].any(axis=0)
            outside[members] = False
            graph[members] |= outside
            graph[np.ix_(members, members)] = np.tril(np.ones((len(members),) * 2, dtype=bool), -1)
    return graph


def _marginalise(parents: np.ndarray, rank: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Remove elements by arc reversal (Shachter 1986), latest first.

    Child ``c_i`` of a removed ``m`` (children in order) gains ``pa(m)`` and every earlier
    child ``c_j`` with its parents: the path ``c_i <- m -> c_j <- q`` is open once ``m`` is
    gone, so linking the children to ``pa(m)`` and to each other alone would miss edges.
    """
    parents = parents.copy()
    for m in sorted(np.flatnonzero(removed), key=lambda i: -rank[i]):
        running = parents[m].copy()
        for child in sorted(np.flatnonzero(parents[:, m]), key=lambda i: rank[i]):
            parents[child] |= running
            running |= parents[child]
            running[child] = True
        parents[m, :] = False
        parents[:, m] = False
    return parents


def _element_graph(sites, term_edges, site_parents, failed, event_links, noise_groups=None) -> tuple[np.ndarray, list]:
    """Parents among all latent elements, and the parent sets that observed terms couple."""
    by_name = {s.name: s for s in sites}
    num_latent = sum(s.size for s in sites if not s.observed)
    graph = np.zeros((num_latent, num_latent), dtype=bool)
    cliques, row = [], 0
    for site in sites:
        num_terms, event = math.prod(site.term_shape), site.event_size
        edges = term_edges[row : row + num_terms].copy()
        row += num_terms
        for name in site_parents[site.name]:
            parent = by_name[name]
            if name != site.name and (parent.discrete or site.name in failed):
                edges[:, parent.offset : parent.offset + parent.size] = True
            elif name == site.name and site.control_flow and (site.discrete or name in failed):
                for term in range(num_terms):  # a scan step may read every earlier step
                    edges[term, site.offset : site.offset + term * event] = True
        if site.observed:
            cliques.extend(np.flatnonzero(e) for e in edges if e.sum() > 1)
            for label in np.unique((noise_groups or {}).get(site.name, [])):  # shared noise couples them all
                cliques.append(np.flatnonzero(edges[noise_groups[site.name] == label].any(axis=0)))
            continue
        for term in range(num_terms):  # the term's own event is held fixed
            edges[term, site.offset + term * event : site.offset + (term + 1) * event] = False
        block = slice(site.offset, site.offset + site.size)
        graph[block] |= np.repeat(edges, event, axis=0)
        if site.name in (noise_groups or {}):
            for label in np.unique(noise_groups[site.name]):
                _share_noise(graph, site.offset + np.flatnonzero(noise_groups[site.name] == label))
        elif site.name in event_links:
            graph[block, block] |= np.tril(event_links[site.name], -1)
        else:
            within_event = np.tril(np.ones((event, event), dtype=bool), -1)
            graph[block, block] |= np.kron(np.eye(num_terms, dtype=bool), within_event)
    np.fill_diagonal(graph, False)
    return graph, cliques


def _condition_and_marginalise(graph: np.ndarray, cliques: list, keep: np.ndarray) -> np.ndarray:
    """Marry the parents of observed terms, then marginalise every element not in ``keep``."""
    num_latent = len(graph)
    order = _topological_order(graph)
    if order is None:
        warnings.warn(
            "Conservative site-level edges made the element graph cyclic (typically a discrete "
            "site inside `scan`); each cycle is made a clique that shares all its parents.",
            stacklevel=3,
        )
        graph = _merge_cycles(graph)
        order = _topological_order(graph)
    rank = np.empty(num_latent, dtype=int)
    rank[order] = np.arange(num_latent)
    for members in cliques:
        members = members[np.argsort(rank[members])]
        graph[np.ix_(members, members)] |= np.tril(np.ones((len(members),) * 2, dtype=bool), -1)
    removed = np.ones(num_latent, dtype=bool)
    removed[keep] = False
    return _marginalise(graph, rank, removed)


def element_parents(
    model: Callable,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    *,
    token_sites: Sequence[str] | None = None,
    exclude_sites: Sequence[str] = (),
    rng_key: jax.Array | None = None,
    num_draws: int = 4,
) -> tuple[list[str], np.ndarray]:
    """Direct parents of every token, down to single array elements.

    Parameters:
        model: a NumPyro model.
        model_args, model_kwargs: passed to the model.
        token_sites: latent sample sites that become tokens, in this order (default: every
            latent sample site that is neither auxiliary nor improper, in trace order).
        exclude_sites: sites removed from ``token_sites``; like every latent non-token site
            (simulator noise, say) they are marginalised out: their children gain their
            parents and each other, ordered later <- earlier.
        rng_key: key for the prior draws and perturbations (default ``jax.random.key(0)``);
            the result is deterministic given it.
        num_draws: prior draws at which derivatives and perturbations are OR-ed together.

    Returns:
        ``(labels, parents)``: token labels (``theta``, ``theta[0]``, ``x[2,1]``, each site
        flattened in C order) and a bool array ``(num_tokens, num_tokens)`` with
        ``parents[i, j]`` True when token j is a direct parent of token i (acyclic, no
        self-loops). Sites the Jacobian route cannot handle get site-level edges, with a
        warning naming them.

    Example:
        >>> def model():
        ...     theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
        ...     numpyro.sample("x", dist.Normal(theta, 0.1).to_event(1))
        >>> labels, parents = element_parents(model)
        >>> labels, parents[2:, :2].tolist()
        (['theta[0]', 'theta[1]', 'x[0]', 'x[1]'], [[True, False], [False, True]])
    """
    args, kwargs = tuple(model_args), {} if model_kwargs is None else dict(model_kwargs)
    if not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"`num_draws` must be a positive int; received {num_draws!r}.")
    rng_key = jax.random.key(0) if rng_key is None else rng_key
    key_draws, key_perturb, key_events = jax.random.split(rng_key, 3)
    sites, types, draws = _prior_draws(model, args, kwargs, key_draws, num_draws)
    draws = _finite_draws(draws)
    tokens = _resolve_tokens(types, sites, token_sites, exclude_sites)
    by_name = {s.name: s for s in sites}

    failed: dict[str, str] = {}
    term_edges, input_edges = _probe(model, args, kwargs, sites, draws, key_perturb, failed)
    noise_groups = _simulator_edges(model, args, kwargs, sites, draws, jax.random.fold_in(key_events, 1),
                                       failed, term_edges, input_edges)
    first_draw = {name: value[0] for name, value in draws.items()}
    site_parents, provenance_error = _site_parents(model, args, kwargs, sites, first_draw)
    if provenance_error is not None:
        warnings.warn(
            f"NumPyro provenance tracking failed ({provenance_error.splitlines()[0][:200]}); "
            "site-level fallbacks assume each site depends on every earlier site.", stacklevel=2
        )
    if failed:
        reasons: dict[str, list[str]] = {}
        for name, reason in failed.items():
            reasons.setdefault(reason.splitlines()[0][:200], []).append(name)
        details = "; ".join(f"{names}: {reason}" for reason, names in reasons.items())
        warnings.warn(
            f"Element-level dependencies could not be computed for site(s) {sorted(failed)} "
            f"({details}). Using conservative site-level edges for them (every element <- "
            "every element of each parent site). To override, pass your own `parents=` or "
            "`attention=` mask to Simformer.", stacklevel=2,
        )
    event_links = _event_links(model, args, kwargs, sites, draws, key_events, failed)
    graph, cliques = _element_graph(sites, term_edges, site_parents, failed, event_links, noise_groups)
    token_index = np.concatenate(
        [np.arange(by_name[n].offset, by_name[n].offset + by_name[n].size) for n in tokens]
    ).astype(int)
    graph = _condition_and_marginalise(graph, cliques, token_index)
    labels = [label for n in tokens for label in _labels(n, by_name[n].shape)]
    return labels, graph[np.ix_(token_index, token_index)]


def dependency_matrix(model: Callable, *model_args: Any, **model_kwargs: Any) -> tuple[list[str], np.ndarray]:
    """Token labels and direct-parent matrix of every latent sample site of ``model``.

    The shortcut for :func:`element_parents` with its defaults: tokens are the scalar
    elements of every latent (not ``obs=``-given, not auxiliary, not improper) sample site,
    in trace order, each flattened in C order.

    Returns:
        ``(labels, parents)`` with ``parents[i, j]`` True when token j is a direct parent of
        token i.

    Example:
        >>> def model():
        ...     a = numpyro.sample("a", dist.Normal(0, 1))
        ...     numpyro.sample("b", dist.Normal(a, 1))
        >>> dependency_matrix(model)
        (['a', 'b'], array([[False, False],
               [ True, False]]))
    """
    return element_parents(model, model_args, model_kwargs)


def attention_mask(
    parents: np.ndarray, kind: str | Callable[[np.ndarray], np.ndarray] = "undirected"
) -> np.ndarray:
    """Which tokens may attend to which, from the direct-parent matrix.

    With ``G = parents | I``:

    - ``"undirected"`` (default): the moral graph ``G | G.T | (G.T @ G > 0)``: every token
      sees its parents, children and co-parents (its Markov blanket). Valid for every
      condition mask.
    - ``"directed"``: ``G``, each token attends to its parents only. Only valid when nothing
      is observed (joint sampling); conditioning opens paths this mask blocks.
    - ``"dense"``: all True.
    - a callable ``kind(G) -> mask`` for a mask of your own.

    Parameters:
        parents: bool ``(num_tokens, num_tokens)``, ``parents[i, j]`` True when j is a
            parent of i.
        kind: one of ``"undirected"``, ``"directed"``, ``"dense"``, or a callable.

    Returns:
        bool ``(num_tokens, num_tokens)``, ``mask[i, j]`` True when token i may attend to
        token j; the diagonal is always True.

    Example:
        >>> attention_mask(np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0]], bool)).astype(int)
        array([[1, 1, 1],
               [1, 1, 1],
               [1, 1, 1]])
    """
    graph = np.asarray(parents)
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise ValueError(
            f"`parents` must be a square (num_tokens, num_tokens) matrix; received shape "
            f"{graph.shape}. Build it with `element_parents` or `dependency_matrix`."
        )
    eye = np.eye(graph.shape[0], dtype=bool)
    graph = graph.astype(bool) | eye
    if callable(kind):
        mask = np.asarray(kind(graph), dtype=bool)
        if mask.shape != graph.shape:
            raise ValueError(f"The mask function returned shape {mask.shape}; expected {graph.shape}.")
        return mask | eye
    if kind == "undirected":
        return graph | graph.T | gram_nonzero(graph)
    if kind == "directed":
        return graph
    if kind == "dense":
        return np.ones_like(graph)
    raise ValueError(
        f"Unknown attention mask kind {kind!r}; expected one of {list(_MASK_KINDS)} "
        "or a callable taking the parents-with-diagonal matrix and returning a bool mask."
    )
