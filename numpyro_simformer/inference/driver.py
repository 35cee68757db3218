"""The sampling driver: every query kind drawn through one set of compiled functions.

A :class:`QuerySpace` is the token space of queries at one set of model arguments: its
:class:`~numpyro_simformer.model.spec.ModelSpec`, token transform and score function, and
the jitted sampling functions built for it, cached by (sampler, chunk, guidance, batched),
so a second identical query compiles nothing. :func:`draw_z` is the one driver: it cuts a
query into jitted calls (chunks of draws; groups of observations of a batch; the split of
a long series into chunks of positions) behind one progress bar per pass.

:func:`build_sample_fn` is the pure layer underneath (as BlackJAX's ``build_kernel``):
a jitted ``sample_fn(rng_key, params, observed_z, condition_mask)`` from a score function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_simformer.diffusion.score import build_score_fn
from numpyro_simformer.model.spec import ModelSpec
from numpyro_simformer.model.variable import variable_token_mask
from numpyro_simformer.nn import build_denoiser_fn, reachable_tokens
from numpyro_simformer.samplers.guidance import build_interval_score_fn
from numpyro_simformer.tokens.transforms import TokenTransform
from numpyro_simformer.training.state import spec_denoiser_fn

__all__ = ["QuerySpace", "build_sample_fn", "draw_z", "split_plan"]


def build_sample_fn(score_fn: Callable, sde, sampler, num_samples: int, *, guidance=None, batched: bool = False):
    """A jitted ``sample_fn(rng_key, params, observed_z, condition_mask) -> (num_samples, num_tokens)``.

    Args:
        score_fn: pure ``score_fn(params, x_t, time, condition_mask)``.
        sde: the diffusion.
        sampler: an :class:`~numpyro_simformer.samplers.AbstractSampler`.
        num_samples: draws per call (static).
        guidance: an :class:`~numpyro_simformer.samplers.guidance.AbstractIntervalGuidance`:
            ``params`` is then ``(params, IntervalBounds)``.
        batched: vmap over observations (keys, observed values and masks with a leading axis).
    """
    if guidance is not None:
        score_fn = build_interval_score_fn(score_fn, sde, guidance)
    sample_fn = sampler.build(score_fn, sde)

    def one(rng_key, params, values, mask):
        return sample_fn(rng_key, params, values, mask, num_samples)

    return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)) if batched else one)


@dataclass(eq=False)
class QuerySpace:
    """The token space of queries at one set of model arguments, and its compiled functions.

    Attributes:
        spec: the :class:`ModelSpec` at these arguments (the training spec, or ``spec.at(kwargs)``).
        transform: the token transform of its layout.
        graphdef, constants: the network's structure (to build functions over token subsets).
        sde: the diffusion.
        points_per_dim: the most positions per variable dim one network pass saw in training.
        query_kwargs: the model's keyword arguments of a query at new arguments (``None``: the training ones).
        num_layers: the network's attention layers: a sampling pass leaves out the tokens
            farther than this from every latent token in the attention mask (they cannot
            change the latent tokens' scores; :meth:`relevant_tokens`). ``None``: no pruning.
    """

    spec: ModelSpec
    transform: TokenTransform
    graphdef: Any
    constants: Any
    sde: Any
    points_per_dim: int
    query_kwargs: dict | None = None
    num_layers: int | None = None
    sample_fns: dict = field(default_factory=dict)
    log_prob_fns: dict = field(default_factory=dict)
    deterministic: tuple | None = None  # ({name: dims}, random_outside), read on first use

    @property
    def layout(self):
        return self.spec.layout

    @cached_property
    def denoiser_fn(self):
        return spec_denoiser_fn(self.graphdef, self.constants, self.spec)

    @cached_property
    def score_fn(self):
        return build_score_fn(self.denoiser_fn, self.sde)

    @cached_property
    def coordinates(self) -> dict:
        """``{dim: values}`` of the coordinate dims, for the DataTree."""
        return self.spec.coordinate_values()

    def relevant_tokens(self, condition_mask) -> tuple[int, ...] | None:
        """The network tokens a sampling pass needs, for (num_observations, num_elements) masks.

        A latent element's score after ``num_layers`` masked attention layers depends only
        on the tokens reachable from its token in that many steps of the attention mask;
        the scores of observed elements are never used. So the tokens that no latent token
        reaches (observed distractors, the far end of a chain) are left out of the pass:
        the same draws up to floating-point rounding, at the cost of the tokens kept.
        ``None`` when every token is needed, or the model has variable-size dims (whose
        tokens count their node's tokens) or no ``num_layers`` is known.
        """
        if self.num_layers is None or self.spec.variable_dims is not None:
            return None
        latent = ~np.asarray(condition_mask, dtype=bool).reshape(-1, np.shape(condition_mask)[-1]).all(axis=0)
        grouping = self.spec.grouping
        if grouping is None:
            start, mask = latent, self.spec.attention_mask
        else:
            members = grouping.members
            start = (np.where(members >= 0, latent[np.maximum(members, 0)], False)).any(axis=1)
            mask = grouping.attention_mask
        reached = reachable_tokens(mask, start, self.num_layers)
        return None if reached.all() else tuple(int(i) for i in np.flatnonzero(reached))

    def sample_fn(self, sampler, chunk: int, guidance=None, batched: bool = False, tokens=None):
        """The cached :func:`build_sample_fn` of this space, over the network tokens ``tokens`` (all: ``None``)."""
        key = (sampler, chunk, guidance, batched, tokens)
        if key not in self.sample_fns:
            score_fn = self.score_fn
            if tokens is not None:
                layout = self.layout
                denoiser = build_denoiser_fn(self.graphdef, self.constants, layout.node_ids, layout.coordinates,
                                             self.spec.attention_mask, grouping=self.spec.grouping, tokens=tokens)
                score_fn = build_score_fn(denoiser, self.sde)
            self.sample_fns[key] = build_sample_fn(score_fn, self.sde, sampler, chunk, guidance=guidance,
                                                   batched=batched)
        return self.sample_fns[key]

    def subset_sample_fn(self, sampler, num_tokens: int, batched: bool):
        """A jitted sampler over a token subset: ``fn(key, (params, node_ids, coordinates, mask), values, ...)``.

        The subset's identities and attention mask are arguments, so every chunk of one
        size shares one compiled function.
        """
        key = ("subset", sampler, num_tokens, batched)
        if key not in self.sample_fns:
            denoiser = self.denoiser_fn

            def denoiser_fn(packed, values, time, condition_mask):
                params, node_ids, coordinates, attention_mask = packed
                return denoiser(params, values, time, condition_mask, coordinates=coordinates,
                                attention_mask=attention_mask, node_ids=node_ids)

            sample_fn = sampler.build(build_score_fn(denoiser_fn, self.sde), self.sde)
            if batched:  # one draw per row of observed values
                one = lambda rng_key, packed, values, mask: sample_fn(rng_key, packed, values, mask, 1)[0]
                self.sample_fns[key] = jax.jit(jax.vmap(one, in_axes=(0, None, 0, None)))
            else:
                self.sample_fns[key] = jax.jit(sample_fn, static_argnums=4)
        return self.sample_fns[key]

    def packed(self, params, tokens):
        """``(params, node_ids, coordinates, attention mask)`` of a token subset."""
        mask = np.asarray(self.spec.attention_mask)[np.ix_(tokens, tokens)]
        layout = self.layout
        return (params, jnp.asarray(layout.node_ids[tokens]), jnp.asarray(layout.coordinates[tokens]),
                jnp.asarray(mask))


def split_plan(space: QuerySpace, condition_mask):
    """How to answer a query with more positions along a variable dim than training saw.

    Training shows at most ``points_per_dim`` positions per variable dim. When a query
    asks for more latent ones (a series predicted at 200 times) and those latent
    variable tokens are conditionally independent given the rest (no two adjacent in the
    attention mask, and every neighbour a token on no variable dim), the query splits
    exactly: first the other latent tokens given the observations (the many latent
    ones marginalised, i.e. left out), then, for each draw, the latent variable tokens
    in chunks of ``points_per_dim``, each given that draw's non-variable tokens.

    Returns ``None`` (answer in one pass) or ``(first, fixed, chunks)``: token indices
    of the first pass, of the tokens on no variable dim (each chunk's condition), and a
    list of index arrays, one per chunk.
    """
    variable = space.spec.variable_dims
    if variable is None:
        return None
    layout = space.layout
    on_variable = variable_token_mask(layout, variable)
    latent_variable = np.flatnonzero(on_variable & ~np.asarray(condition_mask))
    if latent_variable.size == 0 or max(variable.sizes(layout.sites).values()) <= space.points_per_dim:
        return None
    attention = space.spec.attention_mask
    adjacent = attention | attention.T
    np.fill_diagonal(adjacent, False)
    neighbours = adjacent[latent_variable]
    if (neighbours & on_variable[None]).any():
        return None  # coupled series: no exact split; one pass
    first = np.setdiff1d(np.arange(layout.num_tokens), latent_variable)
    fixed = np.flatnonzero(~on_variable)  # the chunks' only neighbours
    size = space.points_per_dim
    chunks = [latent_variable[start:start + size] for start in range(0, latent_variable.size, size)]
    return first, fixed, chunks


def _progress(progress_bar: bool, num_calls: int):
    """A tqdm bar over jitted sampling calls, when asked for and there are several."""
    if not progress_bar or num_calls < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=num_calls, desc="sampling", unit="call")


def _tick(bar, result=None):
    if bar is not None:
        if result is not None:
            jax.block_until_ready(result)
        bar.update()


def _close(bar):
    if bar is not None:
        bar.close()


def _sample_single(rng_key, space, sampler, params, z_observed, condition_mask, num_samples, batch_size, guidance,
                   progress_bar):
    """(num_samples, num_tokens) in z-space for one observation."""
    chunk = min(batch_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    sample_fn = space.sample_fn(sampler, chunk, guidance, tokens=space.relevant_tokens(condition_mask))
    keys = jax.random.split(rng_key, num_chunks)
    bar, parts = _progress(progress_bar, num_chunks), []
    for key in keys:
        parts.append(sample_fn(key, params, jnp.asarray(z_observed), jnp.asarray(condition_mask)))
        _tick(bar, parts[-1])
    _close(bar)
    return jnp.concatenate(parts)[:num_samples]


def _sample_batched(rng_key, space, sampler, params, z_observed, condition_mask, num_samples, batch_size, guidance,
                    progress_bar):
    """(num_observations, num_samples, num_tokens), vmapped over observations.

    Observation i draws with ``fold_in(rng_key, i)``, split into chunk keys exactly as
    :func:`_sample_single` splits its key, so it equals the unbatched query with that key.
    """
    chunk = min(batch_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    num_observations = z_observed.shape[0]
    group = min(num_observations, max(1, batch_size // chunk))
    sample_fn = space.sample_fn(sampler, chunk, guidance, batched=True, tokens=space.relevant_tokens(condition_mask))
    keys = jnp.stack([jax.random.split(jax.random.fold_in(rng_key, index), num_chunks)
                      for index in range(num_observations)])
    padded = -(-num_observations // group) * group
    pad = lambda array: np.concatenate([array, np.repeat(array[-1:], padded - num_observations, axis=0)])
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], padded - num_observations, 0)])
    z_observed, condition_mask = pad(np.asarray(z_observed)), pad(np.asarray(condition_mask))
    results, bar = [], _progress(progress_bar, padded // group)
    for start in range(0, padded, group):
        rows = slice(start, start + group)
        parts = [sample_fn(keys[rows, index], params, jnp.asarray(z_observed[rows]), jnp.asarray(condition_mask[rows]))
                 for index in range(num_chunks)]
        results.append(jnp.concatenate(parts, axis=1)[:, :num_samples])
        _tick(bar, results[-1])
    _close(bar)
    return jnp.concatenate(results)[:num_observations]


def _sample_split(rng_key, space, sampler, params, plan, z_observed, condition_mask, num_samples, batch_size,
                  progress_bar):
    """(num_samples, num_tokens) in z-space by the split of :func:`split_plan`."""
    first, fixed, chunks = plan
    key_first, key_chunks = jax.random.split(rng_key)
    first_fn, packed = space.subset_sample_fn(sampler, first.size, batched=False), space.packed(params, first)
    chunk = min(batch_size, num_samples)
    parts = [first_fn(key, packed, jnp.asarray(z_observed[first]), jnp.asarray(condition_mask[first]), chunk)
             for key in jax.random.split(key_first, -(-num_samples // chunk))]
    z = np.repeat(np.asarray(z_observed)[None], num_samples, axis=0)
    z[:, first] = np.asarray(jnp.concatenate(parts)[:num_samples])
    bar = _progress(progress_bar, len(chunks))
    for index, latent in enumerate(chunks):
        tokens = np.concatenate([fixed, latent])
        chunk_mask = np.concatenate([np.ones(fixed.size, bool), np.zeros(latent.size, bool)])
        sample_fn, packed = space.subset_sample_fn(sampler, tokens.size, batched=True), space.packed(params, tokens)
        keys = jax.random.split(jax.random.fold_in(key_chunks, index), num_samples)
        draws = []
        for start in range(0, num_samples, batch_size):
            rows = slice(start, start + batch_size)
            draws.append(sample_fn(keys[rows], packed, jnp.asarray(z[rows][:, tokens]), jnp.asarray(chunk_mask)))
        z[:, latent] = np.asarray(jnp.concatenate(draws))[:, fixed.size:]
        _tick(bar)
    _close(bar)
    return jnp.asarray(z)


def draw_z(rng_key, space: QuerySpace, sampler, params, z_observed, condition_mask, num_samples: int, *,
           batched: bool, batch_size: int, guidance=None, progress_bar: bool = False, allow_split: bool = True):
    """Draws of one query in z-space: (num_samples, num_observations, num_tokens).

    Args:
        rng_key: a JAX PRNG key.
        space: the :class:`QuerySpace`.
        sampler: an :class:`~numpyro_simformer.samplers.AbstractSampler`.
        params: the network's parameters (with ``guidance``: ``(params, IntervalBounds)``).
        z_observed, condition_mask: (num_observations, num_tokens) in z-space.
        num_samples: draws per observation.
        batched: whether the query is a batch of observations (each observation ``i``
            then draws with ``fold_in(rng_key, i)``).
        batch_size: draws per jitted call.
        guidance: interval guidance, or ``None``.
        progress_bar: a bar over jitted calls.
        allow_split: answer a long series in chunks (:func:`split_plan`) where that is exact;
            ``False`` draws in one pass (as the probability-flow density integrates).
    """
    if batched:
        z = _sample_batched(rng_key, space, sampler, params, z_observed, condition_mask, num_samples, batch_size,
                            guidance, progress_bar)
        return jnp.swapaxes(z, 0, 1)
    plan = split_plan(space, condition_mask[0]) if allow_split and guidance is None else None
    if plan is not None:
        z = _sample_split(rng_key, space, sampler, params, plan, z_observed[0], condition_mask[0], num_samples,
                          batch_size, progress_bar)
    else:
        z = _sample_single(rng_key, space, sampler, params, z_observed[0], condition_mask[0], num_samples,
                           batch_size, guidance, progress_bar)
    return z[:, None]
