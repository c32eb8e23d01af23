"""Shared pieces of the scale and robustness tests (gradient caching, FSDP, bf16, multi-host, faults).

A tiny real DualEncoder (BERT layout, 2 layers, hidden 32-64) and synthetic batches: these tests are about
arithmetic and placement, so compilation, not the model, should dominate their time.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mlret.config import default_config
from mlret.models import DualEncoder, Encoder, EncoderConfig, Tied, Untied

VOCAB = 96


def tiny_model(seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4, vocab: int = VOCAB,
               dtype: str = "float32", tied: bool = True, scale: float = 10.0) -> DualEncoder:
    """A random BERT-layout dual encoder. `scale` widens the init (HF's is 0.02) so embeddings differ and the
    loss sits far from log(B*G), which makes gradient comparisons meaningful."""
    cfg = EncoderConfig(model_type="bert", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64, type_vocab_size=2,
                        layer_norm_eps=1e-12, pad_token_id=0)

    def encoder(s: int) -> Encoder:
        enc = Encoder(cfg, dtype=dtype, rngs=nnx.Rngs(s))
        graphdef, state = nnx.split(enc)
        state = jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, state)
        return nnx.merge(graphdef, state)

    with nnx.use_eager_sharding(False):
        towers = Tied(encoder(seed)) if tied else Untied(encoder(seed), encoder(seed + 1))
        return DualEncoder(towers)


def tiny_config(mesh_shape=(1, 1, 1), *, steps: int = 10, **loss):
    c = default_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.mesh.replicated_param_threshold = 1000  # small, so that the tiny model's matrices must be sharded
    c.train.steps = steps
    c.optim.warmup_steps = 2
    c.loss.update(loss)
    return c


def tiny_batch(seed: int = 0, *, batch: int = 24, group: int = 3, length: int = 8,
               vocab: int = VOCAB) -> dict[str, np.ndarray]:
    """Random token ids with random-length padding and repeated unit ids (masked same-unit negatives)."""
    rng = np.random.default_rng(seed)
    mask = lambda *s: (np.arange(length) < rng.integers(3, length + 1, size=(*s, 1))).astype(np.int32)
    qm, pm = mask(batch), mask(batch, group)
    return {
        "query_ids": (rng.integers(1, vocab, (batch, length)) * qm).astype(np.int32), "query_mask": qm,
        "passage_ids": (rng.integers(1, vocab, (batch, group, length)) * pm).astype(np.int32), "passage_mask": pm,
        "unit_id": rng.integers(0, batch // 2, batch).astype(np.int32),
    }


def max_abs_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
