"""Plots of the token dependency graph and attention masks.

Matplotlib is imported inside the functions, so importing this module (or the package)
never loads it or touches its backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from numpyro_simformer.diagnostics.plots import plot_coverage, plot_history

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_dependencies", "plot_history", "plot_coverage"]


def plot_dependencies(
    labels: Sequence[str],
    mask_or_parents: np.ndarray,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Draw a boolean token-by-token matrix, one labelled row and column per token.

    Row i, column j is dark when ``matrix[i, j]`` is True: for a parents matrix, token j is
    a parent of token i; for an attention mask, token i may attend to token j.

    Parameters:
        labels: the ``num_tokens`` token labels (as returned by ``element_parents``).
        mask_or_parents: bool ``(num_tokens, num_tokens)``.
        ax: the Axes to draw on (default: a new figure sized to the number of tokens).
        title: optional title.

    Returns:
        The Axes.

    Example:
        >>> labels, parents = dependency_matrix(model)  # doctest: +SKIP
        >>> ax = plot_dependencies(labels, attention_mask(parents), title="undirected")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    matrix = np.asarray(mask_or_parents, dtype=bool)
    labels = [str(label) for label in labels]
    num_tokens = len(labels)
    if matrix.shape != (num_tokens, num_tokens):
        raise ValueError(
            f"Got {num_tokens} labels but a matrix of shape {matrix.shape}; expected "
            f"({num_tokens}, {num_tokens}). Pass the labels returned with the matrix."
        )
    if ax is None:
        size = min(2.0 + 0.25 * num_tokens, 14.0)
        _, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(num_tokens), labels, rotation=90)
    ax.set_yticks(range(num_tokens), labels)
    ax.set_xticks(np.arange(num_tokens + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(num_tokens + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="0.75", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("j (parent / attended token)")
    ax.set_ylabel("i (token)")
    if title is not None:
        ax.set_title(title)
    return ax
