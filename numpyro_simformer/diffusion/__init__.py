"""The diffusion: SDEs, the score from the network, the denoising loss, condition masks."""

from numpyro_simformer.diffusion.masks import ConditionMaskDistribution
from numpyro_simformer.diffusion.score import build_score_fn
from numpyro_simformer.diffusion.sde import VESDE, VPSDE, AbstractSDE

__all__ = ["AbstractSDE", "VESDE", "VPSDE", "build_score_fn", "ConditionMaskDistribution"]
