"""Samples -> ArviZ ``xarray.DataTree``, in one place.

Groups: ``posterior`` holds each unobserved (or partly observed) site that has children
in the model graph and the model's deterministic sites, ``posterior_predictive`` each
unobserved site without children, and ``observed_data`` the conditioned values (NaN where
an element was inferred). Sample dims
are ``(chain, draw)``; each variable keeps its site's shape, and plate names become dim
names.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import xarray as xr
from arviz_base import from_dict

from numpyro_simformer.model.deterministic import deterministic_values, read_deterministic
from numpyro_simformer.tokens.layout import TokenLayout

__all__ = ["to_datatree", "answer_tree", "deterministic_sites", "site_values_of"]


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
    bounds: Mapping[str, tuple[np.ndarray, Sequence[str]]] | None = None,
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
        bounds: ``{name: (array, dims)}``: interval bounds (``{site}_lower``,
            ``{site}_upper``), added to ``observed_data``.
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
    if bounds:
        arrays = {name: xr.DataArray(np.asarray(value, dtype=np.float64), dims=list(site_dims))
                  for name, (value, site_dims) in bounds.items()}
        if "observed_data" in tree.children:
            tree["observed_data"] = tree["observed_data"].to_dataset().assign(arrays)
        else:
            tree["observed_data"] = xr.Dataset(arrays)
    return tree


def site_values_of(layout: TokenLayout, tokens) -> dict[str, np.ndarray]:
    """``{site: (..., *site shape)}`` of constrained tokens (..., num_tokens); discrete sites as integers."""
    unflat = layout.unflatten(tokens)
    return {site.name: np.rint(unflat[site.name]).astype(np.int64) if site.is_discrete
            else np.asarray(unflat[site.name]) for site in layout.sites}


def answer_tree(space, tokens, values, condition_mask, observed_names: Sequence[str], *, attrs: Mapping,
                batched: bool = False, intervals=None, deterministic=None, site_values=None):
    """The DataTree of one answered query.

    Args:
        space: the :class:`~numpyro_simformer.inference.driver.QuerySpace` (layout, coordinates, which sites have children).
        tokens: (chain, draw, [observation,] num_tokens), constrained.
        values: ([observation,] num_tokens), the observed values, NaN where latent.
        condition_mask: (..., num_tokens), True where observed.
        observed_names: the sites the user gave in ``observed``.
        attrs: the root's attributes.
        batched: whether the query is a batch of observations (an ``observation`` dim).
        intervals: the query's :class:`~numpyro_simformer.inference.query.IntervalQuery`, or ``None``.
        deterministic: ``(values, not_returned)`` from :func:`deterministic_sites`, or ``None``.
        site_values: :func:`site_values_of` the tokens, when the caller has them already.
    """
    layout = space.layout
    has_children = space.spec.has_children
    slices = layout.slices()
    condition_mask = np.reshape(condition_mask, (-1, layout.num_tokens))
    inferred = [site for site in layout.sites if not condition_mask[:, slices[site.name]].all()]
    site_values = site_values_of(layout, tokens) if site_values is None else site_values
    samples = {site.name: site_values[site.name] for site in inferred}
    observed_sites = layout.unflatten(np.asarray(values, dtype=np.float64))
    extra_dims = ("observation",) if batched else ()
    attrs = dict(attrs)
    deterministic_arrays, not_returned = deterministic if deterministic is not None else ({}, [])
    if not_returned:
        attrs["deterministic_sites_not_returned"] = not_returned
    bounds = {}
    if intervals is not None:
        attrs["interval_sites"] = [name for name in layout.site_names if intervals.interval_mask[slices[name]].any()]
        for name in attrs["interval_sites"]:
            site = layout.site(name)
            for side, bound in (("lower", intervals.lower), ("upper", intervals.upper)):
                value = bound[slices[name]].reshape(site.shape)
                bounds[f"{name}_{side}"] = (np.broadcast_to(value, tokens.shape[2:-1] + site.shape),
                                            [*extra_dims, *site.dims])
    return to_datatree(
        layout,
        samples,
        {name: observed_sites[name] for name in observed_names},
        [site.name for site in inferred if has_children[site.name]],
        [site.name for site in inferred if not has_children[site.name]],
        attrs=attrs,
        extra_dims=extra_dims,
        coords=space.coordinates,
        deterministic=deterministic_arrays,
        bounds=bounds,
    )


def deterministic_sites(rng_key, space, site_values, batch_ndim: int):
    """``({name: (values, dims)}, not_returned)``: the model's deterministic sites for each draw.

    ``site_values``: :func:`site_values_of` the constrained tokens, with ``batch_ndim``
    leading axes (chain, draw, [observation]). The model is re-run on every draw's token
    sites (as ``numpyro.infer.Predictive``); a site that also depends on sample sites
    outside the tokens is named in ``not_returned``, with a warning.
    """
    spec = space.spec
    layout = space.layout
    if space.deterministic is None:
        space.deterministic = read_deterministic(spec.model, spec.model_args, spec.model_kwargs, layout.site_names)
    dims, random_outside = space.deterministic
    if not dims:
        return {}, []
    values, not_returned = deterministic_values(rng_key, spec.model, spec.model_args, spec.model_kwargs, site_values,
                                                dims, batch_ndim, random_outside)
    if not_returned:
        warnings.warn(
            f"Deterministic site(s) {not_returned} depend on sites outside the tokens (exclude_sites="
            f"{list(spec.options.exclude_sites)}), so the answer cannot fix them; they are not returned. Make those "
            "sites tokens to get them.", stacklevel=3)
    return {name: (value, dims[name]) for name, value in values.items()}, not_returned
