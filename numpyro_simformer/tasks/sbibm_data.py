"""sbibm's observations and reference posterior samples, fetched once and cached.

sbibm (Lueckmann et al. 2021) ships, per task, 10 observations and 10,000 reference
posterior samples each, inside its wheel under
``sbibm/tasks/<task>/files/num_observation_<n>/``. We read only those files: on first use
the wheel is downloaded with pip (``pip download --no-deps sbibm==1.1.0``, no sbibm code
or dependencies are installed) and the CSV files of the tasks we use are extracted into
the cache directory: ``$NUMPYRO_SIMFORMER_CACHE/sbibm`` if that variable is set, else
``~/.cache/numpyro_simformer/sbibm``.
"""

from __future__ import annotations

import bz2
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = [
    "SBIBM_TASKS",
    "SbibmDataUnavailableError",
    "sbibm_cache_dir",
    "ensure_sbibm_files",
    "load_sbibm_array",
]

SBIBM_VERSION = "1.1.0"
SBIBM_TASKS = ("gaussian_linear", "gaussian_mixture", "two_moons", "slcp")
NUM_OBSERVATIONS = 10
_FILES = ("observation.csv", "true_parameters.csv", "reference_posterior_samples.csv.bz2")


class SbibmDataUnavailableError(RuntimeError):
    """sbibm's files are not in the cache and could not be downloaded."""


def sbibm_cache_dir() -> Path:
    """Where the sbibm files live: ``$NUMPYRO_SIMFORMER_CACHE/sbibm`` or ``~/.cache/numpyro_simformer/sbibm``."""
    root = os.environ.get("NUMPYRO_SIMFORMER_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "numpyro_simformer"
    return base / "sbibm"


def _task_complete(directory: Path) -> bool:
    return all(
        (directory / f"num_observation_{number}" / name).is_file()
        for number in range(1, NUM_OBSERVATIONS + 1)
        for name in _FILES
    )


def _download_wheel(destination: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"sbibm=={SBIBM_VERSION}"]
    try:
        result = subprocess.run(
            command + ["-d", str(destination)], capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SbibmDataUnavailableError(f"Running {' '.join(command)} failed: {error}") from error
    wheels = sorted(destination.glob("sbibm-*.whl"))
    if result.returncode != 0 or not wheels:
        raise SbibmDataUnavailableError(
            f"Could not download the sbibm {SBIBM_VERSION} wheel with `{' '.join(command)}` "
            f"(exit code {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return wheels[0]


def _extract(wheel: Path, cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(dir=cache) as staging:
        for task in SBIBM_TASKS:
            for number in range(1, NUM_OBSERVATIONS + 1):
                for name in _FILES:
                    member = f"sbibm/tasks/{task}/files/num_observation_{number}/{name}"
                    target = Path(staging) / task / f"num_observation_{number}" / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
        for task in SBIBM_TASKS:
            if not _task_complete(cache / task):  # another process may have finished first
                shutil.rmtree(cache / task, ignore_errors=True)
                os.replace(Path(staging) / task, cache / task)


def ensure_sbibm_files(task: str) -> Path:
    """The directory holding sbibm's files for ``task``, downloading them on first use.

    Args:
        task: sbibm's task name, one of ``SBIBM_TASKS``.

    Returns:
        ``sbibm_cache_dir() / task``, holding ``num_observation_<n>/`` for n = 1..10.

    Raises:
        SbibmDataUnavailableError: when the files are absent and the download fails; the
            message says how to provide them by hand.

    Example:
        >>> (ensure_sbibm_files("two_moons") / "num_observation_1" / "observation.csv").is_file()
        True
    """
    if task not in SBIBM_TASKS:
        raise ValueError(f"task must be one of {SBIBM_TASKS}, got {task!r}.")
    cache = sbibm_cache_dir()
    if _task_complete(cache / task):
        return cache / task
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download:
            _extract(_download_wheel(Path(download)), cache)
    except (SbibmDataUnavailableError, OSError, KeyError, zipfile.BadZipFile) as error:
        raise SbibmDataUnavailableError(
            f"sbibm's reference files for {task!r} are not in {cache} and could not be fetched: {error}\n"
            f"To provide them by hand: `pip download --no-deps sbibm=={SBIBM_VERSION} -d DIR` on a machine "
            f"with network access, unzip the wheel, and copy sbibm/tasks/<task>/files/num_observation_* "
            f"to {cache}/<task>/ (or set NUMPYRO_SIMFORMER_CACHE)."
        ) from error
    if not _task_complete(cache / task):
        raise SbibmDataUnavailableError(f"Extracting the sbibm wheel left {cache / task} incomplete.")
    return cache / task


@functools.lru_cache(maxsize=64)
def _load(task: str, num_observation: int, name: str) -> np.ndarray:
    path = ensure_sbibm_files(task) / f"num_observation_{num_observation}" / name
    opener = bz2.open if name.endswith(".bz2") else open
    with opener(path, "rt") as handle:
        array = np.loadtxt(handle, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    array.setflags(write=False)
    return array


def load_sbibm_array(task: str, num_observation: int, name: str) -> np.ndarray:
    """One of sbibm's CSV files as a float32 array (rows = samples), read-only and cached.

    Args:
        task: sbibm's task name (``"two_moons"``, ``"slcp"``, ...).
        num_observation: 1 to 10.
        name: ``"observation"``, ``"true_parameters"`` or ``"reference_posterior_samples"``.

    Returns:
        Array (1, dim) for observations and true parameters, (10000, dim) for samples.
    """
    if not isinstance(num_observation, (int, np.integer)) or not 1 <= num_observation <= NUM_OBSERVATIONS:
        raise ValueError(f"num_observation must be an integer from 1 to {NUM_OBSERVATIONS}, got {num_observation!r}.")
    files = {"observation": _FILES[0], "true_parameters": _FILES[1], "reference_posterior_samples": _FILES[2]}
    if name not in files:
        raise ValueError(f"name must be one of {sorted(files)}, got {name!r}.")
    return _load(task, int(num_observation), files[name])
