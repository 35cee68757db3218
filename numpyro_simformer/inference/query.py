"""Validate a query and turn it into token values and a condition mask.

``observed`` names any subset of the token sites. NaN elements mean "missing": they are
inferred with the rest of the latent tokens. Everything here is static and checked before
any tracing, with errors that name the site.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer.samplers.guidance import IntervalBounds
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.tokens.transforms import couples_elements, outside_discrete_support

__all__ = ["Query", "build_query", "observed_tokens", "batched_observed_tokens", "to_z_checked", "IntervalQuery",
           "interval_bounds"]


def _check_token_site(layout: TokenLayout, name, argument: str, verb: str, excluded_sites=()) -> None:
    """Raise a ValueError naming ``name`` when it is not a token site."""
    if name in layout.site_names:
        return
    hint = (
        f" {name!r} was excluded from the tokens (`exclude_sites`), so it cannot be {verb}."
        if name in excluded_sites
        else ""
    )
    raise ValueError(f"{argument} names an unknown site {name!r}.{hint} The token sites are {layout.site_names}.")


def _as_float_array(name: str, value) -> np.ndarray:
    try:
        array = np.asarray(jax.device_get(value), dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"observed[{name!r}] must be numeric (a number or an array), got "
            f"{type(value).__name__}: {error}"
        ) from None
    return array


def observed_tokens(layout: TokenLayout, observed: Mapping | None, *, excluded_sites=()) -> tuple[np.ndarray, np.ndarray]:
    """Flat constrained token values and condition mask of a query.

    Args:
        layout: the token layout.
        observed: ``{site_name: value}``; each value has the site's shape; NaN = missing.
        excluded_sites: model sites that are not tokens (named in the error message).

    Returns:
        ``(values, condition_mask)``: float (num_tokens,) with NaN where latent, and bool
        (num_tokens,) True where observed.

    Raises:
        TypeError: ``observed`` is not a mapping, or a value is not numeric.
        ValueError: unknown site, wrong shape, infinite value, or nothing left to infer.
    """
    observed = {} if observed is None else observed
    if not isinstance(observed, Mapping):
        raise TypeError(
            f"`observed` must be a dict mapping site names to arrays, got {type(observed).__name__}."
        )
    slices = layout.slices()
    values = np.full(layout.num_tokens, np.nan)
    for name, value in observed.items():
        _check_token_site(layout, name, "observed", "observed", excluded_sites)
        site = layout.site(name)
        array = _as_float_array(name, value)
        if array.shape != site.shape:
            raise ValueError(
                f"observed[{name!r}] has shape {array.shape}, but site {name!r} has shape "
                f"{site.shape}. Pass one value per element of the site (NaN marks a missing "
                "element)."
            )
        if np.any(np.isinf(array)):
            raise ValueError(
                f"observed[{name!r}] contains inf. Observed values must be finite; use NaN "
                "for an element that is missing."
            )
        values[slices[name]] = array.reshape(-1)
    condition_mask = ~np.isnan(values)
    if condition_mask.all():
        raise ValueError(
            "Every token is observed, so there is nothing to infer. Leave out a site (or set "
            "elements to NaN) to ask for it."
        )
    return values, condition_mask


def to_z_checked(layout: TokenLayout, transform, values: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
    """Observed constrained values -> z-space; latent tokens set to 0.

    ``values`` and ``condition_mask`` are (num_tokens,) or (num_observations, num_tokens).

    Raises:
        ValueError: an observed value lies outside its site's support (for a discrete site:
            is no integer of it), or a site whose
            support couples its elements (a simplex, an ordered vector) is partly observed.
    """
    _check_coupled_sites(layout, transform, values, condition_mask)
    filled = np.where(condition_mask, values, _interior_fill(transform)).astype(np.float32)
    z = np.asarray(transform.to_z_fn(filled))
    bad = condition_mask & (~np.isfinite(z) | outside_discrete_support(transform, values))
    if bad.any():
        position = tuple(np.argwhere(bad)[0])
        index = int(position[-1])
        site = layout.sites[layout.site_of_token()[index]]
        raise ValueError(
            f"observed[{site.name!r}] has value {values[position]} at token "
            f"{layout.labels[index]!r}, outside the site's support {site.support}."
        )
    return np.where(condition_mask, z, 0.0).astype(np.float32)


def _check_coupled_sites(layout: TokenLayout, transform, values: np.ndarray, condition_mask: np.ndarray) -> None:
    """A site whose bijection mixes its elements is observed whole (and in its support) or not at all.

    Its unconstrained coordinates are functions of all of its elements (a simplex's
    log-ratios, an ordered vector's gaps), so observing some elements fixes no token.
    """
    slices = layout.slices()
    condition_mask = np.reshape(condition_mask, (-1, layout.num_tokens))
    values = np.reshape(values, (-1, layout.num_tokens))
    for site, bijection in zip(layout.sites, transform.bijections):
        if site.is_discrete or not couples_elements(bijection):
            continue
        given = condition_mask[:, slices[site.name]]
        if (given.any(axis=1) & ~given.all(axis=1)).any():
            raise ValueError(
                f"observed[{site.name!r}] gives some elements of a site whose support {site.support} couples "
                "its elements: give all of them, or none (NaN everywhere) to infer the site."
            )
        for row in np.flatnonzero(given.all(axis=1)):
            value = values[row, slices[site.name]].reshape(site.shape)
            if not np.all(site.support(value)):
                raise ValueError(
                    f"observed[{site.name!r}] is {value.tolist()}, outside the site's support {site.support}."
                )


def _interior_fill(transform) -> np.ndarray:
    """A value inside every site's support (the constrained image of the z-space mean)."""
    return np.asarray(transform.from_z_fn(np.zeros(transform.layout.num_tokens, np.float32)))


def batched_observed_tokens(
    layout: TokenLayout, observed: Mapping | None, *, excluded_sites=()
) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Like :func:`observed_tokens`, for one observation or a batch of them.

    A site's value is a batch when it has one more axis than the site:
    ``(num_observations, *site.shape)``. Sites given without the batch axis are shared by
    every observation. All batched sites must agree on ``num_observations``.

    Returns:
        ``(values, condition_mask, num_observations)``: float and bool arrays
        (num_observations, num_tokens) (one row when nothing is batched), and the batch
        size, or ``None`` when no site has a batch axis.

    Raises:
        ValueError: as :func:`observed_tokens`; and when batched sites disagree on the
            number of observations (the message names them).
    """
    observed = {} if observed is None else observed
    if not isinstance(observed, Mapping):
        raise TypeError(
            f"`observed` must be a dict mapping site names to arrays, got {type(observed).__name__}."
        )
    slices = layout.slices()
    arrays, batch_sizes = {}, {}
    for name, value in observed.items():
        _check_token_site(layout, name, "observed", "observed", excluded_sites)
        site = layout.site(name)
        array = _as_float_array(name, value)
        if array.ndim == len(site.shape) + 1 and array.shape[1:] == site.shape:
            if array.shape[0] == 0:
                raise ValueError(f"observed[{name!r}] has a batch axis of length 0: there is no observation to answer.")
            batch_sizes[name] = array.shape[0]
        elif array.shape != site.shape:
            raise ValueError(
                f"observed[{name!r}] has shape {array.shape}, but site {name!r} has shape "
                f"{site.shape}. Pass one value per element of the site (NaN marks a missing "
                f"element), or a batch of observations of shape (num_observations, *{site.shape})."
            )
        arrays[name] = array
    if not batch_sizes:
        values, condition_mask = observed_tokens(layout, arrays, excluded_sites=excluded_sites)
        return values[None], condition_mask[None], None
    if len(set(batch_sizes.values())) > 1:
        described = ", ".join(f"{name!r}: {size}" for name, size in batch_sizes.items())
        raise ValueError(
            f"The batched sites of `observed` have different numbers of observations ({described}). "
            "Give every batched site the same leading axis, or drop the batch axis of a site "
            "shared by all observations."
        )
    num_observations = next(iter(batch_sizes.values()))
    values = np.empty((num_observations, layout.num_tokens))
    condition_mask = np.empty((num_observations, layout.num_tokens), dtype=bool)
    for index in range(num_observations):
        row = {name: array[index] if name in batch_sizes else array for name, array in arrays.items()}
        try:
            values[index], condition_mask[index] = observed_tokens(layout, row, excluded_sites=excluded_sites)
        except ValueError as error:
            raise ValueError(f"Observation {index} of the batch: {error}") from None
    return values, condition_mask, num_observations


class IntervalQuery(NamedTuple):
    """Validated interval conditions, per token (num_tokens,).

    Attributes:
        lower, upper: the bounds in the user's (constrained) space, ``-inf``/``inf`` where open.
        z_lower, z_upper: the same bounds in z-space (swapped where the site's transform
            decreases), ``-inf``/``inf`` where open.
        interval_mask: True where a token carries an interval (at least one finite bound).
    """

    lower: np.ndarray
    upper: np.ndarray
    z_lower: np.ndarray
    z_upper: np.ndarray
    interval_mask: np.ndarray

    def z_bounds(self) -> IntervalBounds:
        """The z-space bounds as the guided samplers take them."""
        return IntervalBounds(jnp.asarray(self.z_lower), jnp.asarray(self.z_upper))


class Query(NamedTuple):
    """One validated query, converted to token space once.

    Attributes:
        values: float64 (num_observations, num_tokens), the observed values in the user's
            space, NaN where latent (one row when the query is not a batch).
        condition_mask: bool (num_observations, num_tokens), True where observed.
        z_observed: float32 (num_observations, num_tokens), the observed values in z-space
            (0 where latent).
        batched: whether ``observed`` gave a batch of observations.
        observed_names: the sites given in ``observed``.
        intervals: the :class:`IntervalQuery`, or ``None``.
    """

    values: np.ndarray
    condition_mask: np.ndarray
    z_observed: np.ndarray
    batched: bool
    observed_names: list[str]
    intervals: IntervalQuery | None


def build_query(layout: TokenLayout, transform, observed: Mapping | None, intervals: Mapping | None = None, *,
                excluded_sites=()) -> Query:
    """Validate ``observed`` and ``intervals`` and convert them to token space (see :class:`Query`).

    Raises:
        TypeError, ValueError: as :func:`batched_observed_tokens`, :func:`interval_bounds`
            and :func:`to_z_checked`, naming the site.
    """
    values, condition_mask, num_observations = batched_observed_tokens(layout, observed,
                                                                       excluded_sites=excluded_sites)
    bounds = interval_bounds(layout, transform, intervals, condition_mask, excluded_sites=excluded_sites)
    z_observed = to_z_checked(layout, transform, values, condition_mask)
    return Query(values, condition_mask, z_observed, num_observations is not None,
                 [] if observed is None else list(observed), bounds)


def _bound_array(name: str, side: str, bound, shape) -> np.ndarray:
    if bound is None:
        return np.full(shape, -np.inf if side == "low" else np.inf)
    try:
        array = np.asarray(jax.device_get(bound), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"intervals[{name!r}]: `{side}` must be a number, an array of the site's shape "
            f"{shape} or None, got {type(bound).__name__}."
        ) from None
    try:
        array = np.broadcast_to(array, shape)
    except ValueError:
        raise ValueError(
            f"intervals[{name!r}]: `{side}` has shape {array.shape}, which does not broadcast to "
            f"the site's shape {shape}. Give a scalar or an array of shape {shape}."
        ) from None
    if np.any(np.isnan(array)):
        raise ValueError(
            f"intervals[{name!r}]: `{side}` contains NaN. Use None or "
            f"{'-inf' if side == 'low' else 'inf'} for an open side."
        )
    return array


def interval_bounds(
    layout: TokenLayout, transform, intervals: Mapping | None, condition_mask: np.ndarray, *, excluded_sites=()
) -> IntervalQuery | None:
    """Validate ``intervals={site: (low, high)}`` and map the bounds into z-space.

    ``low``/``high`` are scalars or arrays of the site's shape; ``None`` or an infinite
    bound leaves that side open; an element with both sides open carries no interval.
    The bounds go through the site's transform (unconstrained bijection, then z-scoring),
    which is monotone elementwise: increasing for real, positive, interval and
    greater-than supports, decreasing for less-than supports, where the two bounds swap.

    Args:
        layout, transform: the fitted Simformer's token layout and transform.
        intervals: ``{site_name: (low, high)}``; ``None`` or empty for no intervals.
        condition_mask: bool (..., num_tokens), True where an element is observed exactly
            (in any observation of a batch).
        excluded_sites: model sites that are not tokens (named in the error message).

    Returns:
        an :class:`IntervalQuery`, or ``None`` when there are no intervals.

    Raises:
        TypeError: ``intervals`` is not a mapping of pairs.
        ValueError: unknown site; wrong shape; NaN; ``low >= high``; a finite bound outside
            the site's support; an interval on an element that is also observed exactly.
    """
    if not intervals:
        return None
    if not isinstance(intervals, Mapping):
        raise TypeError(
            f"`intervals` must be a dict mapping site names to (low, high) pairs, got {type(intervals).__name__}."
        )
    slices = layout.slices()
    lower = np.full(layout.num_tokens, -np.inf)
    upper = np.full(layout.num_tokens, np.inf)
    for name, pair in intervals.items():
        _check_token_site(layout, name, "intervals", "constrained", excluded_sites)
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise TypeError(
                f"intervals[{name!r}] must be a pair (low, high), got {pair!r}. Use None for an open side, "
                f"e.g. intervals={{{name!r}: (0.0, None)}}."
            )
        site = layout.site(name)
        if couples_elements(transform.bijections[layout.site_names.index(name)]):
            raise ValueError(
                f"intervals[{name!r}]: site {name!r} has support {site.support}, whose unconstrained coordinates mix "
                "its elements, so a bound on one element is no bound on one token; intervals on it are not "
                "supported. Bound a site with an elementwise support instead."
            )
        low = _bound_array(name, "low", pair[0], site.shape).reshape(-1)
        high = _bound_array(name, "high", pair[1], site.shape).reshape(-1)
        labels = layout.labels[slices[name]]
        bad = low >= high
        if bad.any():
            index = int(np.argmax(bad))
            raise ValueError(
                f"intervals[{name!r}] has low >= high at {labels[index]!r} (low={low[index]}, "
                f"high={high[index]}). Each interval needs low < high; use -inf/inf or None for an open side."
            )
        _check_bounds_in_support(site, transform, slices[name], labels, low, high)
        lower[slices[name]] = low
        upper[slices[name]] = high
    interval_mask = np.isfinite(lower) | np.isfinite(upper)
    conflict = interval_mask & np.any(np.reshape(condition_mask, (-1, layout.num_tokens)), axis=0)
    if conflict.any():
        index = int(np.argmax(conflict))
        site = layout.sites[layout.site_of_token()[index]]
        raise ValueError(
            f"Element {layout.labels[index]!r} of site {site.name!r} has both an exact value in "
            f"`observed` and an interval in `intervals`. Give one of them: set the observed element "
            "to NaN to keep the interval, or make its bounds -inf/inf to keep the value."
        )
    z_low = _bound_to_z(transform, lower)
    z_high = _bound_to_z(transform, upper)
    increasing = _transform_increases(transform)
    z_lower = np.where(increasing, np.where(np.isfinite(lower), z_low, -np.inf), np.where(np.isfinite(upper), z_high, -np.inf))
    z_upper = np.where(increasing, np.where(np.isfinite(upper), z_high, np.inf), np.where(np.isfinite(lower), z_low, np.inf))
    return IntervalQuery(lower, upper, z_lower.astype(np.float32), z_upper.astype(np.float32), interval_mask)


def _bound_to_z(transform, bounds: np.ndarray) -> np.ndarray:
    """Finite bounds -> z-space (NaN outside the support, +-inf on its boundary); others filled."""
    filled = np.where(np.isfinite(bounds), bounds, _interior_fill(transform)).astype(np.float32)
    return np.asarray(transform.to_z_fn(filled), dtype=np.float64)


def _transform_increases(transform) -> np.ndarray:
    """bool (num_tokens,): whether each token's map z -> constrained value increases."""
    num_tokens = transform.layout.num_tokens
    from_z = transform.from_z_fn
    low = np.asarray(from_z(np.full(num_tokens, -0.5, np.float32)))
    high = np.asarray(from_z(np.full(num_tokens, 0.5, np.float32)))
    return high >= low


def _check_bounds_in_support(site, transform, token_slice, labels, low, high):
    """A finite bound must lie in the closure of the site's support."""
    from numpyro_simformer.model.sites import support_bounds

    support_low, support_high = support_bounds(site.support)
    for side, bound in (("low", low), ("high", high)):
        finite = np.isfinite(bound)
        outside = np.zeros_like(finite)
        if support_low is not None:
            outside |= finite & (bound < np.broadcast_to(support_low, site.shape).reshape(-1))
        if support_high is not None:
            outside |= finite & (bound > np.broadcast_to(support_high, site.shape).reshape(-1))
        if not site.is_discrete:
            full = np.full(transform.layout.num_tokens, np.nan)
            full[token_slice] = bound
            outside |= finite & np.isnan(_bound_to_z(transform, full)[token_slice])
        if outside.any():
            index = int(np.argmax(outside))
            raise ValueError(
                f"intervals[{site.name!r}] has {side}={bound[index]} at {labels[index]!r}, outside the "
                f"site's support {site.support}. Bounds must lie in the support (its boundary "
                "counts as an open side)."
            )
