"""A Mr. TyDi-format retrieval set built from real XQuAD-R text: the worked example of the TREC evaluators
(README, "Mr. TyDi and MIRACL"), the set the tests run it on, and the mixed-language corpus of the ScaNN-vs-exact
benchmark (benchmarks/scann_vs_exact.py).

    python scripts/xquad_trec.py --xquad DATA/xquad-r --out trec-example [--languages en,de,zh,ar,hi]
        [--paragraphs 120] [--no-lang]

writes, in Mr. TyDi's layout (what `config.eval.mrtydi` reads, split "dev"):

    OUT/topics.mrtydi-v1.1-{lang}.dev.txt.gz   qid<TAB>question, gzipped, one file per language
    OUT/qrels.mrtydi-v1.1-{lang}.dev.txt       qid Q0 docid 1: the question's paragraph in its own language
    OUT/corpus/docs.jsonl                      {"id", "contents", "lang"}: every language's paragraphs, one corpus

The first `--paragraphs` paragraphs in XQuAD-R's article order (all 48 articles hold 1,190 paragraphs) of each
language are the corpus; their questions are the topics. The corpus mixes the languages, as a multilingual
collection does, so a question's translations of its paragraph are in the pool but not judged relevant (Mr. TyDi
judges within a language). `--no-lang` leaves the `"lang"` field out (then the per-language index cannot be used
on this shared corpus: the evaluator says so).
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

LANGUAGES = ("en", "de", "zh", "ar", "hi")


def build(xquad_dir: str | Path, out: str | Path, languages: Sequence[str] = LANGUAGES, paragraphs: int = 120,
          lang_field: bool = True) -> dict[str, int]:
    """Write the set (see the module docstring); returns {"passages": n, "<lang>": topics of that language}."""
    xquad_dir, out = Path(xquad_dir), Path(out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    records = []
    for lang in languages:
        path = xquad_dir / f"{lang}.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing (--xquad names the folder of XQuAD-R's <lang>.json files)")
        data = json.loads(path.read_text(encoding="utf-8"))
        pars = [(a, p, par) for a, art in enumerate(data["data"]) for p, par in enumerate(art["paragraphs"])]
        topics, qrels = [], []
        for a, p, par in pars[:paragraphs]:
            docid = f"{lang}-{a}-{p}"
            records.append({"id": docid, "contents": par["context"], **({"lang": lang} if lang_field else {})})
            for qa in par["qas"]:
                qid = f"{lang}-{qa['id']}"
                topics.append(f"{qid}\t{' '.join(qa['question'].split())}\n")
                qrels.append(f"{qid} Q0 {docid} 1\n")
        with gzip.open(out / f"topics.mrtydi-v1.1-{lang}.dev.txt.gz", "wt", encoding="utf-8") as f:
            f.writelines(topics)
        (out / f"qrels.mrtydi-v1.1-{lang}.dev.txt").write_text("".join(qrels), encoding="utf-8")
        counts[lang] = len(topics)
    with open(out / "corpus" / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    counts["passages"] = len(records)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python scripts/xquad_trec.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--xquad", required=True, help="folder of XQuAD-R's <lang>.json files")
    p.add_argument("--out", required=True, help="folder to write the set into")
    p.add_argument("--languages", default=",".join(LANGUAGES))
    p.add_argument("--paragraphs", type=int, default=120, help="paragraphs per language (XQuAD-R has 1,190)")
    p.add_argument("--no-lang", action="store_true", help="corpus records without the 'lang' field")
    a = p.parse_args(argv)
    counts = build(a.xquad, a.out, [x for x in a.languages.split(",") if x], a.paragraphs, not a.no_lang)
    print(f"{a.out}: {counts.pop('passages')} passages; topics " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
