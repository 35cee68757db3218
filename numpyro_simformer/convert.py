"""Samples -> ArviZ ``xarray.DataTree``, in one place.

Groups: ``posterior`` holds each unobserved (or partly observed) site that has children
in the model graph and the model's deterministic sites, ``posterior_predictive`` each
unobserved site without children, and ``observed_data`` the conditioned values (NaN where
an element was inferred). Sample dims
are ``(chain, draw)``; each variable keeps its site's shape, and plate names become dim
names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from arviz_base import from_dict

from numpyro_simformer.layout import TokenLayout

__all__ = ["to_datatree"]


def to_datatree(
    layout: TokenLayout,
    samples: Mapping[str, np.ndarray],
    observed: Mapping[str, np.ndarray],
    posterior_sites: Sequence[str],
    predictive_sites: Sequence[str],
    *,
    attrs: Mapping | None = None,
    extra_dims: Sequence[str] = (),
    coords: Mapping[str, np.ndarray] | None = None,
    deterministic: Mapping[str, tuple[np.ndarray, Sequence[str]]] | None = None,
):
    """Build the DataTree of one query.

    Args:
        layout: the token layout (shapes and dim names).
        samples: ``{site: array (chain, draw, *extra, *site.shape)}`` for the inferred sites.
        observed: ``{site: array (*extra, *site.shape)}`` of the conditioned sites.
        posterior_sites, predictive_sites: which sampled sites go to which group.
        attrs: attributes for the root (inference settings).
        extra_dims: names of dims that sit between the sample dims and the site's dims
            (for example a batch of observations).
        coords: ``{dim: values}``: coordinate values of dims (the times of a time series).
        deterministic: ``{name: (array (chain, draw, *extra, *shape), dims)}``: the
            model's deterministic sites, added to ``posterior``.
    """
    deterministic = dict(deterministic or {})
    dims = {site.name: [*extra_dims, *site.dims] for site in layout.sites}
    dims |= {name: [*extra_dims, *site_dims] for name, (_, site_dims) in deterministic.items()}
    data = {
        "posterior": {name: np.asarray(samples[name]) for name in posterior_sites}
        | {name: np.asarray(value) for name, (value, _) in deterministic.items()},
        "posterior_predictive": {name: np.asarray(samples[name]) for name in predictive_sites},
        "observed_data": {name: np.asarray(value) for name, value in observed.items()},
    }
    data = {group: variables for group, variables in data.items() if variables}
    tree = from_dict(data, dims=dims, coords=dict(coords or {}), sample_dims=["chain", "draw"])
    if attrs:
        tree.attrs.update(dict(attrs))
    return tree
