"""Tokenizer and masked transformer of the Simformer, in Flax NNX.

A token for element i is the sum of four embeddings of width ``width``:
its node identity (a learned table indexed by ``node_ids``), its value (a learned linear
map of the scalar), its condition state (a learned vector times ``condition_mask[i]``) and
its coordinate (the coordinate and random Fourier features of it, a learned projection). The
sum of learned linear embeddings is what the reference's concatenation followed by the
first linear layer computes, with one layer fewer. Diffusion time enters every block's MLP
through Fourier features, as in the reference. There is no positional encoding.

A token may hold several elements of one site (``slots`` > 1, see
:mod:`numpyro_simformer.tokens.grouping`): the network then reads the element vector,
gathers each token's ``slots`` values and observed flags (both embedded by learned linear
maps of width ``slots``), and its head predicts ``slots`` values per token, scattered back
to the elements. Everything outside the network stays element by element.

Outside this module the network is a pure function (``build_denoiser_fn``) over its
parameter state: ``nnx.split`` once, ``nnx.merge`` inside the traced function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["NetworkConfig", "SimformerNetwork", "build_denoiser_fn", "default_num_layers"]


#: The default depth grows with the model: at most this many tokens take
#: ``SMALL_MODEL_LAYERS`` attention layers, more take ``LARGE_MODEL_LAYERS``.
SMALL_MODEL_TOKENS = 8
SMALL_MODEL_LAYERS = 3
LARGE_MODEL_LAYERS = 6


def default_num_layers(num_tokens: int) -> int:
    """The depth ``NetworkConfig(num_layers=None)`` takes for a model of ``num_tokens`` tokens.

    3 layers up to 8 tokens, 6 above. The evidence (``docs/benchmarks.md``, sbibm MLP or RF
    C2ST at 10,000 simulations): depth pays where a conditional needs structure spread over
    many tokens, and costs only time where it does not. SLCP (13 tokens) reached 0.616-0.631
    with 6 layers against 0.738 with 3 (through sbibm-jax's simulator, 0.629 against 0.723);
    sbibm's Bernoulli GLM (20 tokens) 0.647 against 0.690; the 10-step HMM's random conditionals (20 tokens)
    0.532-0.543 against 0.567, since with a graph attention mask each layer reaches one more
    link of the chain; the linear Gaussian (20 tokens) gave 0.504 against 0.503. On Two Moons
    and the Gaussian mixture (4 tokens) 6 layers changed nothing (0.533 against 0.531,
    0.519 against 0.521) at about twice the time per step, so small models keep 3.
    """
    return SMALL_MODEL_LAYERS if num_tokens <= SMALL_MODEL_TOKENS else LARGE_MODEL_LAYERS


@dataclass(frozen=True)
class NetworkConfig:
    """Size of the transformer.

    Defaults suit a 2-core CPU (a small problem trains in minutes); scale ``width``,
    ``num_layers`` and ``mlp_width`` up on a GPU. The paper's benchmark model is
    ``NetworkConfig(width=50, num_layers=6, num_heads=4, mlp_width=150)``.

    ``num_layers=None`` (the default) lets the depth grow with the model
    (:func:`default_num_layers`): 3 attention layers for a model of at most 8 tokens, 6 for
    a larger one. A fit resolves it (``sf.state.network.num_layers`` is the depth trained;
    checkpoints record it); an integer fixes the depth.
    """

    width: int = 64
    num_layers: int | None = None
    num_heads: int = 2
    mlp_width: int = 128
    num_time_features: int = 64
    num_coordinate_features: int = 16

    def __post_init__(self):
        for name in ("width", "num_layers", "num_heads", "mlp_width", "num_time_features"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # num_layers=None: by the model
                raise ValueError(f"NetworkConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.width % self.num_heads:
            raise ValueError(
                f"NetworkConfig.width ({self.width}) must be divisible by num_heads "
                f"({self.num_heads})."
            )

    def for_tokens(self, num_tokens: int) -> NetworkConfig:
        """This configuration with its depth fixed for a model of ``num_tokens`` tokens.

        An integer ``num_layers`` is kept; ``None`` becomes :func:`default_num_layers`.
        """
        if self.num_layers is not None:
            return self
        return dataclasses.replace(self, num_layers=default_num_layers(num_tokens))


def _fourier_features(x, frequencies):
    angles = 2.0 * jnp.pi * x[..., None] * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class _Block(nnx.Module):
    def __init__(self, config: NetworkConfig, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.num_heads,
            in_features=config.width,
            decode=False,
            deterministic=True,
            keep_rngs=False,
            rngs=rngs,
        )
        self.mlp_norm = nnx.LayerNorm(config.width, rngs=rngs)
        self.mlp_in = nnx.Linear(config.width, config.mlp_width, rngs=rngs)
        self.time_in = nnx.Linear(config.width, config.mlp_width, rngs=rngs)
        self.mlp_out = nnx.Linear(config.mlp_width, config.width, rngs=rngs)

    def __call__(self, h, time_embedding, attention_mask):
        h = h + self.attention(self.attention_norm(h), mask=attention_mask)
        m = self.mlp_in(self.mlp_norm(h)) + self.time_in(time_embedding)[:, None, :]
        return h + self.mlp_out(jax.nn.gelu(m))


class SimformerNetwork(nnx.Module):
    """Masked transformer over tokens; predicts the noise of each token.

    Args:
        num_nodes: size of the node-identity table.
        config: a :class:`NetworkConfig`; an unresolved depth (``num_layers=None``) is
            fixed for ``num_nodes`` tokens (:meth:`NetworkConfig.for_tokens`).
        variable_size: the model has coordinate or exchangeable dims (sizes that change
            between training and queries).
        slots: elements per token (the most of any token of a
            :class:`~numpyro_simformer.tokens.grouping.TokenGrouping`; 1 without grouping).
        rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(self, num_nodes: int, config: NetworkConfig = NetworkConfig(), *, variable_size: bool = False,
                 slots: int = 1, rngs: nnx.Rngs):
        config = config.for_tokens(num_nodes)
        width = config.width
        self.slots = int(slots)
        self.node_embedding = nnx.Embed(num_nodes, width, rngs=rngs)
        self.value_embedding = nnx.Linear(self.slots, width, rngs=rngs)
        # one learned vector per slot, added where that slot's element is observed
        self.condition_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (width,) if self.slots == 1 else (self.slots, width)) * 0.5
        )
        # Coordinates are rescaled to [0, 1] over the training range (variable.py): a few
        # cycles across the range resolve a time series' features.
        self.coordinate_frequencies = nnx.Variable(
            jax.random.normal(rngs.params(), (config.num_coordinate_features,)) * 3.0
        )
        # With variable-size dims (``variable_size``) the coordinate itself joins its
        # Fourier features, and each token gets log(1 + n) of its node's present and observed
        # tokens: attention averages, so a node with a variable number of elements (a series
        # observed at n times) tells its readers n this way. Fixed layouts need neither.
        self.variable_size = bool(variable_size)
        self.coordinate_embedding = nnx.Linear(2 * config.num_coordinate_features + self.variable_size, width,
                                               rngs=rngs)
        if self.variable_size:
            self.count_embedding = nnx.Linear(2, width, rngs=rngs)
        self.time_frequencies = nnx.Variable(
            jax.random.normal(rngs.params(), (config.num_time_features // 2,)) * 8.0
        )
        self.time_mlp = nnx.Linear(config.num_time_features, width, rngs=rngs)
        self.blocks = nnx.List([_Block(config, rngs) for _ in range(config.num_layers)])
        self.output_norm = nnx.LayerNorm(width, rngs=rngs)
        self.output = nnx.Linear(width, self.slots, rngs=rngs)

    def __call__(self, values, time, condition_mask, node_ids, coordinates, attention_mask, present=None,
                 members=None, positions=None):
        """Predicted noise for every token.

        Args:
            values: (batch, num_tokens) token values (noisy latent, clean observed).
            time: (batch,) diffusion times (or any noise-level input in [0, 1]).
            condition_mask: (batch, num_tokens) bool, True where observed.
            node_ids: (num_tokens,) int node identities.
            coordinates: (num_tokens,) float coordinates (0 where a site has none), or
                (batch, num_tokens) when each example has its own.
            attention_mask: (num_tokens, num_tokens) bool, ``[i, j]`` True if token i may
                attend to token j; or (batch, num_tokens, num_tokens).
            present: optional (batch, num_tokens) bool, False for padding tokens (training
                on random subsets of variable-size dims); padding counts for no node.
            members, positions: a grouping's (num_tokens, slots) element indices (-1 in
                unused slots) and each element's position in the flattened token output
                (``TokenGrouping.element_positions``). ``values`` and ``condition_mask``
                are then (batch, num_elements), and so is the result.

        Returns:
            (batch, num_tokens) predicted noise, or (batch, num_elements) with ``members``.
        """
        if members is not None:
            return self._grouped(values, time, condition_mask, node_ids, coordinates, attention_mask, members,
                                 positions)
        features = _fourier_features(coordinates, self.coordinate_frequencies[...])
        if self.variable_size:  # the coordinate itself, and its features
            features = jnp.concatenate([coordinates[..., None], features], axis=-1)
        coordinate_tokens = self.coordinate_embedding(features)
        tokens = self.node_embedding(node_ids)[None]
        if self.variable_size:
            same_node = (node_ids[:, None] == node_ids[None, :]).astype(values.dtype)
            weight = jnp.ones_like(values) if present is None else present.astype(values.dtype)
            observed = weight * condition_mask.astype(values.dtype)
            counts = jnp.stack([weight @ same_node, observed @ same_node], axis=-1)  # same_node is symmetric
            tokens = tokens + self.count_embedding(jnp.log1p(counts))
        tokens = (
            tokens
            + self.value_embedding(values[..., None])
            + condition_mask[..., None].astype(values.dtype) * self.condition_embedding[...]
            + (coordinate_tokens[None] if coordinates.ndim == 1 else coordinate_tokens)
        )
        return self._transform(tokens, time, attention_mask)[..., 0]

    def _transform(self, tokens, time, attention_mask):
        """The blocks and the head over embedded tokens: (batch, num_tokens, slots)."""
        time_embedding = jax.nn.gelu(
            self.time_mlp(_fourier_features(time, self.time_frequencies[...]))
        )
        mask = attention_mask[None, None] if attention_mask.ndim == 2 else attention_mask[:, None]
        h = tokens
        for block in self.blocks:
            h = block(h, time_embedding, mask)
        return self.output(self.output_norm(h))

    def _grouped(self, values, time, condition_mask, node_ids, coordinates, attention_mask, members, positions):
        used = members >= 0
        gather = jnp.where(used, members, 0)
        grouped_values = jnp.where(used, values[..., gather], 0.0)  # (batch, num_tokens, slots)
        observed = (used & condition_mask[..., gather]).astype(values.dtype)
        coordinate_tokens = self.coordinate_embedding(_fourier_features(coordinates, self.coordinate_frequencies[...]))
        condition = self.condition_embedding[...]
        tokens = (
            self.node_embedding(node_ids)[None]
            + self.value_embedding(grouped_values)
            + observed @ (condition[None] if condition.ndim == 1 else condition)
            + coordinate_tokens[None]
        )
        predicted = self._transform(tokens, time, attention_mask)
        flat = predicted.reshape(predicted.shape[:-2] + (-1,))
        # one zero after the tokens' outputs: where the elements of tokens left out of a pass point
        flat = jnp.concatenate([flat, jnp.zeros(flat.shape[:-1] + (1,), flat.dtype)], axis=-1)
        return flat[..., positions]


def build_denoiser_fn(graphdef, constants, node_ids, coordinates, attention_mask, grouping=None, tokens=None):
    """A pure ``denoiser_fn(params, values, time, condition_mask) -> noise`` over the state.

    ``graphdef, params, constants = nnx.split(network, nnx.Param, ...)``; the trainable
    ``params`` are the function's argument, while ``constants`` (fixed Fourier
    frequencies), ``node_ids``, ``coordinates`` and ``attention_mask`` are captured.
    ``coordinates`` and ``attention_mask`` may be overridden per call with per-example
    arrays ((batch, num_tokens) and (batch, num_tokens, num_tokens)), and ``present``
    given: training on random subsets of a variable-size dim does so. ``node_ids`` may be
    overridden too (a query over a subset of the tokens).

    With a :class:`~numpyro_simformer.tokens.grouping.TokenGrouping` the function still maps
    element vectors to element vectors; the network's tokens are the grouping's (their node
    ids ``0 .. num_tokens - 1``, coordinate 0, the grouping's attention mask), and
    ``node_ids``, ``coordinates`` and ``attention_mask`` are the grouping's business.

    ``tokens``: optional sorted indices of the network's tokens (the grouping's, or the
    layout's) to run the network on; the others are left out of the pass and their
    elements get noise 0. The function keeps its element-vector signature (no overrides).
    Tokens that no wanted output can reach through the attention mask in
    ``num_layers`` steps change nothing (:func:`reachable_tokens`).
    """
    if grouping is not None:
        kept = np.arange(grouping.num_tokens) if tokens is None else np.asarray(tokens, dtype=np.int64)
        members = grouping.members[kept]
        flat, positions = members.reshape(-1), np.full(grouping.num_elements, members.size, np.int32)
        used = np.flatnonzero(flat >= 0)
        positions[flat[used]] = used
        members, positions = jnp.asarray(members), jnp.asarray(positions)
        token_ids = jnp.asarray(kept, dtype=jnp.int32)
        token_coordinates = jnp.zeros(kept.size, jnp.float32)
        token_mask = jnp.asarray(np.asarray(grouping.attention_mask, dtype=bool)[np.ix_(kept, kept)])

        def grouped_denoiser_fn(params, values, time, condition_mask):
            network = nnx.merge(graphdef, params, constants)
            return network(values, time, condition_mask, token_ids, token_coordinates, token_mask,
                           members=members, positions=positions)

        return grouped_denoiser_fn
    if tokens is not None:
        kept = np.asarray(tokens, dtype=np.int64)
        kept_ids = jnp.asarray(np.asarray(node_ids)[kept])
        kept_coordinates = jnp.asarray(np.asarray(coordinates, dtype=np.float32)[kept])
        kept_mask = jnp.asarray(np.asarray(attention_mask, dtype=bool)[np.ix_(kept, kept)])
        index = jnp.asarray(kept)

        def subset_denoiser_fn(params, values, time, condition_mask):
            network = nnx.merge(graphdef, params, constants)
            noise = network(values[..., index], time, condition_mask[..., index], kept_ids, kept_coordinates,
                            kept_mask)
            return jnp.zeros_like(values).at[..., index].set(noise)

        return subset_denoiser_fn
    node_ids = jnp.asarray(node_ids)
    coordinates = jnp.asarray(coordinates, dtype=jnp.float32)
    attention_mask = jnp.asarray(attention_mask, dtype=bool)

    def denoiser_fn(params, values, time, condition_mask, coordinates=coordinates, attention_mask=attention_mask,
                    present=None, node_ids=node_ids):
        network = nnx.merge(graphdef, params, constants)
        return network(values, time, condition_mask, node_ids, coordinates, attention_mask, present)

    return denoiser_fn


def reachable_tokens(attention_mask, start, num_layers: int) -> np.ndarray:
    """bool (num_tokens,): the tokens whose inputs can change the outputs of ``start``.

    After ``num_layers`` masked attention layers token ``i``'s output depends on the inputs
    of the tokens reachable from ``i`` in at most ``num_layers`` steps along ``attention_mask``
    (``[i, j]``: i attends to j); every other part of a layer acts token by token.
    """
    mask = np.asarray(attention_mask, dtype=bool)
    reached = np.asarray(start, dtype=bool).copy()
    for _ in range(num_layers):
        grown = reached | mask[reached].any(axis=0)
        if (grown == reached).all():
            break
        reached = grown
    return reached
