"""Hodgkin–Huxley: the posterior given summary statistics and an interval on the energy, by guided diffusion.

Run:  python examples/hodgkin_huxley.py --output docs/images   (8 CPU-minutes: at most 8 minutes on
                                                               a 2-core CPU, 11 on one shared with other jobs)
      python examples/hodgkin_huxley.py --tiny                 (about 75 CPU-seconds; what the test suite runs)

A stochastic Hodgkin–Huxley neuron with 7 unknown parameters is written as an ordinary
NumPyro model: the parameters ``theta``, the simulator's current noise ``noise`` (left out
of the Simformer's tokens) and 8 summary statistics ``x`` of the voltage trace, the last
of which is the energy the neuron spends (its sodium charge). One Simformer answers

1. ``p(theta | x_o)``: all 8 statistics observed;
2. ``p(theta | x_o[:7], energy <= energy_o)``: the 7 voltage statistics observed and the
   energy only bounded from above, by guided diffusion (``intervals=``).

Writes ``hodgkin_huxley.png`` (posterior marginals and energies) to ``--output``.
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import Predictive

from numpyro_simformer import GuidedEulerMaruyama, NetworkConfig, Simformer, TrainingConfig

PARAMETER_NAMES = ["C_m", "g_Na", "g_K", "g_L", "E_Na", "E_K", "E_L"]
PARAMETER_UNITS = ["µF/cm²", "mS/cm²", "mS/cm²", "mS/cm²", "mV", "mV", "mV"]
PRIOR_LOW = np.array([1.0, 60.0, 10.0, 0.1, 40.0, -100.0, -90.0])
PRIOR_HIGH = np.array([2.0, 120.0, 30.0, 0.5, 70.0, -60.0, -60.0])
STATISTIC_NAMES = [
    "spike count",
    "resting potential mean (mV)",
    "log resting potential std (log mV)",
    "mean potential, stimulation (mV)",
    "potential std, stimulation (mV)",
    "potential skewness, stimulation",
    "log potential kurtosis, stimulation",
    "energy: log10 sodium charge (log10 nC/cm²)",
]
ENERGY = 7  # index of the energy among the statistics
# The spread of each statistic over the prior predictive (rounded); the observation noise is 1 % of it.
STATISTIC_SCALE = np.array([3.0, 9.0, 0.9, 7.0, 10.0, 3.0, 0.9, 0.8])
OBSERVATION_STD = 0.01 * STATISTIC_SCALE

DURATION, STIMULUS_ON, STIMULUS_OFF, REST_FROM = 200.0, 50.0, 150.0, 20.0  # ms
STIMULUS = 8.0  # µA/cm², a step current from STIMULUS_ON to STIMULUS_OFF
NOISE_BLOCK = 1.0  # ms: the noise current is constant over each block
NUM_NOISE = int(DURATION / NOISE_BLOCK)
NOISE_STD = 0.5  # µA/cm² · ms^½: white-noise intensity of the current noise
SPIKE_THRESHOLD = -10.0  # mV, upward crossings count as spikes
V_START = -65.0  # mV, the gates start at their steady state there


def _x_over_1_minus_exp(x):
    """x / (1 - exp(-x)), finite with a finite gradient at x = 0 (the HH rates' removable singularity)."""
    small = jnp.abs(x) < 1e-4
    safe = jnp.where(small, 1.0, x)
    return jnp.where(small, 1.0 + 0.5 * x, safe / -jnp.expm1(-safe))


def _rates(v):
    """The classic HH opening and closing rates (1/ms) of the gates m, h, n at voltage v (mV)."""
    m = (_x_over_1_minus_exp((v + 40.0) / 10.0), 4.0 * jnp.exp(-(v + 65.0) / 18.0))
    h = (0.07 * jnp.exp(-(v + 65.0) / 20.0), 1.0 / (1.0 + jnp.exp(-(v + 35.0) / 10.0)))
    n = (0.1 * _x_over_1_minus_exp((v + 55.0) / 10.0), 0.125 * jnp.exp(-(v + 65.0) / 80.0))
    return m, h, n


def simulate(theta, noise, dt):
    """Voltage trace (mV) at times ``t`` (ms) and the sodium charge (nC/cm²) during the stimulus.

    Exponential Euler for the gates and the membrane (each is linear in itself over one
    step, so the step is exact for frozen conductances and stable at any ``dt``); the
    current noise enters as ``NOISE_STD * noise[block] / sqrt(NOISE_BLOCK)``.
    """
    c_m, g_na, g_k, g_l, e_na, e_k, e_l = (theta[..., i] for i in range(7))
    num_steps = int(round(DURATION / dt))
    t = (jnp.arange(num_steps) + 1) * dt
    during = (t > STIMULUS_ON) & (t <= STIMULUS_OFF)
    block = jnp.minimum(jnp.floor((t - 0.5 * dt) / NOISE_BLOCK).astype(jnp.int32), NUM_NOISE - 1)
    noise_current = noise[..., block] * NOISE_STD / jnp.sqrt(NOISE_BLOCK)
    current = jnp.where(during, STIMULUS, 0.0) + noise_current

    def relax(value, target, rate):
        return target + (value - target) * jnp.exp(-dt * rate)

    def step(state, inputs):
        v, m, h, n, charge = state
        i_ext, on = inputs
        gates = []
        for x, (alpha, beta) in zip((m, h, n), _rates(v)):
            gates.append(relax(x, alpha / (alpha + beta), alpha + beta))
        m, h, n = gates
        g_sodium, g_potassium = g_na * m**3 * h, g_k * n**4
        g_total = g_sodium + g_potassium + g_l
        v_target = (g_sodium * e_na + g_potassium * e_k + g_l * e_l + i_ext) / g_total
        v = relax(v, v_target, g_total / c_m)
        charge = charge + jnp.where(on, g_sodium * (e_na - v) * dt, 0.0)
        return (v, m, h, n, charge), v

    start = [V_START] + [alpha / (alpha + beta) for alpha, beta in _rates(jnp.asarray(V_START))]
    (*_, charge), v = jax.lax.scan(step, (*start, 0.0 * c_m), (current, during))
    return t, v, charge


def summary_statistics(t, v, charge):
    """The 8 statistics: spikes, rest and stimulation moments of the voltage, and the energy."""
    rest = (t > REST_FROM) & (t <= STIMULUS_ON)
    during = (t > STIMULUS_ON) & (t <= STIMULUS_OFF)

    def mean(values, where):
        return jnp.sum(jnp.where(where, values, 0.0)) / jnp.sum(where)

    crossings = (v[:-1] < SPIKE_THRESHOLD) & (v[1:] >= SPIKE_THRESHOLD) & during[1:]
    rest_mean = mean(v, rest)
    rest_std = jnp.sqrt(mean((v - rest_mean) ** 2, rest))
    stim_mean = mean(v, during)
    deviation = v - stim_mean
    stim_var = mean(deviation**2, during)
    return jnp.stack([
        jnp.sum(crossings.astype(v.dtype)),
        rest_mean,
        jnp.log(rest_std),
        stim_mean,
        jnp.sqrt(stim_var),
        mean(deviation**3, during) / stim_var**1.5,
        jnp.log(mean(deviation**4, during) / stim_var**2),
        jnp.log10(charge),
    ])


def model(dt: float = 0.025):
    """theta ~ uniform prior, noise ~ N(0, 1) per ms, x = statistics of the simulated trace + 1 % noise."""
    theta = numpyro.sample("theta", dist.Uniform(PRIOR_LOW, PRIOR_HIGH).to_event(1))
    noise = numpyro.sample("noise", dist.Normal(0.0, 1.0).expand([NUM_NOISE]).to_event(1))
    statistics = summary_statistics(*simulate(theta, noise, dt))
    numpyro.sample("x", dist.Normal(statistics, OBSERVATION_STD).to_event(1))


THETA_O = np.array([1.3, 90.0, 20.0, 0.25, 55.0, -75.0, -68.0])  # fires 7 spikes, whatever the noise


def _simulate_statistics(rng_key, thetas, dt):
    """Statistics of fresh simulations (new noise) at each row of ``thetas``: (num, 8)."""
    predictive = Predictive(model, posterior_samples={"theta": jnp.asarray(thetas)}, return_sites=["x"], parallel=True)
    return np.asarray(predictive(rng_key, dt=dt)["x"])


def main(tiny: bool = False, output: str = "hodgkin-huxley-output") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if tiny:
        dt, num_simulations, num_samples, num_resimulated = 0.1, 500, 100, 100
        network = NetworkConfig(width=16, num_layers=1, num_heads=1, mlp_width=32, num_time_features=16)
        training = TrainingConfig(max_steps=200, steps_per_call=100, validation_interval=100)
        sampler = GuidedEulerMaruyama(num_steps=25, resampling_steps=5)
    else:
        dt, num_simulations, num_samples, num_resimulated = 0.025, 10_000, 1_000, 1_000
        network, training = NetworkConfig(num_layers=3), TrainingConfig(max_steps=12_000, validation_interval=1_000)
        sampler = GuidedEulerMaruyama(num_steps=50, resampling_steps=5)
    start = time.perf_counter()

    # the observation: one run of the model at known parameters (noise and observation noise included)
    conditioned = handlers.seed(handlers.condition(model, {"theta": THETA_O}), jax.random.key(42))
    x_o = np.asarray(handlers.trace(conditioned).get_trace(dt=dt)["x"]["value"], dtype=np.float64)
    print("x_o:", dict(zip(STATISTIC_NAMES, np.round(x_o, 3))))

    sf = Simformer(model, num_simulations=num_simulations, exclude_sites=["noise"], network=network,
                   training=training, simulation_chunk_size=2_000, progress_bar=not tiny)
    sf.fit(jax.random.key(0), dt=dt)
    info = sf.simulation_info
    print(f"simulated {info.num_requested} ({info.num_invalid} invalid) in {sf.simulation_time:.0f} s, "
          f"trained {sf.history.step[-1]} steps in {sf.training_time:.0f} s")

    sampling_start = time.perf_counter()
    # 1. all 8 statistics observed
    posterior = sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=num_samples)
    # 2. the 7 voltage statistics observed, the energy only bounded: at most the observed energy
    observed = x_o.copy()
    observed[ENERGY] = np.nan
    low, high = np.full(8, -np.inf), np.full(8, np.inf)
    high[ENERGY] = x_o[ENERGY]
    constrained = sf.sample(jax.random.key(2), observed={"x": observed}, intervals={"x": (low, high)},
                            num_samples=num_samples, sampler=sampler)
    # 3. for reference: the 7 voltage statistics, the energy free
    free = sf.sample(jax.random.key(3), observed={"x": observed}, num_samples=num_samples)
    print(f"three queries of {num_samples} draws in {time.perf_counter() - sampling_start:.0f} s")

    predicted_energy = constrained.posterior_predictive["x"].values[..., ENERGY].ravel()
    free_energy = free.posterior_predictive["x"].values[..., ENERGY].ravel()
    fraction_inside = float(np.mean(predicted_energy <= high[ENERGY]))
    # does the simulator agree? Run it again (new noise) at the posterior draws, and at prior draws, in one call
    thetas = {name: tree.posterior["theta"].values.reshape(-1, 7)[:num_resimulated]
              for name, tree in (("posterior", posterior), ("constrained", constrained), ("free", free))}
    thetas["prior"] = np.asarray(jax.random.uniform(jax.random.key(4), (2 * num_resimulated, 7),
                                                    minval=PRIOR_LOW, maxval=PRIOR_HIGH))
    statistics = _simulate_statistics(jax.random.key(5), np.concatenate(list(thetas.values())), dt)
    resimulated = dict(zip(thetas, np.split(statistics, np.cumsum([len(v) for v in thetas.values()])[:-1])))
    resimulated_energy = resimulated["constrained"][:, ENERGY]
    fraction_inside_resimulated = float(np.mean(resimulated_energy <= high[ENERGY]))
    fraction_free = float(np.mean(free_energy <= high[ENERGY]))  # the same fractions without the interval
    fraction_free_resimulated = float(np.mean(resimulated["free"][:, ENERGY] <= high[ENERGY]))
    prior_energy = resimulated["prior"][:, ENERGY]

    print(f"\nenergy bound: log10 charge <= {high[ENERGY]:.3f}")
    print(f"energy inside the bound: {fraction_inside:.1%} of the Simformer's predicted energies, "
          f"{fraction_inside_resimulated:.1%} of energies re-simulated at the posterior draws")
    print(f"            without the interval: {fraction_free:.1%} predicted, "
          f"{fraction_free_resimulated:.1%} re-simulated")
    free_resimulated = resimulated["free"][:, ENERGY]
    print("energy given the 7 other statistics, energy free:  "
          f"Simformer {np.mean(free_energy):.3f} ± {np.std(free_energy):.3f}, "
          f"re-simulated {np.mean(free_resimulated):.3f} ± {np.std(free_resimulated):.3f}")
    print("energy given the 7 other statistics and the bound: "
          f"Simformer {np.mean(predicted_energy):.3f} ± {np.std(predicted_energy):.3f}, "
          f"re-simulated {np.mean(resimulated_energy):.3f} ± {np.std(resimulated_energy):.3f}")
    print("\nposterior mean ± std    true      all 8 statistics      7 statistics + energy bound")
    for index, name in enumerate(PARAMETER_NAMES):
        exact, bounded = thetas["posterior"][:, index], thetas["constrained"][:, index]
        print(f"{name:>5} ({PARAMETER_UNITS[index]:>7}) {THETA_O[index]:8.2f}   "
              f"{exact.mean():8.2f} ± {exact.std():6.2f}     {bounded.mean():8.2f} ± {bounded.std():6.2f}")
    print("\nre-simulated statistics minus x_o, median of |difference| / prior predictive spread (STATISTIC_SCALE):")
    for name in ("posterior", "free", "prior"):
        print(f"  {name:>9}:", np.round(np.median(np.abs(resimulated[name] - x_o), axis=0) / STATISTIC_SCALE, 3))

    figure, axes = plt.subplots(3, 3, figsize=(11, 8.4))
    for index, axis in enumerate(axes.flat[:7]):
        bins = np.linspace(PRIOR_LOW[index], PRIOR_HIGH[index], 41)
        axis.hist(posterior.posterior["theta"].values[..., index].ravel(), bins=bins, density=True, alpha=0.45,
                  color="C0", label="all 8 statistics")
        axis.hist(constrained.posterior["theta"].values[..., index].ravel(), bins=bins, density=True,
                  histtype="step", linewidth=1.6, color="C3", label="7 statistics + energy bound")
        axis.axvline(THETA_O[index], color="k", linestyle="--", linewidth=1, label="true value")
        axis.set_xlabel(f"{PARAMETER_NAMES[index]} ({PARAMETER_UNITS[index]})")
        axis.set_yticks([])
    axes.flat[0].legend(fontsize=7, loc="upper right")
    energy_label = "energy: log10 Na⁺ charge (nC/cm²)"
    # the energy over the prior predictive: the interval is the shaded side of the observed energy
    axis = axes.flat[7]
    bins = np.linspace(np.nanmin(prior_energy), np.nanmax(prior_energy), 50)
    axis.hist(prior_energy, bins=bins, density=True, color="0.7", label="prior predictive (simulated)")
    axis.axvspan(bins[0], high[ENERGY], color="C3", alpha=0.08, label="interval: energy ≤ observed")
    axis.axvline(x_o[ENERGY], color="k", linestyle="--", linewidth=1, label="observed energy")
    axis.set_xlabel(energy_label)
    axis.set_yticks([])
    axis.legend(fontsize=7, loc="upper left")
    # zoomed in: the energy given the 7 other statistics, free and bounded
    axis = axes.flat[8]
    zoom = np.linspace(x_o[ENERGY] - 0.3, x_o[ENERGY] + 0.2, 51)
    axis.hist(free_energy, bins=zoom, density=True, histtype="step", color="C2", label="energy free (Simformer)")
    axis.hist(resimulated["free"][:, ENERGY], bins=zoom, density=True, histtype="step", linestyle=":", color="C2",
              linewidth=1.6, label="energy free (re-simulated)")
    axis.hist(predicted_energy, bins=zoom, density=True, histtype="step", linewidth=1.6, color="C3",
              label="energy bounded (Simformer)")
    axis.hist(resimulated_energy, bins=zoom, density=True, histtype="step", linestyle=":", linewidth=1.6,
              color="C3", label="energy bounded (re-simulated)")
    axis.axvspan(zoom[0], high[ENERGY], color="C3", alpha=0.08)
    axis.axvline(x_o[ENERGY], color="k", linestyle="--", linewidth=1)
    axis.set_xlim(zoom[0], zoom[-1])
    axis.set_xlabel(energy_label + ", zoomed")
    axis.set_title("given the 7 other statistics", fontsize=9)
    axis.set_yticks([])
    axis.legend(fontsize=7, loc="upper left")
    figure.suptitle("Hodgkin–Huxley: the posterior given all 8 statistics, and given the 7 voltage statistics\n"
                    "with the energy at most its observed value (guided diffusion)")
    figure.tight_layout()
    figure_path = output / "hodgkin_huxley.png"
    figure.savefig(figure_path, dpi=100)
    plt.close(figure)
    print(f"\nwrote {figure_path}; {time.perf_counter() - start:.0f} s in all")
    return {
        "simformer": sf,
        "posterior": posterior,
        "constrained": constrained,
        "free": free,
        "x_o": x_o,
        "interval": (low, high),
        "fraction_inside": fraction_inside,
        "fraction_inside_resimulated": fraction_inside_resimulated,
        "fraction_free": fraction_free,
        "fraction_free_resimulated": fraction_free_resimulated,
        "figure": figure_path,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny settings (for the test suite)")
    parser.add_argument("--output", default="hodgkin-huxley-output", help="folder for the figure")
    arguments = parser.parse_args()
    main(arguments.tiny, arguments.output)
