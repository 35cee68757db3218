"""Calibration of any conditional: simulation-based calibration (SBC), coverage and TARP.

The idea (Talts et al., 2018): draw ``(theta_i, x_i)`` from the joint, sample the
conditional ``p(theta | x_i)`` ``L`` times, and record the rank of ``theta_i`` among the
``L`` draws. For an exact conditional every rank in ``{0, ..., L}`` is equally likely; an
over-confident answer piles ranks at both ends, an under-confident one in the middle, a
biased one at one end. Ties (discrete sites) are broken at random.

:func:`sbc` returns an ArviZ ``DataTree``:

- ``prior_sbc``: the probability integral transform (PIT) of each element, the rank
  spread uniformly over its bin, ``(rank + U) / (L + 1)``: exactly uniform on (0, 1) for
  an exact conditional. Dims ``(chain, draw, *site dims)``, one ``draw`` per simulation.
  This is the group :func:`arviz_plots.plot_ecdf_pit` reads by default.
- ``sbc_ranks``: the integer ranks.
- ``tarp``: the TARP statistic of each simulation (Lemos et al., 2023), a joint test over
  all target elements: the share of conditional draws closer to a random reference point
  than the true value (spread over its bin like the PIT); uniform for an exact
  conditional. ``plot_ecdf_pit(tree,
  group="tarp")`` plots it.

A Simformer answers all ``num_simulations`` queries in one batched call
(``sf.sample`` with a leading observation axis); any other posterior is a function called
once per simulation.

:func:`coverage` turns it into expected coverage (the share of true values inside the
central credible interval of each level), :func:`uniformity_test` into p-values, and
:func:`rank_uniformity_pvalue` tests raw ranks with a chi-square test.

Example:
    >>> tree = sbc(jax.random.key(0), sf, num_simulations=200, num_samples=100)   # doctest: +SKIP
    >>> uniformity_test(tree)                                                      # doctest: +SKIP
    >>> arviz_plots.plot_ecdf_pit(tree)                                           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, Sequence

import jax
import numpy as np
import xarray as xr
from scipy import stats

from numpyro_simformer._checks import check_fitted, check_rng_key

__all__ = ["sbc", "coverage", "uniformity_test", "rank_uniformity_pvalue"]

PosteriorFn = Callable[[jax.Array, Mapping[str, np.ndarray], int], Mapping[str, np.ndarray]]


def _is_simformer(posterior) -> bool:
    from numpyro_simformer.simformer import Simformer

    return isinstance(posterior, Simformer)


def _sites_of(posterior, model, model_args, model_kwargs):
    """(model, {name: SiteInfo}) for a Simformer or a model."""
    if _is_simformer(posterior):
        check_fitted(posterior, "sbc")
        return posterior.model, {site.name: site for site in posterior.layout.sites}
    from numpyro_simformer.model.sites import read_sites, trace_model

    if model is None:
        raise ValueError(
            "sbc: with a posterior function, pass the NumPyro model it belongs to as `model=`; "
            "the joint draws come from it."
        )
    trace = trace_model(jax.random.key(0), model, model_args, model_kwargs)
    return model, {site.name: site for site in read_sites(trace)}


def _choose_sites(posterior, sites, observed_sites, target_sites):
    names = list(sites)
    if observed_sites is None:
        if not _is_simformer(posterior):
            raise ValueError(
                "sbc: with a posterior function, say which sites it conditions on: "
                f"`observed_sites=[...]` (the model's sites are {names})."
            )
        observed_sites = [name for name in names if not posterior.spec.has_children[name]]
    if isinstance(observed_sites, str) or isinstance(target_sites, str):
        raise TypeError("sbc: `observed_sites` and `target_sites` take a list of site names, not a string.")
    observed_sites = list(observed_sites)
    target_sites = [name for name in names if name not in observed_sites] if target_sites is None else list(target_sites)
    for argument, chosen in (("observed_sites", observed_sites), ("target_sites", target_sites)):
        unknown = [name for name in chosen if name not in sites]
        if unknown:
            raise ValueError(f"sbc: `{argument}` names {unknown}, which are not sites here; the sites are {names}.")
    overlap = sorted(set(observed_sites) & set(target_sites))
    if overlap:
        raise ValueError(f"sbc: {overlap} are both observed and targets; a site is one or the other.")
    if not target_sites:
        raise ValueError("sbc: no target site is left to calibrate; name some in `target_sites`.")
    return observed_sites, target_sites


def _simformer_draws(sf, rng_key, observed: Mapping[str, np.ndarray], target_sites, num_samples: int):
    """All conditional draws of a Simformer in one batched query: ``{site: (n, L, *shape)}``.

    ``observed`` holds ``(n, *site shape)`` per site; observation ``i`` is answered as the
    single query with key ``jax.random.fold_in(rng_key, i)`` would be.
    """
    tree = sf.sample(rng_key, observed=dict(observed), num_samples=num_samples)
    out = {}
    for name in target_sites:
        group = "posterior" if "posterior" in tree.children and name in tree["posterior"].data_vars else "posterior_predictive"
        value = np.asarray(tree[group][name].transpose("observation", "chain", "draw", ...).values)
        out[name] = value.reshape((value.shape[0], -1) + value.shape[3:])
    return out


def _ranks(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of ``truth`` (*shape) among ``draws`` (L, *shape); ties broken uniformly at random."""
    below = np.sum(draws < truth, axis=0)
    ties = np.sum(draws == truth, axis=0)
    return below + np.floor(rng.uniform(size=np.shape(truth)) * (ties + 1)).astype(np.int64)


def _tarp(truth: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TARP statistic per simulation, ``truth`` (n, d), ``draws`` (n, L, d): uniform when exact."""
    center, scale = truth.mean(axis=0), truth.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    truth, draws = (truth - center) / scale, (draws - center) / scale
    low, high = truth.min(axis=0), truth.max(axis=0)
    references = rng.uniform(low, high, size=truth.shape)
    distance_true = np.linalg.norm(truth - references, axis=-1)
    distance_draws = np.linalg.norm(draws - references[:, None], axis=-1)
    closer = np.sum(distance_draws < distance_true[:, None], axis=1)  # a rank in {0..L}, spread like the PIT
    return (closer + rng.uniform(size=closer.shape)) / (draws.shape[1] + 1)


def sbc(
    rng_key,
    posterior,
    *model_args,
    num_simulations: int = 200,
    num_samples: int = 100,
    model: Callable | None = None,
    observed_sites: Sequence[str] | None = None,
    target_sites: Sequence[str] | None = None,
    progress_bar: bool = False,
    **model_kwargs,
):
    """Simulation-based calibration ranks, PIT values and TARP of any conditional.

    Args:
        rng_key: a JAX PRNG key; the result is a function of it.
        posterior: a fitted :class:`~numpyro_simformer.Simformer`, or a function
            ``posterior_fn(rng_key, observed, num_samples) -> {site: (num_samples, *site shape)}``
            that samples the conditional of the target sites given ``observed`` (a dict
            of site values): an exact posterior, another method, a deliberately broken
            one (no network needed).
        *model_args, **model_kwargs: passed to the model, as in ``fit``.
        num_simulations: joint draws to test on (draws with NaN or inf are dropped).
        num_samples: conditional draws per simulation, ``L``; ranks lie in ``{0..L}``.
        model: the NumPyro model; required with a posterior function (a Simformer
            brings its own).
        observed_sites: the sites conditioned on. Default for a Simformer: its data
            sites (sites without children), i.e. the posterior; required with a function.
        target_sites: the sites whose calibration is tested; default all other sites.
        progress_bar: a tqdm bar over the simulations of a posterior function (a
            Simformer answers all of them in one batched query).

    Returns:
        An ``xarray.DataTree`` with groups ``prior_sbc`` (PIT values), ``sbc_ranks`` and
        ``tarp`` (see the module docstring); its ``attrs`` hold the settings.

    Example:
        >>> import jax, numpy as np, numpyro, numpyro.distributions as dist
        >>> def model():
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("x", dist.Normal(mu, 1.0))
        >>> def exact(rng_key, observed, num_samples):  # p(mu | x) = N(x / 2, 1 / 2)
        ...     noise = jax.random.normal(rng_key, (num_samples,))
        ...     return {"mu": observed["x"] / 2 + np.sqrt(0.5) * np.asarray(noise)}
        >>> tree = sbc(jax.random.key(0), exact, model=model, observed_sites=["x"], num_simulations=100)
        >>> float(uniformity_test(tree)["mu"]) > 0.001
        True
    """
    from arviz_base import from_dict

    from numpyro_simformer.model.simulate import simulate

    for name, value in (("num_simulations", num_simulations), ("num_samples", num_samples)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"sbc: `{name}` must be a positive integer, got {value!r}.")
    if not _is_simformer(posterior) and not callable(posterior):
        raise TypeError(f"sbc: `posterior` must be a Simformer or a function, got {type(posterior).__name__}.")
    model, sites = _sites_of(posterior, model, model_args, model_kwargs)
    observed_sites, target_sites = _choose_sites(posterior, sites, observed_sites, target_sites)

    check_rng_key(rng_key, "sbc")
    key_simulate, key_posterior, key_ranks = jax.random.split(rng_key, 3)
    draws, info = simulate(key_simulate, model, num_simulations, observed_sites + target_sites, model_args, model_kwargs)
    num_valid = info.num_valid
    if num_valid == 0:
        raise RuntimeError(f"sbc: all {num_simulations} joint draws contained NaN or inf.")
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key_ranks)).ravel())
    ranks = {name: np.zeros((num_valid,) + sites[name].shape, np.int64) for name in target_sites}
    flat_draws = np.zeros((num_valid, num_samples, sum(sites[name].size for name in target_sites)))
    batched = None
    if _is_simformer(posterior):  # one batched query for every simulation
        batched = _simformer_draws(posterior, key_posterior, {name: draws[name] for name in observed_sites},
                                   target_sites, num_samples)
    indices = range(num_valid)
    if progress_bar and batched is None:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="sbc", unit="simulation")
    for index in indices:
        if batched is None:
            observed = {name: np.asarray(draws[name][index]) for name in observed_sites}
            samples = posterior(jax.random.fold_in(key_posterior, index), observed, num_samples)
        else:
            samples = {name: value[index] for name, value in batched.items()}
        parts = []
        for name in target_sites:
            value = np.asarray(samples[name], dtype=np.float64)
            expected = (num_samples,) + sites[name].shape
            if value.shape != expected:
                raise ValueError(f"sbc: the posterior returned {name!r} of shape {value.shape}; expected {expected}.")
            ranks[name][index] = _ranks(value, np.asarray(draws[name][index], dtype=np.float64), rng)
            parts.append(value.reshape(num_samples, -1))
        flat_draws[index] = np.concatenate(parts, axis=1)
    truth = np.concatenate([np.asarray(draws[name], np.float64).reshape(num_valid, -1) for name in target_sites], axis=1)
    tarp = _tarp(truth, flat_draws, rng)
    pit = {name: (rank + rng.uniform(size=rank.shape)) / (num_samples + 1) for name, rank in ranks.items()}

    tree = from_dict(
        {
            "prior_sbc": {name: value[None] for name, value in pit.items()},
            "sbc_ranks": {name: value[None] for name, value in ranks.items()},
            "tarp": {"tarp": tarp[None]},
        },
        dims={name: list(sites[name].dims) for name in target_sites},
        sample_dims=["chain", "draw"],
    )
    tree.attrs.update(
        {
            "num_simulations": int(num_valid),
            "num_invalid_simulations": int(info.num_invalid),
            "num_samples": int(num_samples),
            "observed_sites": list(observed_sites),
            "target_sites": list(target_sites),
            "inference_library": "numpyro_simformer",
        }
    )
    return tree


def coverage(calibration, levels: Sequence[float] | None = None) -> xr.Dataset:
    """Expected coverage: the share of true values inside each central credible interval.

    For an exact conditional the share equals the level; below the diagonal the answer is
    over-confident, above it under-confident. Marginal per element (from the PIT), and
    joint over all target elements for ``tarp`` (TARP's expected coverage).

    Args:
        calibration: the ``DataTree`` returned by :func:`sbc`.
        levels: credibility levels in [0, 1] (default 0, 0.05, ..., 1).

    Returns:
        An ``xarray.Dataset`` with one variable per target site (dims
        ``(credibility_level, *site dims)``) and ``tarp`` (dim ``credibility_level``).
    """
    levels = np.linspace(0.0, 1.0, 21) if levels is None else np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or np.any((levels < 0) | (levels > 1)):
        raise ValueError(f"coverage: `levels` must be a 1-d sequence in [0, 1], got {levels}.")
    level = xr.DataArray(levels, dims="credibility_level", coords={"credibility_level": levels})
    pit = calibration["prior_sbc"].to_dataset()
    out = {name: (np.abs(pit[name] - 0.5) <= level / 2).mean(("chain", "draw")) for name in pit.data_vars}
    if "tarp" in calibration.children:
        out["tarp"] = (calibration["tarp"]["tarp"] < level).mean(("chain", "draw"))
    return xr.Dataset(out)


def rank_uniformity_pvalue(ranks, num_samples: int, *, num_bins: int | None = None) -> np.ndarray:
    """Chi-square p-value that integer ranks in ``{0..num_samples}`` are uniform.

    Args:
        ranks: int array (num_simulations, ...) of SBC ranks; tested along axis 0.
        num_samples: ``L``, the number of conditional draws behind each rank.
        num_bins: bins of neighbouring ranks (default: about 10 ranks expected per bin,
            at most ``L + 1``, at least 2).

    Returns:
        p-values, one per element of ``ranks.shape[1:]`` (a 0-d array for 1-d ranks).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim == 0 or ranks.shape[0] < 2:
        raise ValueError(f"rank_uniformity_pvalue: need ranks of shape (num_simulations >= 2, ...), got {ranks.shape}.")
    if np.any(ranks < 0) or np.any(ranks > num_samples):
        raise ValueError(f"rank_uniformity_pvalue: ranks must lie in [0, {num_samples}] (num_samples).")
    num_values, num_simulations = num_samples + 1, ranks.shape[0]
    if num_bins is None:
        num_bins = int(np.clip(num_simulations // 10, 2, num_values))
    bin_of_rank = (np.arange(num_values) * num_bins) // num_values
    expected = np.bincount(bin_of_rank, minlength=num_bins) * num_simulations / num_values
    flat = ranks.reshape(num_simulations, -1)
    pvalues = [
        stats.chisquare(np.bincount(bin_of_rank[flat[:, element]], minlength=num_bins), expected).pvalue
        for element in range(flat.shape[1])
    ]
    return np.asarray(pvalues).reshape(ranks.shape[1:])


def uniformity_test(calibration, *, method: Literal["ks", "chi2"] = "ks") -> xr.Dataset:
    """p-values that the calibration statistics are uniform, per element and for TARP.

    Args:
        calibration: the ``DataTree`` returned by :func:`sbc`.
        method: ``"ks"``: Kolmogorov-Smirnov on the PIT values (exactly uniform under an
            exact conditional); ``"chi2"``: chi-square on the binned integer ranks.

    Returns:
        An ``xarray.Dataset`` of p-values, one variable per target site (its site dims)
        and ``tarp`` (KS for both methods). Small values (below ``0.01 / num_elements``,
        say) flag a miscalibrated conditional.
    """
    if method not in ("ks", "chi2"):
        raise ValueError(f"uniformity_test: `method` must be 'ks' or 'chi2', got {method!r}.")
    out = {}
    source = calibration["prior_sbc" if method == "ks" else "sbc_ranks"].to_dataset()
    for name, values in source.data_vars.items():
        flat = values.stack(sample=("chain", "draw")).transpose("sample", ...)
        if method == "ks":
            pvalue = stats.kstest(flat.values, "uniform", axis=0).pvalue
        else:
            pvalue = rank_uniformity_pvalue(flat.values, calibration.attrs["num_samples"])
        out[name] = xr.DataArray(np.asarray(pvalue), dims=[dim for dim in flat.dims if dim != "sample"])
    if "tarp" in calibration.children:
        out["tarp"] = xr.DataArray(stats.kstest(calibration["tarp"]["tarp"].values.ravel(), "uniform").pvalue)
    return xr.Dataset(out)
