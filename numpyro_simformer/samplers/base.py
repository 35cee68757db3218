"""The interface every sampler implements.

A sampler is a frozen dataclass (its settings) whose :meth:`AbstractSampler.build` turns a
pure score function and an SDE into a pure sampling function, as BlackJAX's ``build_kernel``
does: nothing is jitted or stored, and the same sampler object serves every query.
"""

from __future__ import annotations

import abc

__all__ = ["AbstractSampler"]


class AbstractSampler(abc.ABC):
    """Draws latent tokens given observed ones by integrating from the SDE's prior to ``t_min``.

    Subclasses are frozen dataclasses and implement both members.
    """

    @abc.abstractmethod
    def build(self, score_fn, sde):
        """``sample_fn(rng_key, params, observed_values, condition_mask, num_samples)``.

        Args:
            score_fn: pure ``score_fn(params, x_t, time, condition_mask)`` in z-space.
            sde: the diffusion (:class:`~numpyro_simformer.diffusion.sde.AbstractSDE`).

        Returns:
            A pure function: ``observed_values`` and ``condition_mask`` (num_tokens,) in
            z-space, ``num_samples`` static; returns (num_samples, num_tokens) with observed
            tokens at their values.
        """

    @property
    @abc.abstractmethod
    def network_evaluations(self) -> int | None:
        """Network evaluations per draw (``None`` where an adaptive solver decides)."""
