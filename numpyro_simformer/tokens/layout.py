"""Site dict <-> flat token vector, with a stable token order and token identities.

One token per scalar element of each token site, sites in a fixed order, each flattened in
C order. A token's identity has two parts: an integer ``node_id`` (which embedding it
uses) and a float ``coordinate``. Today every token has its own node id and coordinate
0; a time-indexed site can later share one node id over its elements and carry its
times in ``coordinates`` without changing anything downstream.

The layout is pure bookkeeping and is what checkpoints store; keep it stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from numpyro_simformer.model.sites import SiteInfo

__all__ = ["TokenLayout", "element_labels"]


def element_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """Token labels of one site: ``name`` for a scalar, else ``name[i]``, ``name[i,j]`` (C order)."""
    if shape == ():
        return [name]
    return [f"{name}[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


@dataclass(frozen=True)
class TokenLayout:
    """Where each site's elements sit in the flat token vector.

    Attributes:
        sites: the token sites, in token order.
        node_ids: int array (num_tokens,), the embedding index of each token.
        coordinates: float array (num_tokens,), each token's coordinate (0 if none).
    """

    sites: tuple[SiteInfo, ...]
    node_ids: np.ndarray
    coordinates: np.ndarray

    @classmethod
    def from_sites(cls, sites) -> "TokenLayout":
        sites = tuple(sites)
        num_tokens = sum(site.size for site in sites)
        return cls(
            sites=sites,
            node_ids=np.arange(num_tokens, dtype=np.int32),
            coordinates=np.zeros(num_tokens, dtype=np.float32),
        )

    @property
    def num_tokens(self) -> int:
        return int(sum(site.size for site in self.sites))

    @property
    def num_nodes(self) -> int:
        return int(self.node_ids.max()) + 1

    @property
    def site_names(self) -> list[str]:
        return [site.name for site in self.sites]

    def site(self, name: str) -> SiteInfo:
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)

    def slices(self) -> dict[str, slice]:
        """The token slice of each site."""
        out, start = {}, 0
        for site in self.sites:
            out[site.name] = slice(start, start + site.size)
            start += site.size
        return out

    @property
    def labels(self) -> list[str]:
        return [label for site in self.sites for label in element_labels(site.name, site.shape)]

    def site_of_token(self) -> np.ndarray:
        """int array (num_tokens,): the index of each token's site in ``sites``."""
        return np.repeat(np.arange(len(self.sites)), [site.size for site in self.sites])

    def flatten(self, values: Mapping[str, "jnp.ndarray"], batch_ndim: int = 1):
        """Concatenate site arrays with ``batch_ndim`` leading axes into (*batch, num_tokens)."""
        parts = []
        for site in self.sites:
            value = jnp.asarray(values[site.name])
            batch_shape = value.shape[:batch_ndim]
            parts.append(jnp.reshape(value, batch_shape + (site.size,)).astype(jnp.float32))
        return jnp.concatenate(parts, axis=-1)

    def flatten_host(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """float32 (num_rows, num_tokens) from ``{site: (num_rows, *site shape)}``, on the host.

        Each site's array is removed from ``values`` once copied, so the table is held
        about once, not twice. The table is 64-byte aligned: a CPU device then uses it in
        place (``jax.device_put`` aliases an aligned array instead of copying it).
        """
        num_rows = len(values[self.sites[0].name])
        tokens = _aligned_empty((num_rows, self.num_tokens))
        for site, part in zip(self.sites, self.slices().values()):
            tokens[:, part] = np.reshape(values.pop(site.name), (num_rows, site.size))
        return tokens

    def unflatten(self, tokens) -> dict[str, "jnp.ndarray"]:
        """Split (*batch, num_tokens) into site arrays of shape (*batch, *site.shape)."""
        batch_shape = tokens.shape[:-1]
        slices = self.slices()
        return {
            site.name: tokens[..., slices[site.name]].reshape(batch_shape + site.shape)
            for site in self.sites
        }


def _aligned_empty(shape: tuple[int, ...], alignment: int = 64) -> np.ndarray:
    """An uninitialised float32 array whose data starts on an ``alignment``-byte boundary."""
    size = int(np.prod(shape)) * 4
    raw = np.empty(size + alignment, np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset:offset + size].view(np.float32).reshape(shape)
