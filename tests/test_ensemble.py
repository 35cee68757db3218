"""SimformerEnsemble: members trained on one set of simulations, answers are their mixture.

The checks are exact: the ensemble's draws are the members' own draws (an equal share each,
with the documented keys), its log density is the log of the members' mean density, and a
saved ensemble answers as the original.
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_simformer import EulerMaruyama, NetworkConfig, Simformer, SimformerEnsemble, TrainingConfig
from numpyro_simformer.model.simulate import simulate

X_O = np.array([0.5, -1.0])

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


def other_model():
    theta = numpyro.sample("theta", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    numpyro.sample("x", dist.Normal(theta, 0.5).to_event(1))


TINY = dict(
    num_simulations=300,
    network=NetworkConfig(width=8, num_layers=1, num_heads=1, mlp_width=16, num_time_features=8),
    training=TrainingConfig(max_steps=20, steps_per_call=5, batch_size=32, validation_interval=10, warmup_steps=5),
    sampler=EulerMaruyama(num_steps=10),
    progress_bar=False,
)


@pytest.fixture(scope="module")
def fit_key():
    return jax.random.key(3)


@pytest.fixture(scope="module")
def ensemble(fit_key):
    return SimformerEnsemble(model, num_members=2, **TINY).fit(fit_key)


def _draws(tree, site="theta"):
    return np.asarray(tree["posterior"][site].values).reshape(-1, 2)


def test_members_share_the_simulations_of_a_single_fit_and_differ_by_key(ensemble, fit_key):
    _, key_simulate, _ = jax.random.split(fit_key, 3)
    simulations, _ = simulate(key_simulate, model, TINY["num_simulations"], ["theta", "x"])
    alone = Simformer(model, **TINY).fit_simulations(jax.random.fold_in(fit_key, 1), simulations)
    member = ensemble.members[1]
    np.testing.assert_array_equal(member.transform.mean, alone.transform.mean)  # the same simulations
    for got, expected in zip(jax.tree.leaves(member.params), jax.tree.leaves(alone.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))  # member k = key fold_in(key, k)
    first, second = (jax.tree.leaves(m.params) for m in ensemble.members)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))


def test_sample_draws_an_equal_share_from_each_member(ensemble, rng_key):
    tree = ensemble.sample(rng_key, observed={"x": X_O}, num_samples=7)
    mixed = _draws(tree)
    assert tree["posterior"]["theta"].dims[:2] == ("chain", "draw") and mixed.shape == (7, 2)
    assert tree.attrs["ensemble_members"] == 2
    np.testing.assert_array_equal(tree["observed_data"]["x"].values, X_O)
    parts = [_draws(member.sample(jax.random.fold_in(rng_key, index), observed={"x": X_O}, num_samples=share))
             for index, (member, share) in enumerate(zip(ensemble.members, (4, 3)))]
    expected = np.concatenate(parts)
    np.testing.assert_array_equal(mixed[np.lexsort(mixed.T)], expected[np.lexsort(expected.T)])
    # Shuffled: the first member's draws do not simply come first.
    assert not np.array_equal(mixed[:4], parts[0])
    np.testing.assert_array_equal(_draws(ensemble.sample(rng_key, observed={"x": X_O}, num_samples=7)), mixed)


def test_batched_observations_mix_per_observation(ensemble, rng_key):
    observed = {"x": np.stack([X_O, -X_O])}
    tree = ensemble.sample(rng_key, observed=observed, num_samples=6)
    assert tree["posterior"]["theta"].shape == (1, 6, 2, 2)
    values = tree["posterior"]["theta"].values
    assert np.all(np.isfinite(values)) and not np.allclose(values[:, :, 0], values[:, :, 1])


def test_log_prob_is_the_log_of_the_members_mean_density(ensemble):
    points = {"theta": np.array([[0.3, -0.6], [1.0, 0.0], [-2.0, 1.5]])}
    mixture = ensemble.log_prob(points, observed={"x": X_O})
    members = [member.log_prob(points, observed={"x": X_O}) for member in ensemble.members]
    np.testing.assert_allclose(mixture, np.logaddexp(*members) - np.log(2), rtol=1e-6)
    assert mixture.shape == (3,) and np.all(np.isfinite(mixture))


def test_save_and_load_give_identical_samples(ensemble, tmp_path, rng_key):
    path = ensemble.save(tmp_path / "ensemble")
    loaded = SimformerEnsemble.load(path, model)
    assert loaded.num_members == 2
    np.testing.assert_array_equal(_draws(loaded.sample(rng_key, observed={"x": X_O}, num_samples=5)),
                                  _draws(ensemble.sample(rng_key, observed={"x": X_O}, num_samples=5)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ensemble.save(path)
    with pytest.raises(FileNotFoundError, match="ensemble.json"):
        SimformerEnsemble.load(tmp_path, model)


def test_training_checkpoints_go_to_one_folder_per_member(tmp_path, rng_key):
    from dataclasses import replace

    options = dict(TINY, training=replace(TINY["training"], checkpoint_dir=str(tmp_path), checkpoint_every=10))
    ensemble = SimformerEnsemble(model, num_members=2, **options).fit(rng_key)
    assert [m.training_config.checkpoint_dir for m in ensemble.members] == [str(tmp_path / "member_0"),
                                                                             str(tmp_path / "member_1")]
    assert all(any((tmp_path / f"member_{k}").iterdir()) for k in range(2))
    # Refitting resumes each member from its own checkpoint and ends in the same state.
    again = SimformerEnsemble(model, num_members=2, **options).fit(rng_key)
    for first, second in zip(ensemble.members, again.members):
        for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(second.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_arguments_are_named(ensemble, rng_key):
    with pytest.raises(ValueError, match="num_members"):
        SimformerEnsemble(model, num_members=0)
    with pytest.raises(ValueError, match="num_samples"):
        ensemble.sample(rng_key, observed={"x": X_O}, num_samples=1)
    with pytest.raises(ValueError, match="not fitted"):
        SimformerEnsemble.from_members([ensemble.members[0], Simformer(model, **TINY)])
    other = Simformer(other_model, **TINY).fit(rng_key)
    with pytest.raises(ValueError, match="same sites"):
        SimformerEnsemble.from_members([ensemble.members[0], other])
    with pytest.raises(TypeError, match="Simformer objects"):
        SimformerEnsemble.from_members([])


def test_the_model_is_read_once_per_ensemble_fit(monkeypatch, rng_key):
    """One graph extraction and one trace pair for all members (it was num_members + 1)."""
    import numpyro_simformer.model.spec as spec_module

    calls = []
    extract = spec_module.element_parents
    monkeypatch.setattr(spec_module, "element_parents", lambda *args, **kwargs: calls.append(1) or extract(*args, **kwargs))
    ensemble = SimformerEnsemble(model, num_members=3, **TINY).fit(rng_key)
    assert len(calls) == 1
    assert all(member.spec is ensemble.members[0].spec for member in ensemble.members)
