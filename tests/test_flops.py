"""The MFU FLOP formula (mlret/flops.py) against XLA's own count of the compiled train step.

XLA's `cost_analysis()["flops"]` counts every operation (elementwise ones too); the formula counts matmuls
only. So the properties are: the formula never exceeds XLA's count and explains nearly all of it on a config
whose matmuls dominate (hidden 128: as in real encoders, h is large next to the elementwise work per
element), and the *change* in XLA's count when a passage length or the layer count changes matches the
formula's change (a term missed or counted twice would show there). One CPU device, so the count is the whole step's,
not one shard's.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mlret import flops, parallel
from mlret.config import default_config
from mlret.models import DualEncoder, Encoder, EncoderConfig, Tied
from mlret.step import build_train_step

B, G = 4, 2


def _encoder_config(layers: int) -> EncoderConfig:
    return EncoderConfig(model_type="bert", vocab_size=64, hidden_size=128, num_layers=layers, num_heads=4,
                         intermediate_size=512, max_position_embeddings=128, type_vocab_size=2,
                         layer_norm_eps=1e-12, pad_token_id=0)


def xla_step_flops(layers: int, query_len: int, passage_len: int) -> float:
    cfg = _encoder_config(layers)
    with nnx.use_eager_sharding(False):
        model = DualEncoder(Tied(Encoder(cfg, with_pooler=False, rngs=nnx.Rngs(0))))
    c = default_config()
    c.mesh.data = 1
    c.train.steps, c.optim.warmup_steps = 10, 2
    trainer, _ = build_train_step(model, c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
    shapes = {"query_ids": (B, query_len), "query_mask": (B, query_len), "passage_ids": (B, G, passage_len),
              "passage_mask": (B, G, passage_len), "unit_id": (B,)}
    batch = {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=trainer.batch_shardings[k])
             for k, s in shapes.items()}
    state = trainer.abstract_state()
    cost = trainer.step.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older jax returned one dict per device
    return float(cost["flops"])


@pytest.fixture(scope="module")
def counts() -> dict[tuple[int, int, int], float]:
    return {key: xla_step_flops(*key) for key in ((2, 16, 32), (2, 16, 64), (3, 16, 32))}


def test_formula_is_the_bulk_of_xlas_count(counts):
    xla = counts[(2, 16, 32)]
    ours = flops.train_step_flops(_encoder_config(2), B, G, 16, 32)
    assert ours <= xla, (ours, xla)
    assert ours >= 0.85 * xla, f"formula {ours:.4g} explains only {ours / xla:.1%} of XLA's {xla:.4g}"


@pytest.mark.parametrize("other", [(2, 16, 64), (3, 16, 32)], ids=["passage_len", "layers"])
def test_formula_tracks_changes(counts, other):
    base = (2, 16, 32)
    d_xla = counts[other] - counts[base]
    d_ours = (flops.train_step_flops(_encoder_config(other[0]), B, G, other[1], other[2])
              - flops.train_step_flops(_encoder_config(base[0]), B, G, base[1], base[2]))
    assert d_ours == pytest.approx(d_xla, rel=0.1), (d_ours, d_xla)
