"""How a checkpoint's parts become files: configurations as JSON, arrays with Orbax.

Configuration objects (frozen dataclasses) are stored as their type name and fields
(:func:`encode_config`) and rebuilt only from ``numpyro_simformer``'s own classes
(:func:`decode_config`): a checkpoint never runs code of its own, and there is no pickle.
Arrays are written with Orbax, flattened to numbered leaves, with their paths, shapes,
dtypes and a SHA-256 digest in the JSON record, so that a damaged or altered file and a
network of another size are both caught with a clear :class:`CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import errno
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CheckpointError",
    "ModelMismatchError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "seal_record",
    "check_record_seal",
    "encode_config",
    "decode_config",
    "encode_array",
    "decode_array",
    "encode_bool_matrix",
    "decode_bool_matrix",
    "encode_named_tuple",
    "decode_named_tuple",
    "support_record",
    "same_support",
    "save_arrays",
    "restore_arrays",
    "read_json",
    "write_json",
    "record_header",
    "check_publish_target",
    "publish_directory",
    "ensure_writable_directory",
]

FORMAT_NAME = "numpyro_simformer.checkpoint"  # a name in the files, not a module path: never changes
# 2: the record is sealed by a digest of itself (RECORD_DIGEST) and holds a fingerprint of
# the model (fixed-key draws); version 1 checkpoints load without either check.
FORMAT_VERSION = 2
RECORD_DIGEST = "record_sha256"


class CheckpointError(ValueError):
    """A checkpoint cannot be read: missing, truncated, altered, or of an unknown format."""


class ModelMismatchError(CheckpointError):
    """The model given to ``load`` has sites that differ from those in the checkpoint."""


# ---------------------------------------------------------------------------- JSON pieces
def encode_config(value: Any) -> Any:
    """A configuration object as JSON data: dataclasses as ``{"type", "fields"}``.

    Frozen dataclasses (``NetworkConfig``, ``VESDE``, ``EulerMaruyama`` ...) are stored as
    their ``module.QualName`` and their fields, recursively; tuples become lists.

    Raises:
        TypeError: for a value that is not a dataclass, number, string, bool, None,
            sequence or mapping of those.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": f"{type(value).__module__}.{type(value).__qualname__}",
            "fields": {field.name: encode_config(getattr(value, field.name)) for field in dataclasses.fields(value)},
        }
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [encode_config(item) for item in value]
    if isinstance(value, Mapping):
        return {"mapping": {str(key): encode_config(item) for key, item in value.items()}}
    raise TypeError(
        f"Cannot store a {type(value).__name__} in a checkpoint; configuration objects must be "
        "frozen dataclasses of numbers, strings, bools and tuples."
    )


# Modules that moved in 0.2.0 (the package's subpackages): checkpoints written before name
# their configuration classes by the old paths.
_MOVED_MODULES = {
    "numpyro_simformer.sde": "numpyro_simformer.diffusion.sde",
    "numpyro_simformer.masks": "numpyro_simformer.diffusion.masks",
    "numpyro_simformer.train": "numpyro_simformer.training.loop",
    "numpyro_simformer.density": "numpyro_simformer.inference.density",
}
# Fields a class no longer has, with the only value an old checkpoint can hold for them.
_RETIRED_FIELDS = {"NetworkConfig": {"variable_size": False}}


def decode_config(record: Any) -> Any:
    """Inverse of :func:`encode_config`; only classes of ``numpyro_simformer`` are rebuilt.

    Raises:
        CheckpointError: for a type outside ``numpyro_simformer`` or one that no longer
            exists or takes other fields.
    """
    if isinstance(record, list):
        return tuple(decode_config(item) for item in record)
    if isinstance(record, dict) and set(record) == {"mapping"}:
        return {key: decode_config(item) for key, item in record["mapping"].items()}
    if isinstance(record, dict):
        type_name = record["type"]
        module_name, _, qualname = type_name.rpartition(".")
        module_name = _MOVED_MODULES.get(module_name, module_name)
        if not (module_name == "numpyro_simformer" or module_name.startswith("numpyro_simformer.")):
            raise CheckpointError(
                f"The checkpoint holds a {type_name}, defined outside numpyro_simformer; checkpoints "
                "only rebuild the library's own components. Load it with the library's components "
                "or rebuild the object by hand."
            )
        try:
            cls = getattr(importlib.import_module(module_name), qualname)
        except (ImportError, AttributeError) as error:
            raise CheckpointError(
                f"The checkpoint holds a {type_name}, which this version of numpyro_simformer does not "
                f"have ({error})."
            ) from None
        if not dataclasses.is_dataclass(cls):
            raise CheckpointError(f"The checkpoint names {type_name}, which is not a configuration dataclass.")
        fields = {name: decode_config(value) for name, value in record["fields"].items()}
        for name, value in _RETIRED_FIELDS.get(qualname, {}).items():
            if fields.get(name, value) == value:
                fields.pop(name, None)
        try:
            return cls(**fields)
        except TypeError as error:
            raise CheckpointError(f"Cannot rebuild {type_name} from the checkpoint's fields: {error}.") from None
    return record


def encode_array(array) -> dict:
    array = np.asarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape), "values": array.reshape(-1).tolist()}


def decode_array(record: dict) -> np.ndarray:
    return np.asarray(record["values"], dtype=np.dtype(record["dtype"])).reshape(record["shape"])


def encode_bool_matrix(matrix) -> list[str]:
    """A bool matrix as one string of ``0``/``1`` per row: compact and readable."""
    digits = np.asarray(matrix, dtype=bool).astype(np.uint8) + ord("0")
    return [row.tobytes().decode("ascii") for row in np.atleast_2d(digits)]


def decode_bool_matrix(rows: list[str]) -> np.ndarray:
    return np.array([np.frombuffer(row.encode("ascii"), np.uint8) == ord("1") for row in rows],
                    dtype=bool).reshape(len(rows), -1)


def encode_named_tuple(value) -> dict:
    out = {}
    for name, item in value._asdict().items():
        if isinstance(item, (np.ndarray, jax.Array)):
            out[name] = {"array": encode_array(item)}
        else:
            out[name] = encode_config(item)
    return out


def decode_named_tuple(cls, record: dict):
    values = {}
    for name, item in record.items():
        if name not in cls._fields:
            continue  # written by a version with more fields
        values[name] = decode_array(item["array"]) if isinstance(item, dict) and "array" in item else item
    return cls(**values)


def support_record(support) -> dict:
    """The parts of a NumPyro constraint that decide its bijection: types, event dim, bounds."""
    from numpyro_simformer.model.sites import support_bounds

    names, inner = [], support
    while hasattr(inner, "base_constraint"):
        names.append(type(inner).__name__)
        inner = inner.base_constraint
    names.append(type(inner).__name__)
    lower, upper = support_bounds(support)
    as_list = lambda bound: None if bound is None else np.asarray(bound, dtype=np.float64).tolist()
    return {"constraint": "/".join(names), "event_dim": int(support.event_dim), "lower": as_list(lower),
            "upper": as_list(upper)}


def same_support(a: dict, b: dict) -> bool:
    if a["constraint"] != b["constraint"] or a["event_dim"] != b["event_dim"]:
        return False
    for key in ("lower", "upper"):
        if (a[key] is None) != (b[key] is None):
            return False
        if a[key] is not None:
            try:
                if not np.allclose(np.asarray(a[key], dtype=np.float64), np.asarray(b[key], dtype=np.float64),
                                   rtol=1e-6, atol=0.0, equal_nan=True):
                    return False
            except ValueError:  # bounds of shapes that do not broadcast
                return False
    return True


# ---------------------------------------------------------------------------- arrays
def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _digest(groups: Mapping[str, list[np.ndarray]]) -> str:
    sha = hashlib.sha256()
    for name in sorted(groups):
        sha.update(name.encode())
        for leaf in groups[name]:
            leaf = np.ascontiguousarray(leaf)
            sha.update(f"{leaf.dtype.str}{leaf.shape}".encode())
            sha.update(leaf.tobytes())
    return sha.hexdigest()


def save_arrays(directory: pathlib.Path, trees: Mapping[str, Any]) -> dict:
    """Write the leaves of each tree with Orbax; return their description and digest."""
    import orbax.checkpoint as ocp

    groups = {name: _leaves(tree) for name, tree in trees.items()}
    payload = {name: {f"{index:05d}": leaf for index, leaf in enumerate(leaves)} for name, leaves in groups.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.absolute(), payload)
        checkpointer.wait_until_finished()
    return {
        "files": _file_digests(directory),
        "groups": {
            name: {
                "paths": [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(trees[name])[0]],
                "shapes": [list(leaf.shape) for leaf in leaves],
                "dtypes": [leaf.dtype.str for leaf in leaves],
            }
            for name, leaves in groups.items()
        },
        "sha256": _digest(groups),
    }


def _file_digests(directory: pathlib.Path) -> dict:
    """``{relative path: {"size", "sha256"}}`` of every file under ``directory``."""
    digests = {}
    for file in sorted(directory.rglob("*")):
        if file.is_file():
            digests[file.relative_to(directory).as_posix()] = {
                "size": file.stat().st_size, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
    return digests


def _check_files(directory: pathlib.Path, recorded: dict | None, where: str) -> None:
    """Compare the files Orbax wrote with their recorded sizes and digests.

    A damaged file is found here, before Orbax reads it: Orbax reports a failed read
    correctly, but its reads still pending then print dozens of "Event loop is closed"
    tracebacks. Checkpoints written before files were recorded (``None``) are not checked.
    """
    if recorded is None:
        return
    for name, expected in recorded.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{where}: the weights file {name} is missing from {directory}; the checkpoint "
                                  "is truncated or damaged. Save it again.")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{where}: the weights file {name} in {directory} has {size} bytes where "
                                  f"{expected['size']} were written; the checkpoint is truncated or damaged. "
                                  "Save it again.")
        if hashlib.sha256(file.read_bytes()).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{where}: the weights file {name} in {directory} does not match the digest "
                                  "recorded when it was saved; the files were altered or damaged. Save the "
                                  "checkpoint again.")


def restore_arrays(directory: pathlib.Path, templates: Mapping[str, Any], record: dict, where: str) -> dict:
    """Read the trees written by :func:`save_arrays` into the structure of ``templates``.

    The shapes and dtypes of the checkpoint must be those of the templates, and the
    digest must match: a changed network or an altered file is refused.
    """
    import orbax.checkpoint as ocp

    abstract, treedefs = {}, {}
    for name, template in templates.items():
        leaves, treedefs[name] = jax.tree.flatten(template)
        stored = record["groups"].get(name)
        if stored is None:
            raise CheckpointError(f"{where}: the checkpoint has no arrays {name!r}.")
        expected = [(list(np.shape(leaf)), np.dtype(leaf.dtype).str) for leaf in leaves]
        found = list(zip(stored["shapes"], stored["dtypes"]))
        if expected != found:
            differences = [
                f"{path}: stored {tuple(f[0])} {np.dtype(f[1]).name}, expected {tuple(e[0])} {np.dtype(e[1]).name}"
                for path, e, f in zip(stored["paths"], expected, found)
                if e != f
            ]
            if len(expected) != len(found):
                differences.insert(0, f"{len(found)} arrays stored, {len(expected)} expected")
            raise CheckpointError(
                f"{where}: the stored {name} do not fit this network ({'; '.join(differences[:4])}). "
                "Was the checkpoint written with another NetworkConfig?"
            )
        abstract[name] = {
            f"{index:05d}": jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for index, leaf in enumerate(leaves)
        }
    if not directory.is_dir():
        raise CheckpointError(f"{where}: the weights folder {directory} is missing; this is not a complete checkpoint.")
    _check_files(directory, record.get("files"), where)  # before Orbax: it reports damage noisily
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory.absolute(), args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
        raise CheckpointError(
            f"{where}: the weights in {directory} cannot be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:300]}). The checkpoint is truncated or damaged; save it again."
        ) from None
    groups = {name: [np.asarray(restored[name][key]) for key in sorted(restored[name])] for name in templates}
    if _digest(groups) != record["sha256"]:
        raise CheckpointError(
            f"{where}: the weights in {directory} do not match the digest recorded when they were "
            "saved; the files were altered or damaged. Save the checkpoint again."
        )
    return {name: jax.tree.unflatten(treedefs[name], [jnp.asarray(leaf) for leaf in groups[name]]) for name in templates}


def read_json(path: pathlib.Path, where: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path.name} is missing; this is not a complete checkpoint.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{where}: cannot read {path.name} ({error}).") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{where}: {path.name} is not valid JSON ({error}); the checkpoint is truncated or damaged."
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: {path.name} is not a numpyro_simformer checkpoint.")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {version!r} was written by numpyro_simformer "
            f"{record.get('library_version')}; this version reads up to {FORMAT_VERSION}. Upgrade the library."
        )
    return record


def write_json(path: pathlib.Path, record: dict) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        json.dump(record, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def _record_digest(record: Mapping) -> str:
    payload = json.dumps({key: value for key, value in record.items() if key != RECORD_DIGEST}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def seal_record(record: dict) -> dict:
    """``record`` with a SHA-256 digest of its own content (every field but the digest)."""
    return {**record, RECORD_DIGEST: _record_digest(record)}


def check_record_seal(record: Mapping, where: str) -> None:
    """Refuse a record whose content no longer matches its digest (version 2 and later).

    The digest catches edits and damage (a z-score shifted, a mask replaced, a NaN put in),
    not a forger who recomputes it: it is an integrity check, not a signature.
    """
    if record.get("format_version", 1) < 2:
        return  # written before records were sealed
    if record.get(RECORD_DIGEST) != _record_digest(record):
        raise CheckpointError(
            f"{where}: simformer.json does not match the digest recorded when it was saved; it was edited or "
            "damaged after `save`. Save the checkpoint again from the fitted Simformer (or fit again)."
        )


def record_header() -> dict:
    from numpyro_simformer import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------- publishing
def check_publish_target(path: pathlib.Path, overwrite: bool, marker: str) -> None:
    """Refuse early a ``path`` that :func:`publish_directory` would refuse or must not replace.

    Args:
        path: where a checkpoint directory is to appear.
        overwrite: whether an existing checkpoint there may be replaced.
        marker: a file name that every checkpoint of this kind holds (``simformer.json``).

    Raises:
        FileExistsError: ``path`` (or a folder above it) is a file; ``path`` exists and
            ``overwrite`` is false; or it is a non-empty directory without ``marker``.
    """
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            where = "" if folder == path else f" (a folder above {path})"
            raise FileExistsError(
                f"{folder} is a file{where}, not a directory: a checkpoint is a directory. Choose another path, "
                "or remove the file."
            )
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass `overwrite=True` to replace it, or choose another path.")
    if path.exists() and not (path / marker).exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is a non-empty directory that is not a checkpoint; refusing to replace it.")


def publish_directory(staging: pathlib.Path, path: pathlib.Path, overwrite: bool) -> None:
    """Move the finished directory ``staging`` to ``path`` in one rename; safe between processes.

    ``os.rename`` of a directory onto an existing non-empty directory fails (POSIX and
    Windows), so of two saves racing to one new ``path`` exactly one wins and the other
    raises; nothing is replaced unless ``overwrite``. With ``overwrite``, an existing
    ``path`` is first renamed aside and deleted after the new one is in place, so ``path``
    always holds one complete checkpoint (of the last save to publish).

    Args:
        staging: a complete directory on the same file system as ``path``.
        path: the destination.
        overwrite: replace what is at ``path``.

    Raises:
        FileExistsError: ``path`` exists (another save got there first) and not ``overwrite``.
    """
    retired = []
    try:
        for _ in range(100):  # each pass loses only to a save that publishes meanwhile
            try:
                os.rename(staging, path)
                return
            except OSError as error:
                taken = error.errno in (errno.EEXIST, errno.ENOTEMPTY) or isinstance(error, FileExistsError)
                if not taken:
                    raise
                if not overwrite:
                    raise FileExistsError(
                        f"{path} was written by another save while this one was running; pass `overwrite=True` to "
                        "replace it, or choose another path."
                    ) from None
            aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            try:
                os.rename(path, aside)
                retired.append(aside)
            except FileNotFoundError:  # another save moved it aside first
                pass
        raise RuntimeError(f"Could not publish {path}: other saves kept replacing it.")
    finally:
        for aside in retired:
            shutil.rmtree(aside, ignore_errors=True)


def ensure_writable_directory(path, argument: str) -> None:
    """Create the folder ``path`` and prove it writable (write and remove a probe file).

    Called before a fit starts, so that a folder that cannot take checkpoints is said at
    once and not after the simulations and the first training steps. ``None``: nothing.

    Raises:
        OSError: ``path`` cannot be created or written: ``PermissionError`` for a read-only
            folder, ``NotADirectoryError`` below a file, ...; the message names ``argument``.
    """
    if path is None:
        return
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        kind = type(error) if type(error) is not OSError else PermissionError
        raise kind(
            error.errno,
            f"{argument}={str(path)!r} cannot be written ({error.strerror or error}). Training checkpoints go "
            "there: choose a folder you can write, or set it to None.",
        ) from None
