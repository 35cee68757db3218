# Experiment script, run 2026-12-07 as `python exp_tm_1min.py VARIANT` (log: exp_tm_1min.log). Kept as a record, not maintained.
"""Experiment (issue 32): what costs the library's first minute on Two Moons.

Two Moons, 10,000 simulations, seed 0, `TrainingConfig(max_time=60)`, observations 1 and 2,
5,000 draws against 5,000 reference samples, sbibm's exact MLP C2ST. One variant per run.
"""
import sys, time, resource
import jax, numpy as np
from numpyro_simformer import Simformer, TrainingConfig, NetworkConfig, tasks
from numpyro_simformer.diffusion import VESDE
from numpyro_simformer.diffusion.masks import ConditionMaskDistribution
from numpyro_simformer.diagnostics import c2st

variant = sys.argv[1]
budget = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
training, options = dict(max_time=budget), {}
if variant == "posterior_masks":
    options["condition_masks"] = ConditionMaskDistribution(joint=0.0, posterior=1.0, likelihood=0.0, bernoulli=(0.0, 0.0))
elif variant == "noclip":
    training["gradient_clip_norm"] = 1e6
elif variant == "sigma15":
    options["sde"] = VESDE(sigma_max=15.0)
elif variant == "sigma5":
    options["sde"] = VESDE(sigma_max=5.0)
elif variant == "batch512":
    training["batch_size"] = 512
elif variant == "lr3e-3":
    training["learning_rate"] = 3e-3
elif variant == "lr3e-4":
    training["learning_rate"] = 3e-4
elif variant == "edm_time":  # sigma log-normal (EDM), N(-0.8, 1.6) in log sigma, instead of log-uniform
    import jax.numpy as jnp
    import numpyro_simformer.diffusion.loss as loss_module

    def noise_example(rng_key, sde, x0, condition_mask):
        key_time, key_noise = jax.random.split(rng_key)
        log_sigma = -0.8 + 1.6 * jax.random.normal(key_time, ())
        time = jnp.clip(jnp.log(jnp.exp(log_sigma) / sde.sigma_min) / jnp.log(sde.sigma_max / sde.sigma_min),
                        sde.t_min, 1.0)
        noise = jax.random.normal(key_noise, x0.shape)
        alpha, sigma = sde.marginal(time)
        return jnp.where(condition_mask, x0, alpha * x0 + sigma * noise), time, noise

    loss_module.noise_example = noise_example
elif variant != "default":
    raise SystemExit(f"unknown variant {variant}")

task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(0), 3)
sf = Simformer(task.model, num_simulations=10_000, token_sites=list(task.token_sites),
               exclude_sites=list(task.exclude_sites), progress_bar=False, training=TrainingConfig(**training),
               **options).fit(key_fit)
scores = []
for index, number in enumerate((1, 2)):
    observed, reference = task.observation(number), task.reference_posterior_samples(number)
    tree = sf.sample(jax.random.fold_in(key_sample, index), observed=observed, num_samples=5000)
    theta = np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2)
    scores.append(c2st(np.asarray(reference)[:5000], theta[:5000]))
print(f"{variant} budget {budget:g}: steps {int(sf.history.step[-1])} c2st {scores[0]:.4f} {scores[1]:.4f} "
      f"mean {np.mean(scores):.4f} training {sf.training_time:.0f} s", flush=True)
