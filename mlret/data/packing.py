"""Packed batches: several texts per fixed-length row, with segment ids (T5X / MaxText style), on the host.

MLQA-R questions have a median of 18 tokens and answer sentences 42 under the MiniLM tokenizer, so a batch padded
to 64 / 192 tokens is mostly padding, and padding each batch to its longest text barely helps (the longest of 64
sentences is nearly always close to 192). Packing puts the texts of a batch one after the other in rows of the
configured length (`config.data.query_len` for queries, `passage_len` for passages), so every text fits in one
row; `segments[r, t]` is the index of the text that token t of row r belongs to (-1: padding). The encoder
attends within a segment only and restarts positions at its first token (`mlret.models.encoder`), and pooling
is per segment (`DualEncoder.encode_*_packed`), so a text's embedding is the one it gets on its own padded row.

Layout. The texts are packed in *pieces*, one per (data-parallel shard, gradient-cache chunk), in the order
`mlret.gradcache.to_chunks` cuts the batch: piece (d, c) holds the pairs that shard d encodes in chunk c, and
its rows are the ones that shard holds for that chunk. So no text crosses a device or a chunk, and the text
indices in `segments` are positions within the chunk (the global pair index without gradient caching).
Every piece gets the same number of rows, the most any piece of the global batch needs rounded up to a
multiple of `config.data.packing_rows_multiple`: shapes stay static and few (one per distinct row count; each
compiles once and lands in the persistent compilation cache). A piece is packed first-fit decreasing (longest
text first, ties by index), a pure function of its tokens, so the layout of the global batch is the same
whatever the number of processes that build it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, in placement order) of total length <= capacity; every length must be in
    [1, capacity]. Deterministic: longest first, ties by index; each item goes to the first bin it fits."""
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"first_fit_decreasing: lengths must lie in [1, {capacity}], got {lengths.min()}.."
                         f"{lengths.max()}")
    bins: list[list[int]] = []
    room = np.full(len(lengths) + 1, capacity, np.int64)  # room[len(bins)] is the next, empty bin
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        n = int(lengths[i])
        b = int(np.argmax(room[:len(bins) + 1] >= n))  # the first bin it fits (an empty one at worst)
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[b] -= n
    return bins


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch is cut into pieces: `shards` data-parallel shards x `chunks` gradient-cache chunks."""

    shards: int
    chunks: int
    rows_multiple: int

    def pieces(self, pairs: int) -> int:
        if pairs % (self.shards * self.chunks):
            raise ValueError(f"packing: {pairs} pairs do not split into {self.shards} shards x {self.chunks} chunks")
        return pairs // (self.shards * self.chunks)


def _pack_piece(ids: np.ndarray, mask: np.ndarray, first_index: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts `ids` [n, L] (lengths from `mask`) -> (ids [rows, L], segments [rows, L]) with text j's tokens under
    segment id first_index + j."""
    lengths = mask.sum(axis=1)
    bins = first_fit_decreasing(lengths, ids.shape[1])
    out_ids = np.zeros((rows, ids.shape[1]), ids.dtype)
    segments = np.full((rows, ids.shape[1]), -1, np.int32)
    for r, members in enumerate(bins):
        t = 0
        for j in members:
            n = int(lengths[j])
            out_ids[r, t:t + n] = ids[j, :n]
            segments[r, t:t + n] = first_index + j
            t += n
    return out_ids, segments


def rows_needed(mask: np.ndarray, capacity: int) -> int:
    """Rows first-fit decreasing needs for the texts of `mask` [n, L]."""
    return len(first_fit_decreasing(mask.sum(axis=1), capacity))


def pack_batch(local: Mapping[str, np.ndarray], layout: Layout, *, first_shard: int, global_pairs: int,
               agree: Callable[[np.ndarray], np.ndarray] = lambda n: n) -> dict[str, np.ndarray]:
    """This process's slice of a padded batch (`query_ids [b, Lq]`, `passage_ids [b, G, Lp]` and masks, b pairs
    on the consecutive shards first_shard, first_shard + 1, ...) -> its slice of the packed global batch:
    `query_ids` / `query_segments` [s * c * Rq, Lq] and `passage_ids` / `passage_segments` [s * c * Rp, Lp]
    (s local shards, c chunks), rows ordered shard-major then chunk; the other fields unchanged.

    `agree(rows)` returns the elementwise maximum over all processes of the (query, passage) row counts this
    process needs (those of the global batch's fullest pieces): the identity in one process.
    """
    q_ids, q_mask = local["query_ids"], local["query_mask"]
    b, g, lp = local["passage_ids"].shape
    p_ids, p_mask = local["passage_ids"].reshape(b * g, lp), local["passage_mask"].reshape(b * g, lp)
    per = layout.pieces(global_pairs)
    if b % per:
        raise ValueError(f"packing: this process's {b} pairs are not whole pieces of {per} pairs")
    # Pieces in shard-major, chunk-minor order: piece k holds pairs k*per .. (k+1)*per - 1 of this slice.
    pieces = [slice(k * per, (k + 1) * per) for k in range(b // per)]
    need_q = max(rows_needed(q_mask[s], q_ids.shape[1]) for s in pieces)
    need_p = max(rows_needed(p_mask[s.start * g:s.stop * g], lp) for s in pieces)
    rows_q, rows_p = (int(n) for n in agree(np.array([round_up(need_q, layout.rows_multiple),
                                                       round_up(need_p, layout.rows_multiple)], np.int32)))
    out = {k: v for k, v in local.items() if k not in ("query_ids", "query_mask", "passage_ids", "passage_mask")}
    parts_q, parts_p = [], []
    for k, s in enumerate(pieces):
        shard = first_shard + k // layout.chunks
        base = shard * per  # the piece's first pair among the pairs of its chunk (to_chunks' order)
        parts_q.append(_pack_piece(q_ids[s], q_mask[s], base, rows_q))
        parts_p.append(_pack_piece(p_ids[s.start * g:s.stop * g], p_mask[s.start * g:s.stop * g], base * g, rows_p))
    out["query_ids"] = np.concatenate([i for i, _ in parts_q])
    out["query_segments"] = np.concatenate([m for _, m in parts_q])
    out["passage_ids"] = np.concatenate([i for i, _ in parts_p])
    out["passage_segments"] = np.concatenate([m for _, m in parts_p])
    return out
