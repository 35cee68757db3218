"""Validate a query and turn it into token values and a condition mask.

``observed`` names any subset of the token sites. NaN elements mean "missing": they are
inferred with the rest of the latent tokens. Everything here is static and checked before
any tracing, with errors that name the site.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from numpyro_simformer.layout import TokenLayout

__all__ = ["observed_tokens", "to_z_checked"]


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
        if name not in slices:
            hint = (
                f" {name!r} was excluded from the tokens (`exclude_sites`), so it cannot be observed."
                if name in excluded_sites
                else ""
            )
            raise ValueError(
                f"observed names an unknown site {name!r}.{hint} The token sites are "
                f"{layout.site_names}."
            )
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

    Raises:
        ValueError: an observed value lies outside its site's support.
    """
    filled = np.where(condition_mask, values, _interior_fill(transform)).astype(np.float32)
    z = np.asarray(jax.jit(transform.to_z)(filled))
    bad = condition_mask & ~np.isfinite(z)
    if bad.any():
        index = int(np.argmax(bad))
        site = layout.sites[layout.site_of_token()[index]]
        raise ValueError(
            f"observed[{site.name!r}] has value {values[index]} at token "
            f"{layout.labels[index]!r}, outside the site's support {site.support}."
        )
    return np.where(condition_mask, z, 0.0).astype(np.float32)


def _interior_fill(transform) -> np.ndarray:
    """A value inside every site's support (the constrained image of the z-space mean)."""
    return np.asarray(jax.jit(transform.from_z)(np.zeros(transform.layout.num_tokens, np.float32)))
