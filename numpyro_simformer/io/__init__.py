"""Saving and loading fitted Simformers: a JSON record and Orbax arrays, no pickle."""

from numpyro_simformer.io.checkpoint import read_checkpoint, save_simformer
from numpyro_simformer.io.serialization import CheckpointError, ModelMismatchError

__all__ = ["save_simformer", "read_checkpoint", "CheckpointError", "ModelMismatchError"]
