# Experiment script, run 2026-11-28 against commit ebe75d7 as `python exp_tm_reflect.py SEED 1.0` (log: exp_tm_reflect.log). It patches library internals (not a supported API) and is kept as a record, not maintained.
"""Experiment: identity coordinates for interval sites, soft reflection augmentation in training, fold at sampling."""
import sys
from pathlib import Path
import jax, jax.numpy as jnp, numpy as np
from numpyro.distributions import constraints, transforms as T
import numpyro_simformer.transforms as tr
import numpyro_simformer.simformer as sfm
import numpyro_simformer.train as train_mod

seed = int(sys.argv[1]); margin = float(sys.argv[2])
_orig = tr.site_bijection
def patched(site, support=None):
    s = site.support if support is None else support
    if isinstance(getattr(s, "base_constraint", s), constraints._Interval):
        return T.IdentityTransform()
    return _orig(site, support)
tr.site_bijection = patched
G = {}
_orig_fit = tr.fit_token_transform
def fit_patched(*a, **k):
    t = _orig_fit(*a, **k); G["t"] = t; return t
sfm.fit_token_transform = fit_patched
_orig_draw = train_mod._draw_batch
def draw_patched(rng_key, rows, data_mask, mask_distribution, subsample, shard=lambda x: x):
    t = G["t"]
    bounded = np.zeros(t.layout.num_tokens, bool); bounded[t.layout.slices()["theta"]] = True
    lo = jnp.asarray((-1 - t.mean) / t.std); hi = jnp.asarray((1 - t.mean) / t.std)
    d_hi, d_lo = hi - rows, rows - lo
    near_hi = d_hi < d_lo
    d = jnp.minimum(d_hi, d_lo)
    r = jnp.where(d < margin, 0.25 * (1 + jnp.cos(jnp.pi * d / margin)), 0.0)
    flip = (jax.random.uniform(jax.random.fold_in(rng_key, 12345), rows.shape) < r) & bounded
    rows = jnp.where(flip, jnp.where(near_hi, 2 * hi - rows, 2 * lo - rows), rows)
    return _orig_draw(rng_key, rows, data_mask, mask_distribution, subsample, shard)
train_mod._draw_batch = draw_patched

from numpyro_simformer import Simformer, tasks
from numpyro_simformer.diagnostics import c2st
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)
ckpt = Path(f"/tmp/exp/ckpt_reflect{margin}_s{seed}")
if ckpt.exists():
    sf = Simformer.load(ckpt, task.model)
else:
    sf = Simformer(task.model, num_simulations=10_000, attention="dense", token_sites=list(task.token_sites),
                   exclude_sites=list(task.exclude_sites), progress_bar=False)
    sf.fit(key_fit)
    sf.save(ckpt)
    print("trained", sf.training_time, sf.history.step[-1], flush=True)
res = []
for index, number in enumerate(range(1, 11)):
    tree = sf.sample(jax.random.fold_in(key_sample, index), observed=task.observation(number), num_samples=10_000)
    est = np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2)
    out = np.mean(np.any(np.abs(est) > 1, axis=1))
    y = np.mod(est + 1, 4.0); fold = np.where(y > 2, 4 - y, y) - 1
    ref = task.reference_posterior_samples(number)
    fc = c2st(ref[:10_000], fold, classifier="rf")
    print(f"obs {number}: outside {out:.3f} fold {fc:.4f} edge ref {np.mean(1-np.abs(ref).max(1)<0.01):.3f} fold {np.mean(1-np.abs(fold).max(1)<0.01):.3f}", flush=True)
    res.append(fc)
print("mean fold", np.mean(res))
