# Experiment script, run 2026-12-07 as `python exp_slcp_grouped.py` (log: exp_slcp_grouped.log). Kept as a record, not maintained.
"""Diagnostic (issues 29, 30): does grouping SLCP's outputs four to a token cost what
slcp_distractors loses against SLCP?

slcp_distractors asks SLCP's question (its observations hold SLCP's values, its reference
posteriors are SLCP's), and its parameters' tokens attend only to the two tokens that hold
the eight informative outputs, four each. This fits SLCP itself exactly as the sbibm suite's
SLCP row did (the same user model, 10,000 simulations, seed 0, the same keys, 6 layers,
batch 78, otherwise defaults) except ``elements_per_token={"x": 4}``, and scores
observations 1-3 with sbibm's MLP C2ST on 10,000 draws per side. The ungrouped row gave
0.629 (0.641, 0.653, 0.594); slcp_distractors gave 0.816 (0.842, 0.831, 0.775).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import jax
import numpy as np
import sbibm_jax
from sbibm_suite import user_model

from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st

task = sbibm_jax.get_task("slcp")
key_fit, key_sample = jax.random.split(jax.random.key(0))
start = time.perf_counter()
sf = Simformer(user_model(task), num_simulations=10_000, elements_per_token={"x": 4},
               network=NetworkConfig(num_layers=6), training=TrainingConfig(batch_size=78),
               progress_bar=False).fit(key_fit)
print(sf, flush=True)
scores, sampling = [], []
for number in (1, 2, 3):
    x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)
    reference = np.asarray(task.get_reference_posterior_samples(number), np.float64)
    t = time.perf_counter()
    tree = sf.sample(jax.random.fold_in(key_sample, number), observed={"x": x_o}, num_samples=10_000)
    sampling.append(time.perf_counter() - t)
    theta = np.asarray(tree.posterior["theta"].values).reshape(10_000, -1)
    scores.append(round(float(c2st(reference[:10_000], theta)), 4))
    print(number, scores[-1], flush=True)
print(json.dumps({"c2st": scores, "mean": round(float(np.mean(scores)), 4), "tokens": sf.spec.grouping.num_tokens,
                  "steps": int(sf.history.step[-1]), "training_s": round(sf.training_time, 1),
                  "sampling_s_per_10k": [round(s, 1) for s in sampling]}), flush=True)
