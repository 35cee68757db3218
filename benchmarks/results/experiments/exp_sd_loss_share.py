# Experiment script, run 2026-12-06 against commit 8729241 as `python exp_sd_loss_share.py --loss {library,latent_mean,linked_only}` (log: exp_sd_loss_share.log). It patches library internals (not a supported API) and is kept as a record, not maintained.
"""Diagnostic: is slcp_distractors' gap to SLCP the distractors diluting the parameters' share of the loss?

Fits slcp_distractors with library defaults and a 5-minute budget with one of three losses:
the library's (sum over latent tokens / all tokens), one normalised by each example's latent
token count (``latent_mean``), or the library's with weight 0 on every token without an
attention link to a parameter token (``linked_only``: the 23 distractor tokens leave the
loss), then scores observations 1-3 (early-stopped MLP C2ST, 10,000 per side).
"""
import argparse, sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import jax, jax.numpy as jnp, numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--task", default="slcp_distractors")
parser.add_argument("--loss", choices=["library", "latent_mean", "linked_only"], default="library")
parser.add_argument("--max-time", type=float, default=300)
args = parser.parse_args()

from numpyro_simformer.diffusion import loss as loss_module
if args.loss == "latent_mean":
    def example_loss(predicted_noise, noise, condition_mask, element_weights=None):
        latent = ~condition_mask
        w = jnp.ones(latent.shape, jnp.float32) if element_weights is None else element_weights
        squared = w * (predicted_noise - noise) ** 2
        return jnp.sum(jnp.where(latent, squared, 0.0)) / jnp.maximum(jnp.sum(jnp.where(latent, w, 0.0)), 1e-6)
    loss_module.example_loss = example_loss

if args.loss == "linked_only":
    # Diagnostic: tokens with no attention link to a parameter token (the distractors) get
    # weight 0 in the loss; the parameters and the informative outputs keep theirs.
    from numpyro_simformer.training import fit as fit_module
    original = fit_module._token_weights
    def _token_weights(grouping):
        weights = original(grouping)
        members = np.asarray(grouping.members)
        theta_tokens = [t for t, row in enumerate(members) if (row[row >= 0] < 5).all()]
        for t, row in enumerate(members):
            if not grouping.attention_mask[t, theta_tokens].any():
                weights[row[row >= 0]] = 0.0
        print("tokens weighted:", int(sum(1 for t in range(len(members)) if grouping.attention_mask[t, theta_tokens].any())),
              "of", len(members), "theta tokens", theta_tokens, flush=True)
        return weights
    fit_module._token_weights = _token_weights

import sbibm_jax
from sbibm_suite import user_model
from numpyro_simformer import Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st

task = sbibm_jax.get_task(args.task)
key_fit, key_sample = jax.random.split(jax.random.key(0))
start = time.perf_counter()
sf = Simformer(user_model(task), num_simulations=10_000, training=TrainingConfig(max_time=args.max_time),
               progress_bar=False).fit(key_fit)
scores = []
for number in (1, 2, 3):
    x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)
    ref = np.asarray(task.get_reference_posterior_samples(number), np.float64)[:10_000]
    tree = sf.sample(jax.random.fold_in(key_sample, number), observed={"x": x_o}, num_samples=10_000)
    est = np.asarray(tree.posterior["theta"].values).reshape(10_000, -1)
    scores.append(round(float(c2st(ref, est, early_stopping=True)), 4))
print(json.dumps({"task": args.task, "loss": args.loss, "max_time": args.max_time, "steps": int(sf.history.step[-1]),
                  "training_s": round(sf.training_time, 1), "c2st": scores, "mean": round(float(np.mean(scores)), 4),
                  "total_s": round(time.perf_counter() - start)}))
