"""Check a Simformer's answer against NUTS on the very same NumPyro model.

When the model has a tractable density (every latent site continuous, no black-box
simulator inside), MCMC gives the exact conditional up to Monte Carlo error. The
Simformer is queried with ``observed``, NUTS runs on the model conditioned on the same
values (:func:`numpyro_simformer.tasks.reference.nuts_reference_with_diagnostics`, with
its convergence checks), and the two sample sets are compared: a classifier two-sample
test over all inferred elements together (:func:`~numpyro_simformer.diagnostics.c2st`,
0.5 when they cannot be told apart) and, per element, the difference of means and of
standard deviations in units of the NUTS standard deviation.

Example:
    >>> result = check_against_mcmc(sf, jax.random.key(0), {"x": x_o})   # doctest: +SKIP
    >>> result                                                            # doctest: +SKIP
    MCMCCheck: C2ST 0.512 (0.5 +- 0.016 expected if equal) ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import jax
import numpy as np

from numpyro_simformer._checks import check_fitted, check_rng_key
from numpyro_simformer.tokens.layout import element_labels

__all__ = ["MCMCCheck", "check_against_mcmc"]


@dataclass(frozen=True)
class MCMCCheck:
    """The Simformer's answer next to NUTS's, for one query.

    Attributes:
        c2st: classifier two-sample test accuracy between the two sample sets over all
            inferred elements (0.5: indistinguishable).
        c2st_null_std: the accuracy's standard deviation when both come from one
            distribution (about ``0.5 / sqrt(2 * num_samples)``).
        labels: one label per compared element, e.g. ``theta[1]``.
        simformer_mean, nuts_mean, simformer_std, nuts_std: float arrays (num_elements,).
        mean_difference: ``(simformer_mean - nuts_mean) / nuts_std``.
        std_difference: ``(simformer_std - nuts_std) / nuts_std``.
        nuts_diagnostics: the reference run's
            :class:`~numpyro_simformer.tasks.reference.ReferenceDiagnostics`.
        simformer_samples, nuts_samples: ``{site: (num_samples, *site shape)}``.
    """

    c2st: float
    c2st_null_std: float
    labels: tuple[str, ...]
    simformer_mean: np.ndarray
    nuts_mean: np.ndarray
    simformer_std: np.ndarray
    nuts_std: np.ndarray
    nuts_diagnostics: object
    simformer_samples: dict = field(repr=False)
    nuts_samples: dict = field(repr=False)

    @property
    def mean_difference(self) -> np.ndarray:
        return (self.simformer_mean - self.nuts_mean) / self.nuts_std

    @property
    def std_difference(self) -> np.ndarray:
        return (self.simformer_std - self.nuts_std) / self.nuts_std

    def __repr__(self) -> str:
        diagnostics = self.nuts_diagnostics
        lines = [
            f"MCMCCheck: C2ST {self.c2st:.3f} (0.5 +- {self.c2st_null_std:.3f} expected if equal)",
            f"  NUTS: {diagnostics.num_chains} chains x {diagnostics.num_draws_per_chain} draws, max R-hat "
            f"{diagnostics.max_rhat:.3f}, min bulk ESS {diagnostics.min_bulk_ess:.0f}, "
            f"{diagnostics.num_divergences} divergences"
            + ("" if diagnostics.converged else "  -- NOT CONVERGED: do not trust this comparison"),
        ]
        width = max(8, *(len(label) for label in self.labels))
        lines.append(
            f"  {'element':<{width}} {'mean SF':>9} {'mean NUTS':>9} {'d mean/sd':>9} {'sd SF':>9} {'sd NUTS':>9} {'d sd/sd':>9}"
        )
        for index, label in enumerate(self.labels):
            lines.append(
                f"  {label:<{width}} {self.simformer_mean[index]:9.3f} {self.nuts_mean[index]:9.3f} "
                f"{self.mean_difference[index]:+9.3f} {self.simformer_std[index]:9.3f} "
                f"{self.nuts_std[index]:9.3f} {self.std_difference[index]:+9.3f}"
            )
        return "\n".join(lines)


def _latent_elements(layout, observed: Mapping, excluded_sites) -> dict[str, np.ndarray]:
    """Per token site with an inferred element: a bool mask (site.size,) of those elements."""
    out = {}
    for site in layout.sites:
        if site.name in excluded_sites:
            continue
        if observed is None or site.name not in observed:
            out[site.name] = np.ones(site.size, dtype=bool)
            continue
        value = np.asarray(observed[site.name], dtype=np.float64).reshape(-1)
        if np.isnan(value).any():
            out[site.name] = np.isnan(value)
    return out


def _flat(samples: Mapping[str, np.ndarray], latent: Mapping[str, np.ndarray]) -> np.ndarray:
    parts = []
    for name, mask in latent.items():
        value = np.asarray(samples[name], dtype=np.float64)
        parts.append(value.reshape(value.shape[0], -1)[:, mask])
    return np.concatenate(parts, axis=1)


def check_against_mcmc(
    sf,
    rng_key,
    observed: Mapping,
    *model_args,
    num_samples: int = 1_000,
    num_warmup: int = 500,
    num_chains: int = 4,
    c2st_fn: Callable | None = None,
    nuts_options: Mapping | None = None,
    **model_kwargs,
) -> MCMCCheck:
    """Compare the Simformer's conditional with NUTS on the same model and observations.

    Args:
        sf: a fitted :class:`~numpyro_simformer.Simformer` whose model has a tractable
            density with continuous latent sites.
        rng_key: a JAX PRNG key.
        observed: ``{site: value}`` as in :meth:`Simformer.sample` (one observation; NaN
            elements are inferred).
        *model_args, **model_kwargs: the model's arguments, as given to ``fit``.
        num_samples: draws from each side.
        num_warmup, num_chains: NUTS settings (vectorised chains).
        c2st_fn: ``c2st_fn(samples_a, samples_b) -> accuracy``; default
            :func:`~numpyro_simformer.diagnostics.c2st` (sbibm's classifier). Pass
            :func:`~numpyro_simformer.diagnostics.c2st_fast` for a quick look.
        nuts_options: more keyword arguments for
            :func:`~numpyro_simformer.tasks.reference.nuts_reference_with_diagnostics`
            (``thinning``, ``reflections``, ``target_accept_prob``, ``strict`` ...). By
            default a run that fails its convergence checks warns instead of raising, and
            the result says so.

    Returns:
        An :class:`MCMCCheck`; ``print`` it for a table.
    """
    from numpyro_simformer.diagnostics.c2st import c2st, c2st_null_std
    from numpyro_simformer.tasks.reference import nuts_reference_with_diagnostics

    check_fitted(sf, "check_against_mcmc")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 10:
        raise ValueError(f"check_against_mcmc: `num_samples` must be an integer >= 10, got {num_samples!r}.")
    check_rng_key(rng_key, "check_against_mcmc")
    key_simformer, key_nuts = jax.random.split(rng_key)
    tree = sf.sample(key_simformer, observed=observed, num_samples=num_samples)  # validates `observed`
    simformer_samples = {}
    for group in ("posterior", "posterior_predictive"):
        if group in tree.children:
            for name, values in tree[group].data_vars.items():
                value = np.asarray(values.values)
                simformer_samples[name] = value.reshape((-1,) + value.shape[2:])
    latent = _latent_elements(sf.layout, observed, sf.exclude_sites)
    options = {"strict": False, **dict(nuts_options or {})}
    nuts_samples, diagnostics = nuts_reference_with_diagnostics(
        key_nuts, sf.model, observed or {}, num_samples, num_chains=num_chains, num_warmup=num_warmup,
        model_args=model_args, model_kwargs=model_kwargs, **options,
    )
    nuts_samples = {name: np.asarray(nuts_samples[name]) for name in latent}
    flat_simformer, flat_nuts = _flat(simformer_samples, latent), _flat(nuts_samples, latent)
    labels = tuple(
        label
        for site in sf.layout.sites
        if site.name in latent
        for label, keep in zip(element_labels(site.name, site.shape), latent[site.name])
        if keep
    )
    c2st_fn = c2st if c2st_fn is None else c2st_fn
    nuts_std = flat_nuts.std(axis=0, ddof=1)
    return MCMCCheck(
        c2st=float(c2st_fn(flat_nuts, flat_simformer)),
        c2st_null_std=c2st_null_std(len(flat_nuts), len(flat_simformer)),
        labels=labels,
        simformer_mean=flat_simformer.mean(axis=0),
        nuts_mean=flat_nuts.mean(axis=0),
        simformer_std=flat_simformer.std(axis=0, ddof=1),
        nuts_std=np.where(nuts_std > 0, nuts_std, np.nan),
        nuts_diagnostics=diagnostics,
        simformer_samples=simformer_samples,
        nuts_samples=nuts_samples,
    )
