# Experiment script, run 2026-12-07 as `python exp_sd_linked.py --loss {library,linked_only} --layers N` (log: exp_sd_linked.log). It patches a library internal (not a supported API) and is kept as a record, not maintained.
"""Diagnostic (issues 29, 30): does training beside the distractors cost slcp_distractors its
accuracy through the loss, at full length?

exp_sd_loss_share.py asked this with 5-minute fits, where every variant was poor (0.92-0.94).
This fits slcp_distractors as the suite row does (its user model, 10,000 simulations, seed 0,
the same keys, defaults: 60,000 steps or early stop) with ``--layers`` layers, either with the
library's loss or with weight 0 on every token that has no attention link to a parameter token
(``linked_only``: the 23 distractor tokens leave the loss and the gradient; the network and
its attention are unchanged). Scores observations 1-3 with sbibm's MLP C2ST, 10,000 per side.
If ``linked_only`` closes most of the gap to SLCP, the distractors cost accuracy through the
shared weights' gradient (capacity, Adam's second moments, clipping); if not, the cause lies
elsewhere (the learning-rate schedule driven by a validation loss the distractors dominate).
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import jax
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--loss", choices=["library", "linked_only"], default="library")
parser.add_argument("--layers", type=int, default=3)
parser.add_argument("--task", default="slcp_distractors")
args = parser.parse_args()

if args.loss == "linked_only":
    from numpyro_simformer.training import fit as fit_module
    original = fit_module._token_weights

    def _token_weights(grouping):
        weights = original(grouping)
        members = np.asarray(grouping.members)
        theta_tokens = [t for t, row in enumerate(members) if (row[row >= 0] < 5).all()]
        linked = [t for t in range(len(members)) if grouping.attention_mask[t, theta_tokens].any()]
        for t, row in enumerate(members):
            if t not in linked:
                weights[row[row >= 0]] = 0.0
        print("tokens in the loss:", len(linked), "of", len(members), flush=True)
        return weights
    fit_module._token_weights = _token_weights

import sbibm_jax
from sbibm_suite import user_model

from numpyro_simformer import NetworkConfig, Simformer
from numpyro_simformer.diagnostics import c2st

task = sbibm_jax.get_task(args.task)
key_fit, key_sample = jax.random.split(jax.random.key(0))
start = time.perf_counter()
sf = Simformer(user_model(task), num_simulations=10_000, network=NetworkConfig(num_layers=args.layers),
               progress_bar=False).fit(key_fit)
print(sf, flush=True)
h = sf.history
lr = [] if h.learning_rate is None else np.asarray(h.learning_rate)
drops = [int(h.step[i]) for i in range(1, len(lr)) if lr[i] < lr[i - 1] * 0.9]
print("learning-rate drops at steps", drops, flush=True)
scores, sampling = [], []
for number in (1, 2, 3):
    x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)
    reference = np.asarray(task.get_reference_posterior_samples(number), np.float64)
    t = time.perf_counter()
    tree = sf.sample(jax.random.fold_in(key_sample, number), observed={"x": x_o}, num_samples=10_000)
    sampling.append(round(time.perf_counter() - t, 1))
    estimate = np.asarray(tree.posterior["theta"].values).reshape(10_000, -1)
    scores.append(round(float(c2st(reference[:10_000], estimate)), 4))
    print(number, scores[-1], flush=True)
print(json.dumps({"task": args.task, "loss": args.loss, "layers": args.layers, "steps": int(h.step[-1]),
                  "best_step": int(h.best_step), "training_s": round(sf.training_time, 1), "lr_drops": drops,
                  "c2st": scores, "mean": round(float(np.mean(scores)), 4), "sampling_s_per_10k": sampling,
                  "total_s": round(time.perf_counter() - start)}), flush=True)
