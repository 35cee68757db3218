# Experiment script, run 2026-11-28 against commit 9fba541 as `python exp_tm_history.py 1` (log: exp_tm_history.log): trains the default Two Moons network of benchmarks/run.py's seed (same keys) and prints its loss history, one row per validation: step, mean training loss since the last validation (raw weights), validation loss (EMA weights, fixed masks and noise), learning rate. Kept as a record, not maintained.
import sys, jax, numpy as np
from pathlib import Path
from numpyro_simformer import Simformer, tasks
seed = int(sys.argv[1])
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)
ckpt = Path(f"/tmp/ckpt_default_s{seed}")
if ckpt.exists():
    sf = Simformer.load(ckpt, task.model)
else:
    sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
                   exclude_sites=list(task.exclude_sites), progress_bar=False)
    sf.fit(key_fit); sf.save(ckpt)
h = sf.history
print("training", sf.training_time, "best", h.best_step, "stopped", h.stopped_early)
for s, tl, vl, lr in zip(h.step, h.train_loss, h.validation_loss, h.learning_rate):
    print(int(s), round(float(tl), 4), round(float(vl), 4), float(lr))
