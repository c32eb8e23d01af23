"""The dual encoder: towers (tied or untied) + pooling + optional L2 normalisation.

Whether queries and passages share weights is a *type* (`Tied` / `Untied`), not a flag: `DualEncoder` asks its
towers for `.query` / `.passage` and never branches on tying, and the parameter tree itself shows which it is
(one `encoder` subtree, or `query` and `passage` subtrees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mlret.models.common import segment_positions
from mlret.models.family import EncoderModule

# cls: the first real token; mean: the mask-weighted mean; pooler: the HF pooler on the first token (BERT);
# last: the last real token (decoder embedders such as Qwen3-Embedding; sentence-transformers' "lasttoken").
POOLING_MODES = ("cls", "mean", "pooler", "last")


class Tied(nnx.Module):
    """One encoder (any family's module, `mlret.models.family.EncoderModule`) for both queries and passages."""

    def __init__(self, encoder: EncoderModule) -> None:
        self.encoder = encoder

    @property
    def query(self) -> EncoderModule:
        return self.encoder

    @property
    def passage(self) -> EncoderModule:
        return self.encoder


class Untied(nnx.Module):
    """Separate query and passage encoders (same architecture, own weights)."""

    def __init__(self, query: EncoderModule, passage: EncoderModule) -> None:
        self.query = query
        self.passage = passage


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mask-weighted mean over tokens, float32 (sentence-transformers' mean pooling, clamp 1e-9)."""
    m = mask.astype(jnp.float32)[..., None]
    return (hidden.astype(jnp.float32) * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12), as torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class DualEncoder(nnx.Module):
    """`encode_query(ids, mask)` / `encode_passage(ids, mask)` -> float32 embeddings [N, D].

    ids and mask may have extra leading axes (e.g. passages [B, G, L]); they are flattened for the encoder
    and restored on the output ([B, G, D]).
    """

    def __init__(self, towers: Tied | Untied, *, pooling: str = "mean", normalize: bool = True,
                 prompt_lengths: tuple[int, int] = (0, 0)) -> None:
        """`prompt_lengths` (query, passage): the first tokens of each text that mean pooling leaves out,
        sentence-transformers' `include_prompt=False` (`load_dual_encoder` measures the prefixes as it does:
        the prompt tokenised alone, less a trailing special token); (0, 0) pools every token."""
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLING_MODES)} (config.model.pooling)")
        if not isinstance(towers, (Tied, Untied)):
            raise TypeError(f"towers must be Tied(encoder) or Untied(query, passage), got {type(towers).__name__}")
        if pooling == "pooler":
            for name, enc in (("query", towers.query), ("passage", towers.passage)):
                if enc.pooler is None:
                    raise ValueError(f"config.model.pooling='pooler' but the {name} encoder has no pooler weights "
                                     "(pooler.dense.*); use 'cls' or 'mean'")
        if any(prompt_lengths) and pooling not in ("mean", "last"):
            raise ValueError(f"config.model.include_prompt=False needs mean or last pooling, not {pooling!r} "
                             "(sentence-transformers would pool the first token after the prompt)")
        self.towers = towers
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.prompt_lengths = (int(prompt_lengths[0]), int(prompt_lengths[1]))

    @property
    def include_prompt(self) -> bool:
        return not any(self.prompt_lengths)

    @property
    def tied(self) -> bool:
        return isinstance(self.towers, Tied)

    @property
    def embed_dim(self) -> int:
        return self.towers.query.cfg.hidden_size

    def _embed(self, encoder: EncoderModule, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None,
               prompt_length: int = 0) -> jax.Array:
        lead = ids.shape[:-1]
        ids2, mask2 = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
        tt = None if token_type_ids is None else token_type_ids.reshape(ids2.shape)
        hidden = encoder(ids2, mask2, tt)
        real = mask2 > 0
        rows = jnp.arange(ids2.shape[0])
        if self.pooling == "mean":
            within = jnp.cumsum(real, axis=1) - 1  # each real token's index in its text, padding on either side
            emb = mean_pool(hidden, real & (within >= prompt_length))
        elif self.pooling == "last":
            last = ids2.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)
            emb = hidden[rows, last]
        else:
            emb = hidden[rows, jnp.argmax(real, axis=1)]  # the first real token: position 0 unless left-padded
            if self.pooling == "pooler":
                emb = encoder.pool_first_tokens(emb)
        if self.normalize:
            emb = l2_normalize(emb)
        return emb.reshape(*lead, emb.shape[-1])

    def _embed_packed(self, encoder: EncoderModule, ids: jax.Array, segments: jax.Array, num_texts: int,
                      prompt_length: int = 0, shards: int = 1) -> jax.Array:
        """Embeddings [num_texts, D] of the texts packed in rows `ids` [R, T]; `segments` [R, T] holds each
        token's text index (0 .. num_texts - 1, -1 for padding), as mlret.data.packing writes them. Pooling is per
        text: the mean of its tokens, or its first (cls / pooler) or last token, exactly as on padded rows.

        `shards` > 1 states mlret.data.packing's layout: the rows are `shards` equal blocks (one per data-parallel
        shard) and block d holds exactly texts d * n .. (d + 1) * n - 1 (n = num_texts / shards). Pooling then runs
        per block on block-local text indices, so under a batch sharding it stays on each device: each device
        pools its own texts, and the loss's gather is the only collective the embeddings meet (pooling over global
        indices makes XLA all-reduce a [num_texts, D] sum instead)."""
        if ids.shape[0] % shards or num_texts % shards:
            raise ValueError(f"packed encoding: {ids.shape[0]} rows and {num_texts} texts do not split into "
                             f"{shards} shards")
        hidden = encoder(ids, segments >= 0, segment_ids=segments)
        per = num_texts // shards
        flat = hidden.reshape(shards, -1, hidden.shape[-1]).astype(jnp.float32)
        local = segments.reshape(shards, -1) - per * jnp.arange(shards, dtype=segments.dtype)[:, None]
        text = jnp.where(segments.reshape(shards, -1) >= 0, local, per)  # padding -> a dropped extra segment
        weight = (segment_positions(segments) >= prompt_length).reshape(shards, -1).astype(jnp.float32)

        def pool(flat: jax.Array, text: jax.Array, weight: jax.Array) -> jax.Array:  # one block's texts [per, D]
            if self.pooling == "mean":
                sums = jax.ops.segment_sum(flat * weight[:, None], text, num_segments=per + 1)[:per]
                counts = jax.ops.segment_sum(weight, text, num_segments=per + 1)
                return sums / jnp.maximum(counts[:per, None], 1e-9)
            position = jnp.arange(text.shape[0], dtype=jnp.int32)
            pick = jax.ops.segment_max if self.pooling == "last" else jax.ops.segment_min
            return flat[pick(position, text, num_segments=per + 1)[:per]]

        emb = jax.vmap(pool)(flat, text, weight).reshape(num_texts, -1)
        if self.pooling == "pooler":
            emb = encoder.pool_first_tokens(emb)
        return l2_normalize(emb) if self.normalize else emb

    def encode_query_packed(self, ids: jax.Array, segments: jax.Array, num_texts: int,
                            shards: int = 1) -> jax.Array:
        """Query embeddings [num_texts, D] from packed rows (see `_embed_packed`)."""
        return self._embed_packed(self.towers.query, ids, segments, num_texts, self.prompt_lengths[0], shards)

    def encode_passage_packed(self, ids: jax.Array, segments: jax.Array, num_texts: int,
                              shards: int = 1) -> jax.Array:
        """Passage embeddings [num_texts, D] from packed rows (see `_embed_packed`)."""
        return self._embed_packed(self.towers.passage, ids, segments, num_texts, self.prompt_lengths[1], shards)

    def encode_query(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        return self._embed(self.towers.query, ids, mask, token_type_ids, self.prompt_lengths[0])

    def encode_passage(self, ids: jax.Array, mask: jax.Array,
                       token_type_ids: jax.Array | None = None) -> jax.Array:
        return self._embed(self.towers.passage, ids, mask, token_type_ids, self.prompt_lengths[1])
