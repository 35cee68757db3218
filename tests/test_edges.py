"""Trust at the edges (issue 31): discrete supports, refused model features, racing saves,
unwritable checkpoint folders, x64, resumed fits, damaged weights and extrapolation.

Every test here failed on the code before the issue's fixes.
"""

import multiprocessing
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import numpyro_simformer.simformer as simformer_module
from helpers import TINY
from numpyro_simformer import Simformer, TrainingConfig
from numpyro_simformer.io.checkpoint import CheckpointError
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.model.sites import read_sites, trace_model
from numpyro_simformer.tokens.transforms import TokenTransform, site_bijection, warn_extrapolation


# ---------------------------------------------------------------------------- discrete supports
class _Integer(constraints.Constraint):
    """Every integer: a discrete support with no bounds (NumPyro has none of its own)."""

    is_discrete = True

    def __call__(self, x):
        return x == jnp.round(x)

    def feasible_like(self, prototype):
        return jnp.zeros_like(prototype)


class ShiftedPoisson(dist.Distribution):
    """1 + Poisson(rate): support ``positive_integer``."""

    support = constraints.positive_integer

    def __init__(self, rate):
        self.rate = rate
        super().__init__(batch_shape=jnp.shape(rate))

    def sample(self, key, sample_shape=()):
        return dist.Poisson(self.rate).sample(key, sample_shape) + 1

    def log_prob(self, value):
        return dist.Poisson(self.rate).log_prob(value - 1)


class PoissonDifference(dist.Distribution):
    """Poisson(a) - Poisson(b) (Skellam): support every integer."""

    support = _Integer()

    def __init__(self, rate):
        self.rate = rate
        super().__init__(batch_shape=jnp.shape(rate))

    def sample(self, key, sample_shape=()):
        key_plus, key_minus = jax.random.split(key)
        poisson = dist.Poisson(self.rate)
        return poisson.sample(key_plus, sample_shape) - poisson.sample(key_minus, sample_shape)

    def log_prob(self, value):
        return jnp.zeros(jnp.shape(value))


def every_discrete_support():
    numpyro.sample("bernoulli", dist.Bernoulli(0.3))  # boolean
    numpyro.sample("binomial", dist.Binomial(3, 0.5))  # integer_interval(0, 3)
    numpyro.sample("categorical", dist.Categorical(probs=jnp.ones(4) / 4))  # integer_interval(0, 3)
    numpyro.sample("bounds", dist.Binomial(jnp.array([1, 5]), 0.5).to_event(1))  # independent, array bounds
    numpyro.sample("poisson", dist.Poisson(2.0))  # nonnegative_integer
    numpyro.sample("geometric", dist.Geometric(0.3))  # nonnegative_integer
    numpyro.sample("shifted", ShiftedPoisson(2.0))  # positive_integer
    numpyro.sample("integer", PoissonDifference(2.0))  # an unbounded integer support
    numpyro.sample("multinomial", dist.Multinomial(4, jnp.ones(3) / 3))  # multinomial(4), elementwise 0..4


def test_every_discrete_support_rounds_and_clips_into_it():
    sites = read_sites(trace_model(jax.random.key(0), every_discrete_support, (), {}))
    assert all(site.is_discrete for site in sites)
    layout = TokenLayout.from_sites(sites)
    transform = TokenTransform(layout, tuple(site_bijection(site) for site in sites),
                               np.zeros(layout.num_tokens, np.float32), np.ones(layout.num_tokens, np.float32))
    z = np.repeat(np.linspace(-40.0, 40.0, 321, dtype=np.float32)[:, None], layout.num_tokens, axis=1)
    values = layout.unflatten(np.asarray(transform.from_z(z)))
    for site in sites:
        value = values[site.name]
        assert np.array_equal(value, np.round(value)), site.name
        if site.name == "multinomial":  # each count in 0..4 (the sum is not enforced)
            assert value.min() == 0 and value.max() == 4
        elif site.name == "integer":
            assert value.min() == -40 and value.max() == 40
        else:
            inside = np.asarray(site.support(jnp.asarray(value)))
            assert inside.all(), f"{site.name}: {np.unique(value[~inside])} outside {site.support}"
    assert set(np.unique(values["bernoulli"])) == {0.0, 1.0}
    assert np.unique(values["bounds"][:, 0]).tolist() == [0.0, 1.0]
    assert values["bounds"][:, 1].max() == 5 and values["shifted"].min() == 1


def bernoulli_poisson():
    p = numpyro.sample("p", dist.Beta(2.0, 2.0))
    z = numpyro.sample("z", dist.Bernoulli(p))
    rate = numpyro.sample("rate", dist.Gamma(4.0, 2.0))
    k = numpyro.sample("k", dist.Poisson(rate))
    numpyro.sample("x", dist.Normal(z + k + p, 0.5))


@pytest.fixture(scope="module")
def fitted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return Simformer(bernoulli_poisson, **TINY).fit(jax.random.key(0))


def test_discrete_latent_draws_stay_in_their_support(fitted):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a tiny network extrapolates
        posterior = fitted.sample(jax.random.key(1), observed={"x": 0.3}, num_samples=300)
    z = posterior["posterior"]["z"].values
    k = posterior["posterior"]["k"].values
    assert set(np.unique(z)) <= {0, 1}
    assert k.min() >= 0


@pytest.mark.parametrize("observed, support", [
    ({"z": 1.5}, "Boolean"), ({"z": -1.0}, "Boolean"), ({"z": 2.0}, "Boolean"),
    ({"k": -2.0}, "IntegerNonnegative"), ({"k": 2.5}, "IntegerNonnegative"),
], ids=["z=1.5", "z=-1", "z=2", "k=-2", "k=2.5"])
def test_impossible_discrete_observation_is_refused(fitted, observed, support):
    (name, value), = observed.items()
    with pytest.raises(ValueError, match=rf"observed\['{name}'\] has value {value}.*outside the site's support "
                                         rf"{support}"):
        fitted.sample(jax.random.key(2), observed={"x": 0.3, **observed}, num_samples=4)
    with pytest.raises(ValueError, match=rf"observed\['{name}'\]"):  # one of a batch of observations
        fitted.sample(jax.random.key(2), observed={"x": np.array([0.3, 0.1]), name: np.array([1.0, value])},
                      num_samples=4)


def test_log_prob_is_minus_infinity_outside_a_discrete_support(fitted):
    points = {"z": np.array([1.0, 3.0, 0.5, 0.0, 1.0]), "k": np.array([2.0, 2.0, 2.0, -1.0, 1.5]),
              "p": np.full(5, 0.5), "rate": np.full(5, 2.0)}
    log_density = fitted.log_prob(points, observed={"x": 0.3})
    assert np.isfinite(log_density[0])
    assert np.all(log_density[1:] == -np.inf)


def test_log_prob_of_zero_points_is_empty(fitted):
    empty = {"z": np.zeros(0), "k": np.zeros(0), "p": np.zeros(0), "rate": np.zeros(0)}
    log_density = fitted.log_prob(empty, observed={"x": 0.3})
    assert log_density.shape == (0,) and log_density.dtype == np.float64


# ---------------------------------------------------------------------------- refused model features
def subsampled():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    with numpyro.plate("trials", 10, subsample_size=3):
        numpyro.sample("x", dist.Normal(theta, 1.0))


def with_param():
    offset = numpyro.param("offset", 0.5)
    theta = numpyro.sample("theta", dist.Normal(offset, 1.0))
    numpyro.sample("x", dist.Normal(theta, 1.0))


def _never_simulate(*args, **kwargs):
    raise AssertionError("the model was simulated before it was checked")


def test_subsampled_plate_is_refused_before_simulating(rng_key, monkeypatch):
    monkeypatch.setattr(simformer_module, "simulate", _never_simulate)
    with pytest.raises(ValueError, match=r"subsamples plate 'trials' \(size 10, subsample_size=3\).*"
                                         r"numpyro.plate\('trials', 10\)` without `subsample_size`"):
        Simformer(subsampled, **TINY).fit(rng_key)


def test_a_plate_subsampled_to_its_full_size_is_accepted():
    def full(n=4):
        with numpyro.plate("trials", n, subsample_size=n):
            numpyro.sample("x", dist.Normal(0.0, 1.0))

    assert [site.name for site in read_sites(trace_model(jax.random.key(0), full, (), {}))] == ["x"]


def test_param_site_is_refused_before_simulating(rng_key, monkeypatch):
    monkeypatch.setattr(simformer_module, "simulate", _never_simulate)
    with pytest.raises(ValueError, match=r"`numpyro.param` site 'offset'.*sample site with a prior.*model argument"):
        Simformer(with_param, **TINY).fit(rng_key)


# ---------------------------------------------------------------------------- saving
def small_model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(theta, 0.5))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sf = Simformer(small_model, **TINY).fit(jax.random.key(3))
    return sf, sf.save(tmp_path_factory.mktemp("saved") / "checkpoint")


def _race_to_save(source, targets, barrier, results):
    """A process: load the checkpoint, then save it to each target together with the other process."""
    sf = Simformer.load(source, small_model)
    for round_index, target in enumerate(targets):
        barrier.wait()
        try:
            sf.save(target)
            results.put((round_index, "saved"))
        except FileExistsError:
            results.put((round_index, "exists"))
        except Exception as error:  # noqa: BLE001 - reported to the test
            results.put((round_index, f"{type(error).__name__}: {error}"))


def test_two_processes_saving_to_one_path_one_wins(saved, tmp_path):
    _, source = saved
    targets = [tmp_path / f"round_{index}" for index in range(5)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_race_to_save, args=(source, targets, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in range(2 * len(targets))]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    for round_index, target in enumerate(targets):
        answers = sorted(answer for index, answer in outcomes if index == round_index)
        assert answers == ["exists", "saved"], (round_index, answers)
        Simformer.load(target, small_model)  # the winner's checkpoint is whole
        assert [entry.name for entry in tmp_path.iterdir() if entry.name.startswith(".")] == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_saving_onto_a_file_says_so(saved, tmp_path, overwrite):
    sf, _ = saved
    (tmp_path / "taken").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match=r"taken is a file, not a directory: a checkpoint is a directory"):
        sf.save(tmp_path / "taken", overwrite=overwrite)
    with pytest.raises(FileExistsError, match=r"is a file \(a folder above"):
        sf.save(tmp_path / "taken" / "checkpoint", overwrite=overwrite)
    assert (tmp_path / "taken").read_text() == "not a checkpoint"


def test_overwrite_still_replaces(saved, tmp_path):
    sf, _ = saved
    sf.save(tmp_path / "checkpoint")
    sf.save(tmp_path / "checkpoint", overwrite=True)
    Simformer.load(tmp_path / "checkpoint", small_model)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint"]


def test_damaged_weights_are_found_before_orbax_reads_them(saved, tmp_path, monkeypatch):
    import shutil

    import orbax.checkpoint as ocp

    _, source = saved
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    data_files = [path for path in (copy / "arrays").rglob("*") if path.is_file() and path.parent.name == "d"]
    for path in data_files:
        path.write_bytes(path.read_bytes()[:7])

    def orbax_reads(*args, **kwargs):  # its pending reads print "Event loop is closed" tracebacks
        raise AssertionError("Orbax was asked to read damaged weights")

    monkeypatch.setattr(ocp.Checkpointer, "restore", orbax_reads)
    with pytest.raises(CheckpointError, match=r"weights file .* bytes where .* were written; the checkpoint is "
                                              r"truncated or damaged"):
        Simformer.load(copy, small_model)


# ---------------------------------------------------------------------------- training checkpoints
def _tiny_with_checkpoints(directory):
    training = TrainingConfig(max_steps=10, steps_per_call=5, validation_interval=5, checkpoint_dir=str(directory),
                              checkpoint_every=5)
    return Simformer(small_model, **{**TINY, "training": training})


def test_unwritable_checkpoint_dir_is_refused_before_simulating(rng_key, tmp_path, monkeypatch):
    monkeypatch.setattr(simformer_module, "simulate", _never_simulate)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"TrainingConfig.checkpoint_dir='.*file/checkpoints' cannot be written"):
        _tiny_with_checkpoints(tmp_path / "file" / "checkpoints").fit(rng_key)
    with pytest.raises(OSError, match="cannot be written"):
        _tiny_with_checkpoints(tmp_path / "file" / "checkpoints").fit_simulations(
            rng_key, {"theta": np.zeros(10), "x": np.zeros(10)})


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_dir_is_refused_before_simulating(rng_key, tmp_path, monkeypatch):
    monkeypatch.setattr(simformer_module, "simulate", _never_simulate)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="checkpoint_dir"):
            _tiny_with_checkpoints(tmp_path / "locked").fit(rng_key)
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_resumed_fit_says_from_which_step(rng_key, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _tiny_with_checkpoints(tmp_path).fit(rng_key)
    with pytest.warns(UserWarning, match=r"Resuming training from step 10 \(of max_steps=10\) from the checkpoint"):
        _tiny_with_checkpoints(tmp_path).fit(rng_key)


# ---------------------------------------------------------------------------- x64
def test_log_prob_works_with_x64_enabled(saved):
    sf, _ = saved
    from numpyro_simformer.inference.density import ProbabilityFlowLogDensity

    points, density = {"theta": np.array([0.1, -0.4])}, ProbabilityFlowLogDensity(num_steps=16)
    expected = sf.log_prob(points, observed={"x": 0.3}, density=density)
    with jax.enable_x64(True):
        assert jax.config.jax_enable_x64
        log_density = sf.log_prob(points, observed={"x": 0.3}, density=density)
    assert not jax.config.jax_enable_x64
    # the same steps, in float64: equal to float32 round-off (amplified near t = 0, where the score is large)
    np.testing.assert_allclose(log_density, expected, atol=1e-2)


def test_fit_sample_and_log_prob_under_x64(rng_key):
    from numpyro_simformer.samplers import ProbabilityFlowODE

    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sf = Simformer(small_model, **TINY).fit(rng_key)
        sf.sample(jax.random.key(1), observed={"x": 0.3}, num_samples=4, sampler=ProbabilityFlowODE(num_steps=4))
        assert np.isfinite(sf.log_prob({"theta": np.array([0.2])}, observed={"x": 0.3})).all()
    assert not jax.config.jax_enable_x64


# ---------------------------------------------------------------------------- extrapolation
def test_draws_far_outside_the_training_data_are_warned_about():
    sites = read_sites(trace_model(jax.random.key(0), bernoulli_poisson, (), {}))
    layout = TokenLayout.from_sites(sites)
    z = np.zeros((2, 100, layout.num_tokens), np.float32)
    condition_mask = np.array([site.name == "x" for site in sites])
    z[:, :, -1] = 50.0  # observed: no extrapolation of the network's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_extrapolation(layout, z, condition_mask)
    z[0, :1, layout.site_names.index("rate")] = 12.0  # one stray draw in 200 (0.5 %): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_extrapolation(layout, z, condition_mask)
    z[0, :3, layout.site_names.index("rate")] = 12.0
    with pytest.warns(UserWarning, match=r"Draws of 'rate' \(1.5% of draws\) lie more than 6 standard deviations.*"
                                         r"up to 12.*extrapolating"):
        warn_extrapolation(layout, z, condition_mask)


# ---------------------------------------------------------------------------- load notices a changed model
def _prior_moved():
    theta = numpyro.sample("theta", dist.Normal(5.0, 0.1))
    numpyro.sample("x", dist.Normal(theta, 0.5))


def _graph_changed():  # x no longer depends on theta: same names, shapes and supports
    numpyro.sample("theta", dist.Normal(0.0, 1.0))
    numpyro.sample("x", dist.Normal(0.0, 0.5))


@pytest.mark.parametrize("changed, what", [(_prior_moved, "site 'theta' draws other values"),
                                            (_graph_changed, "dependency graph differs")])
def test_load_notices_a_changed_model_and_says_what_changed(saved, changed, what):
    from numpyro_simformer.io.checkpoint import ModelMismatchError

    _, path = saved
    with pytest.raises(ModelMismatchError, match=what):
        Simformer.load(path, changed)
    loaded = Simformer.load(path, changed, check_model=False)  # a change made on purpose
    assert loaded.fitted


@pytest.mark.parametrize("edit", ["mean", "std", "parents", "nan"])
def test_an_edited_record_is_refused(saved, tmp_path, edit):
    import json
    import shutil

    _, path = saved
    copy = pathlib.Path(shutil.copytree(path, tmp_path / "edited"))
    record = json.loads((copy / "simformer.json").read_text())
    if edit in ("mean", "std"):
        record["transform"][edit] = _scaled(record["transform"][edit], 1.5 if edit == "std" else None)
    elif edit == "parents":  # the graph emptied: x no longer a child of theta
        record["graph"]["parents"] = ["0" * len(row) for row in record["graph"]["parents"]]
    else:
        record["timings"]["training_time"] = float("nan")
    (copy / "simformer.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="edited or damaged"):
        Simformer.load(copy, small_model)
    assert Simformer.load(path, small_model).fitted  # the untouched original still loads


def _scaled(encoded, factor):
    """An encoded array with its values shifted by 0.5 (``factor`` None) or multiplied by ``factor``."""
    from numpyro_simformer.io.serialization import decode_array, encode_array

    values = decode_array(encoded)
    return encode_array(values + 0.5 if factor is None else values * factor)
