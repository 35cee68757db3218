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

__all__ = ["SiteInfo", "trace_model", "read_sites", "site_dims"]


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
    """
    try:
        with numpyro.validation_enabled(False):
            return handlers.trace(handlers.seed(model, rng_key)).get_trace(*model_args, **model_kwargs)
    except Exception as error:  # noqa: BLE001 - the user's model can raise anything
        raise RuntimeError(
            f"Tracing the model {getattr(model, '__name__', model)!r} failed with "
            f"{type(error).__name__}: {error}\nThe model must run as "
            "`model(*model_args, **model_kwargs)`; pass its arguments to `fit` the way "
            "you would to `numpyro.infer.MCMC.run`."
        ) from error


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


def is_real_support(support) -> bool:
    base = getattr(support, "base_constraint", support)
    return base is constraints.real
