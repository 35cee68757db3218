# Experiment script, run 2026-11-29 (log: exp_tm_ensemble.log). Uses only the public API; kept as a record, not maintained.
# Its members are SimformerEnsemble's (same simulations, member k trained with key fold_in(key_fit, k)):
# the members of seed 1 it trained were loaded by `run.py --members 3 --checkpoints DIR` for ensemble.csv.
"""Experiment: a mixture of K Simformers trained on the same 10,000 Two Moons simulations.

`python exp_tm_ensemble.py train SEED K [TRAINING_JSON]` trains member K (key fold_in(key_fit, K))
and saves it under /tmp/exp/ens_sSEED_mK; `python exp_tm_ensemble.py score SEED K1 K2 ...` draws
10,000 posterior samples per member and observation, scores each member alone and the
mixture (an equal share of each member's draws) with the random-forest C2ST on sbibm's ten
observations.
"""
import json
import sys
from pathlib import Path

import jax
import numpy as np

from numpyro_simformer import Simformer, TrainingConfig, tasks
from numpyro_simformer.diagnostics import c2st
from numpyro_simformer.simulate import simulate

mode, seed = sys.argv[1], int(sys.argv[2])
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)


def member_path(k):
    return Path(f"/tmp/exp/ens_s{seed}_m{k}")


if mode == "train":
    k = int(sys.argv[3])
    training = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
                   exclude_sites=list(task.exclude_sites), progress_bar=False, training=TrainingConfig(**training))
    _, key_simulate, _ = jax.random.split(key_fit, 3)  # the simulations Simformer.fit(key_fit) draws
    draws, _ = simulate(key_simulate, task.model, 10_000, list(task.token_sites))
    sf.fit_simulations(jax.random.fold_in(key_fit, k), draws)
    sf.save(member_path(k), overwrite=True)
    print(f"seed {seed} member {k}: {sf.training_time:.0f} s, {int(sf.history.step[-1])} steps", flush=True)
else:
    members = [int(k) for k in sys.argv[3:]]
    sfs = [Simformer.load(member_path(k), task.model) for k in members]
    alone, mixed = np.zeros((len(members), 10)), np.zeros(10)
    for index, number in enumerate(range(1, 11)):
        reference = task.reference_posterior_samples(number)[:10_000]
        draws = []
        for j, (k, sf) in enumerate(zip(members, sfs)):
            tree = sf.sample(jax.random.fold_in(jax.random.fold_in(key_sample, index), k),
                             observed=task.observation(number), num_samples=10_000)
            draws.append(np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2))
            alone[j, index] = c2st(reference, draws[-1], classifier="rf")
        share = -(-10_000 // len(members))
        mixture = np.concatenate([d[:share] for d in draws])[:10_000]
        mixture = mixture[np.random.default_rng(index).permutation(len(mixture))]
        mixed[index] = c2st(reference, mixture, classifier="rf")
        print(f"obs {number}: alone {np.round(alone[:, index], 4).tolist()} mixture {mixed[index]:.4f}", flush=True)
    print(f"seed {seed} members {members}: alone {np.round(alone.mean(1), 4).tolist()} "
          f"(mean {alone.mean():.4f}), mixture {mixed.mean():.4f}", flush=True)
