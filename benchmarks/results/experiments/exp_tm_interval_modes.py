# Experiment script, run 2026-11-29 against commit 488740f (when interval_sites='clip' existed; since replaced by 'reflect'/'reject') as `python exp_tm_interval_modes.py 1` on the seed-1 network that `run.py --interval-sites clip --checkpoints /tmp/exp/ckpts` trained (log: exp_tm_interval_modes.log). 'reject' and 'fold' use the same network without clipping. It reaches into library internals and is kept as a record, not maintained.
"""Evaluate identity-trained Two Moons networks: clipped denoiser (library interval_sites='clip') vs rejection."""
import sys, json, shutil
from pathlib import Path
import jax, numpy as np
from numpyro_simformer import Simformer, tasks
from numpyro_simformer.diagnostics import c2st
from numpyro_simformer.samplers import build_score_fn
seed = int(sys.argv[1])
src = Path(f"/tmp/exp/ckpts/two_moons_10000_dense_seed{seed}_interval_sites-clip"); dst = src
if not dst.exists():
    shutil.copytree(src, dst)
    rec = json.loads((dst / "simformer.json").read_text()); rec["options"]["interval_sites"] = "clip"
    (dst / "simformer.json").write_text(json.dumps(rec))
task = tasks.two_moons()
key_fit, key_queries, key_sample = jax.random.split(jax.random.key(seed), 3)
sf = Simformer.load(dst, task.model)
print("bijections", sf.transform.bijections, sf.transform.z_bounds(), flush=True)
res = {"clip": [], "reject": [], "fold": []}
for index, number in enumerate(range(1, 11)):
    ref = task.reference_posterior_samples(number)[:10_000]
    key = jax.random.fold_in(key_sample, index)
    tree = sf.sample(key, observed=task.observation(number), num_samples=10_000)
    est = np.asarray(tree["posterior"]["theta"].values).reshape(-1, 2)
    on_edge = np.mean(np.any(np.abs(est) == 1.0, axis=1))
    c = c2st(ref, est, classifier="rf"); res["clip"].append(c)
    # same network, no clipping: leaked draws rejected (z-space samples, before the final clip)
    sf._score_fn = build_score_fn(sf._denoiser_fn, sf.sde)
    from numpyro_simformer.simformer import _Query
    q = sf._default_query; saved = q.score_fn, dict(q.sample_fns)
    q.score_fn = sf._score_fn; q.sample_fns.clear()
    from numpyro_simformer.query import observed_tokens
    vals, mask = observed_tokens(sf.layout, task.observation(number))
    z_obs = np.where(mask, (np.nan_to_num(vals) - sf.transform.mean) / sf.transform.std, 0).astype(np.float32)
    z = np.asarray(sf._sample_z(key, sf.sampler, z_obs, mask, 20_000, 2_000))
    raw = z * sf.transform.std + sf.transform.mean
    th = raw[:, :2]; inside = np.all(np.abs(th) <= 1, axis=1); rej = th[inside][:10_000]
    r = c2st(ref[:len(rej)], rej, classifier="rf"); res["reject"].append(r)
    y = np.mod(th[:10_000] + 1, 4.0); fold = np.where(y > 2, 4 - y, y) - 1
    f = c2st(ref, fold, classifier="rf"); res["fold"].append(f)
    q.score_fn, q.sample_fns = saved[0], {}; q.sample_fns.update(saved[1])
    d_ref = np.mean(1 - np.abs(ref).max(1) < 0.01); d_c = np.mean(1 - np.abs(est).max(1) < 0.01); d_r = np.mean(1 - np.abs(rej).max(1) < 0.01)
    print(f"obs {number}: clip {c:.4f} (on bound {on_edge:.4f}, edge {d_c:.3f}) reject {r:.4f} (accept {inside.mean():.3f}, edge {d_r:.3f}) ref edge {d_ref:.3f} fold {f:.4f}", flush=True)
print("mean clip", np.mean(res["clip"]), "mean reject", np.mean(res["reject"]), "mean fold", np.mean(res["fold"]))
