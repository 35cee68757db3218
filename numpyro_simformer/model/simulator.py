"""A simulator you already have, as one NumPyro sample site.

``Simulator(fn, *inputs)`` wraps a JAX function ``fn(rng_key, *inputs) -> array`` as a
sample-only NumPyro distribution, so that a black-box simulator sits in a model next to
priors, plates and ordinary sample sites::

    theta = numpyro.sample("theta", dist.Normal(0, 1).expand([2]).to_event(1))
    numpyro.sample("x", Simulator(my_simulator, theta, event_shape=(100,)))

``Simulator.from_numpy`` does the same for NumPy code ``fn(rng: numpy.random.Generator,
*inputs) -> ndarray``: the function runs on the host through ``jax.pure_callback``, is
seeded from the JAX key (the same key gives the same draws) and, when vectorized,
receives a whole batch of simulations in one call.

The site has no ``log_prob``. Its element-level dependency graph is read from the function
itself with the noise held fixed (:meth:`Simulator.dependence`): output element ``i``
depends on input element ``j`` when changing ``j`` changes ``x_i`` under the same key.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

__all__ = ["Simulator"]

# The output check accepts these dtype kinds: bool, signed and unsigned int, float.
_NUMERIC_KINDS = "biuf"
# A change below this many machine epsilons (relative) is rounding, not a dependence
# (the value graph.py uses for log-density terms).
_ROUNDING_EPS = 256
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _check_output(name: str, shape: tuple, dtype, expected_shape: tuple, what: str) -> None:
    """Raise naming the function when an output has the wrong shape or a non-numeric dtype."""
    if tuple(shape) != tuple(expected_shape):
        raise ValueError(
            f"The simulator {name!r} returned an array of shape {tuple(shape)}; expected "
            f"{tuple(expected_shape)} ({what}). Pass the right `event_shape=` to Simulator, "
            "or fix the function's output."
        )
    if np.dtype(dtype).kind not in _NUMERIC_KINDS:
        raise TypeError(
            f"The simulator {name!r} returned dtype {np.dtype(dtype)}; expected a real number "
            "type (bool, int or float). Return the real values, e.g. `np.abs(z)` or `z.real`."
        )


def _seed(words: np.ndarray) -> np.random.SeedSequence:
    """A NumPy seed from the random words of one or more JAX keys (all of them count)."""
    digest = hashlib.sha256(np.ascontiguousarray(words, dtype=np.uint32).tobytes()).digest()
    return np.random.SeedSequence(int.from_bytes(digest, "little"))


class Simulator(dist.Distribution):
    """A sample-only NumPyro distribution whose draws come from your simulator function.

    The idea: with its noise held fixed by ``rng_key``, a simulator is a deterministic
    function of its inputs. Sampling calls it (vmapped over batch and sample axes, so a
    model with a ``Simulator`` site simulates in one jitted ``vmap``); the dependency graph
    perturbs its inputs under a fixed key (:meth:`dependence`).

    Parameters:
        fn: a JAX function ``fn(rng_key, *inputs) -> array`` for one simulation; its
            output shape is the site's event shape.
        *inputs: its inputs (arrays, usually functions of upstream sample sites). Their
            first ``batch_ndims`` axes are batch axes (one simulation per batch element);
            ``fn`` sees the remaining axes.
        event_shape: the shape of one simulation's output (default: found with
            ``jax.eval_shape``). A function returning another shape raises a ``ValueError``
            naming it.
        support: the output's support per element, e.g. ``constraints.nonnegative_integer``
            for counts (default ``constraints.real``); ``is_discrete`` follows it.
        batch_ndims: how many leading axes of every input are batch axes (under a plate
            with per-element inputs: 1). Inputs without per-element values can stay
            unbatched if the plate alone repeats the simulation.
        shared_noise: which output elements of one simulation may share randomness:
            ``"auto"`` (default) reads it from a JAX function itself, replacing its random
            draws one element at a time under a fixed key (:meth:`noise_links`); where
            that cannot be read (a NumPy function, draws inside a loop or a branch such as
            ``jax.random.poisson``) all elements are taken to share noise. ``True`` states
            that all of them may, ``False`` that each element draws its own noise, and a
            bool ``(event_size, event_size)`` matrix marks the pairs that may (read as
            groups: its connected components). The dependency graph treats a group's
            noise as a hidden parent of its elements and marginalises it: the elements are
            linked and each inherits the parents of the ones before it (fewest parents
            first, then by which, then by position: not by where the function puts them). Noise-only
            outputs (distractors) stay apart from the parameters only when their noise is
            their own; with noise shared with informative outputs they do carry
            information about the parameters.

    Example:
        >>> def simulator(rng_key, theta):
        ...     return theta + 0.5 * jax.random.normal(rng_key, (2,))
        >>> site = Simulator(simulator, jnp.zeros(2))
        >>> site.event_shape, site.sample(jax.random.key(0), (3,)).shape
        ((2,), (3, 2))
    """

    arg_constraints: dict = {}
    pytree_data_fields = ("inputs",)
    pytree_aux_fields = ("fn", "batch_ndims", "is_numpy", "vectorized", "dtype", "_support",
                         "_shared_noise", "_core_shapes")

    def __init__(
        self,
        fn: Callable,
        *inputs: Any,
        event_shape: Sequence[int] | None = None,
        support: constraints.Constraint | None = None,
        batch_ndims: int = 0,
        shared_noise: bool | np.ndarray | str = "auto",
    ):
        self._setup(fn, inputs, event_shape, support, batch_ndims, shared_noise, is_numpy=False,
                    vectorized=True, dtype=None)

    @classmethod
    def from_numpy(
        cls,
        fn: Callable,
        *inputs: Any,
        event_shape: Sequence[int],
        dtype: Any = jnp.float32,
        vectorized: bool = True,
        support: constraints.Constraint | None = None,
        batch_ndims: int = 0,
        shared_noise: bool | np.ndarray | str = "auto",
    ) -> "Simulator":
        """A simulator written in NumPy: ``fn(rng: numpy.random.Generator, *inputs) -> ndarray``.

        It runs on the host through ``jax.pure_callback``, so it works inside the jitted,
        vmapped simulation; it has no derivative (simulation needs none).

        With ``vectorized=True`` (default) ``fn`` receives a whole batch at once: every
        input with one extra leading axis of ``n`` simulations, and returns ``(n,
        *event_shape)``; one call per simulation chunk. Its generator is seeded from the
        keys of the whole batch, so the same keys in the same chunks give the same draws.
        With ``vectorized=False`` it is called once per simulation with a generator seeded
        from that simulation's key alone; the draws then do not depend on the chunking.
        The two give different draws for the same key: a batch function draws all its
        simulations from one generator, a per-draw function from one generator each (for a
        batch of one they agree).

        Parameters:
            fn: the NumPy simulator.
            *inputs, support, batch_ndims, shared_noise: as for :class:`Simulator`.
            event_shape: the shape of one simulation's output (required: calling the
                function to find it would run a simulation). Checked on every call; a
                wrong shape raises an error naming ``fn``.
            dtype: the dtype of the output; ``fn``'s output is cast to it when NumPy's
                ``same_kind`` casting allows (float64 to float32, int to float), else an
                error names ``fn``.
            vectorized: whether ``fn`` takes a batch (see above).

        Example:
            >>> def simulator(rng, theta):  # theta: (n, 2)
            ...     return theta + 0.5 * rng.normal(size=theta.shape)
            >>> site = Simulator.from_numpy(simulator, jnp.zeros(2), event_shape=(2,))
            >>> site.sample(jax.random.key(0), (3,)).shape
            (3, 2)
        """
        self = cls.__new__(cls)
        if event_shape is None:
            raise ValueError(
                f"Simulator.from_numpy({_fn_name(fn)!r}, ...) needs `event_shape=`, the shape "
                "of one simulation's output: finding it would run the simulator."
            )
        self._setup(fn, inputs, event_shape, support, batch_ndims, shared_noise, is_numpy=True,
                    vectorized=bool(vectorized), dtype=dtype)
        return self

    def _setup(self, fn, inputs, event_shape, support, batch_ndims, shared_noise, *, is_numpy, vectorized, dtype):
        name = _fn_name(fn)
        if not callable(fn):
            raise TypeError(f"Simulator takes a function as its first argument; received {fn!r}.")
        if not isinstance(batch_ndims, int) or batch_ndims < 0:
            raise ValueError(f"`batch_ndims` must be a non-negative int; received {batch_ndims!r}.")
        inputs = tuple(jnp.asarray(x) for x in inputs)
        for position, x in enumerate(inputs):
            if x.ndim < batch_ndims:
                raise ValueError(
                    f"Input {position} of simulator {name!r} has shape {x.shape}, fewer than "
                    f"`batch_ndims={batch_ndims}` axes; give every input the batch axes "
                    "(size 1 to broadcast)."
                )
        try:
            batch_shape = jnp.broadcast_shapes(*(x.shape[:batch_ndims] for x in inputs)) if inputs else ()
        except ValueError as error:
            raise ValueError(
                f"The batch axes of simulator {name!r}'s inputs do not broadcast: "
                f"{[x.shape[:batch_ndims] for x in inputs]} ({error})."
            ) from None
        self.fn, self.inputs, self.batch_ndims = fn, inputs, batch_ndims
        self.is_numpy, self.vectorized = is_numpy, vectorized
        self._core_shapes = tuple(x.shape[batch_ndims:] for x in inputs)
        if is_numpy:
            event_shape = tuple(int(n) for n in event_shape)
            self.dtype = np.dtype(dtype)
            _check_output(name, event_shape, self.dtype, event_shape, "the declared event_shape")
        else:
            core = [jax.ShapeDtypeStruct(s, x.dtype) for s, x in zip(self._core_shapes, inputs)]
            try:
                out = jax.eval_shape(fn, jax.random.key(0), *core)
            except Exception as error:  # noqa: BLE001 - the user's function can raise anything
                raise RuntimeError(
                    f"The simulator {name!r} raised {type(error).__name__}: {error} (called as "
                    f"fn(rng_key, *inputs) with inputs of shapes {[tuple(s) for s in self._core_shapes]})."
                ) from error
            if not hasattr(out, "shape"):
                raise TypeError(f"The simulator {name!r} must return one array; it returned {type(out).__name__}.")
            expected = out.shape if event_shape is None else tuple(int(n) for n in event_shape)
            _check_output(name, out.shape, out.dtype, expected, "the declared event_shape")
            event_shape, self.dtype = tuple(out.shape), np.dtype(out.dtype)
        support = constraints.real if support is None else support
        self._support = constraints.independent(support, len(event_shape)) if event_shape else support
        event_size = math.prod(event_shape)
        if isinstance(shared_noise, str):
            if shared_noise != "auto":
                raise ValueError(
                    f"`shared_noise` for simulator {name!r} must be 'auto', True, False or a bool "
                    f"matrix; received {shared_noise!r}."
                )
            self._shared_noise = None
        elif isinstance(shared_noise, (bool, np.bool_)):
            matrix = np.full((event_size, event_size), bool(shared_noise)) | np.eye(event_size, dtype=bool)
        else:
            matrix = np.asarray(shared_noise, dtype=bool)
            if matrix.shape != (event_size, event_size):
                raise ValueError(
                    f"`shared_noise` for simulator {name!r} must be True, False or a bool matrix "
                    f"of shape ({event_size}, {event_size}) (output elements of one simulation); "
                    f"received shape {matrix.shape}."
                )
            matrix = matrix | matrix.T | np.eye(event_size, dtype=bool)
        if not isinstance(shared_noise, str):
            self._shared_noise = tuple(map(tuple, matrix.tolist()))  # hashable: pytree metadata
        super().__init__(batch_shape=tuple(batch_shape), event_shape=event_shape, validate_args=False)

    # ------------------------------------------------------------------ distribution
    @property
    def support(self) -> constraints.Constraint:
        return self._support

    @property
    def shared_noise(self) -> np.ndarray | None:
        """bool ``(event_size, event_size)``: the output elements of one simulation stated to
        share noise; ``None`` when left to :meth:`noise_links` (``shared_noise="auto"``)."""
        if self._shared_noise is None:
            return None
        return np.array(self._shared_noise, dtype=bool).reshape(2 * (math.prod(self.event_shape),))

    def noise_links(self, rng_key, num_keys: int = 2) -> tuple[np.ndarray, str]:
        """Which output elements of one simulation share noise: ``(links, reason)``.

        ``links`` is bool ``(event_size, event_size)``: the stated ``shared_noise`` if one
        was given; with ``"auto"``, for a JAX function, True where two elements use a
        common random draw, found at this site's first simulation's inputs by replacing
        each draw in turn under ``num_keys`` keys
        (:func:`~numpyro_simformer.model.noise.find_noise_links`). Where the function
        cannot be read that way (a NumPy function, random draws inside a loop or branch,
        too many draws) every pair is linked and ``reason`` says why; else it is ``""``.
        """
        size = math.prod(self.event_shape)
        if self._shared_noise is not None:
            return self.shared_noise, ""
        if self.is_numpy:
            return np.ones((size, size), dtype=bool), "a NumPy function's draws cannot be read"
        from numpyro_simformer.model.noise import find_noise_links

        first = [x[(0,) * self.batch_ndims] for x in self.inputs]
        links, reason = find_noise_links(self.fn, rng_key, first, num_keys)
        if links is None:
            return np.ones((size, size), dtype=bool), reason
        return links, ""

    @property
    def name(self) -> str:
        """The simulator function's name, used in error messages."""
        return _fn_name(self.fn)

    def sample(self, key, sample_shape=()):
        """``sample_shape + batch_shape + event_shape`` draws, each from its own key."""
        shape = tuple(sample_shape) + self.batch_shape
        inputs = [jnp.broadcast_to(x, shape + core) for x, core in zip(self.inputs, self._core_shapes)]
        return self._output(key, inputs, shape)

    def log_prob(self, value):
        raise NotImplementedError(
            f"Simulator({self.name!r}) is sample-only: a black-box simulator has no log-density. "
            "Use it to simulate (numpyro_simformer.Simformer, numpyro.infer.Predictive); MCMC "
            "and SVI need a log-density, so give them a model that writes the likelihood with "
            "NumPyro distributions."
        )

    # ------------------------------------------------------------------ fixed noise
    def output_given(self, rng_key, *inputs) -> jax.Array:
        """The output for ``inputs`` (default: this site's own) with the noise fixed by ``rng_key``.

        ``inputs`` have this simulator's ``batch_ndims`` leading batch axes; the result has
        shape ``batch_shape + event_shape`` and is exactly what :meth:`sample` returns for
        ``sample_shape=()``. The same key gives the same noise, so changing one input and
        comparing outputs shows which output elements depend on it.
        """
        inputs = self.inputs if not inputs else tuple(jnp.asarray(x) for x in inputs)
        shape = jnp.broadcast_shapes(*(x.shape[: self.batch_ndims] for x in inputs)) if inputs else ()
        inputs = [jnp.broadcast_to(x, tuple(shape) + core) for x, core in zip(inputs, self._core_shapes)]
        return self._output(rng_key, inputs, tuple(shape))

    def flat_inputs(self) -> jax.Array:
        """Every input element in one float vector: the inputs as given, each flattened in C order."""
        return jnp.concatenate([jnp.ravel(x).astype(float) for x in self.inputs] or [jnp.zeros(0)])

    def _output(self, rng_key, inputs, shape):
        """One simulation per element of ``shape``; ``inputs`` already have ``shape`` leading."""
        num = math.prod(shape)
        if not shape:
            return self._one(rng_key, *inputs)
        keys = jax.random.split(rng_key, num)
        flat = [x.reshape((num, *core)) for x, core in zip(inputs, self._core_shapes)]
        return jax.vmap(self._one)(keys, *flat).reshape(shape + self.event_shape)

    def _one(self, rng_key, *inputs):
        if not self.is_numpy:
            return self.fn(rng_key, *inputs)
        words = jax.random.bits(rng_key, (4,), jnp.uint32)
        result = jax.ShapeDtypeStruct(self.event_shape, self.dtype)
        inputs = [jax.lax.stop_gradient(x) for x in inputs]  # no derivative through the host
        return jax.pure_callback(self._host, result, words, *inputs, vmap_method="broadcast_all")

    def _host(self, words, *inputs):
        """Run the NumPy function on a batch: ``words`` ``(*lead, 4)``, inputs ``(*lead, *core)``."""
        words = np.asarray(words)
        lead = words.shape[:-1]
        num = math.prod(lead)
        words = words.reshape(num, 4)
        inputs = [np.asarray(x).reshape((num, *core)) for x, core in zip(inputs, self._core_shapes)]
        return self.simulate_numpy(words, *inputs).reshape(lead + self.event_shape)

    def simulate_numpy(self, words: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
        """Call the NumPy function on ``n`` simulations, outside JAX.

        Parameters:
            words: uint32 ``(n, 4)``, random words of each simulation's key
                (``jax.random.bits(key, (4,), jnp.uint32)``).
            *inputs: ``(n, *core shape)`` each.

        Returns:
            ``(n, *event_shape)`` in ``dtype``: one call with a generator seeded from every
            row's words when vectorized, else one call per row seeded from that row's words.
        """
        num = len(words)
        if self.vectorized:
            output = self._call(np.random.default_rng(_seed(words)), inputs, (num, *self.event_shape),
                                f"a batch of {num} simulations, (n, *event_shape)")
        else:
            output = np.empty((num, *self.event_shape), self.dtype)
            for row in range(num):
                output[row] = self._call(np.random.default_rng(_seed(words[row : row + 1])),
                                         [x[row] for x in inputs], self.event_shape, "one simulation")
        return output

    def _call(self, rng, inputs, expected, what):
        try:
            output = self.fn(rng, *inputs)
        except Exception as error:  # noqa: BLE001 - the user's function can raise anything
            raise RuntimeError(
                f"The simulator {self.name!r} raised {type(error).__name__}: {error} (called with "
                f"inputs of shapes {[np.shape(x) for x in inputs]}, {what})."
            ) from error
        output = np.asarray(output)
        _check_output(self.name, output.shape, output.dtype, expected, what)
        if not np.can_cast(output.dtype, self.dtype, casting="same_kind"):
            raise TypeError(
                f"The simulator {self.name!r} returned dtype {output.dtype}, which does not cast "
                f"safely to the declared dtype={self.dtype}. Pass `dtype={output.dtype}` to "
                "Simulator.from_numpy, or return values of that kind."
            )
        return output.astype(self.dtype, copy=False)

    # ------------------------------------------------------------------ dependence
    def dependence(self, rng_key, num_keys: int = 2) -> np.ndarray:
        """Which output elements depend on which input elements, with the noise held fixed.

        Output element ``i`` depends on input element ``j`` when changing ``j`` changes
        ``x_i`` under the same key. Found at this simulator's own inputs, OR-ed over
        ``num_keys`` keys: for a JAX function, a non-zero forward-mode derivative or a
        change under a large step of ``j`` (which catches ``floor``, ``where`` and integer
        casts); for a NumPy function, the large steps alone, all in one batched call
        compared with one call on unperturbed inputs under the same seed. That comparison
        holds the noise fixed when the function draws its noise independently of the input
        values (``f(theta) + sigma * rng.normal(size=...)``); noise whose consumption
        depends on the inputs (``rng.poisson(rate)`` in a vectorized function) can add
        edges, never remove one. ``vectorized=False`` functions get exact common noise.

        Parameters:
            rng_key: keys the noise and the step sizes.
            num_keys: keys at which the dependence is OR-ed.

        Returns:
            bool ``(num_outputs, num_inputs)``: outputs over ``batch_shape + event_shape``
            and inputs over :meth:`flat_inputs`, both in C order.
        """
        flat = np.asarray(self.flat_inputs())
        sizes = [int(np.size(x)) for x in self.inputs]
        starts = np.cumsum([0] + sizes)
        num_outputs = math.prod(self.batch_shape + self.event_shape)
        edges = np.zeros((num_outputs, len(flat)), dtype=bool)
        for x, start, size in zip(self.inputs, starts, sizes):
            if x.dtype == jnp.bool_:  # a step cannot move a bool reliably: keep every edge
                edges[:, start : start + size] = True
        if len(flat) == 0:
            return edges
        key_steps, key_noise = jax.random.split(rng_key)
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key_steps)).ravel())
        magnitude = rng.uniform(1.0, 3.0, size=(num_keys, 2, len(flat)))
        steps = magnitude * (1.0 + np.abs(flat)) * np.array([1.0, -1.0])[:, None]
        rows = flat[None, None, None] + np.where(np.eye(len(flat), dtype=bool), steps[..., None], 0.0)
        rows = rows.reshape(num_keys, -1, len(flat))  # (keys, 2 * num_inputs, num_inputs)
        keys = jax.random.split(key_noise, num_keys)

        def unflatten(vector):
            return [vector[s : s + n].reshape(x.shape).astype(x.dtype) for x, s, n in zip(self.inputs, starts, sizes)]

        if self.is_numpy:
            base, moved = self._numpy_outputs(keys, flat, rows, unflatten)
            jacobian = np.zeros_like(edges)
        else:
            def output(vector, key):
                return jnp.ravel(self.output_given(key, *unflatten(vector))).astype(float)

            def one_key(key, moved_rows):
                nonzero = jax.jacfwd(output)(jnp.asarray(flat), key) != 0
                return output(jnp.asarray(flat), key), jax.vmap(output, (0, None))(moved_rows, key), nonzero

            run = jax.jit(jax.vmap(one_key), compiler_options=_FAST_COMPILE)
            base, moved, jacobian = (np.asarray(a) for a in run(keys, jnp.asarray(rows)))
            base, jacobian = base[:, None], jacobian.any(axis=0)
        # base: (keys, 1 or 2 * num_inputs, num_outputs); moved: (keys, 2 * num_inputs, num_outputs)
        dtype = self.dtype if np.issubdtype(self.dtype, np.floating) else np.float32
        rounding = _ROUNDING_EPS * np.finfo(dtype).eps * (1.0 + np.abs(base))
        with np.errstate(invalid="ignore"):
            same = (moved == base) | (np.abs(moved - base) <= rounding) | (np.isnan(moved) & np.isnan(base))
        changed = ~same  # (keys, 2 * num_inputs, num_outputs)
        changed = changed.reshape(num_keys, 2, len(flat), num_outputs).any(axis=(0, 1)).T
        return edges | changed | jacobian

    def _numpy_outputs(self, keys, flat, rows, unflatten):
        """NumPy outputs at the base inputs and at each perturbed row, with common noise."""
        shape = self.batch_shape
        num_batch = math.prod(shape)
        base, moved = [], []
        for key, key_rows in zip(keys, rows):
            batch_keys = jax.random.split(key, num_batch) if shape else key[None]
            words = np.asarray(jax.vmap(lambda k: jax.random.bits(k, (4,), jnp.uint32))(batch_keys))

            def inputs_of(vectors):  # (m, num_inputs) -> per input (m * num_batch, *core)
                per_row = [unflatten(v) for v in vectors]
                return [
                    np.stack([np.broadcast_to(np.asarray(r[k]), shape + core) for r in per_row]).reshape(
                        (len(vectors) * num_batch, *core))
                    for k, core in enumerate(self._core_shapes)
                ]

            num_rows = len(key_rows)
            tiled_words = np.tile(words, (num_rows, 1))
            moved_out = self.simulate_numpy(tiled_words, *inputs_of(key_rows))
            if self.vectorized:  # the same seed and batch size: the same noise row by row
                base_out = self.simulate_numpy(tiled_words, *inputs_of(np.repeat(flat[None], num_rows, axis=0)))
            else:  # one generator per simulation: the base is the same for every row
                base_out = self.simulate_numpy(words, *inputs_of(flat[None]))
            base.append(base_out.reshape(-1 if self.vectorized else 1, num_batch * math.prod(self.event_shape)))
            moved.append(moved_out.reshape(num_rows, -1))
        return np.stack(base).astype(float), np.stack(moved).astype(float)
