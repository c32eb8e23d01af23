"""FLOPs of one train step, counted from the encoder's architecture and the batch's static shapes (for MFU).

Every encoder family (`mlret.models.family`) gives two numbers: N_layer, the matmul weights of its blocks, and
the attention width w (heads x head_dim; the hidden size in BERT). Only matrix multiplications are counted
(2 FLOPs per multiply-add), as in the usual MFU accounting (PaLM's appendix B, MaxText): LayerNorm, GELU,
softmax, the embedding gather and the optimizer update are elementwise and small next to the matmuls.
With h = hidden size, i = intermediate size, L = layers, one sequence
of length s costs, per token, in the forward pass:

    2 * N_layer + 4 * L * s * w      where, for BERT, N_layer = L * (4 h^2 + 2 h i) and w = h

(N_layer: the matmul weights of the transformer blocks, i.e. the non-embedding parameters without biases
and norms: ModernBERT's GeGLU has 3 h i per layer, Qwen3's grouped-query attention 2 h w + 2 h w_kv; 4 L s w:
the two attention matmuls QK^T and AV, 2 s w each, over the whole row even where a local-attention mask or
causality zeroes part of it: that is what the device computes). The backward pass costs twice
the forward (gradients w.r.t. activations and w.r.t. weights), so fwd + bwd = 3x: per token
6 N_layer + 12 L s h. The contrastive loss adds the score matrix, queries [B, D] x passages [B*G, D]:
2 B (B G) D forward, 6 B (B G) D in all. A step of B pairs with G passages each therefore costs

    step_flops = B * (6 N_layer * s_q + 12 L w s_q^2) + B G * (6 N_layer * s_p + 12 L w s_p^2) + 6 B^2 G D

for query length s_q and passage length s_p (the padded, static lengths: that is what the device computes).
The pooler is not counted (mean / cls pooling never runs it). tests/test_flops.py checks the formula against
XLA's own count (`compiled.cost_analysis()["flops"]`) on small configs.
"""

from __future__ import annotations

from typing import Any

from mlret.models.family import family_of


def layer_matmul_params(cfg: Any) -> int:
    """N_layer: weights of the matmuls in the transformer blocks (attention projections, MLP matrices), from the
    family record of `cfg` (any family's config)."""
    return int(family_of(cfg).matmul_params(cfg))


def encoder_forward_flops(cfg: Any, sequences: int, length: int) -> int:
    """Matmul FLOPs of the encoder's forward pass over `sequences` sequences of `length` tokens."""
    width = int(family_of(cfg).attention_width(cfg))
    per_token = 2 * layer_matmul_params(cfg) + 4 * cfg.num_layers * length * width
    return sequences * length * per_token


def loss_forward_flops(batch: int, group_size: int, dim: int) -> int:
    """The score matrix of the contrastive loss: queries [B, D] x passages [B*G, D]."""
    return 2 * batch * batch * group_size * dim


def train_step_flops(cfg: Any, batch: int, group_size: int, query_len: int,
                     passage_len: int) -> int:
    """Matmul FLOPs of one train step (forward + backward = 3x forward) of a dual encoder on B pairs, each
    with one query and G passages; the embedding dimension is the hidden size (mean / cls pooling). Tied or
    untied towers cost the same."""
    forward = (encoder_forward_flops(cfg, batch, query_len)
               + encoder_forward_flops(cfg, batch * group_size, passage_len)
               + loss_forward_flops(batch, group_size, cfg.hidden_size))
    return 3 * forward


def tokens_per_step(batch: int, group_size: int, query_len: int, passage_len: int) -> int:
    """Padded tokens the encoder processes per step (queries + passages)."""
    return batch * query_len + batch * group_size * passage_len
