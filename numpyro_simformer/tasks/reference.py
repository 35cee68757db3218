"""Reference samples for any conditional of a NumPyro model, by NUTS, checked before use.

:func:`nuts_reference` conditions a model on ``observed`` (a dict of site values; NaN
elements are latent), runs NUTS with several chains, checks convergence (rank-normalised
split R-hat and bulk ESS, Vehtari et al. 2021) and returns draws of the latent sites. A
partially observed site keeps its observed elements fixed: its missing elements become one
auxiliary latent vector (with the site's own elementwise support) and the site's log
density is scored at the completed value, so NUTS sees the exact conditional.

Several benchmark posteriors are multimodal for a known reason: a symmetry of the joint
density (SLCP's signs of θ3 and θ4, the Tree's and HMM's global sign of θ, the two
reflections of Two Moons). NUTS chains stay in one mode, so their R-hat is large and their
mode weights are wrong. A :class:`Reflection` states such a symmetry; where the conditional
keeps it (every token it moves is latent), draws are folded onto one side before the
diagnostics and spread back with probability 1/2 afterwards, which is exact for any mode
weights the chains ended up with.

"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.diagnostics import effective_sample_size
from numpyro.distributions import constraints
from numpyro.infer import MCMC, NUTS, init_to_sample
from numpyro.infer.util import initialize_model
from numpyro.infer.reparam import Reparam
from scipy import special, stats

__all__ = [
    "Reflection",
    "ReferenceDiagnostics",
    "ReferenceNotConvergedError",
    "ReferenceConvergenceWarning",
    "nuts_reference",
    "nuts_reference_with_diagnostics",
]

_FILL_KEY = "_numpyro_simformer_fill_from"
_MIN_DRAWS_PER_CHAIN = 100  # below this, R-hat and ESS say little


class ReferenceNotConvergedError(RuntimeError):
    """NUTS did not pass the convergence checks; its draws must not be used as a reference."""


class ReferenceConvergenceWarning(UserWarning):
    """NUTS did not pass the convergence checks (raised as a warning with ``strict=False``)."""


class Reflection(NamedTuple):
    """A symmetry of the joint density: ``t -> signs * t[permutation]``, an involution.

    ``t`` is the concatenation of the flattened values of ``sites`` in that order. The
    joint density must be invariant under the map, the map must be its own inverse, and
    reflections given together must move disjoint elements.

    Example:
        >>> flip_theta_2 = Reflection(("theta",), (0, 1, 2, 3, 4), (1.0, 1.0, -1.0, 1.0, 1.0))
    """

    sites: tuple[str, ...]
    permutation: tuple[int, ...]
    signs: tuple[float, ...]

    def moved(self) -> np.ndarray:
        """Indices of ``t`` that the reflection changes."""
        permutation, signs = np.asarray(self.permutation), np.asarray(self.signs)
        return np.flatnonzero((permutation != np.arange(len(permutation))) | (signs != 1.0))

    def odd_direction(self) -> np.ndarray:
        """A vector v with v·(R t) = -v·t: which side of the reflection a draw is on."""
        indicator = np.zeros(len(self.permutation))
        indicator[self.moved()] = 1.0
        direction = indicator - self._apply_flat(indicator[None])[0]
        if not np.any(direction):
            indicator = np.zeros(len(self.permutation))
            indicator[self.moved()[0]] = 1.0
            direction = indicator - self._apply_flat(indicator[None])[0]
        return direction

    def _apply_flat(self, flat: np.ndarray) -> np.ndarray:
        return flat[:, list(self.permutation)] * np.asarray(self.signs)

    def apply(self, values: Mapping[str, np.ndarray], where: np.ndarray) -> dict[str, np.ndarray]:
        """Reflect the draws selected by ``where`` (bool, (num_draws,)); values are (num_draws, ...)."""
        flat, shapes = _concat(values, self.sites)
        flat = np.where(where[:, None], self._apply_flat(flat), flat)
        return {**values, **_split(flat, self.sites, shapes)}

    def side(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        """+1 or -1 per draw: the side of the mirror the draw lies on."""
        flat, _ = _concat(values, self.sites)
        return np.where(flat @ self.odd_direction() >= 0, 1.0, -1.0)


class ReferenceDiagnostics(NamedTuple):
    """Convergence summary of one NUTS reference run."""

    max_rhat: float
    min_bulk_ess: float
    worst_site: str
    num_divergences: int
    num_chains: int
    num_draws_per_chain: int
    reflections_used: int
    converged: bool


def _concat(values: Mapping[str, np.ndarray], sites: Sequence[str]) -> tuple[np.ndarray, list]:
    missing = [name for name in sites if name not in values]
    if missing:
        raise KeyError(f"Reflection names sites {missing} that are not latent sites here: {sorted(values)}.")
    num_draws = np.shape(values[sites[0]])[0]
    shapes = [np.shape(values[name])[1:] for name in sites]
    flat = np.concatenate([np.reshape(values[name], (num_draws, -1)) for name in sites], axis=1)
    return flat, shapes


def _split(flat: np.ndarray, sites: Sequence[str], shapes: list) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in zip(sites, shapes):
        size = int(np.prod(shape, dtype=int))
        out[name] = flat[:, start : start + size].reshape((flat.shape[0],) + tuple(shape))
        start += size
    return out


def _elementwise_support(support, shape: tuple[int, ...], index: np.ndarray, site: str):
    while isinstance(support, constraints._IndependentConstraint):
        support = support.base_constraint
    if support.event_dim != 0:
        raise ValueError(
            f"Site {site!r} has support {support} with event_dim {support.event_dim}: its elements "
            "are tied together, so it can only be observed whole. Observe all of its elements or none."
        )
    leaves, treedef = jax.tree_util.tree_flatten(support)
    # jnp, not np: a support's bounds may be computed inside the traced model (a transformed
    # distribution's codomain).
    leaves = [jnp.broadcast_to(jnp.asarray(leaf), shape).reshape(-1)[index] for leaf in leaves]
    return constraints.independent(jax.tree_util.tree_unflatten(treedef, leaves), 1)


class _PartialObservation(Reparam):
    """Observed elements fixed; missing elements become the latent site ``{name}__missing``."""

    def __init__(self, value: np.ndarray, missing_index: np.ndarray):
        self.value = value
        self.missing_index = missing_index

    def __call__(self, name, fn, obs):
        shape = tuple(jnp.shape(self.value))
        support = _elementwise_support(fn.support, shape, self.missing_index, name)
        missing = _sample_missing(name, support, len(self.missing_index), fn, self.missing_index)
        full = jnp.asarray(self.value).reshape(-1).at[self.missing_index].set(missing).reshape(shape)
        return fn, full


def _sample_missing(name, support, size, fn, index):
    improper = dist.ImproperUniform(support, (), (size,))
    return numpyro.sample(f"{name}__missing", improper, infer={_FILL_KEY: (fn, index)})


def _init_strategy(site=None):
    """Prior draws for every latent site; missing elements from their own site's prior."""
    if site is None:
        return functools.partial(_init_strategy)
    fill = site.get("infer", {}).get(_FILL_KEY)
    if fill is not None and site["type"] == "sample" and not site["is_observed"]:
        fn, index = fill
        return jnp.reshape(fn(rng_key=site["kwargs"]["rng_key"]), -1)[index]
    return init_to_sample(site)


def _rank_normalise(draws: np.ndarray) -> np.ndarray:
    ranks = stats.rankdata(draws, axis=None).reshape(draws.shape)
    return special.ndtri((ranks - 0.375) / (draws.size + 0.25))


def _split_rhat(draws: np.ndarray) -> float:
    num_chains, num_draws = draws.shape
    half = num_draws // 2
    split = np.concatenate([draws[:, :half], draws[:, half : 2 * half]], axis=0)
    within = split.var(axis=1, ddof=1).mean()
    between = half * split.mean(axis=1).var(ddof=1)
    if within <= 0:
        return math.inf
    return float(np.sqrt(((half - 1) / half * within + between / half) / within))


def _check_one(draws: np.ndarray) -> tuple[float, float]:
    """Rank-normalised split R-hat (max of bulk and folded) and bulk ESS of one scalar."""
    bulk = _rank_normalise(draws)
    folded = _rank_normalise(np.abs(draws - np.median(draws)))
    rhat = max(_split_rhat(bulk), _split_rhat(folded))
    return rhat, float(effective_sample_size(bulk))


def _validate_observed(trace: dict, observed: Mapping[str, object]) -> dict[str, np.ndarray]:
    sites = {name: site for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]}
    out = {}
    for name, value in observed.items():
        if name not in sites:
            raise ValueError(
                f"observed names {name!r}, which is not a latent sample site of the model; its latent "
                f"sample sites are {sorted(sites)}."
            )
        array = np.asarray(value, dtype=np.float64)
        shape = tuple(np.shape(sites[name]["value"]))
        if array.shape != shape:
            raise ValueError(
                f"observed[{name!r}] has shape {array.shape}, but the site has shape {shape}. Pass one "
                "value per element, with NaN for the elements to infer."
            )
        out[name] = array
    return out


def nuts_reference_with_diagnostics(
    rng_key,
    model: Callable,
    observed: Mapping[str, object],
    num_samples: int,
    *,
    num_chains: int = 4,
    num_warmup: int = 1000,
    thinning: int = 1,
    reflections: Sequence[Reflection] = (),
    max_rhat: float = 1.01,
    min_bulk_ess: float = 400.0,
    max_divergence_fraction: float = 0.01,
    strict: bool = True,
    target_accept_prob: float = 0.9,
    dense_mass: bool = False,
    init_candidates: int = 1,
    use_float64: bool = True,
    model_args: tuple = (),
    model_kwargs: Mapping | None = None,
) -> tuple[dict[str, np.ndarray], ReferenceDiagnostics]:
    """:func:`nuts_reference`, also returning its :class:`ReferenceDiagnostics`."""
    if num_samples < 1 or num_chains < 1 or thinning < 1:
        raise ValueError(
            f"num_samples, num_chains and thinning must be >= 1, got {num_samples}, {num_chains}, {thinning}."
        )
    model_kwargs = dict(model_kwargs or {})
    if init_candidates < 1:
        raise ValueError(f"init_candidates must be >= 1, got {init_candidates}.")
    key_trace, key_mcmc, key_reflect, key_shuffle = jax.random.split(rng_key, 4)
    with jax.enable_x64(True) if use_float64 else contextlib.nullcontext():
        trace = handlers.trace(handlers.seed(model, key_trace)).get_trace(*model_args, **model_kwargs)
        observed = _validate_observed(trace, observed)
        # jax arrays, not numpy: a numpy value checked against a support whose bounds are traced
        # inside the model (a transformed distribution's codomain) fails in numpyro's validation.
        full = {name: jnp.asarray(value) for name, value in observed.items() if not np.any(np.isnan(value))}
        partial = {
            name: _PartialObservation(value, np.flatnonzero(np.isnan(value).reshape(-1)))
            for name, value in observed.items()
            if np.any(np.isnan(value)) and not np.all(np.isnan(value))
        }
        latent_sites = [
            name
            for name, site in trace.items()
            if site["type"] == "sample" and not site["is_observed"] and name not in full
        ]
        if not latent_sites:
            raise ValueError("observed fixes every sample site of the model: there is nothing to infer.")
        conditioned = handlers.condition(handlers.reparam(model, config=partial), data=full)
        kernel = NUTS(
            conditioned, init_strategy=functools.partial(_init_strategy), target_accept_prob=target_accept_prob, dense_mass=dense_mass
        )
        draws_per_chain = max(math.ceil(num_samples / num_chains), _MIN_DRAWS_PER_CHAIN)
        mcmc = MCMC(
            kernel,
            num_warmup=num_warmup,
            num_samples=draws_per_chain * thinning,
            num_chains=num_chains,
            thinning=thinning,
            chain_method="vectorized",
            progress_bar=False,
        )
        init_params = None
        if init_candidates > 1:  # each chain starts at one of the most probable of many prior draws
            key_init, key_mcmc = jax.random.split(key_mcmc)
            candidates = initialize_model(
                jax.random.split(key_init, init_candidates * num_chains), conditioned,
                init_strategy=functools.partial(_init_strategy), model_args=model_args, model_kwargs=model_kwargs,
            ).param_info
            energy = np.nan_to_num(np.asarray(candidates.potential_energy), nan=np.inf)
            best = np.argsort(energy)[:num_chains]
            init_params = jax.tree.map(lambda value: value[best], candidates.z)
        mcmc.run(key_mcmc, *model_args, init_params=init_params, extra_fields=("diverging",), **model_kwargs)
        raw = jax.device_get(mcmc.get_samples(group_by_chain=True))
        num_divergences = int(np.sum(mcmc.get_extra_fields()["diverging"]))

    values, latent_masks = {}, {}
    for name in latent_sites:
        if name in partial:
            index = partial[name].missing_index
            flat = np.broadcast_to(observed[name].reshape(-1), raw[f"{name}__missing"].shape[:2] + (observed[name].size,))
            flat = flat.copy()
            flat[..., index] = raw[f"{name}__missing"]
            values[name] = flat.reshape(flat.shape[:2] + observed[name].shape)
            latent_masks[name] = np.isnan(observed[name]).reshape(-1)
        else:
            values[name] = np.asarray(raw[name], dtype=np.float64)
            latent_masks[name] = np.ones(int(np.prod(values[name].shape[2:], dtype=int)), dtype=bool)
    pooled = {name: value.reshape((-1,) + value.shape[2:]) for name, value in values.items()}

    usable = []
    for reflection in reflections:
        if all(name in latent_masks for name in reflection.sites):
            flat_mask = np.concatenate([latent_masks[name] for name in reflection.sites])
            if np.all(flat_mask[reflection.moved()]):
                usable.append(reflection)
    for reflection in usable:  # fold every draw onto the positive side
        pooled = reflection.apply(pooled, reflection.side(pooled) < 0)

    checks = []  # (label, rhat, bulk ess) per latent element
    for name in latent_sites:
        flat = pooled[name].reshape(num_chains, draws_per_chain, -1)[..., latent_masks[name]]
        for element in range(flat.shape[-1]):
            label = f"{name}[{element}]" if flat.shape[-1] > 1 else name
            checks.append((label, *_check_one(flat[..., element])))
    max_found = max(rhat for _, rhat, _ in checks)
    min_ess = min(ess for _, _, ess in checks)
    worst = max(checks, key=lambda check: (check[1], -check[2]))
    divergence_fraction = num_divergences / (num_chains * draws_per_chain)
    converged = bool(max_found < max_rhat and min_ess >= min_bulk_ess and divergence_fraction <= max_divergence_fraction)
    diagnostics = ReferenceDiagnostics(
        max_rhat=float(max_found),
        min_bulk_ess=float(min_ess),
        worst_site=worst[0],
        num_divergences=num_divergences,
        num_chains=num_chains,
        num_draws_per_chain=draws_per_chain,
        reflections_used=len(usable),
        converged=converged,
    )
    if not converged:
        message = (
            f"NUTS reference not converged: max R-hat {max_found:.4f} (need < {max_rhat}), min bulk ESS "
            f"{min_ess:.0f} (need >= {min_bulk_ess:.0f}), divergent transitions {divergence_fraction:.1%} "
            f"(need <= {max_divergence_fraction:.1%}); worst element {worst[0]}; {num_chains} chains x "
            f"{draws_per_chain} draws. Run longer (num_warmup, thinning), use more chains, pass the "
            "Reflection(s) that explain a multimodal posterior, or (divergences) raise target_accept_prob."
        )
        if strict:
            raise ReferenceNotConvergedError(message)
        warnings.warn(message, ReferenceConvergenceWarning, stacklevel=3)

    for index, reflection in enumerate(usable):  # spread back over both sides, exactly
        flips = np.asarray(jax.random.bernoulli(jax.random.fold_in(key_reflect, index), 0.5, (draws_per_chain * num_chains,)))
        pooled = reflection.apply(pooled, flips)
    order = np.asarray(jax.random.permutation(key_shuffle, draws_per_chain * num_chains))[:num_samples]
    return {name: value[order] for name, value in pooled.items()}, diagnostics


def nuts_reference(
    rng_key,
    model: Callable,
    observed: Mapping[str, object],
    num_samples: int,
    **kwargs,
) -> dict[str, np.ndarray]:
    """Reference draws of the latent sites of ``model`` given ``observed``, by checked NUTS.

    Args:
        rng_key: a JAX PRNG key.
        model: a NumPyro model with a tractable density (an explicit-likelihood model).
        observed: site name -> value of the site's full shape; NaN elements are latent.
            Sites not named are latent.
        num_samples: number of draws returned (pooled over chains, shuffled); each chain
            keeps at least 100 draws for the diagnostics.
        num_chains: vectorised NUTS chains, each started from a prior draw (default 4).
        num_warmup: warm-up steps per chain (default 1000).
        thinning: keep every ``thinning``-th draw (raises ESS per draw).
        reflections: symmetries of the joint density (see :class:`Reflection`); used where
            every element they move is latent.
        max_rhat, min_bulk_ess: convergence thresholds (defaults 1.01 and 400), on the
            rank-normalised split R-hat (max of bulk and folded) and bulk ESS of every
            latent element.
        max_divergence_fraction: most divergent transitions tolerated, as a fraction of
            the kept draws (default 0.01); a hard edge in a high-density region (Two Moons'
            half ring) shows up here.
        strict: raise :class:`ReferenceNotConvergedError` when not converged (default);
            ``False`` warns with :class:`ReferenceConvergenceWarning` instead.
        target_accept_prob, dense_mass: NUTS settings.
        init_candidates: draw ``init_candidates * num_chains`` initial points from the
            prior and start the chains at the ``num_chains`` most probable (default 1:
            each chain at its own prior draw). For posteriors with poor local optima (an
            ODE fitted to a few points of an oscillation), where chains started anywhere
            stay stuck; R-hat still checks that the chains agree.
        use_float64: run in float64 (a scoped ``jax.enable_x64``; default True).
        model_args, model_kwargs: passed to the model.

    Returns:
        Dict site name -> array (num_samples, *site_shape) for every latent sample site;
        a partially observed site is returned whole, its observed elements constant.

    Example:
        >>> import jax, numpyro, numpyro.distributions as dist
        >>> def model():
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(mu, 1.0))
        >>> draws = nuts_reference(jax.random.key(0), model, {"x": 2.0}, 4000, num_warmup=500)
        >>> bool(abs(draws["mu"].mean() - 1.0) < 0.1)
        True
    """
    samples, _ = nuts_reference_with_diagnostics(rng_key, model, observed, num_samples, **kwargs)
    return samples
