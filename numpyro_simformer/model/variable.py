"""Sites whose size may change: coordinate-indexed series and exchangeable plates.

A *variable dim* is an axis of one or more token sites along which the number of elements
may differ between training and queries:

- a **coordinate dim** carries a coordinate per element, given by a keyword argument of
  the model: a time series ``u`` observed at times ``t`` (``with numpyro.plate("time",
  len(t))``), or a function-valued parameter ``beta`` evaluated at ``t_beta``
  (``beta_dim_0``, an event axis). ``Simformer(model, coordinates={"time": "t"})``.
- an **exchangeable dim** is an iid plate whose size may change: ``Simformer(model,
  exchangeable=["trials"])``.

All elements of a site along a variable dim share one node id (one embedding); a
coordinate dim adds the element's coordinate, rescaled to [0, 1] over the training range,
through the network's Fourier features. Training draws, per example, a random subset of
between 1 and ``points_per_dim`` positions along each variable dim from the simulated grid
(:class:`Subsampler`); the positions not drawn are padding that no token attends to.
Queries re-trace the model with new keyword arguments (new times, a new plate size) and
rebuild the layout and the attention mask for them.

Dropping elements from the graph marginalises them out, which can link their neighbours
(an SDE path observed at fewer times is still Markov, but with longer steps). The
attention mask is therefore closed over the variable dims (:func:`close_over_variable`):
each connected group of variable tokens becomes a clique with its neighbours. That is
exact for the common case (observations independent given the parameters: nothing is
added) and dense where the extraction cannot say more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.model.sites import SiteInfo

__all__ = ["VariableDims", "resolve_variable_dims", "variable_layout", "close_over_variable", "Subsampler"]


@dataclass(frozen=True)
class VariableDims:
    """Which axis of which site is variable, and the coordinates along coordinate dims.

    Attributes:
        axes: ``{site: ((axis, dim_key), ...)}`` for every site with a variable axis.
        coordinates: ``{dim_key: float array}`` for coordinate dims (current sizes).
        exchangeable: the exchangeable dim keys.
    """

    axes: Mapping[str, tuple[tuple[int, str], ...]]
    coordinates: Mapping[str, np.ndarray]
    exchangeable: tuple[str, ...]

    @property
    def dim_keys(self) -> list[str]:
        return sorted({key for axes in self.axes.values() for _, key in axes})

    def sizes(self, sites: Sequence[SiteInfo]) -> dict[str, int]:
        """Current size of each variable dim (checked equal across the sites that share it)."""
        sizes: dict[str, int] = {}
        for site in sites:
            for axis, key in self.axes.get(site.name, ()):
                size = site.shape[axis]
                if sizes.setdefault(key, size) != size:
                    raise ValueError(
                        f"The variable dim {key!r} has size {sizes[key]} in one site and {size} in "
                        f"site {site.name!r}; the sites that share a dim must have the same size along it."
                    )
        return sizes


def _axis_dims(site: SiteInfo) -> list[str]:
    return list(site.dims)


def resolve_variable_dims(
    sites: Sequence[SiteInfo],
    coordinates: Mapping[str, str],
    exchangeable: Sequence[str],
    model_kwargs: Mapping,
) -> VariableDims:
    """Match the user's ``coordinates`` and ``exchangeable`` dims to site axes.

    A key of ``coordinates`` (or an entry of ``exchangeable``) is a dim name as it appears in
    the results: a plate's name, or ``"{site}_dim_{k}"`` for an axis that is not a plate; a
    site's name stands for its first axis. A value of ``coordinates`` names the keyword
    argument of the model that holds the coordinates (a 1-d array, one per element).

    Raises:
        ValueError: for a key that matches no axis, a missing or mis-sized coordinate
            argument, or a dim that is both a coordinate and an exchangeable dim.
    """
    coordinates = dict(coordinates or {})
    exchangeable = tuple(exchangeable or ())
    both = set(coordinates) & set(exchangeable)
    if both:
        raise ValueError(f"The dims {sorted(both)} are given both `coordinates` and `exchangeable`; a coordinate "
                         "dim is already variable-size, so name it in `coordinates` only.")
    keys = list(coordinates) + list(exchangeable)
    axes: dict[str, list[tuple[int, str]]] = {}
    matched = set()
    for site in sites:
        for axis, dim in enumerate(_axis_dims(site)):
            key = dim if dim in keys else (site.name if axis == 0 and site.name in keys else None)
            if key is None:
                continue
            axes.setdefault(site.name, []).append((axis, key))
            matched.add(key)
    unknown = [key for key in keys if key not in matched]
    if unknown:
        available = sorted({dim for site in sites for dim in site.dims} | {site.name for site in sites if site.shape})
        raise ValueError(
            f"`coordinates`/`exchangeable` name {unknown}, which is no axis of a token site. Use a plate's "
            f"name or a dim name as in the results; the token sites' dims are {available}."
        )
    for name, site_axes in axes.items():
        if sum(key in coordinates for _, key in site_axes) > 1:
            raise ValueError(f"Site {name!r} has more than one coordinate dim ({site_axes}); one coordinate "
                             "per token is supported.")
    sizes = VariableDims({k: tuple(v) for k, v in axes.items()}, {}, exchangeable).sizes(sites)
    values = {}
    for key, argument in coordinates.items():
        if not isinstance(argument, str):
            raise TypeError(f"`coordinates[{key!r}]` must name a keyword argument of the model, got {argument!r}.")
        if argument not in model_kwargs:
            raise ValueError(
                f"`coordinates` maps the dim {key!r} to the model argument {argument!r}, but the model was "
                f"not given `{argument}=`. Pass the coordinates as a keyword argument, e.g. "
                f"`fit(rng_key, {argument}=times)` or `sample(..., model_kwargs={{{argument!r}: times}})`."
            )
        value = np.asarray(model_kwargs[argument], dtype=np.float64)
        if value.shape != (sizes[key],):
            raise ValueError(
                f"The coordinates of dim {key!r} (model argument {argument!r}) have shape {value.shape}; the "
                f"model's sites have {sizes[key]} elements along that dim, so expected ({sizes[key]},)."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"The coordinates of dim {key!r} (model argument {argument!r}) contain NaN or inf.")
        values[key] = value
    return VariableDims({k: tuple(v) for k, v in axes.items()}, values, exchangeable)


def coordinate_scales(variable: VariableDims) -> dict[str, tuple[float, float]]:
    """``{dim: (low, high)}`` of the training coordinates; queries are rescaled with these."""
    scales = {}
    for key, value in variable.coordinates.items():
        low, high = float(value.min()), float(value.max())
        scales[key] = (low, high if high > low else low + 1.0)
    return scales


def _fixed_shape(site: SiteInfo, variable_axes) -> tuple[int, ...]:
    drop = {axis for axis, _ in variable_axes}
    return tuple(size for axis, size in enumerate(site.shape) if axis not in drop)


def node_shapes(sites: Sequence[SiteInfo], variable: VariableDims) -> dict[str, tuple[int, ...]]:
    """The shape of each site without its variable axes: one node id per element of it."""
    return {site.name: _fixed_shape(site, variable.axes.get(site.name, ())) for site in sites}


def variable_layout(sites: Sequence[SiteInfo], variable: VariableDims,
                    scales: Mapping[str, tuple[float, float]]) -> TokenLayout:
    """A layout whose tokens share node ids along variable dims and carry coordinates."""
    node_ids, coords = [], []
    base = 0
    for site in sites:
        site_axes = variable.axes.get(site.name, ())
        fixed = _fixed_shape(site, site_axes)
        variable_axes = {axis for axis, _ in site_axes}
        coordinate_axis = [(axis, key) for axis, key in site_axes if key in variable.coordinates]
        for index in np.ndindex(*site.shape):
            fixed_index = tuple(i for axis, i in enumerate(index) if axis not in variable_axes)
            node_ids.append(base + (int(np.ravel_multi_index(fixed_index, fixed)) if fixed else 0))
            if coordinate_axis:
                axis, key = coordinate_axis[0]
                low, high = scales[key]
                coords.append((variable.coordinates[key][index[axis]] - low) / (high - low))
            else:
                coords.append(0.0)
        base += int(np.prod(fixed, dtype=int))
    return TokenLayout(tuple(sites), np.asarray(node_ids, np.int32), np.asarray(coords, np.float32))


def variable_token_mask(layout: TokenLayout, variable: VariableDims) -> np.ndarray:
    """bool (num_tokens,): True for tokens of a site with a variable axis."""
    return np.concatenate([np.full(site.size, site.name in variable.axes) for site in layout.sites])


def close_over_variable(mask: np.ndarray, variable_tokens: np.ndarray) -> np.ndarray:
    """The attention mask with every subset of the variable tokens marginalisable.

    For each connected group ``C`` of variable tokens (connected through edges between
    variable tokens), ``C`` and all its neighbours become one clique: what removing any
    part of ``C`` can link. Tokens on no variable dim keep their edges.
    """
    from scipy.sparse.csgraph import connected_components

    mask = np.asarray(mask, dtype=bool)
    symmetric = mask | mask.T
    variable_tokens = np.asarray(variable_tokens, dtype=bool)
    index = np.flatnonzero(variable_tokens)
    if index.size == 0:
        return mask
    sub = symmetric[np.ix_(index, index)] & ~np.eye(index.size, dtype=bool)
    _, labels = connected_components(sub, directed=False)
    closed = mask.copy()
    for label in np.unique(labels):
        members = index[labels == label]
        neighbours = np.flatnonzero(symmetric[members].any(axis=0))
        group = np.union1d(members, neighbours)
        closed[np.ix_(group, group)] = True
    return closed


def node_level_mask(mask: np.ndarray, node_ids: np.ndarray) -> np.ndarray | None:
    """``A`` (num_nodes, num_nodes) with ``mask[i, j] == A[node_i, node_j]`` for all ``i != j``, or ``None``.

    When the attention between two tokens depends only on their nodes (observations
    independent given the parameters, for example), the mask of any other layout of the
    same nodes is ``A[node_i, node_j]``: no need to extract the graph again.
    """
    mask = np.asarray(mask, dtype=bool)
    off_diagonal = ~np.eye(mask.shape[0], dtype=bool)
    one_hot = (np.asarray(node_ids)[:, None] == np.arange(int(np.max(node_ids)) + 1)[None]).astype(np.int64)
    connected = one_hot.T @ (mask & off_diagonal).astype(np.int64) @ one_hot
    pairs = one_hot.T @ off_diagonal.astype(np.int64) @ one_hot
    if np.any((connected != 0) & (connected != pairs)):
        return None
    return connected > 0


@dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of jitted functions
class Subsampler:
    """Draws, per training example, random positions along each variable dim.

    Built from the full (simulated) layout; ``template`` is the layout of one training
    example, with ``points[d]`` slots along dim ``d``. ``__call__`` maps a row of full
    tokens to the template's tokens, coordinates, a presence mask and the attention mask.
    """

    template: TokenLayout
    dim_keys: tuple[str, ...]
    grid_sizes: tuple[int, ...]
    points: tuple[int, ...]
    base: np.ndarray  # (T,) full index with every variable position 0
    strides: np.ndarray  # (D, T) full-index stride of each dim (0 if the token lacks it)
    slots: np.ndarray  # (D, T) slot along each dim (0 if the token lacks it)
    has_dim: np.ndarray  # (D, T) bool
    full_coordinates: np.ndarray  # (N,)
    full_mask: np.ndarray  # (N, N) bool, closed over the variable dims

    @classmethod
    def build(cls, layout: TokenLayout, variable: VariableDims, attention_mask: np.ndarray,
              points_per_dim: int) -> "Subsampler":
        sizes = variable.sizes(layout.sites)
        keys = tuple(sorted(sizes))
        points = tuple(min(sizes[key], points_per_dim) for key in keys)
        template_sites = []
        for site in layout.sites:
            shape = list(site.shape)
            for axis, key in variable.axes.get(site.name, ()):
                shape[axis] = points[keys.index(key)]
            template_sites.append(replace(site, shape=tuple(shape)))
        template_variable = VariableDims(variable.axes, {k: np.zeros(points[keys.index(k)]) for k in variable.coordinates},
                                         variable.exchangeable)
        template = variable_layout(template_sites, template_variable, {k: (0.0, 1.0) for k in variable.coordinates})
        base, strides, slots, has_dim = [], [], [], []
        offsets = layout.slices()
        for site, small in zip(layout.sites, template_sites):
            full_strides = np.array([int(np.prod(site.shape[axis + 1:], dtype=int)) for axis in range(len(site.shape))])
            dim_of_axis = {axis: key for axis, key in variable.axes.get(site.name, ())}
            for index in np.ndindex(*small.shape):
                fixed = sum(full_strides[a] * i for a, i in enumerate(index) if a not in dim_of_axis)
                base.append(offsets[site.name].start + int(fixed))
                row_stride, row_slot, row_has = np.zeros(len(keys), int), np.zeros(len(keys), int), np.zeros(len(keys), bool)
                for axis, key in dim_of_axis.items():
                    d = keys.index(key)
                    row_stride[d], row_slot[d], row_has[d] = full_strides[axis], index[axis], True
                strides.append(row_stride), slots.append(row_slot), has_dim.append(row_has)
        return cls(template, keys, tuple(sizes[k] for k in keys), points, np.asarray(base, np.int32),
                   np.asarray(strides, np.int32).T.reshape(len(keys), -1), np.asarray(slots, np.int32).T.reshape(len(keys), -1),
                   np.asarray(has_dim, bool).T.reshape(len(keys), -1), np.asarray(layout.coordinates, np.float32),
                   np.asarray(attention_mask, bool))

    def indices(self, rng_key):
        """(full indices (T,), present (T,)) for one example."""
        index = jnp.asarray(self.base)
        present = jnp.ones(self.base.shape, bool)
        for d, (size, points) in enumerate(zip(self.grid_sizes, self.points)):
            key_choice, key_count, rng_key = jax.random.split(rng_key, 3)
            chosen = jax.random.permutation(key_choice, size)[:points]
            count = jax.random.randint(key_count, (), 1, points + 1)
            slots = jnp.asarray(self.slots[d])
            index = index + jnp.asarray(self.strides[d]) * chosen[slots]
            present = present & (~jnp.asarray(self.has_dim[d]) | (slots < count))
        return index, present

    def __call__(self, rng_key, row):
        """``row`` (N,) full tokens -> (tokens (T,), present (T,), coordinates (T,), mask (T, T))."""
        index, present = self.indices(rng_key)
        mask = jnp.asarray(self.full_mask)[index][:, index]
        mask = (mask & present[None, :]) | jnp.eye(index.shape[0], dtype=bool)
        return row[index], present, jnp.asarray(self.full_coordinates)[index], mask


def pooled_statistics(tokens_unconstrained: np.ndarray, node_ids: np.ndarray):
    """Per-node mean and std (pooled over a node's elements) from unconstrained simulations."""
    values = np.asarray(tokens_unconstrained, dtype=np.float64)
    count = np.bincount(node_ids) * values.shape[0]
    node_mean = np.bincount(node_ids, weights=values.sum(axis=0)) / count
    centred = values - node_mean[node_ids]
    node_std = np.sqrt(np.bincount(node_ids, weights=(centred**2).sum(axis=0)) / count)
    node_std = np.where(node_std > 1e-8, node_std, 1.0)
    return node_mean.astype(np.float32), node_std.astype(np.float32)
