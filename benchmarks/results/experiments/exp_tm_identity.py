# Experiment script, run 2026-11-28 against commit ebe75d7 as `python exp_tm_identity.py SEED` (log: exp_tm_identity.log). It patches library internals (not a supported API) and is kept as a record, not maintained.
"""Experiment: interval sites trained in their own coordinates (identity), leaked draws rejected."""
import sys, time, json
import jax, numpy as np
from numpyro.distributions import constraints, transforms as T
import numpyro_simformer.transforms as tr

mode = sys.argv[2] if len(sys.argv) > 2 else "identity"
_orig = tr.site_bijection
def patched(site, support=None):
    s = site.support if support is None else support
    base = getattr(s, "base_constraint", s)
    if mode == "identity" and isinstance(base, constraints._Interval):
        return T.IdentityTransform()
    return _orig(site, support)
tr.site_bijection = patched

from numpyro_simformer import Simformer, tasks
from numpyro_simformer.diagnostics import c2st

seed = int(sys.argv[1])
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)
from pathlib import Path
ckpt = Path(f"/tmp/exp/ckpt_{mode}_s{seed}")
if ckpt.exists():
    sf = Simformer.load(ckpt, task.model)
else:
    sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
                   exclude_sites=list(task.exclude_sites), progress_bar=False)
    sf.fit(key_fit)
    sf.save(ckpt)
print("trained", sf.training_time, sf.history.step[-1], flush=True)
res = []; resf = []
for index, number in enumerate(range(1, 11)):
    tree = sf.sample(jax.random.fold_in(key_sample, index), observed=task.observation(number), num_samples=20_000)
    est = np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2)
    inside = np.all(np.abs(est) <= 1, axis=1)
    acc = inside.mean()
    est_in = est[inside][:10_000]
    ref = task.reference_posterior_samples(number)
    n = min(len(est_in), len(ref))
    y = np.mod(est + 1, 4.0); fold = np.where(y > 2, 4 - y, y)[:10_000] - 1
    fc = c2st(ref[:10_000], fold, classifier="rf")
    d_f = 1 - np.abs(fold).max(1)
    print(f"obs {number}: fold {fc:.4f} edge fold {np.mean(d_f<0.01):.3f}", flush=True)
    resf.append(fc)
    raw = c2st(ref[:10_000], est[:10_000], classifier="rf")
    rej = c2st(ref[:n], est_in[:n], classifier="rf")
    d_ref = 1 - np.abs(ref).max(1); d_est = 1 - np.abs(est_in).max(1)
    print(f"obs {number}: accept {acc:.3f} rf_raw {raw:.4f} rf_rejected {rej:.4f} edge ref {np.mean(d_ref<0.01):.3f} est {np.mean(d_est<0.01):.3f}", flush=True)
    res.append(rej)
print("mean rejected", np.mean(res), "mean fold", np.mean(resf))
