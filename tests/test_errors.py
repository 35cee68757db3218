"""Bad input gets a clear error naming the site or argument, raised before any tracing."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from helpers import TINY
from numpyro_simformer import NetworkConfig, Simformer, TrainingConfig


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 1.0).to_event(1))


@pytest.fixture(scope="module")
def fitted():
    return Simformer(model, **TINY).fit(jax.random.key(0))


def test_unknown_site_in_observed(fitted, rng_key):
    with pytest.raises(ValueError, match=r"unknown site 'y'.*\['theta', 'x'\]"):
        fitted.sample(rng_key, observed={"y": np.zeros(2)}, num_samples=4)


def test_wrong_shape(fitted, rng_key):
    with pytest.raises(ValueError, match=r"observed\['x'\] has shape \(3,\).*shape \(2,\)"):
        fitted.sample(rng_key, observed={"x": np.zeros(3)}, num_samples=4)


def test_every_site_observed(fitted, rng_key):
    with pytest.raises(ValueError, match="nothing to infer"):
        fitted.sample(rng_key, observed={"x": np.zeros(2), "theta": np.zeros(2)}, num_samples=4)


def test_non_numeric_observed(fitted, rng_key):
    with pytest.raises(TypeError, match=r"observed\['x'\] must be numeric"):
        fitted.sample(rng_key, observed={"x": "abc"}, num_samples=4)


def test_infinite_observed(fitted, rng_key):
    with pytest.raises(ValueError, match=r"observed\['x'\] contains inf"):
        fitted.sample(rng_key, observed={"x": np.array([np.inf, 0.0])}, num_samples=4)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5])
def test_non_positive_num_samples(fitted, rng_key, num_samples):
    with pytest.raises(ValueError, match="`num_samples` must be a positive integer"):
        fitted.sample(rng_key, observed={"x": np.zeros(2)}, num_samples=num_samples)


@pytest.mark.parametrize("num_simulations", [0, -1, 10.0])
def test_non_positive_num_simulations(num_simulations):
    with pytest.raises(ValueError, match="`num_simulations` must be a positive integer"):
        Simformer(model, num_simulations=num_simulations)


def test_sample_before_fit(rng_key):
    with pytest.raises(RuntimeError, match=r"call `fit\(rng_key, ...\)` first"):
        Simformer(model, **TINY).sample(rng_key, observed={"x": np.zeros(2)}, num_samples=4)


def test_model_without_sample_sites(rng_key):
    def empty_model():
        numpyro.deterministic("z", 1.0)

    with pytest.raises(ValueError, match="no unobserved sample sites"):
        Simformer(empty_model, **TINY).fit(rng_key)


def test_model_that_fails_when_traced(rng_key):
    def broken_model(scale):
        numpyro.sample("theta", dist.Normal(0.0, scale))
        raise KeyError("the model's own problem")

    with pytest.raises(RuntimeError, match="KeyError: \"the model's own problem\""):
        Simformer(broken_model, **TINY).fit(rng_key, 1.0)


def test_model_missing_argument(rng_key):
    def needs_argument(n):
        numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([n]).to_event(1))

    with pytest.raises(RuntimeError, match="missing 1 required positional argument"):
        Simformer(needs_argument, **TINY).fit(rng_key)


def test_all_simulations_nan(rng_key):
    def nan_model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(theta * np.nan, 1.0))

    with pytest.raises(RuntimeError, match="All 100 simulations contained NaN or inf"):
        Simformer(nan_model, **TINY).fit(rng_key)


def test_some_simulations_nan_are_counted(rng_key):
    def sometimes_nan_model():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        numpyro.sample("x", dist.Normal(jax.numpy.log(theta), 1.0))  # NaN for theta < 0

    sf = Simformer(sometimes_nan_model, **TINY)
    with pytest.warns(UserWarning, match="simulations contained NaN or inf and were dropped"):
        sf.fit(rng_key)
    info = sf.simulation_info
    assert info.num_invalid > 20 and info.num_valid + info.num_invalid == 100


def test_observed_outside_support(rng_key):
    def bounded():
        theta = numpyro.sample("theta", dist.Uniform(0.0, 1.0))
        numpyro.sample("x", dist.Normal(theta, 1.0))

    sf = Simformer(bounded, **TINY).fit(rng_key)
    with pytest.raises(ValueError, match=r"observed\['theta'\].*outside the site's support"):
        sf.sample(rng_key, observed={"theta": 1.5}, num_samples=4)


def test_unknown_exclude_site(rng_key):
    with pytest.raises(ValueError, match="exclude_sites names 'noise'"):
        Simformer(model, exclude_sites=["noise"], **TINY).fit(rng_key)


def test_bad_attention_argument():
    with pytest.raises(ValueError, match="`attention` must be one of"):
        Simformer(model, attention="sparse")


def test_bad_config_values():
    with pytest.raises(ValueError, match="TrainingConfig.batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        NetworkConfig(width=10, num_heads=3)


def test_condition_mask_weights_accept_lists():
    """Lists (e.g. read from JSON) work like tuples: the distribution is a hashed jit argument."""
    from numpyro_simformer.diffusion.masks import ConditionMaskDistribution

    listed = ConditionMaskDistribution(bernoulli=[0.1, 0.3], bernoulli_rates=[0.3, 0.7])
    assert listed == ConditionMaskDistribution(bernoulli=(0.1, 0.3), bernoulli_rates=(0.3, 0.7))
    hash(listed)
    with pytest.raises(ValueError, match="one weight per Bernoulli rate"):
        ConditionMaskDistribution(bernoulli=[0.2], bernoulli_rates=[0.3, 0.7])


@pytest.mark.parametrize(
    "extra, names",
    [
        (lambda theta: numpyro.sample("y", dist.Normal(theta.sum(), 1.0), obs=0.3), r"observes site\(s\) \['y'\]"),
        (lambda theta: numpyro.factor("penalty", -theta.sum() ** 2), r"has factor site\(s\) \['penalty'\]"),
    ],
    ids=["obs", "factor"],
)
def test_terms_forward_simulation_ignores_are_named_when_fitting(extra, names, rng_key):
    def with_term():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        extra(theta)
        numpyro.sample("x", dist.Normal(theta, 1.0).to_event(1))

    with pytest.warns(UserWarning, match=names + r".*as if they were absent") as record:
        Simformer(with_term, **TINY).fit(rng_key)
    assert any(warning.filename == __file__ for warning in record)  # points at the user's `fit` call


def test_plain_model_fits_without_a_warning_about_ignored_terms(rng_key):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Simformer(model, **TINY).fit(rng_key)


@pytest.mark.parametrize("bad_key", [0, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0), 2)],
                         ids=["int", "wrong-shape", "batch-of-keys"])
def test_rng_key_that_is_not_one_key_is_named(fitted, bad_key):
    with pytest.raises(TypeError, match=r"`Simformer.sample` takes one JAX PRNG key as `rng_key`"):
        fitted.sample(bad_key, observed={"x": np.zeros(2)}, num_samples=4)
    with pytest.raises(TypeError, match=r"`Simformer.fit` takes one JAX PRNG key"):
        Simformer(model, **TINY).fit(bad_key)


def test_legacy_raw_key_is_accepted(fitted):
    tree = fitted.sample(jax.random.PRNGKey(0), observed={"x": np.zeros(2)}, num_samples=4)
    assert tree.posterior["theta"].shape == (1, 4, 2)


@pytest.mark.parametrize("site, plate", [("x/obs", "n"), ("x", "obs/plate")])
def test_slash_in_a_site_or_plate_name_is_refused_before_training(site, plate, rng_key):
    def slashed():
        theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
        with numpyro.plate(plate, 3):
            numpyro.sample(site, dist.Normal(theta, 1.0))

    with pytest.raises(ValueError, match=f"name '{site if '/' in site else plate}'.*contains '/'"):
        Simformer(slashed, **TINY).fit(rng_key)


def test_few_simulations_warn_with_the_count_and_the_fix():
    few = dict(TINY, num_simulations=10)
    with pytest.warns(UserWarning, match=r"only 10 valid simulations.*0 are held out.*never stops early.*num_simulations"):
        Simformer(model, **few).fit(jax.random.key(0))


def test_enough_simulations_do_not_warn_about_their_number(recwarn):
    Simformer(model, **TINY).fit(jax.random.key(0))
    assert not [w for w in recwarn if "valid simulations" in str(w.message)]
