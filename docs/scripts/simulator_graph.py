"""Draw the dependency graph of a black-box simulator with distractors for the docs.

Run from the repository root:

    python docs/scripts/simulator_graph.py

It writes ``docs/images/simulator-distractors.png`` and prints the extracted parents. The
model is a small ``slcp_distractors``-like one: a JAX function of two parameters whose
output holds four informative elements among eight noise-only ones.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

from numpyro_simformer import Simulator, attention_mask, dependency_matrix  # noqa: E402
from numpyro_simformer.plot import plot_dependencies  # noqa: E402


def simulator(rng_key, theta):
    """x[2:6] informative (means theta, scale |theta[1]|), the rest Student-t noise."""
    key_signal, key_distractors = jax.random.split(rng_key)
    signal = jnp.tile(theta, 2) + 0.1 * jnp.abs(theta[1]) * jax.random.normal(key_signal, (4,))
    distractors = jax.random.t(key_distractors, 3.0, (8,))
    return jnp.concatenate([distractors[:2], signal, distractors[2:]])


def model(shared_noise="auto"):
    theta = numpyro.sample("theta", dist.Uniform(-3, 3).expand([2]).to_event(1))
    numpyro.sample("x", Simulator(simulator, theta, shared_noise=shared_noise))


def main() -> None:
    labels, parents = dependency_matrix(model)
    _, shared = dependency_matrix(model, shared_noise=True)
    for i, label in enumerate(labels):
        print(f"{label:>8} <- {[labels[j] for j in parents[i].nonzero()[0]]}")
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    plot_dependencies(labels, shared, ax=axes[0], title="parents (shared_noise=True)")
    plot_dependencies(labels, attention_mask(shared), ax=axes[1], title="attention mask (shared_noise=True)")
    plot_dependencies(labels, attention_mask(parents), ax=axes[2],
                      title="attention mask (default: noise read from the function)")
    figure.tight_layout()
    path = Path(__file__).resolve().parents[1] / "images" / "simulator-distractors.png"
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
