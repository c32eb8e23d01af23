"""A corpus spread over the hosts: each process reads, encodes, keeps and searches only its shard.

* `read_corpus_shard(path, index, count)`: process `index` of `count` reads only its part of the corpus, in one of
  the two forms of `mlret.eval.corpus`:
  - jsonl (a .jsonl / .jsonl.gz file or a folder of them): the corpus is seen as the byte stream of its files in
    name order, cut into `count` equal byte ranges, and the process streams only its range: in a plain .jsonl
    file a record belongs to the range holding its first byte (the reader seeks to the range and skips the
    partial line, as Hadoop's line splits do); a .jsonl.gz file cannot be split and belongs whole to the range
    holding its first byte (corpora published as many gz shards, like MIRACL's, spread evenly). Shards are about
    equal in bytes, not in records.
  - ArrayRecord (a .array_record file or a folder of them): the record counts are known up front, so with n
    records in all the process reads records [index * n // count, (index + 1) * n // count) by random access:
    shards differ by at most one record, whatever the file layout.
  Either way shards are contiguous in corpus order, so `shard_offset` (an all-gather of the shard sizes) turns a
  local row into the record's global position.
* `encode_corpus_shard`: the shard's passages through `ShardedEmbedder.local_passages` (every process encodes only
  its rows, all stepping together), kept as float32, bfloat16 or float16; with `cache_dir`, written there once
  (`<cache_dir>/shard-<index>-of-<count>.npz` with the docids and what made them) and read back on reuse.
* `sharded_topk`: each process searches its shard (exact or ScaNN, per language or not, as `build_index`
  picks), the [Q, k] lists are all-gathered and merged (`retrieval.merge_topk`) into the global top k, the same
  on every host. Queries are few and replicated: every host holds them all.

Host memory is the shard's texts while it is encoded and its embeddings: O(corpus / processes).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from mlret import storage
from mlret.errors import DataError
from mlret.eval.corpus import (
    ArrayRecordCorpus,
    check_languages,
    corpus_files,
    corpus_language,
    corpus_record,
    is_array_record,
)
from mlret.eval.retrieval import (
    RetrievalOptions,
    TopK,
    build_index,
    check_embeddings,
    merge_topk,
    topk_recall,
    warn_low_recall,
)

log = logging.getLogger(__name__)

EMBEDDING_DTYPES = ("float32", "bfloat16", "float16")


def gathered(x: np.ndarray) -> np.ndarray:
    """[processes, *x.shape]: every process's `x` (the same shape everywhere), on every process."""
    import jax  # lazy: jax-free start-up (the CLIs import mlret.eval before jax)

    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils  # lazy: jax-free start-up

    return np.asarray(multihost_utils.process_allgather(x))


def shard_offset(n_local: int) -> tuple[int, int]:
    """(global position of this process's first record, corpus size) from every process's shard size."""
    import jax  # lazy: jax-free start-up (the CLIs import mlret.eval before jax)

    sizes = gathered(np.array([n_local], dtype=np.int64))[:, 0]
    return int(sizes[: jax.process_index()].sum()), int(sizes.sum())


def _file_lines(file: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines of a plain file whose first byte lies in [start, stop)."""
    with storage.path(file).open("rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the range before
                f.readline()
        while (at := f.tell()) < stop:
            line = f.readline()
            if not line:
                break
            yield at, line


def _line_number(file: str, offset: int) -> int:
    """1-based number of the line starting at byte `offset` (read only to name a bad record)."""
    with storage.path(file).open("rb") as f:
        return f.read(offset).count(b"\n") + 1


def _gz_lines(file: str) -> Iterator[tuple[int, bytes]]:
    with storage.path(file).open("rb") as raw, gzip.GzipFile(fileobj=raw) as f:
        yield from enumerate(f, 1)


def read_corpus_shard(path: str, index: int = 0, count: int = 1, passage_template: str = "{title} {text}",
                      languages: list[str | None] | None = None) -> tuple[list[str], list[str]]:
    """(docids, passage texts) of shard `index` of `count` (see the module docstring), streamed; each record's
    `"lang"` (or None) is appended to `languages` when given."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}")
    files = corpus_files(path)
    if is_array_record(files):
        with ArrayRecordCorpus(files) as corpus:
            n = len(corpus)
            return corpus.read(n * index // count, n * (index + 1) // count, passage_template, languages)
    sizes = [storage.path(f).stat().length for f in files]
    total = sum(sizes)
    lo, hi = total * index // count, total * (index + 1) // count
    docids, texts = [], []
    pos = 0
    for file, size in zip(files, sizes):
        gz = file.endswith(".gz")
        if gz:
            lines = _gz_lines(file) if lo <= pos < hi else iter(())
        else:
            start, stop = max(lo - pos, 0), min(hi - pos, size)
            lines = _file_lines(file, start, stop) if start < stop else iter(())
        for at, line in lines:  # at: the line number (gz) or the line's byte offset (plain)
            if not line.strip():
                continue
            where = lambda at=at, gz=gz, file=file: f"{file}:{at if gz else _line_number(file, at)}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where()}: not JSON ({e})") from None
            docid, text = corpus_record(rec, where, passage_template)
            docids.append(docid)
            texts.append(text)
            if languages is not None:
                languages.append(corpus_language(rec, where))
        pos += size
    return docids, texts


@dataclasses.dataclass
class CorpusShard:
    """This process's rows of a corpus: docids, embeddings [n_local, D], the global row of the first, the corpus
    size, and the records' languages (their `"lang"`; None when the records carry none)."""

    docids: list[str]
    embeddings: np.ndarray
    offset: int
    total: int
    languages: list[str] | None = None


def _numpy_dtype(name: str):
    if name not in EMBEDDING_DTYPES:
        raise ValueError(f"config.eval.retrieval.corpus_dtype: {name!r} is not one of {', '.join(EMBEDDING_DTYPES)}")
    if name == "bfloat16":
        return ml_dtypes.bfloat16
    return np.dtype(name)


def encode_corpus_shard(embedder: Any, path: str, *, passage_template: str = "{title} {text}",
                        dtype: str = "float32", cache_dir: str | None = None, key: str = "") -> CorpusShard:
    """Read and encode this process's shard of the corpus at `path` (see the module docstring).

    embedder: a `ShardedEmbedder` (its `local_passages` runs every process together); in one process any
    embedder with `.passages` does. `key` says what made the embeddings (model, step, template): a cached shard
    with another key, corpus or shard layout is encoded again, never reused."""
    import jax  # lazy: jax-free start-up (the CLIs import mlret.eval before jax)

    index, count = jax.process_index(), jax.process_count()
    np_dtype = _numpy_dtype(dtype)
    cache = storage.path(cache_dir) / f"shard-{index:05d}-of-{count:05d}.npz" if cache_dir else None
    meta = json.dumps({"corpus": path, "template": passage_template, "dtype": dtype, "key": key})
    if cache and cache.exists():
        with cache.open("rb") as f, np.load(f) as z:
            if str(z["meta"]) == meta and "languages" in z:
                docids = json.loads(str(z["docids"]))
                langs = json.loads(str(z["languages"]))
                emb = z["embeddings"].view(np_dtype) if dtype == "bfloat16" else z["embeddings"]
                offset, total = shard_offset(len(docids))
                log.info("corpus shard %d/%d from %s (%d passages)", index, count, cache, len(docids))
                return CorpusShard(docids, emb, offset, total, langs)
        log.info("%s was made by other settings: encoding again", cache)
    record_langs: list[str | None] = []
    docids, texts = read_corpus_shard(path, index, count, passage_template, record_langs)
    langs = check_languages(record_langs, path)
    offset, total = shard_offset(len(docids))
    log.info("corpus shard %d/%d of %s: passages %d to %d of %d", index, count, path, offset,
             offset + len(docids), total)
    if count > 1 or hasattr(embedder, "local_passages"):
        emb = embedder.local_passages(texts, dtype=np_dtype)
    else:
        emb = np.asarray(embedder.passages(texts), dtype=np.float32).astype(np_dtype)
    if len(docids) and emb.shape[0] != len(docids):
        raise ValueError(f"{path}: the embedder returned {emb.shape[0]} rows for {len(docids)} passages")
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f"{cache.name}.tmp.npz"
        stored = emb.view(np.uint16) if dtype == "bfloat16" else emb
        with tmp.open("wb") as f:
            np.savez(f, meta=np.array(meta), docids=np.array(json.dumps(docids)), embeddings=stored,
                     languages=np.array(json.dumps(langs)))
        tmp.replace(cache)
    return CorpusShard(docids, emb, offset, total, langs)


def global_options(opts: RetrievalOptions, pool: int) -> RetrievalOptions:
    """`method = auto` decided on the whole pool, so that every host builds the same kind of index (and takes
    part in the same collectives) whatever its shard's size."""
    if opts.method != "auto":
        return opts
    return dataclasses.replace(opts, method="scann" if pool > opts.scann_threshold else "exact")


def _local_then_merged(queries: np.ndarray, shard: np.ndarray, offset: int, k: int, opts: RetrievalOptions,
                       languages: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Each process's top k of its shard (global rows), all-gathered and merged: [Q, k] with index -1 / score
    -inf where a query has fewer than k results (each query keeps all it has: a short list never cuts another)."""
    idx = np.full((len(queries), k), -1, dtype=np.int64)
    val = np.full((len(queries), k), -np.inf, dtype=np.float32)  # padding (a shard smaller than k) sorts last
    info: dict[str, Any] = {"method": opts.method}
    if len(shard):
        top = build_index(shard, k, opts, languages).search(queries, k)
        width = top.indices.shape[1]
        idx[:, :width] = np.where(top.indices >= 0, top.indices + offset, -1)
        val[:, :width] = top.scores
        info = top.info
    merged_idx, merged_val = merge_topk(list(gathered(idx)), list(gathered(val)), k)
    return merged_idx, merged_val, info


def sharded_topk(queries: np.ndarray, shard: np.ndarray, offset: int, k: int,
                 opts: RetrievalOptions | None = None, languages: Sequence[str] | None = None,
                 name: str = "") -> TopK:
    """The global top k of `queries` (the same on every process) over all processes' shards: each searches its
    `shard` (rows `offset`...) with the index the options pick for the whole pool, the lists are all-gathered and
    merged ([Q, min(k, pool)], padded with -1 / -inf only where a query has fewer results; `TopK.found`).
    `languages`: this shard's candidates' (the per-language index needs them). For an approximate index, recall@k
    against exact sharded search on `opts.recall_sample` queries is in `info["recall_vs_exact"]`; below
    `opts.recall_floor` the search is done again exactly (`info["fallback"]`) or raises `RecallError`
    (`opts.on_low_recall`): the merged lists and the recall are the same on every host, so they all decide alike."""
    opts = opts or RetrievalOptions()
    queries = check_embeddings(queries, "query embeddings")
    sizes = gathered(np.array([len(shard)], dtype=np.int64))[:, 0]
    pool = int(sizes.sum())
    k = min(k, pool)
    opts = global_options(opts, pool)
    if opts.method == "exact":  # one exact index or one per language: the same lists
        opts = dataclasses.replace(opts, per_language_index=False)
    idx, val, info = _local_then_merged(queries, shard, offset, k, opts, languages)
    short = int((idx < 0).any(axis=1).sum())
    info = {**info, "pool": pool, "shards": len(sizes), "short_queries": short}
    approximate = opts.method == "scann"
    if short:
        log.warning("%s: %d of %d queries have fewer than %d results", name or "search", short, len(queries), k)
    if approximate and opts.recall_sample > 0:
        exact_opts = dataclasses.replace(opts, method="exact", per_language_index=False)
        rng = np.random.default_rng(opts.seed)
        pick = np.sort(rng.choice(len(queries), size=min(opts.recall_sample, len(queries)), replace=False))
        exact = _local_then_merged(queries[pick], shard, offset, k, exact_opts, None)[0]
        info["recall_vs_exact"] = topk_recall(idx[pick], exact)
        info["recall_sample"] = len(pick)
        if warn_low_recall(info["recall_vs_exact"], opts, name, k):
            idx, val, exact_info = _local_then_merged(queries, shard, offset, k, exact_opts, None)
            info = {**exact_info, "pool": pool, "shards": len(sizes), "short_queries": 0, "fallback": info}
    return TopK(idx, val, info)


def global_docids(indices: np.ndarray, shard: CorpusShard) -> list[list[str]]:
    """The docids of global rows [Q, k]: each process fills in its shard's, all-gathered (every host gets all).
    Each query's list holds its real results only (its -1 padding, at the end of the row, is left out)."""
    mine = (indices >= shard.offset) & (indices < shard.offset + len(shard.docids))  # -1 (no result): nobody's
    encoded = {int(i): shard.docids[int(i) - shard.offset].encode("utf-8") for i in np.unique(indices[mine])}
    width = int(gathered(np.array([max(map(len, encoded.values()), default=1)]))[:, 0].max())
    buf = np.zeros((*indices.shape, width), dtype=np.uint8)
    for (q, j), i in zip(np.argwhere(mine), indices[mine]):
        b = encoded[int(i)]
        buf[q, j, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    full = gathered(buf).max(axis=0)  # one process owns each entry; the others left zeros
    return [[bytes(row).rstrip(b"\0").decode("utf-8") for row, i in zip(q, rows) if i >= 0]
            for q, rows in zip(full, indices)]
