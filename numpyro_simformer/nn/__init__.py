"""The Simformer network (Flax NNX). Everything outside this package sees a pure function."""

from numpyro_simformer.nn.transformer import NetworkConfig, SimformerNetwork, build_denoiser_fn, default_num_layers, reachable_tokens

__all__ = ["NetworkConfig", "SimformerNetwork", "build_denoiser_fn", "default_num_layers", "reachable_tokens"]
