"""Multilingual-aware retrieval: one ScaNN index per candidate language against exact search and a single tree.

    python benchmarks/retrieval_scale.py --embeddings runs/bench/xquad_me5small.npz [--n 2000000 --dim 384
        --languages 10 --queries 2000 --k 100] [--skip-xquad] [--skip-synthetic] [--write]

* XQuAD-R: the multilingual pool (13,090 questions of 11 languages against all 13,014 candidate sentences),
  embedded by multilingual-e5-small (`benchmarks/eval.py --embeddings F.npz` encodes and caches them). Exact top
  k against a single ScaNN tree (the evaluation defaults) and against `PerLanguageIndex` (one ScaNN tree per
  language, forced: the pools are small) at several `leaves_to_search` fractions: multilingual mAP@k and rank
  distance (over the top k: a relevant sentence outside it counts as rank k + 1), recall@k against exact search
  overall and in the worst candidate language.
* Synthetic: `--n` x `--dim` unit vectors in `--languages` languages, built like multilingual embeddings: `--n` /
  `--languages` / 10 topics shared by every language (10 passages per topic and language), each language
  shifted by its own offset (norm `--offset`), plus noise; queries are a topic in a language, so that the
  exact top k holds the topic's passages in every language while the pool clusters by language, as real
  multilingual embeddings do. Exact search (numpy, query blocks: the pool is held once) against the
  per-language index (int8 reordering copy, float32 re-scoring of the final k), with times, recall@k overall and
  per language, and peak memory (ru_maxrss of the process: the host's whole footprint, one host).

Prints the tables; `--write` puts each part in its own section of docs/benchmarks.md (XQuAD-R, synthetic).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402

# One docs section per part, so that running one part keeps the other's numbers.
SECTIONS = {part: (f"<!-- retrieval-scale-{part}:start -->", f"<!-- retrieval-scale-{part}:end -->")
            for part in ("xquad", "synthetic")}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncated_metrics(indices: np.ndarray, relevant: np.ndarray, n_rel: np.ndarray, k: int) -> tuple[float, float]:
    """(mAP@k, mean rank distance over the top k) of [Q, k] result lists against [Q, R] relevant indices (-1
    padding); a relevant candidate outside the list counts as rank k + 1 for the rank distance."""
    from mlret.eval import metrics as M

    hit = indices[:, :, None] == relevant[:, None, :]
    ranks = np.where(hit.any(axis=1), np.argmax(hit, axis=1) + 1.0, np.inf)
    ap = M.average_precision(np.sort(ranks, axis=1), n_rel, k=k).mean()
    capped = np.where((relevant >= 0) & np.isinf(ranks), k + 1.0, ranks)
    return float(ap), float(M.rank_distance(np.sort(capped, axis=1)).mean())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed_median(fn, repeats: int):
    """(the last result, the median seconds of `repeats` calls): short searches are timed more than once."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        out, t = timed(fn)
        times.append(t)
    return out, float(np.median(times))


def bench_xquad(path: str, shared_data: str, k: int, fractions: list[float]) -> tuple[list[list[str]], str]:
    from mlret.data.datasets import XQUAD_R
    from mlret.eval.lareqa import load, multi_relevant
    from mlret.eval.retrieval import (
        ExactIndex,
        PerLanguageIndex,
        RetrievalOptions,
        ScannIndex,
        recall_by_language,
        topk_recall,
    )

    with np.load(path) as z:
        questions, candidates, key = z["questions"], z["candidates"], str(z["key"])
    if "e5" not in key:
        raise SystemExit(f"{path} holds embeddings of {key}, not multilingual-e5: encode them with benchmarks/eval.py")
    langs = load(str(Path(shared_data) / "xquad-r"), XQUAD_R.languages)
    gold = [r for x in langs for r in multi_relevant(langs)[x]]
    relevant = np.full((len(gold), max(map(len, gold))), -1, dtype=np.int64)
    for i, r in enumerate(gold):
        relevant[i, :len(r)] = r
    n_rel = np.array([len(r) for r in gold], dtype=np.float64)
    cand_lang = np.repeat(list(langs), [len(x.sentences) for x in langs.values()])
    exact, t_exact = timed(lambda: ExactIndex(candidates).search(questions, k))
    rows = [["exact", "-", f"{t_exact:.2f}", "1.000", "1.000", *(f"{v:.4f}" for v in
                                                               truncated_metrics(exact.indices, relevant, n_rel, k))]]

    def row(name: str, top, build_s: float, search_s: float) -> list[str]:
        by_lang = recall_by_language(top.indices, exact.indices, cand_lang)
        worst = min(by_lang, key=by_lang.get)
        m = truncated_metrics(top.indices, relevant, n_rel, k)
        return [name, f"{build_s:.2f}", f"{search_s:.2f}", f"{topk_recall(top.indices, exact.indices):.3f}",
                f"{by_lang[worst]:.3f} ({worst})", f"{m[0]:.4f}", f"{m[1]:.1f}"]

    single, t_single = timed(lambda: ScannIndex(candidates, k, RetrievalOptions()))
    per, t_per = timed(lambda: PerLanguageIndex(candidates, cand_lang, k, RetrievalOptions(method="scann")))
    for frac in fractions:
        lts = max(1, round(frac * single.num_leaves))
        top, t = timed(lambda lts=lts: single.search(questions, k, leaves_to_search=lts))
        rows.append(row(f"one ScaNN tree, {single.num_leaves} leaves, search {lts}", top, t_single, t))
    for frac in fractions:
        leaves = per.parts[0][2].num_leaves
        lts = max(1, round(frac * leaves))
        top, t = timed(lambda lts=lts: per.search(questions, k, leaves_to_search=lts))
        rows.append(row(f"per language: {len(per.parts)} trees of ~{leaves} leaves, search {lts}", top, t_per, t))
    for r in rows:
        print(r, flush=True)
    return rows, key


def synthetic_pool(n: int, dim: int, n_lang: int, offset: float, noise: float, queries: int, seed: int = 0):
    """(candidates [n, dim] ordered by language, their languages, queries, query languages, query topics); unit
    vectors topic + language offset + noise, drawn in slices (float32 throughout: the pool is the only big array)."""
    rng = np.random.default_rng(seed)
    per_lang, per_topic = n // n_lang, 10
    topics = per_lang // per_topic

    def unit_rows(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit_rows(rng.standard_normal((topics, dim), dtype=np.float32))
    shifts = offset * unit_rows(rng.standard_normal((n_lang, dim), dtype=np.float32))
    sigma = noise / np.sqrt(dim)
    cands = np.empty((per_lang * n_lang, dim), dtype=np.float32)
    for lang in range(n_lang):
        topic = rng.permutation(np.repeat(np.arange(topics), per_topic))
        for s in range(0, per_lang, 50_000):
            t = topic[s:s + 50_000]
            block = centres[t] + shifts[lang] + sigma * rng.standard_normal((len(t), dim), dtype=np.float32)
            cands[lang * per_lang + s: lang * per_lang + s + len(t)] = unit_rows(block)
    q_lang = rng.integers(0, n_lang, queries)
    q_topic = rng.integers(0, topics, queries)
    q = unit_rows(centres[q_topic] + shifts[q_lang] + sigma * rng.standard_normal((queries, dim), dtype=np.float32))
    names = np.array([f"L{i}" for i in range(n_lang)])
    return cands, np.repeat(names, per_lang), q.astype(np.float32)


def bench_synthetic(a) -> tuple[list[list[str]], str]:
    from mlret.eval.retrieval import ExactIndex, PerLanguageIndex, RetrievalOptions, recall_by_language, topk_recall

    (cands, langs, queries), t_gen = timed(lambda: synthetic_pool(a.n, a.dim, a.languages, a.offset, a.noise,
                                                                  a.queries))
    print(f"pool {cands.shape} in {t_gen:.1f} s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    exact, t_exact = timed(lambda: ExactIndex(cands).search(queries, a.k))
    rss_exact = peak_rss_gib()
    share = np.mean([len(set(langs[row])) for row in exact.indices])
    print(f"exact {t_exact:.1f} s ({len(queries) / t_exact:.0f} q/s), peak RSS {rss_exact:.2f} GiB; exact top "
          f"{a.k} lists span {share:.1f} languages on average", flush=True)
    rows = [["exact (numpy, query blocks)", "-", f"{t_exact:.1f}", f"{len(queries) / t_exact:.0f}", "1.0x",
             "1.000", "1.000", f"{rss_exact:.2f}"]]
    # One build (its reordering copy serves any depth); each (leaves, reorder) pair is a search-time override.
    reorders = [int(v) for v in a.reorder.split(",")]
    opts = RetrievalOptions(method="scann", reorder=max(reorders), reorder_dtype=a.reorder_dtype,
                            training_sample_size=a.training_sample)
    index, t_build = timed(lambda: PerLanguageIndex(cands, langs, a.k, opts))
    leaves = index.parts[0][2].num_leaves
    print(f"per-language index built in {t_build:.1f} s, peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    for reorder in reorders:
        for lts in [int(v) for v in a.leaves.split(",")]:
            top, t = timed_median(functools.partial(index.search, queries, a.k, leaves_to_search=lts,
                                                    reorder=reorder), a.repeats)
            by_lang = recall_by_language(top.indices, exact.indices, langs)
            worst = min(by_lang, key=by_lang.get)
            rows.append([f"per language: {len(index.parts)} x {leaves} leaves, search {lts}, reorder {reorder} "
                         f"({a.reorder_dtype})", f"{t_build:.1f}", f"{t:.1f}", f"{len(queries) / t:.0f}",
                         f"{t_exact / t:.1f}x", f"{topk_recall(top.indices, exact.indices):.3f}",
                         f"{by_lang[worst]:.3f} ({worst})", f"{peak_rss_gib():.2f}"])
            print(rows[-1], flush=True)
    return rows, f"{share:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", default="runs/bench/xquad_me5small.npz",
                   help="XQuAD-R multilingual-e5 embeddings (benchmarks/eval.py --embeddings)")
    p.add_argument("--shared-data", default=os.environ.get("MLRET_DATA_DIR", str(REPO.parent / "shared" / "data")))
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--fractions", default="0.1,0.25", help="XQuAD-R: shares of the leaves searched")
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--languages", type=int, default=10)
    p.add_argument("--offset", type=float, default=0.8, help="norm of each language's offset (topics: 1)")
    p.add_argument("--noise", type=float, default=0.6, help="norm of the per-passage noise")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--leaves", default="20,45", help="synthetic: leaves_to_search per language index")
    p.add_argument("--reorder", default="400", help="synthetic: reorder depths searched (one build, search-time)")
    p.add_argument("--reorder-dtype", default="int8")
    p.add_argument("--repeats", type=int, default=3, help="synthetic: timed calls per ScaNN setting (median)")
    p.add_argument("--training-sample", type=int, default=100_000)
    p.add_argument("--skip-xquad", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()

    stamp = (f"Command: `python benchmarks/retrieval_scale.py {shlex.join(sys.argv[1:])}`  \n"
             f"Machine: {cpu_summary()}, load average {os.getloadavg()[0]:.1f} at start (shared by other jobs)  \n"
             f"Date: {datetime.date.today().isoformat()}\n")
    sections: list[tuple[str, list[str]]] = []
    if not args.skip_xquad:
        fractions = [float(v) for v in args.fractions.split(",")]
        rows, key = bench_xquad(args.embeddings, args.shared_data, args.k, fractions)
        sections.append(("xquad", [
            "## Retrieval at scale: one ScaNN index per language on XQuAD-R\n", stamp,
            f"XQuAD-R multilingual pool, embeddings of `{key.split('|')[0].rsplit('/', 1)[-1]}` (prefixes "
            f"'query: ' / 'passage: '), top {args.k}. Recall@{args.k} is against exact search on every "
            f"question; \"worst language\" is the lowest recall among the 11 candidate languages (of the "
            f"exact top-{args.k} entries in that language, the share returned). mAP@{args.k} and the rank "
            f"distance are over the top {args.k} (a relevant sentence outside it counts as rank "
            f"{args.k + 1}). Build and search are seconds.\n",
            markdown_table(["method", "build s", "search s", f"recall@{args.k}", "worst language",
                            f"mAP@{args.k}", "rank distance"], rows) + "\n"]))
    if not args.skip_synthetic:
        rows, span = bench_synthetic(args)
        sections.append(("synthetic", [
            "## Retrieval at scale: one ScaNN index per language on a 2M synthetic multilingual pool\n", stamp,
            f"Synthetic multilingual pool: {args.n:,} x {args.dim} unit vectors, {args.languages} languages "
            f"of {args.n // args.languages:,}, topics shared by every language (10 passages per topic and "
            f"language), language offset norm {args.offset}, noise norm {args.noise}; {args.queries:,} "
            f"queries (a topic in a language), top {args.k}; the exact top {args.k} spans {span} languages "
            "on average. Speed-up is exact search time (one call) over the method's search time (median of "
            f"{args.repeats} calls), both on the same cores, in this run; peak RSS is the process's high-water "
            "mark so far (one host holds the whole pool: 1 host = the per-host memory).\n",
            markdown_table(["method", "build s", "search s", "queries/s", "speed-up", f"recall@{args.k}",
                            "worst language", "peak RSS GiB"], rows) + "\n"]))
    for part, lines in sections:
        text = "\n".join(lines)
        print(text)
        if args.write:
            print(f"wrote {write_section(*SECTIONS[part], text)}")


if __name__ == "__main__":
    main()
