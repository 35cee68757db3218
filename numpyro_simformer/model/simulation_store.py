"""Simulations kept on disk: one ``.npz`` file per finished chunk, each written atomically.

A simulation directory holds::

    simulations.json     what was asked: the key, num_simulations, chunk_size, the sites and shapes
    chunk-00000.npz      {site name: float32 (rows, *site shape)}: the rows of chunk 0, NaN rows included
    chunk-00001.npz      ... one file per finished chunk
    report.json          the last run's report: chunks reused, simulated, rerun, failed, with errors

Every file is written to a temporary name in the same folder (starting with ``.``) and
renamed into place (``os.replace``), so a chunk file is either absent or complete: a killed
process or a full disk leaves at most a stray temporary file, which is never read as data
(and is removed by the next run). The chunk files need no library to read::

    import numpy as np, pathlib
    chunks = sorted(pathlib.Path("sims").glob("chunk-*.npz"))
    theta = np.concatenate([np.load(path)["theta"] for path in chunks])

:func:`read_simulations` does this, checks that every chunk is there, and returns the
``{site: array}`` dict that :meth:`~numpyro_simformer.Simformer.fit_simulations` takes.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import tempfile
import zipfile
from typing import Mapping

import numpy as np

__all__ = ["SimulationStore", "SimulationDirectoryError", "read_simulations", "FORMAT_NAME", "FORMAT_VERSION",
           "MANIFEST", "REPORT"]

FORMAT_NAME = "numpyro_simformer.simulations"
FORMAT_VERSION = 1
MANIFEST = "simulations.json"
REPORT = "report.json"
# What identifies a simulation set: the same values here give the same draws, chunk by chunk.
_IDENTITY = ("num_simulations", "chunk_size", "rng_key", "sites")
_TEMPORARY = re.compile(r"^\.(chunk-\d+\.npz|simulations\.json|report\.json)\..*\.tmp$")


class SimulationDirectoryError(ValueError):
    """A simulation directory holds another simulation set, or cannot be read as one."""


def _write_atomically(path: pathlib.Path, write) -> None:
    """``write(stream)`` into a temporary file beside ``path``, flushed to disk, then renamed onto ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise


def _write_json(path: pathlib.Path, record: dict) -> None:
    _write_atomically(path, lambda stream: stream.write(json.dumps(record, indent=1).encode()))


class SimulationStore:
    """A simulation directory: its manifest, and its chunks read and written by index.

    Build one with :meth:`open` (create, or check that an existing directory holds the same
    simulation set) or :meth:`read` (an existing directory, as it is).
    """

    def __init__(self, directory: pathlib.Path, manifest: Mapping):
        self.directory = pathlib.Path(directory)
        self.manifest = dict(manifest)

    # ------------------------------------------------------------------ the manifest
    @staticmethod
    def manifest_for(rng_key_record: Mapping, num_simulations: int, chunk_size: int,
                     shapes: Mapping[str, tuple]) -> dict:
        """The manifest of a simulation set; ``rng_key_record`` is ``{"impl", "data"}`` of the key."""
        from numpyro_simformer import __version__

        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "num_simulations": int(num_simulations),
            "chunk_size": int(chunk_size),
            "num_chunks": -(-int(num_simulations) // int(chunk_size)),
            "rng_key": dict(rng_key_record),
            "sites": [{"name": name, "shape": [int(n) for n in shape], "dtype": "float32"}
                      for name, shape in shapes.items()],
            "chunk_files": "chunk-{index:05d}.npz (zero-padded to at least 5 digits)",
        }

    @classmethod
    def open(cls, directory, manifest: Mapping) -> "SimulationStore":
        """Create ``directory`` for ``manifest``'s simulation set, or reopen it to resume.

        Stray temporary files of a killed run are removed (one run per directory at a time).

        Raises:
            SimulationDirectoryError: the directory holds another simulation set (another
                key, number of simulations, chunk size or sites), or files that are not one.
        """
        directory = pathlib.Path(directory)
        if directory.exists() and not directory.is_dir():
            raise SimulationDirectoryError(f"simulation_dir={str(directory)!r} is a file; it must be a directory.")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MANIFEST
        if not path.exists():
            strangers = [p.name for p in directory.iterdir() if not _TEMPORARY.match(p.name)]
            if strangers:
                raise SimulationDirectoryError(
                    f"simulation_dir={str(directory)!r} is not empty and holds no {MANIFEST} (found "
                    f"{sorted(strangers)[:5]}): it is not a simulation directory. Choose a new or empty folder."
                )
            _write_json(path, dict(manifest))
            store = cls(directory, manifest)
        else:
            store = cls.read(directory)
            changed = [name for name in _IDENTITY if store.manifest.get(name) != manifest[name]]
            if changed:
                raise SimulationDirectoryError(
                    f"simulation_dir={str(directory)!r} holds another simulation set: its {', '.join(changed)} "
                    f"differ from this run's ({', '.join(f'{n}={_short(manifest[n])}' for n in changed)} here, "
                    f"{', '.join(f'{n}={_short(store.manifest.get(n))}' for n in changed)} on disk). Its chunks "
                    "cannot be reused: choose another folder, or delete this one to start over."
                )
        for stray in directory.iterdir():
            if _TEMPORARY.match(stray.name):
                stray.unlink(missing_ok=True)
        return store

    @classmethod
    def read(cls, directory) -> "SimulationStore":
        """The simulation directory at ``directory``, as it is on disk."""
        directory = pathlib.Path(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise SimulationDirectoryError(f"{directory} holds no {MANIFEST}: it is not a simulation directory.") from None
        except (OSError, ValueError) as error:
            raise SimulationDirectoryError(f"{path} cannot be read ({error}).") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise SimulationDirectoryError(f"{path} is not a numpyro_simformer simulation manifest.")
        if not isinstance(manifest.get("format_version"), int) or manifest["format_version"] > FORMAT_VERSION:
            raise SimulationDirectoryError(
                f"{path} has format version {manifest.get('format_version')!r}; this version of numpyro_simformer "
                f"reads up to {FORMAT_VERSION}. Upgrade the library."
            )
        return cls(directory, manifest)

    # ------------------------------------------------------------------ chunks
    @property
    def num_chunks(self) -> int:
        return int(self.manifest["num_chunks"])

    @property
    def shapes(self) -> dict[str, tuple]:
        return {site["name"]: tuple(site["shape"]) for site in self.manifest["sites"]}

    def chunk_rows(self, index: int) -> tuple[int, int]:
        """``(start, stop)``: the simulations chunk ``index`` holds."""
        size = int(self.manifest["chunk_size"])
        return index * size, min((index + 1) * size, int(self.manifest["num_simulations"]))

    def chunk_path(self, index: int) -> pathlib.Path:
        return self.directory / f"chunk-{index:05d}.npz"

    def finished_chunks(self) -> list[int]:
        """Indices of the chunks with a file on disk (temporary files are not chunks)."""
        found = (re.fullmatch(r"chunk-(\d+)\.npz", path.name) for path in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match and int(match.group(1)) < self.num_chunks)

    def read_chunk(self, index: int) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """``(draws, None)`` for a complete chunk on disk; ``(None, why)`` when it is absent or damaged."""
        path = self.chunk_path(index)
        if not path.exists():
            return None, "absent"
        start, stop = self.chunk_rows(index)
        try:
            with np.load(path, allow_pickle=False) as data:
                draws = {name: np.asarray(data[name]) for name in self.shapes}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            return None, f"{path.name} cannot be read ({type(error).__name__}: {error})"
        for name, shape in self.shapes.items():
            if draws[name].shape != (stop - start, *shape):
                return None, (f"{path.name} holds {name!r} of shape {draws[name].shape}; expected "
                              f"{(stop - start, *shape)}")
        return draws, None

    def write_chunk(self, index: int, draws: Mapping[str, np.ndarray]) -> None:
        """Write chunk ``index`` atomically (a temporary file, then a rename)."""
        arrays = {name: np.asarray(draws[name], dtype=np.float32) for name in self.shapes}
        _write_atomically(self.chunk_path(index), lambda stream: np.savez(stream, **arrays))

    def write_report(self, record: dict) -> None:
        _write_json(self.directory / REPORT, record)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_simulations(directory) -> dict[str, np.ndarray]:
    """The simulations in a simulation directory, as ``{site: array (num_simulations, *site shape)}``.

    The rows are in chunk order, NaN rows included (``Simformer.fit_simulations`` drops and
    counts them), so the result is exactly what the run that wrote the directory simulated::

        sf.fit_simulations(jax.random.key(2), read_simulations("sims"))

    Raises:
        SimulationDirectoryError: ``directory`` is not a simulation directory, or chunks are
            missing or damaged (an interrupted run: run the simulation again with the same
            key and directory to finish it).
    """
    store = SimulationStore.read(directory)
    chunks, problems = [], []
    for index in range(store.num_chunks):
        draws, why = store.read_chunk(index)
        if draws is None:
            problems.append(f"chunk {index}: {why}")
        chunks.append(draws)
    if problems:
        raise SimulationDirectoryError(
            f"{directory} is incomplete: {len(problems)} of {store.num_chunks} chunks are missing or damaged "
            f"({'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}). Run the simulation again with the "
            "same key and directory to finish it: only these chunks are simulated."
        )
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in store.shapes}
