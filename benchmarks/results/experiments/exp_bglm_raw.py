# Experiment script, run 2026-12-06 against commit b026b79 as
# `python exp_bglm_raw.py --variant {library,posterior_masks,theta_loss,posterior_heavy,balanced}`
# and `--task bernoulli_glm --variant {library,posterior_masks}` (log: exp_bglm_raw.log; one JSON
# line per run); on 2026-12-07 `--width 128` and `--variant dequantize` (against 7a627e4),
# `--variant declared` (e936faa), `--task bernoulli_glm --variant {count_blur,library}` (295df2b plus the bounds fix, which
# changes nothing for these continuous models); on 2026-12-07 `--task bernoulli_glm --variant library --num-layers 6
# --max-time 0` (89a7dc1: the default schedule, no budget, at six layers).
# Kept as a record, not maintained.
"""Diagnostic: why is bernoulli_glm_raw (0.935) far above NPE (0.765) at 10^4 simulations?

Fits bernoulli_glm_raw (10 parameters, 100 binary outputs, 35 tokens: the data four to a
token) with library defaults and a 5-minute budget, changing one thing per variant:

- ``library``: defaults.
- ``posterior_masks``: training sees only the posterior condition mask (all data observed),
  so the loss is the parameters' alone; tests whether spreading the network over the joint
  objective (100 binary data elements against 10 parameters) is what costs accuracy.
- ``theta_loss``: the library's masks, but the data elements weigh 0 in the loss (they are
  still masked, noised and read): the network is trained on the parameters' scores alone.
  Tests whether the data's denoising loss crowds out the parameters'.
- ``balanced``: the library's masks; the data's tokens together weigh as much as the
  parameters' tokens in the loss (each data token 10/25 instead of 1).
- ``posterior_heavy``: the mask mixture moved towards the posterior (joint 0.1, posterior
  0.6, likelihood 0.1, Bernoulli 0.1 and 0.1, against 0.2 each by default).
- ``dequantize``: the model's data are the simulator's integers plus U(-1/2, 1/2) noise of
  their own (a user-level change, no patch). p(theta | x + u) = p(theta | x) exactly, since
  x + u determines x, so conditioning on the observed integers (the bins' centres) asks the
  same question; what changes is that the data's scores are those of a density, not of
  point masses. Tests whether denoising point masses is what costs the parameters.
- ``declared``: the outputs declared binary (``Simulator(..., support=constraints.boolean)``,
  as ``sbibm_suite.user_model`` does since the library warns about integer-valued sites), so
  the library trains them dequantized (``discrete_sites="dequantize"``, its default since
  then). Every other variant keeps them real-valued, as they ran.
- ``count_blur`` (``--task bernoulli_glm`` only): the first summary statistic, the spike
  count (an integer), blurred by N(0, 1/8^2) in the simulator, as the library's
  dequantization would do to a discrete element (the other nine statistics are real).
  Tests whether that one point-mass element costs the posterior.
- ``--width`` / ``--num-layers``: a larger network (mlp_width follows at twice the width).

Then scores observations 1-3 (early-stopped MLP C2ST, 10,000 per side) and prints, per
parameter, the posterior's bias and width against the reference (in reference sds).
"""
import argparse, sys, time, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import jax, numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--task", default="bernoulli_glm_raw")
parser.add_argument("--variant", choices=["library", "posterior_masks", "theta_loss", "posterior_heavy", "balanced", "dequantize", "declared", "count_blur"],
                    default="library")
parser.add_argument("--max-time", type=float, default=300, help="0: no budget (the default schedule)")
parser.add_argument("--num-simulations", type=int, default=10_000)
parser.add_argument("--max-steps", type=int, default=None, help="smoke runs only")
parser.add_argument("--observations", type=int, nargs="+", default=[1, 2, 3])
parser.add_argument("--num-samples", type=int, default=10_000)
parser.add_argument("--width", type=int, default=None, help="NetworkConfig.width (mlp_width follows at 2x)")
parser.add_argument("--num-layers", type=int, default=None, help="NetworkConfig.num_layers")
args = parser.parse_args()

import sbibm_jax
from sbibm_suite import user_model
from numpyro_simformer import ConditionMaskDistribution, NetworkConfig, Simformer, TrainingConfig
from numpyro_simformer.diagnostics import c2st

options = {}
training = {"max_time": args.max_time} if args.max_time > 0 else {}
if args.max_steps is not None:
    training.update(max_steps=args.max_steps, warmup_steps=0, steps_per_call=10, validation_interval=10)
if args.variant == "posterior_masks":
    options["condition_masks"] = ConditionMaskDistribution(joint=0, posterior=1, likelihood=0, bernoulli=(0, 0))
if args.variant == "posterior_heavy":
    options["condition_masks"] = ConditionMaskDistribution(joint=0.1, posterior=0.6, likelihood=0.1, bernoulli=(0.1, 0.1))
if args.variant in ("theta_loss", "balanced"):  # patches library internals (not a supported API)
    if args.task != "bernoulli_glm_raw":
        parser.error(f"--variant {args.variant} weights bernoulli_glm_raw's layout (10 + 25 tokens) only")
    from numpyro_simformer.training import fit as fit_module
    original_weights = fit_module._token_weights
    def _token_weights(grouping):
        weights = original_weights(grouping)
        # theta's 10 elements come first in the layout, one per token; the data's 100 in 25 tokens
        weights[10:] *= 0.0 if args.variant == "theta_loss" else 10 / 25
        return weights
    fit_module._token_weights = _token_weights
network = {}
if args.width is not None:
    network.update(width=args.width, mlp_width=2 * args.width)
if args.num_layers is not None:
    network.update(num_layers=args.num_layers)
if network:
    options["network"] = NetworkConfig(**network)
task = sbibm_jax.get_task(args.task)
key_fit, key_sample = jax.random.split(jax.random.key(0))
start = time.perf_counter()
model = user_model(task, declare_support=args.variant == "declared")
if args.variant in ("dequantize", "count_blur"):
    import numpyro, numpyro.distributions as dist
    from numpyro_simformer import Simulator
    if args.variant == "count_blur" and args.task != "bernoulli_glm":
        parser.error("--variant count_blur blurs bernoulli_glm's first statistic only")
    batched = task.get_simulator(jax.random.key(0))
    def simulate(key, theta):
        key_sim, key_u = jax.random.split(key)
        x = batched(key_sim, theta[None])[0]
        if args.variant == "count_blur":
            return x.at[0].add(0.125 * jax.random.normal(key_u, (), x.dtype))
        return x + jax.random.uniform(key_u, x.shape, x.dtype, -0.5, 0.5)
    def model():
        theta = numpyro.sample("theta", task.get_prior_dist())
        numpyro.sample("x", Simulator(simulate, theta))
sf = Simformer(model, num_simulations=args.num_simulations, training=TrainingConfig(**training),
               progress_bar=False, **options).fit(key_fit)
scores, bias, width = [], [], []
for number in args.observations:
    x_o = np.asarray(task.get_observation(number), np.float64).reshape(-1)
    ref = np.asarray(task.get_reference_posterior_samples(number), np.float64)[:args.num_samples]
    tree = sf.sample(jax.random.fold_in(key_sample, number), observed={"x": x_o}, num_samples=args.num_samples)
    est = np.asarray(tree.posterior["theta"].values).reshape(args.num_samples, -1)
    scores.append(round(float(c2st(ref, est, early_stopping=True)), 4))
    bias.append(np.round((est.mean(0) - ref.mean(0)) / ref.std(0), 2).tolist())
    width.append(np.round(est.std(0) / ref.std(0), 2).tolist())
print(json.dumps({"task": args.task, "variant": args.variant, "network": network, "max_time": args.max_time,
                  "steps": int(sf.history.step[-1]), "training_s": round(sf.training_time, 1), "c2st": scores,
                  "mean": round(float(np.mean(scores)), 4), "bias_in_ref_sd": bias, "width_over_ref": width,
                  "total_s": round(time.perf_counter() - start)}))
