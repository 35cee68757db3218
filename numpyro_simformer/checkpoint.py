"""Save and load a fitted Simformer; checkpoint and resume a long training run.

A Simformer checkpoint is a directory with two parts and no pickle:

- ``simformer.json``: everything that is not a network weight, as plain JSON: the format
  version and library version, the token layout (site names, shapes, event dims, dims,
  discrete flags, supports, node ids, coordinates), the parents graph, the attention
  mask, the data mask, the z-scoring mean and standard deviation, the options given to
  the constructor (configurations are stored as their type name and fields), the
  training history, the simulation info, and a SHA-256 digest of the weights.
- ``arrays/``: the network's parameters and its fixed constants, written by Orbax.

:func:`load_simformer` rebuilds the object from the directory and the user's model: the
model is traced once and its sites must match the checkpoint's (names, shapes, event
dims, discrete flags, supports); a difference raises :class:`ModelMismatchError` naming
the site. An unreadable, truncated or altered checkpoint raises :class:`CheckpointError`
naming the path, never an error from deep inside Orbax or the JSON parser. A loaded
object gives bit for bit the samples of the saved one for the same key.

:class:`TrainingCheckpointer` writes the training loop's whole state (weights, EMA
weights, optimiser state, step, the loop's position in its key sequence, best-so-far,
history) every ``TrainingConfig.checkpoint_every`` steps, and :func:`train` resumes from
the newest one. Each checkpoint records a fingerprint of its run (key, simulations,
configuration) so that a directory is never resumed by a different run.

Example:
    >>> sf.save("fitted")                                            # doctest: +SKIP
    >>> sf = Simformer.load("fitted", model)                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
import tempfile
from typing import Callable, Mapping

import jax
import numpy as np

from numpyro_simformer.serialization import (
    FORMAT_VERSION,
    CheckpointError,
    ModelMismatchError,
    check_publish_target,
    publish_directory,
    decode_array,
    decode_bool_matrix,
    decode_named_tuple,
    encode_array,
    encode_bool_matrix,
    encode_named_tuple,
    record_header,
    read_json,
    restore_arrays,
    same_support,
    save_arrays,
    support_record,
    write_json,
    decode_config,
    encode_config,
)

__all__ = [
    "CheckpointError",
    "ModelMismatchError",
    "FORMAT_VERSION",
    "save_simformer",
    "load_simformer",
    "TrainingCheckpointer",
    "run_fingerprint",
    "encode_config",
    "decode_config",
]

_METADATA_FILE = "simformer.json"
_ARRAYS_DIR = "arrays"
_TRAINING_PREFIX = "training-"
_TRAINING_STATE_FILE = "state.json"


# ---------------------------------------------------------------------------- Simformer
def _options_record(sf) -> dict:
    attention = sf.attention if isinstance(sf.attention, str) else {"bool_matrix": encode_bool_matrix(sf.attention)}
    return {
        "num_simulations": sf.num_simulations,
        "network": encode_config(sf.network_config),
        "sde": encode_config(sf.sde),
        "training": encode_config(sf.training_config),
        "sampler": encode_config(sf.sampler),
        "condition_masks": encode_config(sf.condition_masks),
        "attention": attention,
        "parents": None if sf._user_parents is None else encode_bool_matrix(sf._user_parents),
        "token_sites": sf.token_sites,
        "exclude_sites": sf.exclude_sites,
        "data_sites": sf.data_sites,
        "simulation_chunk_size": sf.simulation_chunk_size,
        "interval_sites": sf.interval_sites,
        "progress_bar": sf.progress_bar,
    }


def _options_from_record(record: dict) -> dict:
    attention = record["attention"]
    if isinstance(attention, dict):
        attention = decode_bool_matrix(attention["bool_matrix"])
    return {
        "num_simulations": record["num_simulations"],
        "network": decode_config(record["network"]),
        "sde": decode_config(record["sde"]),
        "training": decode_config(record["training"]),
        "sampler": decode_config(record["sampler"]),
        "condition_masks": decode_config(record["condition_masks"]),
        "attention": attention,
        "parents": None if record["parents"] is None else decode_bool_matrix(record["parents"]),
        "token_sites": record["token_sites"],
        "exclude_sites": record["exclude_sites"],
        "data_sites": record["data_sites"],
        "simulation_chunk_size": record["simulation_chunk_size"],
        "interval_sites": record.get("interval_sites", "transform"),  # absent before the option existed
        "progress_bar": record["progress_bar"],
    }


def save_simformer(sf, path, *, overwrite: bool = False) -> pathlib.Path:
    """Write a fitted Simformer to the directory ``path`` (see the module docstring).

    The checkpoint is written next to ``path`` and renamed into place, so an interrupted
    save never leaves a half-written checkpoint under ``path``; of two saves racing to one
    new ``path`` without ``overwrite``, one succeeds and the other raises
    ``FileExistsError`` (:func:`~numpyro_simformer.serialization.publish_directory`).

    Args:
        sf: a fitted :class:`~numpyro_simformer.Simformer`.
        path: the directory to create.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The path of the checkpoint directory.

    Raises:
        FileExistsError: ``path`` exists (or appears meanwhile) and not ``overwrite``; it
            is a file; or it is a non-empty directory that is not a checkpoint.
    """
    path = pathlib.Path(path)
    check_publish_target(path, overwrite, _METADATA_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = sf.layout
    record = record_header()
    record["options"] = _options_record(sf)
    record["layout"] = {
        "sites": [
            {
                "name": site.name,
                "shape": list(site.shape),
                "event_dim": site.event_dim,
                "is_discrete": site.is_discrete,
                "dims": list(site.dims),
                "support": support_record(site.support),
                # "site": the site's own support; "real": the fallback for a support that varies
                "transform_support": "site" if sf._supports[site.name] is site.support else "real",
            }
            for site in layout.sites
        ],
        "node_ids": encode_array(layout.node_ids),
        "coordinates": encode_array(layout.coordinates),
    }
    record["graph"] = {
        "parents": encode_bool_matrix(sf.parents),
        "attention_mask": encode_bool_matrix(sf.attention_mask),
        "data_mask": encode_bool_matrix(np.asarray(sf._data_mask)[None])[0],
        "has_children": {name: bool(value) for name, value in sf._has_children.items()},
    }
    record["transform"] = {"mean": encode_array(sf.transform.mean), "std": encode_array(sf.transform.std)}
    record["history"] = encode_named_tuple(sf.history)
    record["simulation_info"] = encode_named_tuple(sf.simulation_info)
    record["timings"] = {
        "simulation_time": float(getattr(sf, "simulation_time", 0.0)),
        "training_time": float(getattr(sf, "training_time", 0.0)),
    }
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
    try:
        record["arrays"] = save_arrays(staging / _ARRAYS_DIR, {"params": sf.params, "constants": sf._constants})
        write_json(staging / _METADATA_FILE, record)
        publish_directory(staging, path, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _check_sites(model_sites: dict, stored_sites: list[dict], options: dict, where: str) -> None:
    problems = []
    stored_names = [site["name"] for site in stored_sites]
    for stored in stored_sites:
        name = stored["name"]
        site = model_sites.get(name)
        if site is None:
            problems.append(
                f"site {name!r} is in the checkpoint but is not an unobserved sample site of the model"
            )
            continue
        if list(site.shape) != stored["shape"]:
            problems.append(f"site {name!r} has shape {tuple(site.shape)} in the model but {tuple(stored['shape'])} in the checkpoint")
        if site.event_dim != stored["event_dim"]:
            problems.append(f"site {name!r} has {site.event_dim} event dims in the model but {stored['event_dim']} in the checkpoint")
        if site.is_discrete != stored["is_discrete"]:
            kind = lambda discrete: "discrete" if discrete else "continuous"
            problems.append(f"site {name!r} is {kind(site.is_discrete)} in the model but {kind(stored['is_discrete'])} in the checkpoint")
        elif not same_support(support_record(site.support), stored["support"]):
            problems.append(
                f"site {name!r} has support {site.support} in the model but {stored['support']['constraint']} "
                f"(lower {stored['support']['lower']}, upper {stored['support']['upper']}) in the checkpoint"
            )
    if options["token_sites"] is None:
        excluded = set(options["exclude_sites"])
        extra = [name for name in model_sites if name not in stored_names and name not in excluded]
        problems += [f"site {name!r} is a sample site of the model but not in the checkpoint" for name in extra]
    if problems:
        raise ModelMismatchError(
            f"{where}: the model does not match the checkpoint: " + "; ".join(problems) + ". Load the "
            "checkpoint with the model (and model arguments) it was fitted with, or fit again."
        )


def load_simformer(path, model: Callable, model_args: tuple = (), model_kwargs: Mapping | None = None, *, cls=None):
    """Rebuild a fitted Simformer from a checkpoint directory and the user's model.

    Args:
        path: a directory written by :func:`save_simformer` (``Simformer.save``).
        model: the NumPyro model it was fitted with.
        model_args, model_kwargs: the model's arguments, as given to ``fit``.
        cls: the class to build (default :class:`~numpyro_simformer.Simformer`).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the checkpoint is unreadable, truncated or altered.
        ModelMismatchError: when the model's sites differ from the checkpoint's.
    """
    from flax import nnx

    from numpyro_simformer.layout import TokenLayout
    from numpyro_simformer.nn import SimformerNetwork
    from numpyro_simformer.simformer import Simformer
    from numpyro_simformer.simulate import SimulationInfo
    from numpyro_simformer.sites import SiteInfo, read_sites, trace_model
    from numpyro_simformer.train import TrainingHistory
    from numpyro_simformer.transforms import TokenTransform, site_bijection
    from numpyro.distributions import constraints

    cls = Simformer if cls is None else cls
    model_kwargs = dict(model_kwargs or {})
    path = pathlib.Path(path)
    where = f"Checkpoint {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist.")
    if not path.is_dir():
        raise CheckpointError(f"{where} is a file; a Simformer checkpoint is a directory written by `save`.")
    record = read_json(path / _METADATA_FILE, where)
    try:
        options = _options_from_record(record["options"])
        stored_sites = record["layout"]["sites"]
        graph = record["graph"]
        mean = decode_array(record["transform"]["mean"]).astype(np.float32)
        std = decode_array(record["transform"]["std"]).astype(np.float32)
        node_ids = decode_array(record["layout"]["node_ids"])
        coordinates = decode_array(record["layout"]["coordinates"])
        history = decode_named_tuple(TrainingHistory, record["history"])
        simulation_info = decode_named_tuple(SimulationInfo, record["simulation_info"])
        arrays = record["arrays"]
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{where}: {_METADATA_FILE} lacks or garbles a field ({type(error).__name__}: {error}).") from None

    sf = cls(model, **options)
    trace = trace_model(jax.random.key(0), model, model_args, model_kwargs)
    model_sites = {site.name: site for site in read_sites(trace)}
    _check_sites(model_sites, stored_sites, options, where)

    sites, supports = [], {}
    for stored in stored_sites:
        traced = model_sites[stored["name"]]
        sites.append(SiteInfo(traced.name, tuple(traced.shape), traced.event_dim, traced.support,
                              traced.is_discrete, tuple(traced.dims)))
        supports[traced.name] = traced.support if stored["transform_support"] == "site" else constraints.real
    layout = TokenLayout(sites=tuple(sites), node_ids=node_ids.astype(np.int32), coordinates=coordinates.astype(np.float32))
    num_tokens = layout.num_tokens
    parents = decode_bool_matrix(graph["parents"])
    attention_mask = decode_bool_matrix(graph["attention_mask"])
    data_mask = np.array([character == "1" for character in graph["data_mask"]], dtype=bool)
    for name, array in (("parents", parents), ("attention_mask", attention_mask), ("data_mask", data_mask[None]),
                        ("transform mean", mean[None]), ("transform std", std[None])):
        if array.shape[-1] != num_tokens:
            raise CheckpointError(f"{where}: its {name} has {array.shape[-1]} tokens but its layout {num_tokens}.")

    network_config = sf.network_config
    abstract = nnx.eval_shape(lambda: SimformerNetwork(layout.num_nodes, network_config, rngs=nnx.Rngs(params=0)))
    graphdef, abstract_params, abstract_constants = nnx.split(abstract, nnx.Param, ...)
    restored = restore_arrays(path / _ARRAYS_DIR, {"params": abstract_params, "constants": abstract_constants},
                               arrays, where)

    sf._supports = supports
    sf._model_args, sf._model_kwargs = tuple(model_args), model_kwargs  # for the deterministic sites
    sf.variable_dims = None
    sf.layout = layout
    sf.parents = parents
    sf.attention_mask = attention_mask
    sf._data_mask = data_mask
    sf._has_children = {name: bool(value) for name, value in graph["has_children"].items()}
    sf.transform = TokenTransform(layout, tuple(site_bijection(site, supports[site.name], sf.interval_sites)
                                                for site in sites), mean, std)
    sf._graphdef, sf._constants, sf.params = graphdef, restored["constants"], restored["params"]
    sf.history = history
    sf.simulation_info = simulation_info
    sf.simulation_time = float(record.get("timings", {}).get("simulation_time", 0.0))
    sf.training_time = float(record.get("timings", {}).get("training_time", 0.0))
    sf._build_functions()
    sf._fitted = True
    return sf


# ---------------------------------------------------------------------------- training
def run_fingerprint(rng_key, data, data_mask, config, mask_distribution, tag: str = "") -> dict[str, str]:
    """What identifies a training run: a digest per ingredient, to say which one differs.

    The checkpoint settings themselves (``checkpoint_dir``, ``checkpoint_every``) are not
    part of it: changing them does not change the run.
    """
    sha = lambda payload: hashlib.sha256(payload).hexdigest()[:16]
    clean = dataclasses.replace(config, checkpoint_dir=None, checkpoint_every=1)
    return {
        "rng_key": sha(np.asarray(jax.random.key_data(rng_key)).tobytes()),
        "simulations": sha(np.ascontiguousarray(np.asarray(data, dtype=np.float32)).tobytes()),
        "data_mask": sha(np.asarray(data_mask, dtype=bool).tobytes()),
        "training_config": sha(json.dumps(encode_config(clean), sort_keys=True).encode()),
        "condition_masks": sha(json.dumps(encode_config(mask_distribution), sort_keys=True).encode()),
        "model": sha(tag.encode()),
    }


class TrainingCheckpointer:
    """Periodic checkpoints of the training loop in ``directory``, and resumption from them.

    Each checkpoint is a sub-directory ``training-{steps:09d}`` holding ``arrays/`` (the
    train state, the best EMA weights, written by Orbax) and ``state.json`` (the loop's
    scalars, history rows and run fingerprint), written last: a directory without it is
    an interrupted write and is ignored. Only the newest complete checkpoint is kept.

    Args:
        directory: the folder (created if missing).
        fingerprint: from :func:`run_fingerprint`; a checkpoint of another run is refused.
    """

    def __init__(self, directory, fingerprint: Mapping[str, str]):
        self.directory = pathlib.Path(directory)
        self.fingerprint = dict(fingerprint)

    def _complete(self) -> list[pathlib.Path]:
        if not self.directory.exists():
            return []
        found = [
            entry for entry in self.directory.iterdir()
            if entry.is_dir() and entry.name.startswith(_TRAINING_PREFIX) and entry.name[len(_TRAINING_PREFIX):].isdigit()
            and (entry / _TRAINING_STATE_FILE).exists()
        ]
        return sorted(found, key=lambda entry: int(entry.name[len(_TRAINING_PREFIX):]))

    def latest(self) -> pathlib.Path | None:
        """The newest complete checkpoint, or ``None``."""
        complete = self._complete()
        return complete[-1] if complete else None

    def restore(self, template):
        """The newest checkpoint's loop state in the structure of ``template``, else ``template``.

        Raises:
            CheckpointError: when the newest checkpoint is damaged or belongs to another run.
        """
        latest = self.latest()
        if latest is None:
            return template
        where = f"Training checkpoint {str(latest)!r}"
        record = read_json(latest / _TRAINING_STATE_FILE, where)
        stored = record.get("fingerprint", {})
        differing = [name for name, value in self.fingerprint.items() if stored.get(name) != value]
        if differing:
            raise CheckpointError(
                f"{where} was written by a different training run (its {', '.join(differing)} differ). "
                "Resume with the same key, model, simulations and configuration, or point "
                "`TrainingConfig.checkpoint_dir` at an empty folder (or delete this one)."
            )
        try:
            loop = record["loop"]
            arrays = restore_arrays(
                latest / _ARRAYS_DIR,
                {"train_state": template.train_state, "best_params": template.best_params},
                record["arrays"],
                where,
            )
            return template._replace(
                train_state=arrays["train_state"],
                best_params=arrays["best_params"],
                calls_done=int(loop["calls_done"]),
                rows=tuple(tuple(row) for row in loop["rows"]),
                recent_losses=np.asarray(loop["recent_losses"], dtype=np.float32),
                best_loss=float(loop["best_loss"]) if loop["best_loss"] is not None else math.inf,
                best_step=int(loop["best_step"]),
                stale=int(loop["stale"]),
                stopped_early=bool(loop["stopped_early"]),
                finished=bool(loop["finished"]),
                elapsed=float(loop["elapsed"]),
                plateau_reductions=int(loop["plateau_reductions"]),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: {_TRAINING_STATE_FILE} lacks or garbles a field ({error}).") from None

    def save(self, loop) -> pathlib.Path:
        """Write ``loop`` (a :class:`~numpyro_simformer.train.LoopState`) and drop older checkpoints."""
        self.directory.mkdir(parents=True, exist_ok=True)
        step = int(np.asarray(loop.train_state.step))
        target = self.directory / f"{_TRAINING_PREFIX}{step:09d}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        record = record_header()
        record["fingerprint"] = self.fingerprint
        record["arrays"] = save_arrays(target / _ARRAYS_DIR,
                                        {"train_state": loop.train_state, "best_params": loop.best_params})
        record["loop"] = {
            "calls_done": int(loop.calls_done),
            "rows": [list(map(float, row)) for row in loop.rows],
            "recent_losses": np.asarray(loop.recent_losses, dtype=np.float32).tolist(),
            "best_loss": None if not math.isfinite(loop.best_loss) else float(loop.best_loss),
            "best_step": int(loop.best_step),
            "stale": int(loop.stale),
            "stopped_early": bool(loop.stopped_early),
            "finished": bool(loop.finished),
            "elapsed": float(loop.elapsed),
            "plateau_reductions": int(loop.plateau_reductions),
        }
        write_json(target / _TRAINING_STATE_FILE, record)
        for entry in self.directory.iterdir():  # older checkpoints and interrupted writes
            if entry.is_dir() and entry.name.startswith(_TRAINING_PREFIX) and entry != target:
                shutil.rmtree(entry, ignore_errors=True)
        return target
