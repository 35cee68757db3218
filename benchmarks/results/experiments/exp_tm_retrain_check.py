# Check script, run 2026-11-29 against commit 8aa535d as `python exp_tm_retrain_check.py` (log: exp_tm_retrain_check.log): a fresh interval_sites='reject' fit of Two Moons seed 0 with run.py's options against the checkpoint the interval_sites.csv rows loaded (trained under the earlier 'clip' label). Kept as a record.
"""Does a fresh interval_sites='reject' fit (today's code, run.py's options) equal the network the rows loaded?"""
import jax, numpy as np
from numpyro_simformer import Simformer, TrainingConfig, NetworkConfig, tasks
task = tasks.two_moons()
key_fit, _, _ = jax.random.split(jax.random.key(0), 3)
sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
               exclude_sites=list(task.exclude_sites), progress_bar=False, training=TrainingConfig(),
               network=NetworkConfig(), interval_sites="reject").fit(key_fit)
old = Simformer.load("/tmp/exp/ckpts/two_moons_10000_dense_seed0_interval_sites-reject", task.model)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sf.params), jax.tree.leaves(old.params)))
print("steps", sf.history.step[-1], old.history.step[-1], "params identical", same,
      "max abs diff", max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(sf.params), jax.tree.leaves(old.params))))
