"""Sharded encoding of evaluation texts on the training mesh: the embedder the evaluators are given.

Texts are cut into global batches of `batch_size` rows (a multiple of the data-parallel size). Each global batch is
handed to jax with `jax.make_array_from_callback` (a process supplies only the rows its own devices hold), and the
encode function is jitted with the batch split over the mesh's batch axes (the `batch` rule of
`config.mesh.rules`) and the embeddings replicated on the way out, so every host reads the whole batch back.
The last batch is padded with empty texts to the full size and the padding rows are dropped afterwards: every
host runs the same number of steps with the same shapes (one compilation per tower), which multi-host
collectives require. A tqdm bar with an ETA runs on process 0.

Packed encoding (the default, `packing=True`, config.eval.packing). Evaluation texts are short (XQuAD-R questions
have a median of 16 tokens and its sentences 37 under the MiniLM tokenizer), so padded batches encode mostly
padding. Instead each text goes, whole, into a row of a few fixed widths (the power of two at least twice its
length, at least `MIN_PACK_WIDTH`, at most the tokenizer's length), first-fit decreasing within a window of texts
(`mlret.data.packing`, the packing training uses), and each call encodes `pack_tokens` tokens: rows x width with
rows = pack_tokens / width, a multiple of the data-parallel size. A text attends only within itself and its
positions restart at its first token (the model's packed path, `DualEncoder.encode_*_packed`), so its embedding
is the one a padded batch gives (tests/test_eval_encode.py checks it on MiniLM). One compiled shape per width
(4 for 256-token texts), shared by the query and passage towers when they are the same function; every process
builds the same layout, so calls and shapes agree across hosts. A model whose encoder has no packed path (a
family registered from outside mlret without `segment_ids`) is encoded in length-sorted padded batches instead,
and the embedder says so in the log. `local_passages` (corpus shards, `mlret.eval.sharded`) always pads.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
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
from mlret.data.packing import first_fit_decreasing
from mlret.eval.sharded import gathered
from mlret.models import TextTokenizer

# One jitted function per (graph structure, tower, mesh): periodic evaluations reuse the compiled encoder
# instead of re-tracing a new closure every time.
_ENCODE_FNS: dict[tuple[Any, str, Any, Any], Any] = {}


def _encode_fn(graphdef: Any, tower: str, mesh: Mesh, rules: parallel.Rules, out_spec: P | None = None):
    """The jitted encoder of one tower: batch split over the `batch` rule's axes, embeddings out as `out_spec`
    (default replicated: every host reads every row); the encoder's activations pinned by `rules`
    (`parallel.activation_sharding`)."""
    out_spec = P() if out_spec is None else out_spec
    batch_spec = parallel.batch_spec(rules, mesh)
    key = (graphdef, tower, mesh, rules, out_spec)
    if key not in _ENCODE_FNS:
        def encode(state, ids, mask):
            model = nnx.merge(graphdef, state)
            fn = model.encode_query if tower == "query" else model.encode_passage
            with parallel.activation_sharding(mesh, rules):
                return fn(ids, mask)

        in_batch = NamedSharding(mesh, batch_spec)
        _ENCODE_FNS[key] = jax.jit(encode, in_shardings=(None, in_batch, in_batch),
                                   out_shardings=NamedSharding(mesh, out_spec))
    return _ENCODE_FNS[key]


log = logging.getLogger(__name__)

# Packed encoding: the narrowest row width, and the tokens (rows x width) of one call. On the 2-core CPU of
# docs/benchmarks.md MiniLM encoded XQuAD-R 10-15% faster in calls of 2048 tokens than of 4096 or 8192 (a call's
# activations stay in cache: the GELU input is 2048 x 1536 floats, 12 MiB); an accelerator fills its cores at
# any of them, since R x W tokens is the same work as a padded batch of R rows.
MIN_PACK_WIDTH = 32
PACK_TOKENS = 2048


def _packed_fn(graphdef: Any, tower: str, mesh: Mesh, rules: parallel.Rules, shards: int):
    """The jitted packed encoder of one tower: rows split over `batch_spec`, ids and segments [R, W] ->
    embeddings [R * W, D] (one slot per token: a call can hold at most that many texts), replicated out. The rows
    are `shards` blocks (`pack_calls`), one per data-parallel device, each pooling its own texts. Compiled once
    per (R, W)."""
    batch_spec = parallel.batch_spec(rules, mesh)
    key = (graphdef, tower, mesh, rules, "packed", shards)
    if key not in _ENCODE_FNS:
        def encode(state, ids, segments):
            model = nnx.merge(graphdef, state)
            fn = model.encode_query_packed if tower == "query" else model.encode_passage_packed
            with parallel.activation_sharding(mesh, rules):
                return fn(ids, segments, ids.shape[0] * ids.shape[1], shards)

        in_batch = NamedSharding(mesh, batch_spec)
        _ENCODE_FNS[key] = jax.jit(encode, in_shardings=(None, in_batch, in_batch),
                                   out_shardings=NamedSharding(mesh, P()))
    return _ENCODE_FNS[key]


def packed_path(model: nnx.Module) -> str | None:
    """None when `model` can encode packed rows, else why not (the embedder then pads length-sorted batches):
    it needs `encode_query_packed` / `encode_passage_packed` (DualEncoder) and towers whose encoder takes
    `segment_ids` (every family of mlret.models.family does; one registered from outside may not)."""
    if not (hasattr(model, "encode_query_packed") and hasattr(model, "encode_passage_packed")):
        return f"{type(model).__name__} has no encode_query_packed / encode_passage_packed"
    towers = getattr(model, "towers", None)
    for name in ("query", "passage"):
        encoder = getattr(towers, name, None)
        if not callable(encoder) or "segment_ids" not in inspect.signature(type(encoder).__call__).parameters:
            return f"its {name} encoder ({type(encoder).__name__}) takes no segment_ids"
    return None


def pack_widths(lengths: np.ndarray, full: int, smallest: int = MIN_PACK_WIDTH) -> np.ndarray:
    """The row width each text is packed into: the power of two at least twice its length (so that first-fit
    packs two or more texts to a row, and attention spans few padding keys), at least `smallest`, at most
    `full` (the tokenizer's length, which every text fits)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    widths = np.full(lengths.shape, max(1, smallest), np.int64)
    while (short := widths < 2 * lengths).any() and (widths[short] < full).any():
        widths = np.where(short, widths * 2, widths)
    return np.minimum(widths, full)


def pack_calls(ids: np.ndarray, mask: np.ndarray, full: int, *, tokens: int = PACK_TOKENS, shards: int = 1,
               smallest: int = MIN_PACK_WIDTH):
    """The packed calls of tokenized texts `ids`, `mask` [N, L] (padding on either side; texts without a token
    are left out): yields (width, ids [R, W], segments [R, W], texts [n], slots [n]): text texts[i] is segment
    slots[i], whose embedding is row slots[i] of the call's output.

    R = tokens / W rounded down to a multiple of `shards` (at least `shards`); the rows are `shards` equal blocks
    and block d's texts have slots d * R/shards * W onwards (`DualEncoder._embed_packed`'s blocked layout).
    Deterministic: every process gets the same calls."""
    lengths = mask.sum(axis=1).astype(np.int64)
    starts = np.argmax(mask > 0, axis=1)  # 0 on right-padded rows, the first real token on left-padded ones
    widths = pack_widths(lengths, full, smallest)
    for width in np.unique(widths[lengths > 0]).tolist():
        members = np.nonzero((widths == width) & (lengths > 0))[0]
        rows = max(shards, tokens // width // shards * shards)
        block_rows = rows // shards
        bins = first_fit_decreasing(lengths[members], width)
        for c0 in range(0, len(bins), rows):
            call_ids = np.zeros((rows, width), ids.dtype)
            segments = np.full((rows, width), -1, np.int32)
            texts, slots = [], []
            used = [0] * shards
            for r, members_of_row in enumerate(bins[c0:c0 + rows]):
                block = r // block_rows
                t = 0
                for j in members_of_row:
                    i, n = int(members[j]), int(lengths[members[j]])
                    slot = block * block_rows * width + used[block]
                    used[block] += 1
                    call_ids[r, t:t + n] = ids[i, starts[i]:starts[i] + n]
                    segments[r, t:t + n] = slot
                    texts.append(i)
                    slots.append(slot)
                    t += n
            yield width, call_ids, segments, np.asarray(texts, np.int64), np.asarray(slots, np.int64)


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

    With `packing` (default) `queries` / `passages` pack the texts of each window instead (the module docstring;
    `pack_tokens` tokens a call) and `length_buckets` applies only where the model has no packed path, to the
    texts without a token and to `local_passages`.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any, mesh: Mesh, rules: parallel.Rules | None = None, *,
                 batch_size: int = 256, progress: bool = True, length_buckets: bool = True,
                 sort_window: int = 64, packing: bool = True, pack_tokens: int = PACK_TOKENS):
        rules = parallel.parse_rules(rules if rules is not None else (("batch", ("data", "fsdp")),))
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.batch_spec = P(parallel.batch_axes(rules, mesh))
        dp = parallel.data_parallel_size(rules, mesh)
        # Round up so that every data-parallel device gets the same number of rows.
        self.batch_size = max(dp, int(math.ceil(batch_size / dp)) * dp)
        self.progress = progress
        padding_side = getattr(getattr(tokenizer, "hf", None), "padding_side", "right")
        self.length_buckets = length_buckets and padding_side == "right"
        self.sort_window = max(1, sort_window)
        self.dp = dp
        why_not = packed_path(model) if packing else None
        if why_not:
            log.warning("evaluation encodes length-sorted padded batches, not packed rows: %s", why_not)
        self.packing = packing and why_not is None
        self.pack_tokens = int(pack_tokens)
        # Tied towers with the same prompt handling are one function: queries reuse the passages' compilations.
        self.same_towers = (bool(getattr(model, "tied", False))
                            and len(set(getattr(model, "prompt_lengths", (0, 1)))) == 1)
        self.steps_run = 0  # global batches encoded, for tests and logs
        self.lengths_used: set[tuple[str, int]] = set()  # (tower, padded length or packed row width)
        self.shapes_used: set[tuple[str, tuple[int, int]]] = set()  # (tower, (rows, length)) of every call

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
        fn = _encode_fn(self.graphdef, "passage", self.mesh, self.rules, self.batch_spec)
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

    def _fn_tower(self, tower: str) -> str:
        return "passage" if self.same_towers else tower

    def _encode(self, texts: Sequence[str], tower: str) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("ShardedEmbedder: pass a list of strings, not one string")
        return self._encode_packed(list(texts), tower) if self.packing else self._encode_padded(list(texts), tower)

    def _encode_packed(self, texts: list[str], tower: str) -> np.ndarray:
        """Packed calls over windows of `batch_size * sort_window` texts (module docstring); a text without a
        token (no special tokens, empty text) has no segment and is encoded padded."""
        fn = _packed_fn(self.graphdef, self._fn_tower(tower), self.mesh, self.rules, self.dp)
        n = len(texts)
        full = self.tokenizer.query_len if tower == "query" else self.tokenizer.passage_len
        out: np.ndarray | None = None
        empty: list[int] = []
        bar = tqdm(total=n, desc=f"encode {tower}", unit="text", dynamic_ncols=True, leave=False,
                   disable=not self.progress or jax.process_index() != 0 or n == 0)
        pending: list[tuple[np.ndarray, np.ndarray, jax.Array]] = []

        def collect(rows: np.ndarray, slots: np.ndarray, emb: jax.Array) -> None:
            nonlocal out
            host = np.asarray(emb, dtype=np.float32)  # replicated: every process reads every text's embedding
            if out is None:
                out = np.empty((n, host.shape[-1]), dtype=np.float32)
            out[rows] = host[slots]
            bar.update(len(rows))

        window = self.batch_size * self.sort_window
        with jax.set_mesh(self.mesh):
            for w0 in range(0, n, window):
                ids, mask = self._tokenize(texts[w0:w0 + window], tower)
                empty += (w0 + np.nonzero(mask.sum(axis=1) == 0)[0]).tolist()
                for width, call_ids, segments, rows, slots in pack_calls(ids, mask, full, tokens=self.pack_tokens,
                                                                         shards=self.dp):
                    self.lengths_used.add((tower, width))
                    self.shapes_used.add((tower, call_ids.shape))
                    pending.append((w0 + rows, slots, fn(self.state, *self._device_batch(call_ids, segments))))
                    self.steps_run += 1
                    # One call in flight: packing the next one overlaps with the device work.
                    if len(pending) > 1:
                        collect(*pending.pop(0))
            while pending:
                collect(*pending.pop(0))
        bar.close()
        if empty:
            rest = self._encode_padded([texts[i] for i in empty], tower)
            if out is None:
                out = np.empty((n, rest.shape[-1]), dtype=np.float32)
            out[empty] = rest
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def _encode_padded(self, texts: list[str], tower: str) -> np.ndarray:
        """Padded batches of `batch_size` rows: length-sorted and cut to power-of-two lengths with
        `length_buckets`, else at the tokenizer's full length."""
        fn = _encode_fn(self.graphdef, self._fn_tower(tower), self.mesh, self.rules)
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
                self.shapes_used.add((tower, bi.shape))
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
    bar, length buckets and packing, and config.mesh.rules."""

    query_len: int
    passage_len: int
    query_prefix: str
    passage_prefix: str
    batch_size: int
    progress: bool
    length_buckets: bool
    packing: bool
    rules: parallel.Rules

    def tokenizer(self, model_dir: str, shared: TextTokenizer | None = None) -> TextTokenizer:
        """The TextTokenizer of the model folder `model_dir` with these lengths and prefixes; with `shared` (a
        TextTokenizer of the same folder: a training run's), one that shares its Hugging Face tokenizer
        (`TextTokenizer.with_lengths`) instead of loading the folder's again."""
        if shared is not None and shared.name_or_path == str(model_dir):
            return shared.with_lengths(query_len=self.query_len, passage_len=self.passage_len,
                                       query_prefix=self.query_prefix, passage_prefix=self.passage_prefix)
        return TextTokenizer(model_dir, query_len=self.query_len, passage_len=self.passage_len,
                             query_prefix=self.query_prefix, passage_prefix=self.passage_prefix)

    def embedder(self, model: nnx.Module, mesh: Mesh, tokenizer: Any) -> ShardedEmbedder:
        """A ShardedEmbedder of `model` (placed on `mesh`) with these settings."""
        return ShardedEmbedder(model, tokenizer, mesh, self.rules, batch_size=self.batch_size,
                               progress=self.progress, length_buckets=self.length_buckets,
                               packing=self.packing)


def embed_spec(config: Any) -> EmbedSpec:
    """Evaluation's frozen view of a validated config."""
    ev = config.eval
    return EmbedSpec(
        query_len=int(ev.query_len or config.data.query_len),
        passage_len=int(ev.passage_len or config.data.passage_len),
        query_prefix=config.model.query_prefix if ev.query_prefix is None else ev.query_prefix,
        passage_prefix=config.model.passage_prefix if ev.passage_prefix is None else ev.passage_prefix,
        batch_size=int(ev.batch_size), progress=bool(ev.progress), length_buckets=bool(ev.length_buckets),
        packing=bool(ev.packing),
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
