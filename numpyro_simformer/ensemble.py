"""Several Simformers trained on the same simulations, queried as an equal-weight mixture.

The members differ only in their training key (initial weights, batches, condition masks,
times and noise), so a mixture of their answers averages out the part of the error that a
single network's training happened to make, at the simulations' cost of one network and
the training cost of ``num_members``. This is sbi's ``NeuralPosteriorEnsemble`` for the
Simformer: every query of :meth:`Simformer.sample` and :meth:`Simformer.log_prob` works on
the ensemble too.

Example:
    >>> ensemble = SimformerEnsemble(model, num_members=3, num_simulations=10_000)
    >>> ensemble.fit(jax.random.key(0))
    >>> tree = ensemble.sample(jax.random.key(1), observed={"x": x_o}, num_samples=10_000)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
import xarray as xr
from scipy.special import logsumexp

from numpyro_simformer._checks import check_rng_key
from numpyro_simformer.io.serialization import check_publish_target, ensure_writable_directory, publish_directory
from numpyro_simformer.model.spec import read_model_spec
from numpyro_simformer.simformer import Simformer

__all__ = ["SimformerEnsemble"]

_SAMPLE_GROUPS = ("posterior", "posterior_predictive")
_RECORD = "ensemble.json"


class SimformerEnsemble:
    """``num_members`` Simformers on one set of simulations; answers are their mixture.

    Args:
        model: the NumPyro model, as for :class:`Simformer`.
        num_members: how many networks to train (each costs one training run).
        **simformer_kwargs: every other argument of :class:`Simformer` (``num_simulations``,
            ``network``, ``training``, ``attention``, ...), the same for all members; a
            ``TrainingConfig.checkpoint_dir`` becomes one subfolder per member
            (``member_{k}``), so an interrupted ensemble fit resumes member by member.

    Attributes:
        members: the member :class:`Simformer` objects (fitted ones can be queried alone).
        simulation_time: seconds spent simulating (once, shared by the members).
        training_time: seconds spent training, summed over the members.
    """

    def __init__(self, model: Callable, *, num_members: int = 3, **simformer_kwargs):
        if not isinstance(num_members, (int, np.integer)) or num_members < 1:
            raise ValueError(f"`num_members` must be a positive integer, got {num_members!r}.")
        training = simformer_kwargs.get("training")
        self.members = []
        for index in range(int(num_members)):
            options = dict(simformer_kwargs)
            if training is not None and training.checkpoint_dir is not None:  # one resumable run per member
                options["training"] = replace(training, checkpoint_dir=str(Path(training.checkpoint_dir) / f"member_{index}"))
            self.members.append(Simformer(model, **options))
        self.simulation_time = 0.0

    @classmethod
    def from_members(cls, members: Sequence[Simformer]) -> "SimformerEnsemble":
        """An ensemble of Simformers fitted elsewhere (e.g. loaded), on the same token sites."""
        members = list(members)
        if not members or not all(isinstance(member, Simformer) for member in members):
            raise TypeError("`members` must be a non-empty list of Simformer objects.")
        unfitted = [index for index, member in enumerate(members) if not member.fitted]
        if unfitted:
            raise ValueError(f"Members {unfitted} are not fitted: fit them (or use `SimformerEnsemble.fit`) first.")
        reference = _site_shapes(members[0])
        for index, member in enumerate(members[1:], start=1):
            if _site_shapes(member) != reference:
                raise ValueError(
                    f"Member {index} has token sites {_site_shapes(member)}, member 0 has {reference}: the "
                    "members of an ensemble must answer queries about the same sites."
                )
        ensemble = cls.__new__(cls)
        ensemble.members = members
        ensemble.simulation_time = 0.0
        return ensemble

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def training_time(self) -> float:
        return float(sum(member.training_time for member in self.members if member.fitted))

    def fit(self, rng_key, *model_args, **model_kwargs) -> "SimformerEnsemble":
        """Simulate once and train every member on those simulations.

        The model is read once and simulated once: the simulations are the ones
        ``Simformer.fit(rng_key)`` would draw, and member ``k`` is
        ``fit_simulations(jax.random.fold_in(rng_key, k), simulations, spec=spec)`` with the
        one :class:`~numpyro_simformer.model.spec.ModelSpec`, so a member can be retrained alone.

        Returns:
            ``self``, fitted.
        """
        check_rng_key(rng_key, "SimformerEnsemble.fit")
        key_read, key_simulate, _ = jax.random.split(rng_key, 3)
        first = self.members[0]
        for member in self.members:  # before simulating: a folder that cannot take checkpoints is said now
            ensure_writable_directory(member.training_config.checkpoint_dir, "TrainingConfig.checkpoint_dir")
        spec = read_model_spec(key_read, first.model, model_args, model_kwargs, first.model_options, simulating=True)
        simulations, _, self.simulation_time = first.simulate(key_simulate, spec)
        for index, member in enumerate(self.members):
            member.fit_simulations(jax.random.fold_in(rng_key, index), simulations, spec=spec)
        return self

    def sample(self, rng_key, *, num_samples: int, **query) -> xr.DataTree:
        """Draw ``num_samples`` from the mixture of the members' answers to one query.

        Takes every argument of :meth:`Simformer.sample`. Member ``k`` draws an equal share
        (the first ``num_samples % num_members`` members one more) with key
        ``jax.random.fold_in(rng_key, k)``; the draws are then shuffled, so any prefix of
        them is itself a draw from the mixture. The root's ``ensemble_members`` attribute
        holds the number of members.
        """
        check_rng_key(rng_key, "SimformerEnsemble.sample")
        if not isinstance(num_samples, (int, np.integer)) or num_samples < self.num_members:
            raise ValueError(
                f"`num_samples` must be an integer of at least the number of members ({self.num_members}), "
                f"got {num_samples!r}."
            )
        shares = [num_samples // self.num_members + (index < num_samples % self.num_members)
                  for index in range(self.num_members)]
        trees = [member.sample(jax.random.fold_in(rng_key, index), num_samples=share, **query)
                 for index, (member, share) in enumerate(zip(self.members, shares))]
        order = np.asarray(jax.random.permutation(jax.random.fold_in(rng_key, self.num_members), num_samples))
        tree = trees[0].copy()
        for group in _SAMPLE_GROUPS:
            if group not in trees[0].children:
                continue
            mixed = xr.concat([member_tree[group].to_dataset() for member_tree in trees], dim="draw",
                              coords="minimal", compat="override", join="override")
            mixed = mixed.isel(draw=order).assign_coords(draw=np.arange(num_samples))
            tree[group] = xr.DataTree(mixed)
        tree.attrs = dict(trees[0].attrs, ensemble_members=self.num_members)
        if "draws_outside_support" in tree.attrs:  # interval_sites="reject": the members' counts together
            outside = np.sum([np.asarray(t.attrs["draws_outside_support"]) for t in trees], axis=0)
            # the mixture's mass inside: the members' shares inside, weighted as they are mixed
            acceptance = np.sum([share * np.asarray(t.attrs["support_acceptance"]) for t, share in zip(trees, shares)],
                                axis=0) / num_samples
            tree.attrs["draws_outside_support"] = outside.tolist()
            tree.attrs["support_acceptance"] = acceptance.tolist()
        return tree

    def log_prob(self, values: Mapping, *, rng_key=None, **query) -> np.ndarray:
        """The mixture's log density, ``log(mean_k p_k(values | observed))``.

        Takes every argument of :meth:`Simformer.log_prob`; with ``rng_key`` (Hutchinson's
        estimator) member ``k`` uses ``jax.random.fold_in(rng_key, k)``.
        """
        if rng_key is not None:
            check_rng_key(rng_key, "SimformerEnsemble.log_prob")
        members = [member.log_prob(values, rng_key=None if rng_key is None else jax.random.fold_in(rng_key, index),
                                   **query)
                   for index, member in enumerate(self.members)]
        return logsumexp(np.stack(members), axis=0) - np.log(self.num_members)

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write every member with :meth:`Simformer.save` under ``path/member_{k}``.

        The whole ensemble is written next to ``path`` and renamed into place, as
        :meth:`Simformer.save` does: of two saves racing to one new ``path``, one wins and
        the other raises ``FileExistsError``.
        """
        path = Path(path)
        check_publish_target(path, overwrite, _RECORD)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
        try:
            for index, member in enumerate(self.members):
                member.save(staging / f"member_{index}")
            (staging / _RECORD).write_text(json.dumps({"num_members": self.num_members,
                                                       "simulation_time": self.simulation_time}))
            publish_directory(staging, path, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path, model: Callable, *model_args, check_model: bool = True, **model_kwargs) -> "SimformerEnsemble":
        """Rebuild an ensemble written by :meth:`save`, with its model (as :meth:`Simformer.load`)."""
        path = Path(path)
        record_path = path / _RECORD
        if not record_path.exists():
            raise FileNotFoundError(f"{path} holds no ensemble ({_RECORD} is missing); was it written by "
                                    "`SimformerEnsemble.save`?")
        record = json.loads(record_path.read_text())
        members = [Simformer.load(path / f"member_{index}", model, *model_args, check_model=check_model, **model_kwargs)
                   for index in range(int(record["num_members"]))]
        ensemble = cls.from_members(members)
        ensemble.simulation_time = float(record.get("simulation_time", 0.0))
        return ensemble


def _site_shapes(member: Simformer) -> list[tuple[str, tuple[int, ...]]]:
    return [(site.name, tuple(site.shape)) for site in member.layout.sites]
