"""A benchmark task: a NumPyro model plus what is known about its answers.

A :class:`Task` bundles the simulator as a NumPyro model (no required arguments), which
of its sites are parameters and data (the tokens), which sites are simulator-internal
noise (not tokens), an explicit-likelihood twin for NUTS where the simulator has no
tractable density, the symmetries of the joint density, and, where one exists, an exact
sampler for any conditional. sbibm's tasks also give their 10 observations and reference
posterior samples.

Tokens: ``token_sites = parameter_sites + data_sites``, each site flattened row-major; an
``observed`` dict maps site names to values of the site's shape with NaN where latent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from numpyro_simformer.tasks.reference import Reflection, nuts_reference
from numpyro_simformer.tasks.sbibm_data import load_sbibm_array

__all__ = ["Task", "random_condition_masks"]

ConditionalSampler = Callable[..., dict]


def _simulate(model: Callable, token_sites: tuple[str, ...], rng_keys, fixed: dict) -> dict:
    """Vmapped draws of the token sites. Not jitted: eager vmap runs each primitive once on
    the whole batch, and skips a compile that costs more than it saves for one call."""

    def one(key):
        conditioned = handlers.condition(model, data=fixed) if fixed else model
        trace = handlers.trace(handlers.seed(conditioned, key)).get_trace()
        return {name: trace[name]["value"] for name in token_sites}

    return jax.vmap(one)(rng_keys)


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: short name, e.g. ``"two_moons"``.
        model: the simulator as a NumPyro model taking no required arguments.
        parameter_sites: names of the parameter sites, in token order.
        data_sites: names of the data sites, in token order.
        exclude_sites: simulator-internal sample sites that are not tokens (Two Moons'
            ``a`` and ``r``).
        likelihood_model: a model with the same token sites and a tractable density
            (no excluded sites), for NUTS; ``None`` if there is none.
        reflections: symmetries of the joint density of the tokens (see
            :class:`~numpyro_simformer.tasks.reference.Reflection`).
        sbibm_name: sbibm's name of the task when sbibm ships its observations.
        exact_sampler: ``fn(rng_key, observed, num_samples) -> dict | None`` drawing
            exactly from a conditional; it returns ``None`` for conditionals it does not
            cover, and :meth:`reference_conditional` then runs NUTS.
        nuts_defaults: NUTS settings that converge on this task (e.g. thinning, dense
            mass), used by :meth:`reference_conditional` unless overridden.
    """

    name: str
    model: Callable[[], None]
    parameter_sites: tuple[str, ...]
    data_sites: tuple[str, ...]
    exclude_sites: tuple[str, ...] = ()
    likelihood_model: Callable[[], None] | None = None
    reflections: tuple[Reflection, ...] = ()
    sbibm_name: str | None = None
    exact_sampler: ConditionalSampler | None = field(default=None, repr=False)
    nuts_defaults: Mapping[str, object] = field(default_factory=dict, repr=False, hash=False, compare=False)

    def __post_init__(self):
        if not self.parameter_sites or not self.data_sites:
            raise ValueError(f"Task {self.name!r} needs at least one parameter site and one data site.")
        names = self.parameter_sites + self.data_sites + self.exclude_sites
        if len(set(names)) != len(names):
            raise ValueError(
                f"Task {self.name!r}: parameter_sites {self.parameter_sites}, data_sites {self.data_sites} "
                f"and exclude_sites {self.exclude_sites} must not share names."
            )

    @property
    def token_sites(self) -> tuple[str, ...]:
        """Parameter sites, then data sites: the token order."""
        return self.parameter_sites + self.data_sites

    @functools.cached_property
    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one draw of each token site (read by tracing the model once)."""
        trace = handlers.trace(handlers.seed(self.model, jax.random.key(0))).get_trace()
        missing = [name for name in self.token_sites + self.exclude_sites if name not in trace]
        if missing:
            raise ValueError(f"Task {self.name!r}: the model has no sites {missing}; it has {list(trace)}.")
        return {name: tuple(np.shape(trace[name]["value"])) for name in self.token_sites}

    @property
    def num_tokens(self) -> int:
        """Number of scalar tokens over all token sites."""
        return sum(int(np.prod(shape, dtype=int)) for shape in self.site_shapes.values())

    def data_token_mask(self) -> np.ndarray:
        """Bool (num_tokens,), True for tokens of data sites."""
        sizes = [int(np.prod(self.site_shapes[name], dtype=int)) for name in self.token_sites]
        return np.repeat([name in self.data_sites for name in self.token_sites], sizes)

    def flatten(self, values: Mapping[str, object]) -> np.ndarray:
        """Site dict -> tokens (..., num_tokens); leading batch axes are kept.

        Example:
            >>> from numpyro_simformer.tasks import two_moons
            >>> task = two_moons()
            >>> task.flatten({"theta": np.zeros((5, 2)), "x": np.ones((5, 2))}).shape
            (5, 4)
        """
        parts = []
        for name in self.token_sites:
            if name not in values:
                raise ValueError(f"flatten: `values` has no site {name!r}; token sites are {self.token_sites}.")
            value = np.asarray(values[name], dtype=np.float64)
            shape = self.site_shapes[name]
            batch = value.shape[: value.ndim - len(shape)]
            if value.shape[len(batch) :] != shape:
                raise ValueError(f"flatten: site {name!r} must end in shape {shape}, got {value.shape}.")
            parts.append(value.reshape(batch + (-1,)))
        batch = np.broadcast_shapes(*(part.shape[:-1] for part in parts))
        return np.concatenate([np.broadcast_to(part, batch + part.shape[-1:]) for part in parts], axis=-1)

    def unflatten(self, tokens) -> dict[str, np.ndarray]:
        """Tokens (..., num_tokens) -> site dict with site shapes."""
        tokens = np.asarray(tokens)
        if tokens.shape[-1:] != (self.num_tokens,):
            raise ValueError(f"unflatten: expected a last axis of {self.num_tokens} tokens, got shape {tokens.shape}.")
        out, start = {}, 0
        for name in self.token_sites:
            shape = self.site_shapes[name]
            size = int(np.prod(shape, dtype=int))
            out[name] = tokens[..., start : start + size].reshape(tokens.shape[:-1] + shape)
            start += size
        return out

    def observed_from_mask(self, tokens, condition_mask) -> dict[str, np.ndarray]:
        """An ``observed`` dict from one token vector and a mask (True = observed, else NaN)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        condition_mask = np.asarray(condition_mask, dtype=bool)
        if tokens.shape != (self.num_tokens,) or condition_mask.shape != (self.num_tokens,):
            raise ValueError(
                f"observed_from_mask: tokens and condition_mask must both have shape ({self.num_tokens},), "
                f"got {tokens.shape} and {condition_mask.shape}."
            )
        return self.unflatten(np.where(condition_mask, tokens, np.nan))

    def simulate(self, rng_key, num_samples: int, observed: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
        """Joint draws of the token sites, optionally with some sites fixed (``condition``).

        Args:
            rng_key: a JAX PRNG key.
            num_samples: number of draws.
            observed: whole sites to fix (no NaN); their descendants are simulated given
                them. This is the exact conditional only when no fixed site has a latent
                ancestor (e.g. all parameters fixed: the likelihood).

        Returns:
            Dict site -> array (num_samples, *site_shape) for every token site.
        """
        fixed = {name: jnp.asarray(value) for name, value in (observed or {}).items()}
        draws = _simulate(self.model, self.token_sites, jax.random.split(rng_key, num_samples), fixed)
        return {name: np.asarray(value) for name, value in draws.items()}

    def reference_conditional(
        self, rng_key, observed: Mapping[str, object], num_samples: int, **nuts_kwargs
    ) -> dict[str, np.ndarray]:
        """Reference draws of the latent token sites given ``observed`` (NaN = latent).

        Uses, in order: plain simulation when nothing is observed or when all parameter
        tokens are observed and all data tokens latent; the task's exact sampler where it
        covers the conditional; checked NUTS on the explicit-likelihood model with the
        task's reflections (``nuts_kwargs`` go to
        :func:`~numpyro_simformer.tasks.reference.nuts_reference`).

        Returns:
            Dict site -> (num_samples, *site_shape) for every site with a latent element
            (partially observed sites whole, observed elements constant).
        """
        unknown = sorted(set(observed) - set(self.token_sites))
        if unknown:
            raise ValueError(f"observed names {unknown}, which are not token sites of {self.name!r}: {self.token_sites}.")
        observed = {name: np.asarray(value, dtype=np.float64) for name, value in observed.items()}
        observed = {name: value for name, value in observed.items() if not np.all(np.isnan(value))}
        whole = all(not np.any(np.isnan(value)) for value in observed.values())
        parameters_fixed = all(name in observed for name in self.parameter_sites)
        data_latent = not any(name in observed for name in self.data_sites)
        draws = None
        if whole and (not observed or (parameters_fixed and data_latent)):
            draws = self.simulate(rng_key, num_samples, observed)
        elif self.exact_sampler is not None:
            draws = self.exact_sampler(rng_key, observed, num_samples)
        if draws is not None:
            pass
        elif self.likelihood_model is not None:
            settings = {"reflections": self.reflections, **self.nuts_defaults, **nuts_kwargs}
            draws = nuts_reference(rng_key, self.likelihood_model, observed, num_samples, **settings)
        else:
            raise NotImplementedError(f"Task {self.name!r} has neither an exact sampler nor a likelihood model.")
        return {
            name: np.asarray(draws[name])
            for name in self.token_sites
            if name not in observed or np.any(np.isnan(observed[name]))
        }

    def _require_sbibm(self) -> str:
        if self.sbibm_name is None:
            raise NotImplementedError(
                f"Task {self.name!r} has no fixed observations (it is not an sbibm task); draw "
                "conditionals with random_condition_masks and reference_conditional instead."
            )
        return self.sbibm_name

    def observation(self, num_observation: int) -> dict[str, np.ndarray]:
        """sbibm's observation ``num_observation`` (1..10) as ``{data_site: array}``."""
        data = load_sbibm_array(self._require_sbibm(), num_observation, "observation")[0]
        return self.unflatten_sites(data, self.data_sites)

    def true_parameters(self, num_observation: int) -> dict[str, np.ndarray]:
        """The parameters sbibm simulated observation ``num_observation`` from."""
        theta = load_sbibm_array(self._require_sbibm(), num_observation, "true_parameters")[0]
        return self.unflatten_sites(theta, self.parameter_sites)

    def reference_posterior_samples(self, num_observation: int) -> np.ndarray:
        """sbibm's 10,000 reference posterior samples, array (10000, num_parameter_tokens)."""
        return np.array(load_sbibm_array(self._require_sbibm(), num_observation, "reference_posterior_samples"))

    def unflatten_sites(self, flat, sites: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Split a flat vector over ``sites`` (a subset of the token sites, in that order)."""
        out, start = {}, 0
        for name in sites:
            shape = self.site_shapes[name]
            size = int(np.prod(shape, dtype=int))
            out[name] = np.asarray(flat[start : start + size], dtype=np.float32).reshape(shape)
            start += size
        if start != len(flat):
            raise ValueError(f"Expected {start} values for sites {sites}, got {len(flat)}.")
        return out


def random_condition_masks(rng_key, task: Task, num_masks: int) -> np.ndarray:
    """Random condition masks over the task's tokens, as in the paper's benchmarks.

    Each mask picks, with probability 0.2 each: joint (nothing observed), posterior (all
    data tokens observed), likelihood (all parameter tokens observed), Bernoulli(0.3) or
    Bernoulli(0.7) per token. A mask that observes every token is redrawn.

    Args:
        rng_key: a JAX PRNG key.
        task: a :class:`~numpyro_simformer.tasks.Task` (uses its token order and site kinds).
        num_masks: how many masks.

    Returns:
        Bool array (num_masks, task.num_tokens), True = observed, in ``task.token_sites``
        order, each site flattened row-major.

    Example:
        >>> import jax
        >>> from numpyro_simformer.tasks import tree
        >>> random_condition_masks(jax.random.key(0), tree(), 3).shape
        (3, 7)
    """
    if num_masks < 0:
        raise ValueError(f"num_masks must be >= 0, got {num_masks}.")
    is_data = task.data_token_mask()
    num_tokens = is_data.shape[0]
    masks = []
    while len(masks) < num_masks:
        rng_key, key_kind, key_bernoulli = jax.random.split(rng_key, 3)
        batch = max(2 * (num_masks - len(masks)), 8)
        kind = np.asarray(jax.random.randint(key_kind, (batch,), 0, 5))
        uniform = np.asarray(jax.random.uniform(key_bernoulli, (batch, num_tokens)))
        candidates = np.stack(
            [
                np.zeros((batch, num_tokens), dtype=bool),
                np.broadcast_to(is_data, (batch, num_tokens)),
                np.broadcast_to(~is_data, (batch, num_tokens)),
                uniform < 0.3,
                uniform < 0.7,
            ]
        )[kind, np.arange(batch)]
        masks.extend(mask for mask in candidates if not mask.all())
    return np.asarray(masks[:num_masks], dtype=bool).reshape(num_masks, num_tokens)
