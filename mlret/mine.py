"""Hard negatives mined with a model, written as a training source.

    python -m mlret.mine --config C (--checkpoint RUN | --hf MODEL) --out DIR [--k 30] [--perc_pos 0.95]
        [--max_negatives 16] [--teacher MODEL]

Every training unit of `config.data.sources` is read (the sources' own readers, no TFDS preparation); per passage
language, the passages of every unit (positives and their negatives, deduplicated by text) are the pool, each
unit's query is searched in it (`retrieval.search_topk` with `config.eval.retrieval`: exact, or ScaNN on large
pools), and the top `k` become its negatives after two filters against false negatives:

* any passage of the same unit in any language: a unit's positives are translations of one another, so the
  positive of every language of the unit is excluded (by text);
* NV-Retriever's TopK-PercPos (Moreira et al. 2024): any candidate scoring above `perc_pos` x the score of the
  unit's own positive (a near-duplicate of the answer, or another right answer).

The result is `DIR/units.jsonl` (one `ParallelUnit` JSON per line, the paragraph negatives replaced by the mined
ones) and `DIR/provenance.json` (model, sources, date, options, counts); train on it with the `jsonl` source kind:
`--config.data.sources='({"name": "jsonl", "path": "DIR"},)'`.

`--teacher MODEL` (a Hugging Face folder or id, loaded as `--hf` is) scores each unit's query against its positive
and its kept negatives, language by language, with the teacher's own embeddings (q . p, the teacher's similarity
for a normalising model): the units' `scores` (positive first), which the distillation losses read
(`config.loss.terms=margin_mse` / `kl_distill`, `mlret.losses.distill`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlret import cli, preflight
from mlret.console import route_logging
from mlret.data import tfds_builders
from mlret.data.sources import parse_sources
from mlret.data.units import LangText, ParallelUnit, dumps_unit
from mlret.eval.base import Embedder, embed
from mlret.eval.retrieval import RetrievalOptions, search_topk
from mlret.evaluate import load_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MiningOptions:
    k: int = 30  # candidates searched per query (before the filters)
    perc_pos: float = 0.95  # TopK-PercPos: drop candidates scoring above perc_pos x the positive's score
    max_negatives: int = 16  # negatives kept per unit and language


def source_units(config: Any) -> list[ParallelUnit]:
    """Every unit of config.data.sources, read by the sources' readers (no TFDS preparation)."""
    units: list[ParallelUnit] = []
    for spec in parse_sources(config):
        cfg = tfds_builders.units_config(spec.name, local_dir=spec.path, split=spec.split, languages=spec.languages,
                                         paragraph_context=config.data.paragraph_context,
                                         max_negatives=config.data.max_negatives,
                                         on_bad_record=config.data.on_bad_record, options=dict(spec.options))
        units += tfds_builders.read_source_units(cfg)
    return units


def mine_units(units: Sequence[ParallelUnit], embedder: Embedder, opts: MiningOptions = MiningOptions(),
               retrieval: RetrievalOptions | None = None,
               teacher: Embedder | None = None) -> tuple[list[ParallelUnit], dict[str, int]]:
    """The units with mined negatives (see the module docstring), and counts of what the filters dropped; with a
    `teacher`, each language's texts carry its scores of the positive and the negatives (`LangText.scores`)."""
    if not 0 < opts.perc_pos <= 1:
        raise ValueError(f"--perc_pos: {opts.perc_pos} is not in (0, 1]")
    own = {u.id: {t.positive for t in u.texts.values()} for u in units}  # every language's positive
    mined: dict[str, dict[str, LangText]] = {u.id: {} for u in units}
    stats = {"same_unit": 0, "above_perc_pos": 0, "kept": 0, "units": len(units)}
    for lang in sorted({x for u in units for x in u.texts}):
        members = [u for u in units if lang in u.texts]
        pool = list(dict.fromkeys(p for u in members for p in (u.texts[lang].positive, *u.texts[lang].negatives)))
        where = {t: i for i, t in enumerate(pool)}
        log.info("mining %s: %d queries against %d passages", lang, len(members), len(pool))
        p = embed(embedder.passages, pool, f"mine/{lang} passages")
        q = embed(embedder.queries, [u.texts[lang].query for u in members], f"mine/{lang} queries")
        top = search_topk(q, p, opts.k, retrieval or RetrievalOptions(), name=f"mine/{lang}",
                          languages=[lang] * len(pool))
        positive = np.einsum("qd,qd->q", q, p[[where[u.texts[lang].positive] for u in members]])
        kept: list[tuple[str, ...]] = []
        for i, u in enumerate(members):
            negatives = []
            for j, s in zip(top.indices[i], top.scores[i]):
                if j < 0:  # no more results for this query
                    break
                text = pool[j]
                if text in own[u.id]:
                    stats["same_unit"] += 1
                elif s > opts.perc_pos * positive[i]:
                    stats["above_perc_pos"] += 1
                elif len(negatives) < opts.max_negatives:
                    negatives.append(text)
            stats["kept"] += len(negatives)
            kept.append(tuple(negatives))
        scores = teacher_scores(teacher, members, kept, lang) if teacher is not None else [()] * len(members)
        for u, negatives, s in zip(members, kept, scores, strict=True):
            mined[u.id][lang] = LangText(u.texts[lang].query, u.texts[lang].positive, negatives, s)
    return [ParallelUnit(u.id, u.source, mined[u.id]) for u in units], stats


def teacher_scores(teacher: Embedder, members: Sequence[ParallelUnit], negatives: Sequence[tuple[str, ...]],
                   lang: str) -> list[tuple[float, ...]]:
    """The teacher's score q . p of each member's query against its positive and `negatives` in `lang` (each
    distinct passage encoded once)."""
    texts = list(dict.fromkeys(t for u, negs in zip(members, negatives) for t in (u.texts[lang].positive, *negs)))
    where = {t: i for i, t in enumerate(texts)}
    p = embed(teacher.passages, texts, f"mine/{lang} teacher passages")
    q = embed(teacher.queries, [u.texts[lang].query for u in members], f"mine/{lang} teacher queries")
    return [tuple(float(x) for x in p[[where[t] for t in (u.texts[lang].positive, *negs)]] @ q[i])
            for i, (u, negs) in enumerate(zip(members, negatives))]


def write_mined(out_dir: str, units: Sequence[ParallelUnit], provenance: dict[str, Any]) -> str:
    """DIR/units.jsonl and DIR/provenance.json, each written to a temporary name and renamed (no half file)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "units.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for u in units:
            f.write(dumps_unit(u) + "\n")
    os.replace(path + ".tmp", path)
    prov = os.path.join(out_dir, "provenance.json")
    with open(prov + ".tmp", "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=1, ensure_ascii=False)
    os.replace(prov + ".tmp", prov)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlret.mine", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file (its data.sources are mined)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="training run directory")
    model.add_argument("--hf", help="Hugging Face model folder or id")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (units.jsonl + provenance.json)")
    p.add_argument("--k", type=int, default=MiningOptions.k)
    p.add_argument("--perc_pos", type=float, default=MiningOptions.perc_pos)
    p.add_argument("--max_negatives", type=int, default=MiningOptions.max_negatives)
    p.add_argument("--teacher", help="Hugging Face model folder or id whose scores of each unit's positive and "
                   "negatives are written with them (for the distillation losses)")
    p.add_argument("--verbose", action="store_true", help="library INFO messages on the terminal too; they always "
                   "go to DIR.log beside --out")
    a, overrides = p.parse_known_args(argv)
    prog = "mlret.mine"
    log_file = None
    if argv is None:  # the command line (an in-process caller, e.g. a test, keeps its own logging)
        log_file = cli.log_path(a.out)
        route_logging(log_file, "info" if a.verbose else "warning")  # before transformers is imported
    # lazy: jax (and transformers) after route_logging; --help and argument errors before jax starts
    from mlret import config as config_lib  # lazy: jax-free start-up (above)
    from mlret import parallel  # lazy: jax-free start-up
    from mlret.eval.encode import embed_spec, place_model  # lazy: jax-free start-up

    if not 0 < a.perc_pos <= 1:
        cli.fail(prog, f"--perc_pos: {a.perc_pos} is not in (0, 1]")
    if a.k < 1 or a.max_negatives < 0:
        cli.fail(prog, f"--k must be >= 1 and --max_negatives >= 0 (got {a.k}, {a.max_negatives})")
    cli.check_model_folder(prog, "--hf", a.hf)
    cli.check_model_folder(prog, "--teacher", a.teacher)
    path, _, arg = a.config.partition(":")
    with cli.user_errors(prog, f"--config {a.config}", also=(ValueError,)):  # get_config(arg) refusing its arg
        config = config_lib.load_config_file(path, arg or None)
    with cli.user_errors(prog):  # an unknown or mistyped field, a missing data file, model folder or checkpoint
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
        preflight.check_data(config, evaluators=False)  # the sources' files, before any model is loaded
        units = source_units(config)
        teacher_config = copy.deepcopy(config)  # loading a model writes its settings into the config it is given
        config, model_obj, model_dir, source = load_model(config, a.hf, a.checkpoint, a.step)
        if a.teacher:
            teacher_config, teacher_obj, teacher_dir, teacher_source = load_model(teacher_config, a.teacher, None,
                                                                                  None)
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.parse_rules(config.mesh.rules)
    spec = embed_spec(config)
    embedder = spec.embedder(place_model(model_obj, mesh, rules), mesh, spec.tokenizer(model_dir))
    opts = MiningOptions(a.k, a.perc_pos, a.max_negatives)
    retrieval = RetrievalOptions.from_config(config.eval.retrieval)
    teacher = None
    if a.teacher:
        teacher_spec = embed_spec(teacher_config)
        teacher = teacher_spec.embedder(place_model(teacher_obj, mesh, rules), mesh,
                                        teacher_spec.tokenizer(teacher_dir))
    mined, stats = mine_units(units, embedder, opts, retrieval, teacher)
    provenance = {"model": source, "sources": [dict(s) for s in config.data.sources],
                  **({"teacher": teacher_source} if a.teacher else {}),
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "options": dataclasses.asdict(opts), "retrieval": dataclasses.asdict(retrieval), "counts": stats}
    import jax  # lazy: jax-free start-up (already imported by now)

    if jax.process_index() == 0:
        print(f"wrote {write_mined(a.out, mined, provenance)}: {stats}" + (f"; log {log_file}" if log_file else ""))


if __name__ == "__main__":
    main()
