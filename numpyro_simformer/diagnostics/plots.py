"""Plots of training and calibration: the loss history and expected coverage.

Matplotlib is imported inside the functions, so importing this module (or the package)
never loads it or touches its backend. Calibration's rank plots are ArviZ's:
``arviz_plots.plot_ecdf_pit(calibration)`` reads the tree that
:func:`~numpyro_simformer.diagnostics.sbc` returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_history", "plot_coverage"]


def plot_history(history, ax: Axes | None = None, *, log_scale: bool = False) -> Axes:
    """Training and validation loss against the optimiser step, with the best step marked.

    Args:
        history: a :class:`~numpyro_simformer.training.loop.TrainingHistory` (``sf.history``).
        ax: the Axes to draw on (default: a new figure).
        log_scale: a logarithmic loss axis.

    Returns:
        The Axes.

    Example:
        >>> ax = plot_history(sf.history)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    for field in ("step", "train_loss", "validation_loss", "best_step"):
        if not hasattr(history, field):
            raise TypeError(
                f"plot_history needs a TrainingHistory (sf.history); got a {type(history).__name__} "
                f"without `{field}`."
            )
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.5))
    step = np.asarray(history.step)
    ax.plot(step, np.asarray(history.train_loss), marker=".", label="training loss")
    ax.plot(step, np.asarray(history.validation_loss), marker=".", label="validation loss (EMA weights)")
    ax.axvline(int(history.best_step), color="0.5", linestyle="--", linewidth=1,
               label=f"best step ({int(history.best_step)})")
    rate = getattr(history, "learning_rate", None)
    if rate is not None:  # on a second axis: drops mark plateau reductions and the final decay
        rate_ax = ax.twinx()
        rate_ax.step(step, np.asarray(rate), where="post", color="0.6", linewidth=1, label="learning rate")
        rate_ax.set_yscale("log")
        rate_ax.set_ylabel("learning rate", color="0.4")
        rate_ax.tick_params(axis="y", colors="0.4")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("denoising score-matching loss")
    title = "training history"
    if getattr(history, "stopped_early", False):
        title += " (stopped early)"
    ax.set_title(title)
    ax.legend(frameon=False)
    return ax


def plot_coverage(calibration, ax: Axes | None = None, *, levels: Sequence[float] | None = None,
                  band_probability: float = 0.95) -> Axes:
    """Expected coverage against the credibility level: one line per element, and TARP.

    An exact conditional lies on the diagonal, inside the grey band (the binomial spread of
    ``num_simulations`` coverage indicators); below it the answer is over-confident, above
    it under-confident.

    Args:
        calibration: the ``DataTree`` returned by :func:`~numpyro_simformer.diagnostics.sbc`.
        ax: the Axes to draw on (default: a new figure).
        levels: credibility levels (default 0, 0.05, ..., 1).
        band_probability: probability mass of the grey band.

    Returns:
        The Axes.

    Example:
        >>> ax = plot_coverage(sbc(jax.random.key(0), sf))  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from scipy import stats

    from numpyro_simformer.diagnostics.calibration import coverage  # a sibling module, not the package

    result = coverage(calibration, levels)
    level = result["credibility_level"].values
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    num = int(calibration.attrs.get("num_simulations", calibration["prior_sbc"].sizes["draw"]))
    low = stats.binom.ppf((1 - band_probability) / 2, num, level) / num
    high = stats.binom.ppf((1 + band_probability) / 2, num, level) / num
    ax.fill_between(level, low, high, color="0.85", label=f"{band_probability:.0%} band (exact)")
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1)
    for name, values in result.data_vars.items():
        if name == "tarp":
            continue
        site_dims = [dim for dim in values.dims if dim != "credibility_level"]
        stacked = values.stack(element=site_dims) if site_dims else values.expand_dims(element=[()])
        for index in range(stacked.sizes["element"]):
            element = stacked.isel(element=index)
            label = name if not site_dims else f"{name}[{','.join(str(v) for v in np.atleast_1d(element['element'].item()))}]"
            ax.plot(level, element.values, linewidth=1.2, label=label)
    if "tarp" in result:
        ax.plot(level, result["tarp"].values, color="black", linewidth=2, label="TARP (joint)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    ax.set_title("calibration")
    ax.legend(frameon=False, fontsize="small")
    return ax
