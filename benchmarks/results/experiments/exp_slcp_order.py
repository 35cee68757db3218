# Experiment script, run 2026-12-07 as `python exp_slcp_order.py` twice (log: exp_slcp_order.log): first at e923587
# (tokens by position order), then at 988b4f1 (library as 837ed6e but a docstring), after 837ed6e ordered shared noise and slots by role. Kept as a
# record, not maintained.
"""Diagnostic (issues 29, 30): is slcp_distractors' gap to grouped SLCP the way its eight
informative outputs fall into two tokens?

exp_sd_linked.py showed that taking the 23 distractor tokens out of the loss leaves
slcp_distractors about as far from SLCP (0.858 at 3 layers) as with them in: the distractors
do not cost accuracy through the gradient, and the attention mask isolates the parameters'
7 tokens exactly. What still differs is which outputs share a token. Grouped SLCP
(exp_slcp_grouped.py, 0.673) puts the four first coordinates of SLCP's pairs in one token
and the four second coordinates in the other, so slot i of one token pairs with slot i of
the other. In slcp_distractors the outputs sit at positions 16, 21, 22, 23, 33, 42, 67, 90
(SLCP's x6, x5, x0, x2, x1, x4, x3, x7): the order puts x5 before x4, so the noise-sharing
edge runs x5 -> x4, and the library's grouping gives the tokens (x6, x0, x2, x5) and
(x1, x4, x3, x7), with the pairs misaligned.

This fits SLCP exactly as exp_slcp_grouped.py did (same user model, keys, 6 layers, batch
78, ``elements_per_token={"x": 4}``) except that the simulator's outputs are returned in
slcp_distractors' order (a permutation: same draws, same posterior), and scores observations
1-3 (observations permuted the same way) with sbibm's MLP C2ST, 10,000 per side.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import jax
import numpy as np
import numpyro
import sbibm_jax

from numpyro_simformer import NetworkConfig, Simformer, Simulator, TrainingConfig
from numpyro_simformer.diagnostics import c2st

ORDER = np.array([6, 5, 0, 2, 1, 4, 3, 7])  # SLCP's outputs in the order slcp_distractors holds them
task = sbibm_jax.get_task("slcp")
batched = task.get_simulator(jax.random.key(0))


def model():
    theta = numpyro.sample("theta", task.get_prior_dist())
    numpyro.sample("x", Simulator(lambda key, theta: batched(key, theta[None])[0][ORDER], theta))


key_fit, key_sample = jax.random.split(jax.random.key(0))
start = time.perf_counter()
sf = Simformer(model, num_simulations=10_000, elements_per_token={"x": 4},
               network=NetworkConfig(num_layers=6), training=TrainingConfig(batch_size=78),
               progress_bar=False)
members = np.asarray(sf.read_model(jax.random.key(0)).grouping.members)
print("tokens of x (SLCP indices):", [ORDER[row[row >= 0] - 5].tolist() for row in members[5:]], flush=True)
sf.fit(key_fit)
print(sf, flush=True)
scores, sampling = [], []
for number in (1, 2, 3):
    x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)[ORDER]
    reference = np.asarray(task.get_reference_posterior_samples(number), np.float64)
    t = time.perf_counter()
    tree = sf.sample(jax.random.fold_in(key_sample, number), observed={"x": x_o}, num_samples=10_000)
    sampling.append(round(time.perf_counter() - t, 1))
    estimate = np.asarray(tree.posterior["theta"].values).reshape(10_000, -1)
    scores.append(round(float(c2st(reference[:10_000], estimate)), 4))
    print(number, scores[-1], flush=True)
print(json.dumps({"c2st": scores, "mean": round(float(np.mean(scores)), 4), "steps": int(sf.history.step[-1]),
                  "training_s": round(sf.training_time, 1), "sampling_s_per_10k": sampling,
                  "total_s": round(time.perf_counter() - start)}), flush=True)
