# Experiment script, run 2026-12-07 against commit e936faa as
# `python exp_dequantize.py --mode {integers,gaussian,uniform} [--sd S]` (log: exp_dequantize.log;
# one JSON line per run). Kept as a record, not maintained.
"""How to train a discrete site: on its integers, or dequantized (Gaussian or uniform noise)?

p ~ Beta(2, 2), 12 Bernoulli(p) trials (``tests/test_discrete.py``'s model), 4,000
simulations, a small network (width 32, 2 layers) trained 6,000 steps. Scores:

- the posterior given 8 successes in 12 against the exact Beta(10, 6) (C2ST, 4,000 per side);
- the likelihood at p = 0.3 and 0.7: the share of ones in 4,000 draws of each trial.

Modes: ``integers`` (``discrete_sites="integers"``); ``gaussian``, the library's default
(latent integers plus ``sd`` times N(0, 1), in units of their spacing; ``--sd`` patches
``DEQUANTIZATION_SD``); ``uniform`` (latent integers plus U(-1/2, 1/2): patches
``dequantize_example``, not a supported option).
"""
import argparse, json, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import jax, numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=["integers", "gaussian", "uniform"], required=True)
parser.add_argument("--sd", type=float, default=None)
parser.add_argument("--steps", type=int, default=6_000)
args = parser.parse_args()

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st_fast
from numpyro_simformer.diffusion import loss
from test_discrete import NUM_TRIALS, beta_bernoulli

if args.sd is not None:
    loss.DEQUANTIZATION_SD = args.sd
if args.mode == "uniform":
    loss.dequantize_example = lambda key, x0, widths: x0 + widths * jax.random.uniform(key, x0.shape, x0.dtype, -0.5, 0.5)
sf = Simformer(beta_bernoulli, num_simulations=4_000, progress_bar=False,
               discrete_sites="integers" if args.mode == "integers" else "dequantize",
               network=NetworkConfig(width=32, num_layers=2, num_heads=2, mlp_width=64),
               training=TrainingConfig(max_steps=args.steps, batch_size=128, validation_interval=250))
sf.fit(jax.random.key(0))
x_o = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], np.float32)
k = int(x_o.sum())
post = sf.sample(jax.random.key(1), observed={"x": x_o}, num_samples=4_000).posterior["p"].values.reshape(-1)
reference = np.random.default_rng(0).beta(2 + k, 2 + NUM_TRIALS - k, size=4_000)
shares = {}
for p_o in (0.3, 0.7):
    x = sf.sample(jax.random.key(2), observed={"p": p_o}, num_samples=4_000).posterior_predictive["x"].values
    shares[str(p_o)] = np.round(x.reshape(-1, NUM_TRIALS).mean(0), 3).tolist()
print(json.dumps({"mode": args.mode, "sd": args.sd if args.mode == "gaussian" else None, "steps": args.steps,
                  "posterior_c2st": round(float(c2st_fast(reference[:, None], post[:, None])), 3),
                  "posterior_mean": round(float(post.mean()), 3), "reference_mean": round(float(reference.mean()), 3),
                  "posterior_sd": round(float(post.std()), 3), "reference_sd": round(float(reference.std()), 3),
                  "share_of_ones": shares}))
