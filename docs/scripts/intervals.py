"""The worked example of docs/intervals.md: an interval-conditioned query against rejection sampling.

Run from the repository root (a few minutes on 2 cores):

    python docs/scripts/intervals.py

It trains a small Simformer on theta ~ N(0, 1)^3, x ~ N(theta, 0.5^2), asks for
theta and the missing x[1], x[2] given x[0] = 1.2 and 0.5 <= x[1], x[2] <= 1.0, compares
with rejection sampling from the exact joint, prints the C2ST of both guidance choices,
and writes ``docs/images/intervals.png``.
"""

from pathlib import Path

import jax
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from numpyro_simformer import GuidedEulerMaruyama, NetworkConfig, Simformer, TrainingConfig  # noqa: E402
from numpyro_simformer.diagnostics import c2st  # noqa: E402
from numpyro_simformer.samplers import SigmoidIntervalGuidance  # noqa: E402

NOISE = 0.5
OUTPUT = Path(__file__).resolve().parent.parent / "images" / "intervals.png"


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, NOISE).to_event(1))


def rejection_reference(num_samples, seed=0):
    """(theta, x[1], x[2]) given x[0] = 1.2 and x[1], x[2] in [0.5, 1], by exact conditioning and rejection."""
    eye = np.eye(3)
    covariance = np.block([[eye, eye], [eye, eye * (1 + NOISE**2)]])
    latent = np.array([True, True, True, False, True, True])
    gain = covariance[np.ix_(latent, ~latent)] / covariance[3, 3]
    mean = (gain * 1.2)[:, 0]
    conditional = covariance[np.ix_(latent, latent)] - gain @ covariance[np.ix_(~latent, latent)]
    draws = np.random.default_rng(seed).multivariate_normal(mean, conditional, size=200 * num_samples)
    inside = np.all((draws[:, 3:] >= 0.5) & (draws[:, 3:] <= 1.0), axis=1)
    return draws[inside][:num_samples]


def main():
    sf = Simformer(model, num_simulations=4_000, network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
                   training=TrainingConfig(max_steps=3_000, validation_interval=250), progress_bar=False)
    sf.fit(jax.random.key(0))

    query = dict(observed={"x": [1.2, np.nan, np.nan]},
                 intervals={"x": ([-np.inf, 0.5, 0.5], [np.inf, 1.0, 1.0])},
                 num_samples=2_000, sampler=GuidedEulerMaruyama(num_steps=50, resampling_steps=5))
    tree = sf.sample(jax.random.key(1), **query)
    paper = sf.sample(jax.random.key(1), guidance=SigmoidIntervalGuidance(), **query)
    unguided = sf.sample(jax.random.key(1), observed={"x": [1.2, np.nan, np.nan]}, num_samples=2_000)
    print(tree["observed_data"])

    def flat(result):
        return np.column_stack([result.posterior["theta"].values.reshape(-1, 3),
                                result.posterior_predictive["x"].values.reshape(-1, 3)[:, 1:]])

    reference = rejection_reference(2_000)
    for name, result in (("Gaussian guidance (default)", tree), ("sigmoid guidance (paper)", paper)):
        print(f"{name}: C2ST against rejection sampling {c2st(flat(result), reference, early_stopping=True):.3f}")

    figure, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    panels = [(0, "theta[1]"), (3, "x[1]")]
    for axis, (column, label) in zip(axes[:2], panels):
        bins = np.linspace(-1.5, 2.5, 60)
        axis.hist(flat(unguided)[:, 1 if column == 0 else 3], bins=bins, density=True, histtype="step",
                  color="0.6", label="x[1], x[2] free")
        axis.hist(reference[:, 1 if column == 0 else 3], bins=bins, density=True, alpha=0.35, color="C0",
                  label="rejection (exact)")
        axis.hist(flat(tree)[:, 1 if column == 0 else 3], bins=bins, density=True, histtype="step", color="C3",
                  linewidth=1.5, label="Simformer, interval")
        axis.set_xlabel(label)
    axes[1].axvspan(0.5, 1.0, color="C1", alpha=0.12, label="interval")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[1].legend(fontsize=7, loc="upper left")
    axes[2].scatter(reference[:, 1], reference[:, 3], s=2, alpha=0.3, color="C0", label="rejection (exact)")
    axes[2].scatter(flat(tree)[:, 1], flat(tree)[:, 3], s=2, alpha=0.3, color="C3", label="Simformer")
    axes[2].set_xlabel("theta[1]")
    axes[2].set_ylabel("x[1]")
    axes[2].legend(fontsize=7, markerscale=4)
    figure.suptitle("p(theta, x[1:] | x[0] = 1.2, 0.5 ≤ x[1], x[2] ≤ 1)", fontsize=10)
    figure.tight_layout()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(OUTPUT, dpi=120)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
