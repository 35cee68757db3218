"""Checkpoint and resume a long training run.

:class:`TrainingCheckpointer` writes the training loop's whole state (weights, EMA
weights, optimiser state, step, the loop's position in its key sequence, best-so-far,
history) every ``TrainingConfig.checkpoint_every`` steps, and
:func:`~numpyro_simformer.training.loop.train` resumes from the newest one. Each checkpoint
records a fingerprint of its run (key, simulations, configuration) so that a directory is
never resumed by a different run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import shutil
from typing import Mapping

import jax
import numpy as np

from numpyro_simformer.io.serialization import (
    CheckpointError,
    encode_config,
    read_json,
    record_header,
    restore_arrays,
    save_arrays,
    write_json,
)

__all__ = ["TrainingCheckpointer", "run_fingerprint"]

_ARRAYS_DIR = "arrays"
_TRAINING_PREFIX = "training-"
_TRAINING_STATE_FILE = "state.json"


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
        """Write ``loop`` (a :class:`~numpyro_simformer.training.loop.LoopState`) and drop older checkpoints."""
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
