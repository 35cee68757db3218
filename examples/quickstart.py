"""Quickstart: a NumPyro simulator in, posterior and likelihood back as ArviZ data.

Run:  python examples/quickstart.py            (about a minute on a 2-core CPU)
      python examples/quickstart.py --tiny     (seconds; what the test suite runs)
"""

import argparse
import time

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist

from numpyro_simformer import Simformer, TrainingConfig


def model():
    """theta ~ N(0, 1)^3, x ~ N(theta, 0.5^2): parameters and data are just sample sites."""
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


def main(tiny: bool = False) -> dict:
    num_simulations, max_steps, num_samples = (300, 50, 200) if tiny else (5_000, 2_500, 2_000)
    sf = Simformer(
        model,
        num_simulations=num_simulations,
        training=TrainingConfig(max_steps=max_steps),
        progress_bar=not tiny,
    )
    start = time.perf_counter()
    sf.fit(jax.random.key(0))
    print(f"trained in {time.perf_counter() - start:.0f} s on {sf.simulation_info.num_valid} simulations")
    print(sf)  # what the fit read from the model and trained

    x_o = np.array([1.0, -0.5, 0.3])
    posterior = sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=num_samples)
    print("\nPosterior p(theta | x_o); the exact mean is x_o / 1.25 =", x_o / 1.25, "and std 0.447")
    print(az.summary(posterior, kind="stats"))

    likelihood = sf.sample(jax.random.key(2), observed={"theta": np.zeros(3)}, num_samples=num_samples)
    print("\nLikelihood p(x | theta = 0); exact mean 0, std 0.5")
    print(az.summary(likelihood, group="posterior_predictive", kind="stats"))

    mixed = sf.sample(
        jax.random.key(3),
        observed={"theta": np.array([0.8, np.nan, np.nan]), "x": np.array([1.2, np.nan, -0.7])},
        num_samples=num_samples,
    )
    print("\nA mixed query: theta[0] fixed, x[1] missing")
    print(az.summary(mixed, kind="stats"))
    return {"posterior": posterior, "likelihood": likelihood, "mixed": mixed}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings (for the test suite)")
    main(parser.parse_args().tiny)
