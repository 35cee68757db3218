"""Trust and workflow: train, save and reload, calibrate, and check against NUTS.

Run:  python examples/diagnostics.py            (a few minutes on a 2-core CPU)
      python examples/diagnostics.py --tiny     (what the test suite runs)

Writes its figures (training history, coverage, PIT ECDF) to ``diagnostics-output/``.
"""

import argparse
import dataclasses
import pathlib
import tempfile
import warnings

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st_fast, check_against_mcmc, coverage, plot_coverage, sbc, uniformity_test
from numpyro_simformer.plot import plot_history


def model():
    """theta ~ N(0, 1)^2, x ~ N(theta, 0.5^2): the exact posterior is N(x / 1.25, 0.2)."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


def main(tiny: bool = False, output: str = "diagnostics-output") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import arviz_plots
    import matplotlib.pyplot as plt

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if tiny:
        network = NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=16, num_time_features=8)
        training = TrainingConfig(max_steps=20, steps_per_call=10, batch_size=32, validation_interval=10)
        num_simulations, sbc_simulations, sbc_samples, mcmc = 300, 20, 10, dict(num_samples=100, num_warmup=100, num_chains=2)
    else:
        network, training = NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64), TrainingConfig(max_steps=3_000)
        num_simulations, sbc_simulations, sbc_samples, mcmc = 4_000, 200, 100, dict(num_samples=1_000)

    # 1. train, with training checkpoints: an interrupted run resumes from the last one
    with tempfile.TemporaryDirectory() as scratch:
        training_with_checkpoints = dataclasses.replace(training, checkpoint_dir=f"{scratch}/training")
        sf = Simformer(model, num_simulations=num_simulations, network=network,
                       training=training_with_checkpoints, progress_bar=not tiny)
        sf.fit(jax.random.key(0))
        # 2. save and load: the same samples for the same key
        sf.save(f"{scratch}/fitted")
        loaded = Simformer.load(f"{scratch}/fitted", model)
    x_o = {"x": np.array([1.0, -0.5])}
    first = sf.sample(jax.random.key(1), observed=x_o, num_samples=100).posterior["theta"].values
    second = loaded.sample(jax.random.key(1), observed=x_o, num_samples=100).posterior["theta"].values
    print("loaded checkpoint gives identical samples:", bool(np.array_equal(first, second)))

    ax = plot_history(sf.history)
    ax.figure.savefig(output / "history.png", dpi=100)

    # 3. simulation-based calibration of the posterior
    calibration = sbc(jax.random.key(2), sf, num_simulations=sbc_simulations, num_samples=sbc_samples)
    print("\nSBC uniformity p-values (small = miscalibrated):")
    print(uniformity_test(calibration))
    print("\nexpected coverage at 50 % and 90 %:")
    print(coverage(calibration, levels=[0.5, 0.9]))
    plot_coverage(calibration).figure.savefig(output / "coverage.png", dpi=100)
    arviz_plots.plot_ecdf_pit(calibration, backend="matplotlib").savefig(output / "pit_ecdf.png", dpi=100)
    plt.close("all")

    # 4. the same question answered by NUTS on the same model
    with warnings.catch_warnings():
        if tiny:  # a tiny NUTS run cannot pass its convergence checks; the result says so
            warnings.simplefilter("ignore")
        result = check_against_mcmc(sf, jax.random.key(3), x_o, c2st_fn=c2st_fast, **mcmc)
    print()
    print(result)
    return {"simformer": sf, "calibration": calibration, "mcmc_check": result, "identical": np.array_equal(first, second)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings (for the test suite)")
    parser.add_argument("--output", default="diagnostics-output", help="folder for the figures")
    arguments = parser.parse_args()
    main(arguments.tiny, arguments.output)
