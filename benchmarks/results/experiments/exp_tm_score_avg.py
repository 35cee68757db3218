# Experiment script, run 2026-11-29 (log: exp_tm_score_avg.log). It patches library internals (not a supported API) and is kept as a record, not maintained.
"""Experiment: average the scores of K Simformers trained on the same Two Moons simulations.

Loads the members written by `exp_tm_ensemble.py train SEED K`, samples with the mean of
their scores (one reverse SDE per draw), then scores the draws with
the random-forest C2ST on sbibm's ten observations. The members share the z-scoring (same
simulations), so their scores live in one space.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer import Simformer, tasks
from numpyro_simformer.diagnostics import c2st

seed, members = int(sys.argv[1]), [int(k) for k in sys.argv[2:]]
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)
sfs = [Simformer.load(f"/tmp/exp/ens_s{seed}_m{k}", task.model) for k in members]
for sf in sfs[1:]:
    np.testing.assert_array_equal(sf.transform.mean, sfs[0].transform.mean)
sf = sfs[0]
query = sf._default_query
singles = [s._default_query.score_fn for s in sfs]  # each closes over its member's constants (Fourier features)
query.score_fn = lambda params, x, t, m: sum(f(p, x, t, m) for f, p in zip(singles, params)) / len(params)
sf.params = tuple(s.params for s in sfs)
query.sample_fns.clear()
scores = []
for index, number in enumerate(range(1, 11)):
    reference = task.reference_posterior_samples(number)[:10_000]
    tree = sf.sample(jax.random.fold_in(key_sample, index), observed=task.observation(number), num_samples=10_000)
    scores.append(c2st(reference, np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2), classifier="rf"))
    print(f"obs {number}: score-averaged {scores[-1]:.4f}", flush=True)
print(f"seed {seed} members {members}: score-averaged {np.mean(scores):.4f}", flush=True)
