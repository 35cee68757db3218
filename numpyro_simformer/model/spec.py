"""Read a NumPyro model once into a frozen :class:`ModelSpec`.

Everything the library needs to know about a model before it simulates, trains or answers
a query is read here, in one place: the token sites and their layout, the supports the
token transform uses, the element-level parents, the attention mask, which sites have
children (parameters) and which are data, and the variable-size dims of series and
exchangeable plates. Fitting, ensembles, checkpoints and diagnostics reuse one spec; nothing
reads the model twice.

Example:
    >>> spec = read_model_spec(jax.random.key(0), model, (), {})       # doctest: +SKIP
    >>> spec.layout.labels, spec.attention_mask.shape                    # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
import numpyro

from numpyro_simformer.model.graph import attention_mask as graph_attention_mask, element_parents
from numpyro_simformer.model.sites import SiteInfo, is_factor, read_sites, trace_model
from numpyro_simformer.model.variable import (
    VariableDims,
    close_over_variable,
    coordinate_scales,
    node_level_mask,
    node_shapes,
    resolve_variable_dims,
    variable_layout,
    variable_token_mask,
)
from numpyro_simformer.tokens.grouping import TokenGrouping, group_tokens, resolve_elements_per_token
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.tokens.transforms import constant_support

__all__ = ["ModelOptions", "ModelSpec", "read_model_spec", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("undirected", "dense", "directed")


@dataclass(frozen=True, eq=False)
class ModelOptions:
    """How to read a model: which sites are tokens, which are data, how tokens attend.

    The fields are the :class:`~numpyro_simformer.Simformer` arguments of the same names;
    see its docstring.
    """

    attention: str | np.ndarray = "undirected"
    parents: np.ndarray | None = None
    token_sites: tuple[str, ...] | None = None
    exclude_sites: tuple[str, ...] = ()
    data_sites: tuple[str, ...] | None = None
    coordinates: Mapping[str, str] | None = None
    exchangeable: tuple[str, ...] = ()
    elements_per_token: int | Mapping[str, int] | None = None

    def __post_init__(self):
        if isinstance(self.attention, str) and self.attention not in ATTENTION_KINDS:
            raise ValueError(f"`attention` must be one of {ATTENTION_KINDS} or a bool array, got {self.attention!r}.")
        if any(isinstance(value, str) for value in (self.exclude_sites, self.token_sites, self.data_sites)):
            raise TypeError("`token_sites`, `exclude_sites` and `data_sites` take a list of site names, not a string.")
        if self.coordinates is not None and not isinstance(self.coordinates, Mapping):
            raise TypeError(f"`coordinates` must be a dict {{dim: model argument name}}, got "
                            f"{type(self.coordinates).__name__}.")
        if isinstance(self.exchangeable, str):
            raise TypeError("`exchangeable` takes a list of plate names, not a string.")
        per_token = self.elements_per_token
        if per_token is not None and not isinstance(per_token, Mapping) and (
                isinstance(per_token, bool) or not isinstance(per_token, (int, np.integer)) or per_token < 1):
            raise TypeError(f"`elements_per_token` must be None (automatic), a positive int or a dict "
                            f"{{site: positive int}}, got {per_token!r}.")
        normalised = {
            "parents": None if self.parents is None else np.asarray(self.parents, dtype=bool),
            "token_sites": None if self.token_sites is None else tuple(self.token_sites),
            "exclude_sites": tuple(self.exclude_sites),
            "data_sites": None if self.data_sites is None else tuple(self.data_sites),
            "coordinates": dict(self.coordinates or {}),
            "exchangeable": tuple(self.exchangeable),
            "elements_per_token": dict(per_token) if isinstance(per_token, Mapping) else per_token,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @property
    def variable_size(self) -> bool:
        """Whether some dim may change size between training and queries."""
        return bool(self.coordinates or self.exchangeable)

    @property
    def fixed_graph(self) -> bool:
        """Whether the user gave the graph or the mask as an array (valid for the training layout only)."""
        return self.parents is not None or not isinstance(self.attention, str)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """What the library reads from a model at given arguments; immutable.

    Attributes:
        model: the NumPyro model.
        model_args, model_kwargs: the arguments it was read at (those of ``fit``).
        options: the :class:`ModelOptions` it was read with.
        layout: the :class:`~numpyro_simformer.tokens.layout.TokenLayout` of the token sites.
        supports: ``{site: constraint}``, the support each site's token transform maps
            onto (the site's own, or ``constraints.real`` when it varies between draws).
        parents: bool (num_tokens, num_tokens), ``[i, j]`` True when token j is a direct
            parent of token i (``None`` in the spec of a query at new arguments whose mask
            follows the training graph's node-level rule: the graph is not extracted again).
        attention_mask: bool (num_tokens, num_tokens), True where token i may attend to j.
        has_children: ``{site: bool}``: parameters (True) and data (False).
        data_sites: the sites the posterior and likelihood training masks treat as data.
        variable_dims: the variable-size dims, or ``None``.
        coordinate_scales: ``{dim: (offset, scale)}`` of coordinate dims, or ``None``.
        grouping: the network's :class:`~numpyro_simformer.tokens.grouping.TokenGrouping`
            when some token holds several elements, else ``None`` (one element per token).
            ``layout``, ``parents`` and ``attention_mask`` stay element by element.
    """

    model: Callable
    model_args: tuple
    model_kwargs: Mapping
    options: ModelOptions
    layout: TokenLayout
    supports: Mapping
    parents: np.ndarray | None
    attention_mask: np.ndarray
    has_children: Mapping[str, bool]
    data_sites: tuple[str, ...]
    variable_dims: VariableDims | None = None
    coordinate_scales: Mapping | None = None
    grouping: TokenGrouping | None = None

    @property
    def data_mask(self) -> np.ndarray:
        """bool (num_tokens,): True on the data sites' tokens."""
        return self.data_mask_of(self.layout)

    def data_mask_of(self, layout: TokenLayout) -> np.ndarray:
        """bool (num_tokens,) of ``layout`` (the spec's or a subset's): True on the data sites' tokens."""
        slices = layout.slices()
        mask = np.zeros(layout.num_tokens, dtype=bool)
        for name in self.data_sites:
            mask[slices[name]] = True
        return mask

    def coordinate_values(self) -> dict[str, np.ndarray]:
        """``{dim: coordinates}`` of the coordinate dims, as DataTree coordinates."""
        if self.variable_dims is None:
            return {}
        return {key: np.asarray(value) for key, value in self.variable_dims.coordinates.items()
                if any(key in site.dims for site in self.layout.sites)}

    def at(self, model_kwargs: Mapping) -> "ModelSpec":
        """The spec of the same model with its keyword arguments updated by ``model_kwargs``.

        Only variable-size dims may change (new coordinates, a new plate size); the graph
        of the new layout follows the training graph's rule where it depends on the nodes
        only, and is extracted again otherwise.

        Raises:
            ValueError: the spec has no variable-size dims, a site changes a fixed axis, or
                the graph was given as an array.
        """
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"`model_kwargs` must be a dict of the model's keyword arguments, got "
                            f"{type(model_kwargs).__name__}.")
        if self.variable_dims is None:
            raise ValueError(
                "`model_kwargs` changes the model's sizes or coordinates, but this Simformer has no variable-size "
                "dims: its layout is fixed by `fit`. Declare `coordinates=` or `exchangeable=` when creating it."
            )
        kwargs = {**self.model_kwargs, **dict(model_kwargs)}
        key = jax.random.key(0)  # the query's structure does not depend on a key; reading it is deterministic
        sites = read_sites(trace_model(key, self.model, self.model_args, kwargs), self.layout.site_names,
                           self.options.exclude_sites)
        variable = resolve_variable_dims(sites, self.options.coordinates, self.options.exchangeable, kwargs)
        trained_shapes, shapes = node_shapes(self.layout.sites, self.variable_dims), node_shapes(sites, variable)
        for site in sites:
            if shapes[site.name] != trained_shapes[site.name]:
                raise ValueError(
                    f"Site {site.name!r} has shape {site.shape} at these model arguments; only its variable-size "
                    f"dims may change, so its other axes must keep the trained shape {trained_shapes[site.name]}."
                )
        layout = variable_layout(sites, variable, self.coordinate_scales)
        if self.options.fixed_graph:
            raise ValueError("A query at new model arguments needs the model's graph at them; a user-given "
                             "`parents` or `attention` array fits the training layout only.")
        attention = self.options.attention
        node_mask = None if attention == "dense" else node_level_mask(self.attention_mask, self.layout.node_ids)
        parents = None
        if attention == "dense":
            mask = np.ones((layout.num_tokens, layout.num_tokens), dtype=bool)
        elif node_mask is not None:  # attention depends on the nodes only: the same rule at any size
            mask = node_mask[np.ix_(layout.node_ids, layout.node_ids)] | np.eye(layout.num_tokens, dtype=bool)
        else:
            with numpyro.validation_enabled(False):
                _, parents = element_parents(self.model, self.model_args, kwargs, token_sites=self.layout.site_names,
                                             exclude_sites=self.options.exclude_sites, rng_key=key)
            parents = np.asarray(parents, bool)
            mask = np.asarray(graph_attention_mask(parents, attention), dtype=bool)
        mask = close_over_variable(mask, variable_token_mask(layout, variable))
        return ModelSpec(
            model=self.model, model_args=self.model_args, model_kwargs=kwargs, options=self.options, layout=layout,
            supports=self.supports, parents=parents, attention_mask=mask, has_children=self.has_children,
            data_sites=self.data_sites, variable_dims=variable, coordinate_scales=self.coordinate_scales,
        )


def read_model_spec(rng_key, model: Callable, model_args: tuple = (), model_kwargs: Mapping | None = None,
                    options: ModelOptions = ModelOptions(), *, simulating: bool = False) -> ModelSpec:
    """Read ``model`` at its arguments: sites, supports, layout, graph, attention and data sites.

    Args:
        rng_key: a JAX PRNG key (the traces and the graph extraction's prior draws).
        model, model_args, model_kwargs: the NumPyro model and its arguments.
        options: :class:`ModelOptions`.
        simulating: warn about sites forward simulation cannot honour (``obs=``, factors).

    Raises:
        ValueError: a name a DataTree cannot hold, a graph or mask of the wrong shape, an
            unknown data site.
    """
    model_args, model_kwargs = tuple(model_args), dict(model_kwargs or {})
    key_first, key_second, key_graph = jax.random.split(rng_key, 3)
    first = trace_model(key_first, model, model_args, model_kwargs)
    sites = read_sites(first, options.token_sites, options.exclude_sites)
    _check_names_fit_datatree(sites)
    if simulating:
        _warn_sites_simulation_ignores(first)
    second = trace_model(key_second, model, model_args, model_kwargs)
    supports = {site.name: constant_support(site, [site.support, second[site.name]["fn"].support]) for site in sites}
    variable = scales = None
    if options.variable_size:
        variable = resolve_variable_dims(sites, options.coordinates, options.exchangeable, model_kwargs)
        scales = coordinate_scales(variable)
        layout = variable_layout(sites, variable, scales)
    else:
        layout = TokenLayout.from_sites(sites)
    parents = _graph(key_graph, model, model_args, model_kwargs, options, layout)
    mask = _attention_mask(options.attention, parents, layout.num_tokens)
    if variable is not None:
        mask = close_over_variable(mask, variable_token_mask(layout, variable))
    has_children = _sites_with_children(layout, parents)
    if options.data_sites is None:
        data_sites = tuple(site.name for site in sites if not has_children[site.name])
    else:
        unknown = [name for name in options.data_sites if name not in layout.site_names]
        if unknown:
            raise ValueError(f"`data_sites` names {unknown}, which are not token sites {layout.site_names}.")
        data_sites = tuple(options.data_sites)
    # Grouping needs a fixed layout: every site keeps one element per token in a model with variable-size dims.
    per_token = resolve_elements_per_token(layout, options.elements_per_token,
                                           ungrouped=None if variable is None else "the model has coordinate or "
                                           "exchangeable dims; grouping supports models of fixed-size sites only")
    return ModelSpec(model=model, model_args=model_args, model_kwargs=model_kwargs, options=options, layout=layout,
                     supports=supports, parents=parents, attention_mask=mask, has_children=has_children,
                     data_sites=data_sites, variable_dims=variable, coordinate_scales=scales,
                     grouping=group_tokens(layout, parents, mask, per_token))


def _graph(rng_key, model, model_args, model_kwargs, options: ModelOptions, layout: TokenLayout) -> np.ndarray:
    num_tokens = layout.num_tokens
    if options.parents is not None:
        parents = np.asarray(options.parents, dtype=bool)
        if parents.shape != (num_tokens, num_tokens):
            raise ValueError(
                f"`parents` has shape {parents.shape}, but the model has {num_tokens} tokens "
                f"({layout.labels[:6]}...): expected ({num_tokens}, {num_tokens})."
            )
        return parents & ~np.eye(num_tokens, dtype=bool)
    with numpyro.validation_enabled(False):  # as in simulation: bad draws are counted later
        labels, parents = element_parents(model, model_args, model_kwargs, token_sites=options.token_sites,
                                          exclude_sites=options.exclude_sites, rng_key=rng_key)
    if list(labels) != layout.labels:
        raise AssertionError("The dependency graph's token order differs from the layout's.")
    return np.asarray(parents, dtype=bool)


def _attention_mask(attention, parents: np.ndarray, num_tokens: int) -> np.ndarray:
    if not isinstance(attention, str):
        mask = np.asarray(attention, dtype=bool)
        if mask.shape != (num_tokens, num_tokens):
            raise ValueError(
                f"`attention` has shape {mask.shape}; the model has {num_tokens} tokens, "
                f"so it must be ({num_tokens}, {num_tokens})."
            )
        return mask | np.eye(num_tokens, dtype=bool)
    if attention == "dense":
        return np.ones((num_tokens, num_tokens), dtype=bool)
    return np.asarray(graph_attention_mask(parents, attention), dtype=bool)


def _sites_with_children(layout: TokenLayout, parents: np.ndarray) -> dict[str, bool]:
    site_of_token = layout.site_of_token()
    result = {}
    for index, site in enumerate(layout.sites):
        own = site_of_token == index
        result[site.name] = bool(parents[np.ix_(~own, own)].any())
    return result


def _check_names_fit_datatree(sites: Sequence[SiteInfo]) -> None:
    """Answers are DataTrees, whose variable and dimension names cannot hold '/': say so before training."""
    for site in sites:
        bad = [name for name in (site.name, *site.dims) if "/" in name]
        if bad:
            kind = "site" if bad[0] == site.name else "plate"
            raise ValueError(
                f"The {kind} name {bad[0]!r} (site {site.name!r}) contains '/', which an xarray DataTree "
                "cannot hold in a variable or dimension name (it separates groups). Rename it in the model, "
                "e.g. with '_' instead of '/'."
            )


def _warn_sites_simulation_ignores(trace) -> None:
    """Warn about ``obs=`` and ``numpyro.factor`` sites: forward simulation cannot honour them.

    Simulation draws every site from its distribution in turn, so a site given with ``obs=``
    (or by ``handlers.condition``) and a factor's log-weight change nothing in the draws: the
    Simformer learns the joint of the other sites as if those terms were absent.
    """
    ignored = [name for name, site in trace.items() if site["type"] == "sample" and site["is_observed"]]
    if not ignored:
        return
    factors = [name for name in ignored if is_factor(trace[name])]
    observed = [name for name in ignored if name not in factors]
    found = " and ".join(part for part in (
        f"observes site(s) {observed} (`obs=`)" if observed else "",
        f"has factor site(s) {factors} (`numpyro.factor`)" if factors else "",
    ) if part)
    warnings.warn(
        f"The model {found}. Simulation runs the model forward, drawing each site from its "
        "distribution, so these terms do not shape the simulated joint: the Simformer learns the "
        "model as if they were absent. To condition on such data, remove `obs=` from the model and "
        "pass the values as `observed=` when sampling; a factor cannot be simulated forward, so "
        "write what it encodes as a sample site or drop it.",
        stacklevel=4,  # the user's call of `fit`
    )
