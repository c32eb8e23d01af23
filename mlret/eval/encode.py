"""Sharded encoding of evaluation texts on the training mesh: the embedder the evaluators are given.

Texts are cut into global batches of `batch_size` rows (a multiple of the data-parallel size). Each global batch is
handed to jax with `jax.make_array_from_callback` (a process supplies only the rows its own devices hold), and the
encode function is jitted with the batch split over the mesh's batch axes (the `batch` rule of
`config.mesh.rules`) and the embeddings replicated on the way out, so every host reads the whole batch back.
The last batch is padded with empty texts to the full size and the padding rows are dropped afterwards: every
host runs the same number of steps with the same shapes (one compilation per tower), which multi-host
collectives require. A tqdm bar with an ETA runs on process 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from mlret import parallel
from mlret.eval.sharded import gathered
from mlret.models import TextTokenizer

# One jitted function per (graph structure, tower, mesh): periodic evaluations reuse the compiled encoder
# instead of re-tracing a new closure every time.
_ENCODE_FNS: dict[tuple[Any, str, Any, Any], Any] = {}


def _encode_fn(graphdef: Any, tower: str, mesh: Mesh, batch_spec: P, out_spec: P | None = None):
    """The jitted encoder of one tower: batch split over `batch_spec`, embeddings out as `out_spec` (default
    replicated: every host reads every row)."""
    out_spec = P() if out_spec is None else out_spec
    key = (graphdef, tower, mesh, batch_spec, out_spec)
    if key not in _ENCODE_FNS:
        def encode(state, ids, mask):
            model = nnx.merge(graphdef, state)
            fn = model.encode_query if tower == "query" else model.encode_passage
            return fn(ids, mask)

        in_batch = NamedSharding(mesh, batch_spec)
        _ENCODE_FNS[key] = jax.jit(encode, in_shardings=(None, in_batch, in_batch),
                                   out_shardings=NamedSharding(mesh, out_spec))
    return _ENCODE_FNS[key]


def bucket_length(n_tokens: int, full: int, smallest: int = 16) -> int:
    """The padded length for a batch whose longest row has n_tokens: the next power of two (at least
    `smallest`), capped at the tokenizer's full length. Few distinct lengths = few compilations."""
    length = smallest
    while length < n_tokens:
        length *= 2
    return min(length, full)


class ShardedEmbedder:
    """`.queries(texts)` / `.passages(texts)` -> float32 numpy [N, D], encoded on `mesh`.

    model: a DualEncoder whose arrays are already placed on the mesh (sharded by the rules or replicated);
    tokenizer: a TextTokenizer (static lengths and prefixes are its business).

    With `length_buckets`, texts are sorted by token count within windows of `sort_window` batches and each
    batch is cut to a power-of-two length (padding is on the right and masked, so the embeddings are those of
    the full-length encoding): far less padding to encode, at the cost of one compilation per length used.
    Every process tokenizes every text of a window (cheap next to encoding) so that all of them pick the same
    order and lengths, and each process hands jax only the rows its devices hold.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any, mesh: Mesh, rules: parallel.Rules | None = None, *,
                 batch_size: int = 256, progress: bool = True, length_buckets: bool = True,
                 sort_window: int = 64):
        rules = parallel.parse_rules(rules if rules is not None else (("batch", ("data", "fsdp")),))
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.batch_spec = P(parallel.batch_axes(rules, mesh))
        dp = parallel.data_parallel_size(rules, mesh)
        # Round up so that every data-parallel device gets the same number of rows.
        self.batch_size = max(dp, int(math.ceil(batch_size / dp)) * dp)
        self.progress = progress
        padding_side = getattr(getattr(tokenizer, "hf", None), "padding_side", "right")
        self.length_buckets = length_buckets and padding_side == "right"
        self.sort_window = max(1, sort_window)
        self.steps_run = 0  # global batches encoded, for tests and logs
        self.lengths_used: set[tuple[str, int]] = set()

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "query")

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, "passage")

    def local_passages(self, texts: Sequence[str], dtype: Any = np.float32) -> np.ndarray:
        """This process's `texts` only -> their embeddings [len(texts), D] in `dtype`, the rows of no other
        process (a corpus shard: see `mlret.eval.sharded`). Every process must call it, with its own texts.

        Each global batch is `batch_size / processes` rows of every process (padded where a process has run
        out), batch-sharded in and out, so a process reads back only its rows; one small all-gather per batch
        agrees on the padded length and on when every process is done."""
        texts = list(texts)
        n, procs = len(texts), jax.process_count()
        local_b = self.batch_size // procs
        if local_b * procs != self.batch_size:
            raise ValueError(f"config.eval.batch_size: {self.batch_size} does not split over {procs} processes")
        fn = _encode_fn(self.graphdef, "passage", self.mesh, self.batch_spec, self.batch_spec)
        full = self.tokenizer.passage_len
        pad_ids, pad_mask = self._tokenize([""], "passage")
        out = None
        total = int(gathered(np.array([n]))[:, 0].sum())
        bar = tqdm(total=total, desc="encode corpus shards", unit="text", dynamic_ncols=True, leave=False,
                   disable=not self.progress or jax.process_index() != 0 or total == 0)
        batches = self._batches(texts, local_b, "passage")
        with jax.set_mesh(self.mesh):
            while True:
                rows, ids, mask = next(batches, (np.zeros(0, np.int64), None, None))
                longest = int(mask.sum(axis=1).max()) if len(rows) else 0
                agreed = gathered(np.array([len(rows), longest]))
                if agreed[:, 0].max() == 0:
                    break
                length = bucket_length(int(agreed[:, 1].max()), full) if self.length_buckets else full
                bi = np.repeat(pad_ids[:, :length], local_b, axis=0)
                bm = np.repeat(pad_mask[:, :length], local_b, axis=0)
                if len(rows):
                    bi[: len(rows)], bm[: len(rows)] = ids[:, :length], mask[:, :length]
                gi, gm = multihost_utils.host_local_array_to_global_array((bi, bm), self.mesh, self.batch_spec)
                emb = fn(self.state, gi, gm)
                host = np.asarray(multihost_utils.global_array_to_host_local_array(emb, self.mesh, self.batch_spec))
                if out is None:
                    out = np.empty((n, host.shape[-1]), dtype=dtype)
                out[rows] = host[: len(rows)].astype(dtype)
                self.steps_run += 1
                self.lengths_used.add(("passage", length))
                bar.update(int(agreed[:, 0].sum()))
        bar.close()
        return out if out is not None else np.zeros((0, 0), dtype=dtype)

    def _batches(self, texts: list[str], b: int, tower: str):
        """(row indices, ids, mask) of batches of at most `b` texts, sorted by length within windows of
        `sort_window` batches when length buckets are on (so that a batch pads to few tokens)."""
        window = b * self.sort_window
        for w0 in range(0, len(texts), window):
            ids, mask = self._tokenize(texts[w0:w0 + window], tower)
            lengths = mask.sum(axis=1)
            order = np.argsort(-lengths, kind="stable") if self.length_buckets else np.arange(len(ids))
            for s0 in range(0, len(order), b):
                rows = order[s0:s0 + b]
                yield w0 + rows, ids[rows], mask[rows]

    def _tokenize(self, texts: list[str], tower: str) -> tuple[np.ndarray, np.ndarray]:
        if tower == "query":
            b = self.tokenizer.queries(texts)
            return b["query_ids"], b["query_mask"]
        b = self.tokenizer.passages(texts)
        return b["passage_ids"], b["passage_mask"]

    def _device_batch(self, ids: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
        sharding = NamedSharding(self.mesh, self.batch_spec)
        # The callback is asked only for the slices this process's devices hold.
        return (jax.make_array_from_callback(ids.shape, sharding, lambda idx: ids[idx]),
                jax.make_array_from_callback(mask.shape, sharding, lambda idx: mask[idx]))

    def _encode(self, texts: Sequence[str], tower: str) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("ShardedEmbedder: pass a list of strings, not one string")
        texts = list(texts)
        fn = _encode_fn(self.graphdef, tower, self.mesh, self.batch_spec)
        n, b = len(texts), self.batch_size
        full = self.tokenizer.query_len if tower == "query" else self.tokenizer.passage_len
        pad_ids, pad_mask = self._tokenize([""], tower)  # the filler row of the last, partial batch
        out: np.ndarray | None = None
        bar = tqdm(total=n, desc=f"encode {tower}", unit="text", dynamic_ncols=True, leave=False,
                   disable=not self.progress or jax.process_index() != 0 or n == 0)
        pending: list[tuple[np.ndarray, jax.Array]] = []

        def collect(rows: np.ndarray, emb: jax.Array) -> None:
            nonlocal out
            host = np.asarray(emb, dtype=np.float32)  # replicated: every process reads the whole batch
            if out is None:
                out = np.empty((n, host.shape[-1]), dtype=np.float32)
            out[rows] = host[: len(rows)]
            bar.update(len(rows))

        with jax.set_mesh(self.mesh):
            for rows, ids, mask in self._batches(texts, b, tower):
                length = bucket_length(int(mask.sum(axis=1).max()), full) if self.length_buckets else full
                bi = np.repeat(pad_ids[:, :length], b, axis=0)
                bm = np.repeat(pad_mask[:, :length], b, axis=0)
                bi[: len(rows)], bm[: len(rows)] = ids[:, :length], mask[:, :length]
                self.lengths_used.add((tower, length))
                pending.append((rows, fn(self.state, *self._device_batch(bi, bm))))
                self.steps_run += 1
                # One batch in flight: preparing the next batch overlaps with the device work.
                if len(pending) > 1:
                    collect(*pending.pop(0))
            while pending:
                collect(*pending.pop(0))
        bar.close()
        if out is None:
            return np.zeros((0, 0), dtype=np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    """How evaluation tokenizes and encodes, read once from a validated config (`embed_spec`): config.eval's
    lengths and prefixes where set, else the training ones (config.data, config.model), its batch size, progress
    bar and length buckets, and config.mesh.rules."""

    query_len: int
    passage_len: int
    query_prefix: str
    passage_prefix: str
    batch_size: int
    progress: bool
    length_buckets: bool
    rules: parallel.Rules

    def tokenizer(self, model_dir: str) -> TextTokenizer:
        """The TextTokenizer of the model folder `model_dir` with these lengths and prefixes."""
        return TextTokenizer(model_dir, query_len=self.query_len, passage_len=self.passage_len,
                             query_prefix=self.query_prefix, passage_prefix=self.passage_prefix)

    def embedder(self, model: nnx.Module, mesh: Mesh, tokenizer: Any) -> ShardedEmbedder:
        """A ShardedEmbedder of `model` (placed on `mesh`) with these settings."""
        return ShardedEmbedder(model, tokenizer, mesh, self.rules, batch_size=self.batch_size,
                               progress=self.progress, length_buckets=self.length_buckets)


def embed_spec(config: Any) -> EmbedSpec:
    """Evaluation's frozen view of a validated config."""
    ev = config.eval
    return EmbedSpec(
        query_len=int(ev.query_len or config.data.query_len),
        passage_len=int(ev.passage_len or config.data.passage_len),
        query_prefix=config.model.query_prefix if ev.query_prefix is None else ev.query_prefix,
        passage_prefix=config.model.passage_prefix if ev.passage_prefix is None else ev.passage_prefix,
        batch_size=int(ev.batch_size), progress=bool(ev.progress), length_buckets=bool(ev.length_buckets),
        rules=parallel.parse_rules(config.mesh.rules))


def eval_tokenizer(config: Any, model_dir: str) -> TextTokenizer:
    """The TextTokenizer evaluation uses: config.eval lengths / prefixes where set, else the training ones."""
    return embed_spec(config).tokenizer(model_dir)


def place_model(model: nnx.Module, mesh: Mesh, rules: parallel.Rules) -> nnx.Module:
    """Put a freshly loaded model's arrays on the mesh as the logical-axis rules say."""
    graphdef, state = nnx.split(model)
    shardings = nnx.to_pure_dict(parallel.state_shardings(state, mesh, rules))
    placed = jax.device_put(nnx.to_pure_dict(state), shardings)
    nnx.replace_by_pure_dict(state, placed)
    return nnx.merge(graphdef, state)


def make_embedder(model: nnx.Module, config: Any, mesh: Mesh, tokenizer: Any) -> ShardedEmbedder:
    """A ShardedEmbedder configured from config.eval (batch size, progress) and config.mesh.rules."""
    return embed_spec(config).embedder(model, mesh, tokenizer)
