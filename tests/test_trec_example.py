"""The TREC path (Mr. TyDi / MIRACL) as a user meets it, on the worked example of the README: a Mr. TyDi-format set
built from real XQuAD-R paragraphs (`scripts/xquad_trec.py`, one corpus mixing the languages). The per-language
index runs wherever it is configured (from the records' "lang", or the topic language of a per-language corpus,
and an error where neither can say); a shared corpus is encoded once however many languages search it; qrels that
name no docid of the corpus are a warning naming both files; `mlret.evaluate` runs the README's command and
prints the per-language table; a sentence-transformers folder's prompts and lengths reach `--hf`."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scale_runs import REPO, scale_env

from mlret.errors import DataError
from mlret.eval.base import NgramEmbedder
from mlret.eval.retrieval import RetrievalOptions
from mlret.eval.trec import TrecEvaluator

LANGS = ["en", "de", "zh"]


def _script():
    spec = importlib.util.spec_from_file_location("xquad_trec", REPO / "scripts" / "xquad_trec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(shared_data, tmp_path_factory):
    """The README's set, smaller: 40 paragraphs per language (120 passages), their questions as topics; and the
    same set without "lang" fields."""
    out = tmp_path_factory.mktemp("trec-example")
    counts = _script().build(shared_data / "xquad-r", out / "tagged", LANGS, paragraphs=40)
    _script().build(shared_data / "xquad-r", out / "untagged", LANGS, paragraphs=40, lang_field=False)
    assert counts["passages"] == 120 and all(counts[x] > 100 for x in LANGS)
    return out


class CountingEmbedder(NgramEmbedder):
    """NgramEmbedder that counts the passages it encodes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.passage_texts = 0

    def passages(self, texts):
        self.passage_texts += len(texts)
        return super().passages(texts)


def _evaluator(folder, corpus=None, **opts) -> TrecEvaluator:
    return TrecEvaluator("mrtydi", "mrtydi", str(folder), str(corpus or folder / "corpus"), LANGS,
                         retrieval=RetrievalOptions(**opts))


def test_a_shared_corpus_is_encoded_once(example):
    emb = CountingEmbedder(dim=128)
    result = _evaluator(example / "tagged", method="exact").run(emb)
    assert emb.passage_texts == 120  # one corpus, three topic languages: encoded once
    assert set(result.details["languages"]) == set(LANGS) and result.details["index"] == "exact"
    assert all(0 < m["ndcg10"] <= 1 for m in result.details["languages"].values())


def test_the_per_language_index_runs_where_it_is_configured(example):
    emb = NgramEmbedder(dim=128)
    # 40 passages per language, 6 leaves each, one searched: ScaNN must pad, and the lists still hold 100.
    opts = dict(method="scann", per_language_index=True, num_leaves=6, leaves_to_search=1, recall_floor=0.0)
    ev = _evaluator(example / "tagged", **opts)
    run, info = ev.retrieve(emb, "en")
    assert info["method"] == "per_language" and set(info["languages"]) == set(LANGS)  # from the records' "lang"
    assert all(len(docs) == 100 for docs in run.values()) and info["short_queries"] == 0
    result = ev.run(emb)
    assert result.details["index"].startswith("one index per language (3: scann)")
    assert result.summary["search_short_queries"] == 0 and "search_recall_min" in result.summary
    # Shared by the topic languages and without "lang" fields, the corpus cannot say its languages: an error.
    with pytest.raises(DataError, match="per_language_index is set.*no 'lang'"):
        _evaluator(example / "untagged", **opts).run(emb)
    # One corpus per language (a path with {lang}) without "lang" fields: its passages are the topic language's.
    per_lang = example / "per-lang"
    per_lang.mkdir(exist_ok=True)
    records = [json.loads(line) for line in (example / "untagged" / "corpus" / "docs.jsonl").open()]
    for x in LANGS:
        (per_lang / f"docs-{x}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records if r["id"].startswith(f"{x}-")))
    ev = _evaluator(example / "untagged", corpus=per_lang / "docs-{lang}.jsonl", **opts)
    assert set(ev.retrieve(emb, "de")[1]["languages"]) == {"de"}
    # Exact search needs no languages (one exact index per language gives the same lists): no error.
    exact = _evaluator(example / "untagged", method="exact", per_language_index=True).run(emb)
    assert exact.details["index"] == "exact"


def test_qrels_without_a_corpus_docid_are_a_warning_naming_the_files(example, tmp_path, caplog):
    folder = tmp_path / "set"
    shutil.copytree(example / "tagged", folder)
    qrels = folder / "qrels.mrtydi-v1.1-de.dev.txt"
    qrels.write_text(qrels.read_text().replace(" de-", " renamed-de-"))
    with caplog.at_level(logging.WARNING, logger="mlret.eval.trec"):
        result = _evaluator(folder, method="exact").run(NgramEmbedder(dim=64))
    msgs = [r.getMessage() for r in caplog.records if "none of the" in r.getMessage()]
    assert len(msgs) == 1 and str(qrels) in msgs[0] and str(folder / "corpus") in msgs[0]
    assert result.details["languages"]["de"]["ndcg10"] == 0.0
    assert result.details["search"]["de"]["qrels_docids_in_corpus"] == 0.0
    assert result.details["search"]["en"]["qrels_docids_in_corpus"] == 1.0


def test_hf_takes_a_sentence_transformers_folders_prompts_and_length(minilm_path, tmp_path):
    from mlret.config import load_config_file
    from mlret.evaluate import apply_st_settings

    folder = tmp_path / "st-model"
    shutil.copytree(minilm_path, folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}))
    st = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**st, "max_seq_length": 200}))
    config = load_config_file(str(REPO / "configs" / "eval_trec.py"), "mrtydi")
    applied = apply_st_settings(config, str(folder), given={"data.passage_len"})
    assert config.model.query_prefix == "query: " and config.model.passage_prefix == "passage: "
    assert config.data.query_len == 200 and config.data.passage_len == 256  # the flag wins over the folder
    assert applied["model.pooling"] == "mean" and applied["model.normalize"] is True
    assert "data.passage_len" not in applied


def test_the_readme_example_runs_and_prints_the_per_language_table(example, minilm_path, tmp_path):
    """The README's commands: the set from XQuAD-R, then `mlret.evaluate` on it with all-MiniLM-L6-v2; and the
    same command with a missing corpus: one line naming it, before anything loads or compiles."""
    out = tmp_path / "r.json"
    args = [sys.executable, "-m", "mlret.evaluate", "--config", str(REPO / "configs" / "eval_trec.py") + ":mrtydi",
            "--hf", str(minilm_path), f"--config.eval.mrtydi.data_dir={example / 'tagged'}",
            "--config.eval.mrtydi.languages=en,de", "--config.eval.mrtydi.max_queries=60", "--out", str(out)]
    p = subprocess.run([*args, f"--config.eval.mrtydi.corpus={example / 'tagged' / 'corpus'}"], cwd=tmp_path,
                       env=scale_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert any(line.split()[:1] == ["en"] for line in lines) and any(line.split()[:1] == ["de"] for line in lines)
    assert "  search: exact" in lines
    report = json.loads(out.read_text())
    per_lang = report["results"]["mrtydi"]["languages"]
    assert set(per_lang) == {"en", "de"} and all(m["queries"] == 60 for m in per_lang.values())
    assert np.mean([m["ndcg10"] for m in per_lang.values()]) == pytest.approx(report["summary"]["mrtydi"]["ndcg10"])
    missing = tmp_path / "no-such-corpus"
    p = subprocess.run([*args, f"--config.eval.mrtydi.corpus={missing}"], cwd=tmp_path, env=scale_env(1),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and str(missing) in p.stderr
    assert "Traceback" not in p.stderr
