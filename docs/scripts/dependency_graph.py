"""Draw the extracted dependency graph and attention mask of the Tree task for the docs.

Run from the repository root:

    python docs/scripts/dependency_graph.py

It writes ``docs/images/dependency-graph-tree.png`` and prints the extracted parents.
"""

from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from numpyro_simformer.model.graph import attention_mask, dependency_matrix  # noqa: E402
from numpyro_simformer.plot import plot_dependencies  # noqa: E402


def tree():
    theta0 = numpyro.sample("theta0", dist.Normal(0, 1))
    theta1 = numpyro.sample("theta1", dist.Normal(theta0, 1))
    theta2 = numpyro.sample("theta2", dist.Normal(theta0, 1))
    numpyro.sample("x1", dist.Normal(jnp.sin(theta1) ** 2, 0.2))
    numpyro.sample("x2", dist.Normal(0.1 * theta1**2, 0.2))
    numpyro.sample("x3", dist.Normal(0.1 * theta2**2, 0.6))
    numpyro.sample("x4", dist.Normal(jnp.cos(theta2) ** 2, 0.1))


def main() -> None:
    labels, parents = dependency_matrix(tree)
    for i, label in enumerate(labels):
        print(f"{label:>7} <- {[labels[j] for j in parents[i].nonzero()[0]]}")
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4.6))
    plot_dependencies(labels, parents, ax=left, title="parents[i, j]: j is a parent of i")
    plot_dependencies(labels, attention_mask(parents), ax=right, title='attention_mask(parents, "undirected")')
    figure.tight_layout()
    path = Path(__file__).resolve().parents[1] / "images" / "dependency-graph-tree.png"
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
