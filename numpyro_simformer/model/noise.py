"""Which outputs of a JAX simulator share random draws, read from the function itself.

A JAX function gets its randomness from its key in one place: the sampling primitives
(``random_bits`` under ``jax.random.uniform``, ``normal``, ``categorical``...,
``random_gamma`` under ``gamma``, ``beta`` and ``dirichlet``, ``random_poisson`` under
``poisson`` in recent JAX, and ``threefry2x32``). This
module evaluates the function's jaxpr with one element of one of those draws replaced by
another value, for every element in turn (vmapped, one compiled program): output element
``i`` uses draw ``k`` when replacing ``k`` changes ``x_i``. Two outputs that use a common
draw share noise. The replacement is large (another 32-bit word for random bits), so a
comparison with a threshold (a Bernoulli draw) flips with a probability that several
replacements and keys make high; an output that uses a draw is missed only if no
replacement changes it.

What it cannot read, it says so (``None`` and a reason) and the caller assumes the
conservative answer, all outputs linked: random draws inside a loop or a branch
(``lax.scan``, ``while_loop``, ``cond``: ``jax.random.poisson`` and ``binomial`` draw in a
loop in older JAX), a sampling primitive this module does not know (any primitive that
turns a key into values), or more draws than :data:`MAX_DRAWS`. Randomness taken from a
key's raw words (``jax.random.key_data``) instead of a sampler is not seen.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, DropVar, Literal, jaxprs_in_params

__all__ = ["MAX_DRAWS", "changed_beyond_rounding", "find_noise_links", "gram_nonzero"]

# Sampling primitives: their outputs are the random draws (element by element).
_SOURCES = frozenset({"random_bits", "random_gamma", "random_poisson", "threefry2x32"})
# Primitives that take a key and return values but draw nothing (the key's raw words).
_KEY_READS = frozenset({"random_unwrap"})
# Call-like primitives whose body is evaluated in line (a draw inside them is still seen).
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
           "remat": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
# Probing costs one simulation per draw, replacement and key; beyond this many draws the
# function is treated as unreadable (all outputs linked).
MAX_DRAWS = 20_000
# Replacements of one draw: other 32-bit words (XOR masks) for random bits, affine moves
# (positive stays positive) for gamma variates.
_XOR_MASKS = (0x9E3779B9, 0x7F4A7C15, 0x5BD1E995)
_AFFINE = ((2.0, 1.0), (0.5, 0.25), (1.0, 3.0))
_NUM_REPLACEMENTS = len(_XOR_MASKS)
# A change below this many machine epsilons (relative) is rounding (as in simulator.py).
_ROUNDING_EPS = 256


class _Unreadable(Exception):
    """The function's draws cannot be probed one by one."""


def _jaxpr(value):
    return value.jaxpr if isinstance(value, ClosedJaxpr) else value


def _is_key(var) -> bool:
    return jax.dtypes.issubdtype(var.aval.dtype, jax.dtypes.prng_key)


def _unknown_sampler(eqn) -> bool:
    """A primitive outside :data:`_SOURCES` that turns a key into values (a sampler JAX
    added after this module was written): its draws cannot be replaced one by one."""
    name = eqn.primitive.name
    if name in _SOURCES or name in _KEY_READS or list(jaxprs_in_params(eqn.params)):
        return False
    return any(_is_key(var) for var in eqn.invars if not isinstance(var, Literal)) and not all(
        _is_key(var) for var in eqn.outvars)


def _draws_inside(jaxpr) -> bool:
    """Whether ``jaxpr`` or any jaxpr nested in it runs a sampling primitive."""
    return any(eqn.primitive.name in _SOURCES or _unknown_sampler(eqn)
               or any(_draws_inside(_jaxpr(sub)) for sub in jaxprs_in_params(eqn.params))
               for eqn in jaxpr.eqns)


class _Replace:
    """Replaces draw number ``target`` (counted over every draw in evaluation order) by
    replacement ``which``; ``target < 0`` replaces nothing. Counts the draws as it goes."""

    def __init__(self, target, which):
        self.target, self.which, self.count = target, which, 0

    def __call__(self, value):
        index = self.count + jnp.arange(value.size).reshape(value.shape)
        self.count += value.size
        hit = index == self.target
        if jnp.issubdtype(value.dtype, jnp.integer):
            top = np.uint64(np.iinfo(value.dtype).max)
            masks = jnp.asarray(np.array(_XOR_MASKS, np.uint64) & top, value.dtype)
            moved = value ^ masks[self.which]
        else:
            scale, shift = (jnp.asarray(column, value.dtype) for column in zip(*_AFFINE))
            moved = value * scale[self.which] + shift[self.which]
        return jnp.where(hit, moved, value)


def _evaluate(jaxpr, consts, args, replace: _Replace) -> list:
    """``jax.core.eval_jaxpr`` with every sampling primitive's output passed through ``replace``."""
    env = {}

    def read(var):
        return var.val if isinstance(var, Literal) else env[var]

    def write(var, value):
        if not isinstance(var, DropVar):
            env[var] = value

    for var, value in zip(jaxpr.constvars, consts):
        write(var, value)
    for var, value in zip(jaxpr.invars, args):
        write(var, value)
    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        name = eqn.primitive.name
        body = eqn.params.get(_INLINE.get(name, ""))
        if body is not None:
            closed = body if isinstance(body, ClosedJaxpr) else ClosedJaxpr(body, ())
            outputs = _evaluate(closed.jaxpr, closed.consts, inputs, replace)
        else:
            if any(_draws_inside(_jaxpr(sub)) for sub in jaxprs_in_params(eqn.params)):
                raise _Unreadable(f"it draws random numbers inside `{name}` (a loop or branch)")
            if _unknown_sampler(eqn):
                raise _Unreadable(f"it draws with `{name}`, a sampling primitive this probe cannot replace")
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)  # jax < 0.7: a pair
            with eqn.ctx.manager:
                outputs = eqn.primitive.bind(*subfuns, *inputs, **params)
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
            if name in _SOURCES:
                outputs = [replace(value) for value in outputs]
        for var, value in zip(eqn.outvars, outputs):
            write(var, value)
    return [read(var) for var in jaxpr.outvars]


# One compiled probe per jaxpr (a model traced at several prior draws builds the same one).
_PROBES: collections.OrderedDict = collections.OrderedDict()
_MAX_PROBES = 16


def changed_beyond_rounding(moved: jax.Array, base: jax.Array) -> jax.Array:
    """Where ``moved`` differs from ``base`` beyond rounding (both NaN: unchanged); integers exactly."""
    same = moved == base
    if jnp.issubdtype(base.dtype, jnp.floating):
        rounding = _ROUNDING_EPS * jnp.finfo(base.dtype).eps * (1.0 + jnp.abs(base))
        same |= (jnp.abs(moved - base) <= rounding) | (jnp.isnan(moved) & jnp.isnan(base))
    return ~same


def _probe(closed: ClosedJaxpr, num_draws: int):
    """``probe(consts, keys, inputs) -> uses``: bool (draws, size), True where replacing draw
    k changes output element i beyond rounding, under some key and replacement.

    Compared on the device a chunk of draws at a time: the outputs themselves, (keys,
    replacements, draws, size), took gigabytes at ten thousand draws and outputs.
    """
    text = str(closed.jaxpr)
    if text in _PROBES:
        _PROBES.move_to_end(text)
        return _PROBES[text]

    def output(consts, key, inputs, target, which):
        (value,) = _evaluate(closed.jaxpr, consts, [key, *inputs], _Replace(target, which))
        return jnp.ravel(value)

    def one_key(consts, key, inputs):
        base = output(consts, key, inputs, -1, 0)

        def uses(target):  # (size,): the output elements that draw ``target`` moves
            moved = jax.vmap(lambda which: output(consts, key, inputs, target, which))(jnp.arange(_NUM_REPLACEMENTS))
            return changed_beyond_rounding(moved, base).any(axis=0)

        return jax.lax.map(uses, jnp.arange(num_draws), batch_size=max(1, 256 // _NUM_REPLACEMENTS))

    probe = jax.jit(lambda consts, keys, inputs: jax.vmap(one_key, (None, 0, None))(consts, keys, inputs).any(axis=0))
    _PROBES[text] = probe
    if len(_PROBES) > _MAX_PROBES:
        _PROBES.popitem(last=False)
    return probe


def gram_nonzero(matrix: np.ndarray) -> np.ndarray:
    """``matrix.T @ matrix > 0`` for a bool matrix: which columns share a row.

    Sparse when few entries are set (ten thousand columns took minutes as an integer
    product, 1.2 GB as a dense float one), BLAS otherwise.
    """
    matrix = np.asarray(matrix, dtype=bool)
    if matrix.mean() < 0.01:
        from scipy import sparse  # scipy comes with scikit-learn

        counts = sparse.csr_array(matrix.astype(np.int32))
        product = (counts.T @ counts).tocoo()
        linked = np.zeros((matrix.shape[1],) * 2, dtype=bool)
        linked[product.row, product.col] = product.data > 0
        return linked
    as_float = matrix.astype(np.float32)  # counts up to 2**24 are exact
    return (as_float.T @ as_float) > 0


def find_noise_links(fn, rng_key, inputs, num_keys: int = 2) -> tuple[np.ndarray | None, str]:
    """Which output elements of one simulation ``fn(key, *inputs)`` use a common random draw.

    Parameters:
        fn: a JAX function ``fn(rng_key, *inputs) -> array``.
        rng_key: keys the probe (``num_keys`` keys are split from it).
        inputs: concrete inputs of one simulation.
        num_keys: keys at which the links are OR-ed.

    Returns:
        ``(links, reason)``: bool ``(size, size)`` over the output's elements (C order),
        True where two elements use a common draw (the diagonal always), and ``""``; or
        ``(None, reason)`` when the function cannot be read this way.
    """
    keys = jax.random.split(rng_key, num_keys)
    try:
        closed = jax.make_jaxpr(fn)(keys[0], *inputs)
    except Exception as error:  # noqa: BLE001 - the user's function can raise anything
        return None, f"it could not be traced ({type(error).__name__}: {error})"
    if len(closed.jaxpr.outvars) != 1:
        return None, "it returns more than one array"
    counter = _Replace(-1, 0)
    try:
        jax.eval_shape(lambda key: _evaluate(closed.jaxpr, closed.consts, [key, *inputs], counter), keys[0])
    except _Unreadable as error:
        return None, str(error)
    size = int(np.prod(closed.jaxpr.outvars[0].aval.shape, dtype=int))
    num_draws = counter.count
    if num_draws == 0:
        return np.eye(size, dtype=bool), ""
    if num_draws > MAX_DRAWS:
        return None, f"it makes {num_draws} random draws per simulation (more than {MAX_DRAWS} to probe)"
    try:
        uses = np.asarray(_probe(closed, num_draws)(closed.consts, keys, list(inputs)))  # (draws, size)
    except Exception as error:  # noqa: BLE001 - a primitive the probe cannot replay
        return None, f"its draws could not be replaced ({type(error).__name__}: {error})"
    links = gram_nonzero(uses)
    return links | np.eye(size, dtype=bool), ""
