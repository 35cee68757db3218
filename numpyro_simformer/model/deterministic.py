"""The model's ``numpyro.deterministic`` sites, recomputed from a query's token sites.

A deterministic site is a function of the sample sites above it. Given every token site's
value in a draw (the observed ones and the inferred ones), running the model with those
values substituted gives the deterministic sites of that draw, as ``numpyro.infer.Predictive``
does for MCMC samples. A deterministic site that also depends on randomness outside the
tokens (a site left out with ``exclude_sites``) has no such value: it would be computed
from a fresh prior draw, not from the conditional. When the model has random sites outside the tokens, such
deterministic sites are found by running the model under two keys; they are not returned,
and the answer names them. Otherwise one run is enough.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np
from numpyro.infer import Predictive

from numpyro_simformer.model.sites import site_dims, trace_model

__all__ = ["read_deterministic", "deterministic_values"]


def read_deterministic(model: Callable, model_args: tuple, model_kwargs: Mapping, token_sites):
    """``({name: dims}, random_outside)``: the model's deterministic sites (plate names where
    a plate sits), and whether it draws any sample site that is not a token."""
    trace = trace_model(jax.random.key(0), model, model_args, dict(model_kwargs))
    dims = {
        name: site_dims(name, tuple(np.shape(site["value"])), 0, site.get("cond_indep_stack", ()))
        for name, site in trace.items()
        if site["type"] == "deterministic"
    }
    random_outside = any(site["type"] == "sample" and not site["is_observed"] and name not in set(token_sites)
                         for name, site in trace.items())
    return dims, random_outside


def deterministic_values(rng_key, model: Callable, model_args: tuple, model_kwargs: Mapping,
                         site_values: Mapping[str, np.ndarray], names, batch_ndim: int, random_outside: bool):
    """The deterministic sites ``names`` of every draw in ``site_values``.

    Args:
        rng_key: keys the model's runs (two when ``random_outside``, to tell the sites
            fixed by the tokens from the others).
        site_values: ``{token site: array (*batch, *site shape)}``, every token site.
        names: the deterministic sites to compute.
        batch_ndim: how many leading axes of ``site_values`` are draws (chain, draw, ...).
        random_outside: whether the model draws sample sites that are not tokens.

    Returns:
        ``(values, not_returned)``: ``{name: array (*batch, *site shape)}`` for the sites
        fixed by the tokens, and the names of those that are not.
    """
    names = list(names)
    if not names:
        return {}, []
    batch_shape = next(iter(site_values.values())).shape[:batch_ndim]
    flat = {name: np.reshape(value, (-1, *value.shape[batch_ndim:])) for name, value in site_values.items()}
    predictive = Predictive(model, posterior_samples=flat, return_sites=names, batch_ndims=1)
    keys = jax.random.split(rng_key) if random_outside else [rng_key]
    runs = [predictive(key, *model_args, **dict(model_kwargs)) for key in keys]
    values, not_returned = {}, []
    for name in names:
        first, second = np.asarray(runs[0][name]), np.asarray(runs[-1][name])
        if first.shape == second.shape and np.array_equal(first, second, equal_nan=True):
            values[name] = first.reshape(*batch_shape, *first.shape[1:])
        else:
            not_returned.append(name)
    return values, not_returned
