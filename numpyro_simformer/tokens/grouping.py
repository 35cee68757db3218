"""Several elements of one site in one token: which elements share a token, and its attention.

The layout (:mod:`numpyro_simformer.tokens.layout`) keeps one *element* per position of the
flat vector: the token transform, the training loss, the samplers, interval guidance,
``log_prob`` and the DataTree all work element by element. A :class:`TokenGrouping` is what
the network sees instead: tokens that each hold up to ``slots`` elements of one site. The
network gathers a token's values and observed flags from the element vector, and scatters
its ``slots`` predictions back, so grouping changes the cost of a query, never its meaning:
a partly observed token is a token some of whose elements are observed.

Which elements share a token: a site's elements are ordered by their parents in the
element-level graph (by their parents outside the site, then by all of them: elements with
the same parents side by side, C order among equals), then cut into runs of ``k``. For an iid or element-wise site this is plain C order; for a
site whose elements depend on different parameters (distractors beside informative
outputs) it keeps the ones with the same parents together, so a token of distractors
stays unlinked from the parameters.

Token ``a`` may attend to token ``b`` when any element of ``a`` may attend to any element of
``b`` in the element-level attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from numpyro_simformer._checks import check_positive_int
from numpyro_simformer.tokens.layout import TokenLayout

__all__ = ["AUTO_GROUPING_THRESHOLD", "TokenGrouping", "group_tokens", "resolve_elements_per_token"]

# A site of more elements than this is grouped, by default, into at most this many tokens.
AUTO_GROUPING_THRESHOLD = 32


@dataclass(frozen=True, eq=False)
class TokenGrouping:
    """Tokens of several elements each.

    Attributes:
        members: int32 (num_tokens, slots): the element indices (positions in the layout's
            flat vector) of each token, ``-1`` in unused slots.
        attention_mask: bool (num_tokens, num_tokens): True where token a may attend to b.
        elements_per_token: ``{site: k}`` the grouping was made with.
    """

    members: np.ndarray
    attention_mask: np.ndarray
    elements_per_token: Mapping[str, int]

    @property
    def num_tokens(self) -> int:
        return int(self.members.shape[0])

    @property
    def slots(self) -> int:
        return int(self.members.shape[1])

    @property
    def num_elements(self) -> int:
        return int((self.members >= 0).sum())

    def element_positions(self) -> np.ndarray:
        """int32 (num_elements,): where element e sits in the flattened (num_tokens * slots) token output."""
        positions = np.empty(self.num_elements, np.int32)
        flat = self.members.reshape(-1)
        used = np.flatnonzero(flat >= 0)
        positions[flat[used]] = used
        return positions


def resolve_elements_per_token(layout: TokenLayout, elements_per_token, ungrouped: str | None = None) -> dict[str, int]:
    """``{site: k}`` for every site of ``layout`` from the user's ``elements_per_token``.

    Args:
        layout: the token layout.
        elements_per_token: ``None`` (automatic: a site of more than
            :data:`AUTO_GROUPING_THRESHOLD` elements is cut into at most that many tokens,
            smaller sites keep one element per token), an int for every site, or
            ``{site: k}`` for some sites (the others automatic).
        ungrouped: why no site may be grouped (a model with variable-size dims), or ``None``.

    Raises:
        ValueError: an unknown site, a k that is not a positive int, or k > 1 where no
            site may be grouped.
    """
    names = layout.site_names
    if elements_per_token is None:
        requested = {}
    elif isinstance(elements_per_token, Mapping):
        unknown = [name for name in elements_per_token if name not in names]
        if unknown:
            raise ValueError(f"`elements_per_token` names {unknown}, which are not token sites {names}.")
        requested = dict(elements_per_token)
    else:
        requested = {name: elements_per_token for name in names}
    result = {}
    for site in layout.sites:
        k = requested.get(site.name)
        if k is None:
            k = 1 if site.size <= AUTO_GROUPING_THRESHOLD or ungrouped else \
                math.ceil(site.size / AUTO_GROUPING_THRESHOLD)
        else:
            check_positive_int(k, f"elements_per_token[{site.name!r}]")
        if k > 1 and ungrouped:
            raise ValueError(
                f"`elements_per_token` asks for {k} elements per token of site {site.name!r}, but {ungrouped}. "
                "Leave `elements_per_token` unset (one element per token)."
            )
        result[site.name] = int(min(k, max(site.size, 1)))
    return result


def group_tokens(layout: TokenLayout, parents: np.ndarray | None, attention_mask: np.ndarray,
                 elements_per_token: Mapping[str, int]) -> TokenGrouping | None:
    """The grouping of ``layout`` with ``{site: k}`` elements per token; ``None`` if every k is 1.

    Args:
        layout: the element layout.
        parents: bool (num_elements, num_elements) element-level parents (orders a site's
            elements before they are cut; ``None``: C order).
        attention_mask: bool (num_elements, num_elements) element-level attention.
        elements_per_token: ``{site: k}`` from :func:`resolve_elements_per_token`.
    """
    if all(k == 1 for k in elements_per_token.values()):
        return None
    tokens = []
    for site, part in zip(layout.sites, layout.slices().values()):
        elements = np.arange(part.start, part.stop)
        k = elements_per_token[site.name]
        if k > 1 and parents is not None:
            elements = elements[_order_by_parents(parents[elements], part)]
        tokens += [elements[start:start + k] for start in range(0, elements.size, k)]
    slots = max(token.size for token in tokens)
    members = np.full((len(tokens), slots), -1, np.int32)
    for index, token in enumerate(tokens):
        members[index, :token.size] = token
    return TokenGrouping(members=members, attention_mask=_token_mask(np.asarray(attention_mask, bool), tokens),
                         elements_per_token=dict(elements_per_token))


def _order_by_parents(rows: np.ndarray, site: slice) -> np.ndarray:
    """A stable order of a site's elements that puts elements with the same parents together
    and partners at the same place in their tokens.

    Elements are sorted by the tuple of their parents outside the site, then by their
    anchor, then by position. Parents outside the site come first so that elements linked
    only among themselves (distractors that share noise) sort apart from the ones that
    depend on parameters, whatever their links inside the site. An element's anchor is the
    first position among itself and the site's elements it is linked to (either way): two
    outputs that share noise (an SLCP pair) have the same anchor, so when their roles sort
    them into different tokens they still take the same slot of each, and a token's slot
    means one thing across the site. Without links inside the site the anchor is the
    element's own position (element-wise links keep C order); along a chain (each element
    on the one before) it keeps C order too.
    """
    inside = np.zeros(rows.shape[1], dtype=bool)
    inside[site] = True
    within = rows[:, site]  # (elements, elements): i has j among its parents
    linked = within | within.T
    np.fill_diagonal(linked, True)
    anchors = linked.argmax(axis=1)  # the first True: the diagonal guarantees one
    keys = [(tuple(np.flatnonzero(row & ~inside)), int(anchor)) for row, anchor in zip(rows, anchors)]
    return np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)  # stable: position last


def _token_mask(mask: np.ndarray, tokens: list[np.ndarray]) -> np.ndarray:
    """bool (num_tokens, num_tokens): token a attends to b when an element of a attends to one of b."""
    rows = np.stack([mask[token].any(axis=0) for token in tokens])  # (num_tokens, num_elements)
    return np.stack([rows[:, token].any(axis=1) for token in tokens], axis=1)
