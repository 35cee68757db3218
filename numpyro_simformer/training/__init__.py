"""Training: the configuration, the pure step and loop, training checkpoints, devices, and the fit."""

from numpyro_simformer.training.checkpoint import TrainingCheckpointer
from numpyro_simformer.training.fit import fit_state
from numpyro_simformer.training.loop import LoopState, TrainingConfig, TrainingHistory, TrainState, train
from numpyro_simformer.training.state import FittedState

__all__ = ["TrainingConfig", "TrainingHistory", "TrainState", "LoopState", "train", "fit_state",
           "TrainingCheckpointer", "FittedState"]
