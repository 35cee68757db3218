"""Save and load a fitted Simformer; checkpoint and resume a long training run.

A Simformer checkpoint is a directory with two parts and no pickle:

- ``simformer.json``: everything that is not a network weight, as plain JSON: the format
  version and library version, the token layout (site names, shapes, event dims, dims,
  discrete flags, supports, node ids, coordinates), the parents graph, the attention
  mask, the data mask, the token grouping (which elements share a token, and the tokens'
  attention mask) when there is one, the z-scoring mean and standard deviation, the options given to
  the constructor (configurations are stored as their type name and fields), the network
  configuration the fit resolved (its depth, when the default let it follow the model), the
  training history, the simulation info, and a SHA-256 digest of the weights.
- ``arrays/``: the network's parameters and its fixed constants, written by Orbax.

:func:`read_checkpoint` reads the directory against the user's model (``Simformer.load`` builds the object): the
model is traced once and its sites must match the checkpoint's (names, shapes, event
dims, discrete flags, supports); a difference raises :class:`ModelMismatchError` naming
the site. An unreadable, truncated or altered checkpoint raises :class:`CheckpointError`
naming the path, never an error from deep inside Orbax or the JSON parser. A loaded
object gives bit for bit the samples of the saved one for the same key.


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
import numpyro
from flax import nnx
from numpyro.distributions import constraints

from numpyro_simformer.model.graph import element_parents
from numpyro_simformer.model.simulate import SimulationInfo, simulate
from numpyro_simformer.model.sites import SiteInfo, read_sites, trace_model
from numpyro_simformer.model.spec import ModelOptions, ModelSpec
from numpyro_simformer.nn import NetworkConfig
from numpyro_simformer.training.state import FittedState, network_for_spec
from numpyro_simformer.tokens.grouping import TokenGrouping
from numpyro_simformer.tokens.layout import TokenLayout
from numpyro_simformer.tokens.transforms import TokenTransform, site_bijection
from numpyro_simformer.training.loop import TrainingHistory

from numpyro_simformer.io.serialization import (
    FORMAT_VERSION,
    CheckpointError,
    ModelMismatchError,
    check_publish_target,
    check_record_seal,
    seal_record,
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
    "read_checkpoint",
    "encode_config",
    "decode_config",
]

_METADATA_FILE = "simformer.json"
_ARRAYS_DIR = "arrays"


# ---------------------------------------------------------------------------- Simformer
def _options_record(sf) -> dict:
    options = sf.model_options
    attention = options.attention
    attention = attention if isinstance(attention, str) else {"bool_matrix": encode_bool_matrix(attention)}
    return {
        "num_simulations": sf.num_simulations,
        "network": encode_config(sf.network_config),
        "sde": encode_config(sf.sde),
        "training": encode_config(sf.training_config),
        "sampler": encode_config(sf.sampler),
        "condition_masks": encode_config(sf.condition_masks),
        "attention": attention,
        "parents": None if options.parents is None else encode_bool_matrix(options.parents),
        "token_sites": None if options.token_sites is None else list(options.token_sites),
        "exclude_sites": list(options.exclude_sites),
        "data_sites": None if options.data_sites is None else list(options.data_sites),
        "simulation_chunk_size": sf.simulation_chunk_size,
        "interval_sites": sf.interval_sites,
        "discrete_sites": sf.discrete_sites,
        "elements_per_token": options.elements_per_token,
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
        "discrete_sites": record.get("discrete_sites", "integers"),  # absent: trained on the integers
        "elements_per_token": record.get("elements_per_token"),  # absent before grouping: None reads the same
        "progress_bar": record["progress_bar"],
    }


def _grouping_from_record(record: dict | None, where: str) -> TokenGrouping | None:
    if record is None:
        return None
    try:
        members = decode_array(record["members"]).astype(np.int32)
        mask = decode_bool_matrix(record["attention_mask"])
        per_token = {str(name): int(k) for name, k in record["elements_per_token"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{where}: its grouping record is garbled ({type(error).__name__}: {error}).") from None
    if members.ndim != 2 or mask.shape != (members.shape[0],) * 2:
        raise CheckpointError(f"{where}: its grouping has {members.shape} members but a {mask.shape} attention mask.")
    return TokenGrouping(members=members, attention_mask=mask, elements_per_token=per_token)


def save_simformer(sf, path, *, overwrite: bool = False) -> pathlib.Path:
    """Write a fitted Simformer to the directory ``path`` (see the module docstring).

    The checkpoint is written next to ``path`` and renamed into place, so an interrupted
    save never leaves a half-written checkpoint under ``path``; of two saves racing to one
    new ``path`` without ``overwrite``, one succeeds and the other raises
    ``FileExistsError`` (:func:`~numpyro_simformer.io.serialization.publish_directory`).

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
    state = sf.state
    spec = state.spec
    layout = spec.layout
    record = record_header()
    record["options"] = _options_record(sf)
    record["fitted_network"] = encode_config(state.network)  # the depth the fit resolved
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
                "transform_support": "site" if spec.supports[site.name] is site.support else "real",
            }
            for site in layout.sites
        ],
        "node_ids": encode_array(layout.node_ids),
        "coordinates": encode_array(layout.coordinates),
    }
    record["graph"] = {
        "parents": encode_bool_matrix(spec.parents),
        "attention_mask": encode_bool_matrix(spec.attention_mask),
        "data_mask": encode_bool_matrix(np.asarray(spec.data_mask)[None])[0],
        "has_children": {name: bool(value) for name, value in spec.has_children.items()},
    }
    if spec.grouping is not None:  # the tokens the network was trained on: stored, never recomputed
        record["grouping"] = {
            "members": encode_array(spec.grouping.members),
            "attention_mask": encode_bool_matrix(spec.grouping.attention_mask),
            "elements_per_token": dict(spec.grouping.elements_per_token),
        }
    record["transform"] = {"mean": encode_array(state.transform.mean), "std": encode_array(state.transform.std)}
    record["history"] = encode_named_tuple(state.history)
    record["simulation_info"] = encode_named_tuple(state.simulation_info)
    record["timings"] = {"simulation_time": float(state.simulation_time), "training_time": float(state.training_time)}
    record["model_fingerprint"] = {name: encode_array(value) for name, value in
                                   model_fingerprint(spec.model, spec.model_args, spec.model_kwargs,
                                                     layout.site_names).items()}
    staging = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
    try:
        record["arrays"] = save_arrays(staging / _ARRAYS_DIR, {"params": state.params, "constants": state.constants})
        write_json(staging / _METADATA_FILE, seal_record(record))
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


# Joint draws under a fixed key that stand for the model's prior and simulator.
_FINGERPRINT_DRAWS = 8
_FINGERPRINT_KEY = 0


def model_fingerprint(model: Callable, model_args: tuple, model_kwargs: Mapping, site_names) -> dict[str, np.ndarray]:
    """``{site: (draws, *site shape)}``: the model's joint draws under a fixed key.

    A changed prior or simulator changes them (a different location, scale or
    function), whatever the names and shapes of the sites; ``load`` compares them.
    """
    draws, _ = simulate(jax.random.key(_FINGERPRINT_KEY), model, _FINGERPRINT_DRAWS, list(site_names),
                        tuple(model_args), dict(model_kwargs), chunk_size=_FINGERPRINT_DRAWS)
    return {name: np.asarray(value, dtype=np.float64) for name, value in draws.items()}


def _check_model(model, model_args, model_kwargs, layout, options, stored_parents, stored_fingerprint, where):
    """Refuse a model whose draws or graph differ from the fitted model's, naming what differs."""
    problems = []
    if stored_fingerprint is not None:
        now = model_fingerprint(model, model_args, model_kwargs, layout.site_names)
        for name in layout.site_names:
            stored = decode_array(stored_fingerprint[name]) if name in stored_fingerprint else None
            if stored is None or stored.shape != now[name].shape or not np.allclose(
                    stored, now[name], rtol=1e-4, atol=1e-6, equal_nan=True):
                problems.append(f"site {name!r} draws other values under a fixed key (its prior or simulator "
                                "changed)")
    if options.parents is None:
        with numpyro.validation_enabled(False):
            labels, parents = element_parents(model, model_args, model_kwargs, token_sites=layout.site_names,
                                              exclude_sites=options.exclude_sites, rng_key=jax.random.key(0))
        changed = np.flatnonzero((np.asarray(parents, bool) != stored_parents).any(axis=1))
        if changed.size:
            problems.append("the dependency graph differs at tokens " + ", ".join(
                repr(labels[index]) for index in changed[:6]) + (" ..." if changed.size > 6 else ""))
    if problems:
        raise ModelMismatchError(
            f"{where}: the model is not the one this checkpoint was fitted with: " + "; ".join(problems) + ". Load "
            "it with the model (and model arguments) it was fitted with, or pass `check_model=False` to load the "
            "network into a model you changed on purpose."
        )


def read_checkpoint(path, model: Callable, model_args: tuple = (), model_kwargs: Mapping | None = None, *,
                    check_model: bool = True) -> tuple[dict, FittedState]:
    """Read a checkpoint directory against the user's model: the constructor options and the fitted state.

    ``Simformer.load`` builds the object from them: ``Simformer(model, **options)`` holding ``state``.

    Args:
        path: a directory written by :func:`save_simformer` (``Simformer.save``).
        model: the NumPyro model it was fitted with.
        model_args, model_kwargs: the model's arguments, as given to ``fit``.
        check_model: compare the model with the one that was fitted beyond its sites: its
            element-level graph, and its prior and simulator through draws under a fixed
            key (:func:`model_fingerprint`). ``False`` loads into a model changed on purpose
            (the sites' names, shapes and supports must still match).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        CheckpointError: when the checkpoint is unreadable, truncated or altered (its
            record is sealed by a digest of itself, its weights by theirs).
        ModelMismatchError: when the model's sites differ from the checkpoint's, or (with
            ``check_model``) its graph or its draws do; the message names what differs.
    """
    model_kwargs = dict(model_kwargs or {})
    path = pathlib.Path(path)
    where = f"Checkpoint {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist.")
    if not path.is_dir():
        raise CheckpointError(f"{where} is a file; a Simformer checkpoint is a directory written by `save`.")
    record = read_json(path / _METADATA_FILE, where)
    check_record_seal(record, where)
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
        # the depth the fit resolved; checkpoints from before the default depth grew with the
        # model have none, and their "network" always had an integer depth
        network = decode_config(record["fitted_network"]) if "fitted_network" in record else options["network"]
        if not isinstance(network, NetworkConfig) or network.num_layers is None:
            raise CheckpointError(f"{where}: its fitted network record is garbled ({network!r}).")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{where}: {_METADATA_FILE} lacks or garbles a field ({type(error).__name__}: {error}).") from None

    model_options = ModelOptions(**{name: options[name] for name in
                                    ("attention", "parents", "token_sites", "exclude_sites", "data_sites",
                                     "elements_per_token")})
    grouping = _grouping_from_record(record.get("grouping"), where)
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

    if check_model:
        _check_model(model, tuple(model_args), model_kwargs, layout, model_options, parents,
                     record.get("model_fingerprint"), where)
    data_sites = tuple(name for name, part in layout.slices().items() if data_mask[part].all())
    spec = ModelSpec(model=model, model_args=tuple(model_args), model_kwargs=model_kwargs, options=model_options,
                     layout=layout, supports=supports, parents=parents, attention_mask=attention_mask,
                     has_children={name: bool(value) for name, value in graph["has_children"].items()},
                     data_sites=data_sites, grouping=grouping)
    if not np.array_equal(spec.data_mask, data_mask):
        raise CheckpointError(f"{where}: its data mask covers parts of sites; it was not written by `save`.")
    if grouping is not None and (grouping.members.max() >= num_tokens or grouping.num_elements != num_tokens):
        raise CheckpointError(f"{where}: its grouping does not cover the layout's {num_tokens} elements once each.")
    abstract = nnx.eval_shape(lambda: network_for_spec(spec, network, nnx.Rngs(params=0)))
    graphdef, abstract_params, abstract_constants = nnx.split(abstract, nnx.Param, ...)
    restored = restore_arrays(path / _ARRAYS_DIR, {"params": abstract_params, "constants": abstract_constants},
                               arrays, where)
    transform = TokenTransform(layout, tuple(site_bijection(site, supports[site.name], options["interval_sites"])
                                             for site in sites), mean, std)
    timings = record.get("timings", {})
    state = FittedState(
        spec=spec, transform=transform, network=network, sde=options["sde"], graphdef=graphdef,
        constants=restored["constants"], params=restored["params"], history=history,
        simulation_info=simulation_info, simulation_time=float(timings.get("simulation_time", 0.0)),
        training_time=float(timings.get("training_time", 0.0)),
    )
    return options, state
