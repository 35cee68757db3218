"""Tokens: the flat layout of a model's site elements, their grouping into network tokens, and the transforms into z-space."""

from numpyro_simformer.tokens.grouping import TokenGrouping, group_tokens, resolve_elements_per_token
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.tokens.transforms import (
    AbstractIntervalBijection,
    IntervalClip,
    IntervalReflect,
    SimplexLogRatio,
    TokenTransform,
    fit_token_transform,
    site_bijection,
)

__all__ = [
    "TokenLayout",
    "TokenGrouping",
    "group_tokens",
    "resolve_elements_per_token",
    "TokenTransform",
    "fit_token_transform",
    "site_bijection",
    "AbstractIntervalBijection",
    "IntervalClip",
    "IntervalReflect",
    "SimplexLogRatio",
]
