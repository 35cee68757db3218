"""Read a NumPyro model: its sample sites, shapes, supports and plates.

The model is traced once, with no observations, under a fixed key. Every sample site
that the model does not observe itself (no ``obs=``) is a candidate token site. What is
read here is static: names, shapes, dtypes, supports and the plates over each axis. The
element-level dependency graph lives in :mod:`numpyro_simformer.model.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import numpy as np
import numpyro
from numpyro import handlers
from numpyro.distributions import constraints

__all__ = ["SiteInfo", "trace_model", "read_sites", "site_dims", "refuse_unsupported_sites", "discrete_support_bounds"]


@dataclass(frozen=True)
class SiteInfo:
    """Static description of one sample site.

    Attributes:
        name: the NumPyro site name.
        shape: the shape of one draw of the site (batch shape + event shape).
        event_dim: number of trailing event dimensions.
        support: the site's support (a NumPyro constraint).
        is_discrete: whether the support is discrete (values are rounded on output).
        dims: one dimension name per axis: the plate's name for a plate axis, else
            ``"{name}_dim_{k}"``.
    """

    name: str
    shape: tuple[int, ...]
    event_dim: int
    support: Any
    is_discrete: bool
    dims: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))


def trace_model(rng_key, model: Callable, model_args: tuple, model_kwargs: dict):
    """Trace ``model`` once under ``rng_key``; errors from the model are re-raised with context.

    Distribution argument validation is off, as it is under ``jit`` during simulation: a
    simulator that sometimes yields NaN is read, and its bad draws are counted later.

    Raises:
        RuntimeError: the model raised (re-raised with what to check).
        ValueError: the model uses a feature a Simformer cannot honour
            (:func:`refuse_unsupported_sites`).
    """
    try:
        with numpyro.validation_enabled(False):
            trace = handlers.trace(handlers.seed(model, rng_key)).get_trace(*model_args, **model_kwargs)
    except Exception as error:  # noqa: BLE001 - the user's model can raise anything
        raise RuntimeError(
            f"Tracing the model {getattr(model, '__name__', model)!r} failed with "
            f"{type(error).__name__}: {error}\nThe model must run as "
            "`model(*model_args, **model_kwargs)`; pass its arguments to `fit` the way "
            "you would to `numpyro.infer.MCMC.run`."
        ) from error
    refuse_unsupported_sites(trace)
    return trace


def refuse_unsupported_sites(trace: dict) -> None:
    """Raise for model features whose meaning a Simformer cannot keep: subsampled plates, params.

    A plate with ``subsample_size`` smaller than its size draws a random subset of its
    elements on every run: simulations then hold different elements in the same token
    positions, and the answers mix them up. A ``numpyro.param`` site is an optimisable
    constant: simulation would freeze it at its initial value, silently.

    Raises:
        ValueError: naming the plate or site, why, and what to write instead.
    """
    for name, site in trace.items():
        if site["type"] == "plate":
            size, subsample_size = site["args"][:2]
            if subsample_size is not None and subsample_size != size:
                raise ValueError(
                    f"The model subsamples plate {name!r} (size {size}, subsample_size={subsample_size}). "
                    "Each run would draw another random subset of its elements into the same tokens, so the "
                    "Simformer would learn a mixture of different elements and its answers would mean nothing. "
                    f"Use the full plate: `numpyro.plate({name!r}, {size})` without `subsample_size`."
                )
        elif site["type"] == "param":
            raise ValueError(
                f"The model has a `numpyro.param` site {name!r}. Simulation would use its initial value as a "
                "fixed constant, and nothing would learn it. Make it a sample site with a prior "
                f"(`numpyro.sample({name!r}, ...)`) to infer it, or pass its value as a model argument."
            )


def is_factor(site: dict) -> bool:
    """Whether a trace entry is a ``numpyro.factor`` (a sample site of the ``Unit`` distribution)."""
    return type(site["fn"]).__name__ == "Unit"


def _is_token_candidate(site: dict) -> bool:
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and not site.get("infer", {}).get("is_auxiliary", False)
        and not getattr(site["fn"], "is_improper", False)
        and not is_factor(site)
    )


def site_dims(name: str, shape: tuple[int, ...], event_dim: int, frames) -> tuple[str, ...]:
    dims = [f"{name}_dim_{k}" for k in range(len(shape))]
    batch_ndim = len(shape) - event_dim
    for frame in frames:
        axis = batch_ndim + frame.dim  # frame.dim counts from the right of the batch shape
        if 0 <= axis < batch_ndim and shape[axis] == frame.size and shape[axis] > 1:
            dims[axis] = frame.name
    return tuple(dims)


def read_sites(
    trace: dict, token_sites: Sequence[str] | None = None, exclude_sites: Sequence[str] = ()
) -> list[SiteInfo]:
    """The token sites of a traced model, in trace order (or the order of ``token_sites``).

    Args:
        trace: a trace from :func:`trace_model`.
        token_sites: names of the sites to make tokens; default all unobserved sample sites.
        exclude_sites: names to leave out (simulator-internal noise, for example).

    Raises:
        ValueError: for an unknown or observed site name, or when no site remains.
    """
    candidates = [name for name, site in trace.items() if _is_token_candidate(site)]
    if not candidates:
        raise ValueError(
            "The model has no unobserved sample sites: nothing to simulate or infer. "
            "Write parameters and data as `numpyro.sample` sites without `obs=`."
        )
    for argument, names in (("token_sites", token_sites or ()), ("exclude_sites", exclude_sites)):
        for name in names:
            if name not in candidates:
                raise ValueError(
                    f"{argument} names {name!r}, which is not an unobserved sample site of "
                    f"the model. Its sample sites are {candidates}."
                )
    names = list(token_sites) if token_sites is not None else candidates
    names = [name for name in names if name not in set(exclude_sites)]
    if not names:
        raise ValueError("No token site is left after `exclude_sites`; keep at least one.")
    sites = []
    for name in names:
        site = trace[name]
        value = np.asarray(site["value"])
        fn = site["fn"]
        event_dim = len(getattr(fn, "event_shape", ()))
        support = fn.support
        sites.append(
            SiteInfo(
                name=name,
                shape=tuple(value.shape),
                event_dim=event_dim,
                support=support,
                is_discrete=bool(getattr(support, "is_discrete", False)),
                dims=site_dims(name, tuple(value.shape), event_dim, site.get("cond_indep_stack", ())),
            )
        )
    return sites


def support_bounds(support) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Lower and upper bounds of a support, where it has them (for constancy checks)."""
    support = getattr(support, "base_constraint", support)
    lower = getattr(support, "lower_bound", None)
    upper = getattr(support, "upper_bound", None)
    as_array = lambda bound: None if bound is None else np.asarray(jax.device_get(bound))
    return as_array(lower), as_array(upper)


def discrete_support_bounds(support) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` of a discrete support as float arrays, ``-inf``/``inf`` where unbounded.

    Every discrete support NumPyro has: ``boolean`` (0, 1), ``integer_interval(a, b)``,
    ``integer_greater_than(a)`` with ``nonnegative_integer`` and ``positive_integer``, and
    ``multinomial(n)`` (0, n per element; its sum is not enforced). Wrappers such as
    ``independent`` are looked through; a support that only says ``is_discrete`` (a custom
    ``integer`` constraint) gives the bounds it declares, else none. A continuous support
    (the ``real`` fallback of a site whose bounds vary between simulations) has none.
    """
    base = getattr(support, "base_constraint", support)
    if isinstance(base, type(constraints.boolean)):
        return np.zeros(()), np.ones(())
    lower, upper = support_bounds(support)
    if isinstance(base, constraints._Multinomial):
        lower = np.zeros(())
    as_float = lambda bound, fill: np.full((), fill) if bound is None else np.asarray(bound, dtype=np.float64)
    return as_float(lower, -np.inf), as_float(upper, np.inf)


def is_real_support(support) -> bool:
    base = getattr(support, "base_constraint", support)
    return base is constraints.real
