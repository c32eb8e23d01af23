"""Matryoshka models after training (issue 28, item 1): evaluation at a truncated dimension and by dimension equals
evaluating embeddings truncated by hand, and the exported folder records the trained dimensions and gives, in
sentence-transformers with `truncate_dim`, mlret's embeddings at that dimension."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_fixtures import encode_p, encode_q, model_config
from sentence_transformers import SentenceTransformer

from mlret import parallel
from mlret.config import default_config
from mlret.errors import ConfigError
from mlret.eval import build_evaluators, format_table, registry
from mlret.eval.base import NgramEmbedder
from mlret.eval.dims import truncate
from mlret.eval.encode import ShardedEmbedder, place_model
from mlret.models import load_dual_encoder


class ByHand:
    """The test's own truncation: the first d components, divided by their norm (numpy, no mlret code)."""

    def __init__(self, inner, d):
        self.inner, self.d = inner, d

    def _cut(self, x):
        y = np.asarray(x, np.float32)[:, : self.d]
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.float32(1e-12))

    def queries(self, texts):
        return self._cut(self.inner.queries(texts))

    def passages(self, texts):
        return self._cut(self.inner.passages(texts))


def test_evaluation_at_and_by_dimension_equals_truncating_by_hand(random_bert_path, shared_data, tmp_path):
    """`config.eval.dim` = 24 of the 48: the summary (exact search at 24) is that of embeddings cut by hand; with
    the run's Matryoshka dimensions ("auto") the by-dimension rows at 48 and 8 are too; the CLI's table shows them."""
    from mlret.evaluate import evaluate

    c = default_config()
    c.model.name = str(random_bert_path)
    c.data.data_dir = str(shared_data)
    c.data.query_len, c.data.passage_len = 16, 48
    c.loss.matryoshka_dims = "48,24,8"  # the run trained these; eval.dims = "auto" reports them
    c.eval.dim = 24
    c.eval.evaluators = "xquad_r"
    c.eval.xquad_r.languages = "en,de,zh"
    c.eval.xquad_r.max_paragraphs = 2
    c.eval.progress = False
    report = evaluate(c, hf=str(random_bert_path), out=str(tmp_path / "r.json"))
    block = report["results"]["xquad_r"]
    assert set(block["by_dim"]) == {"48", "24", "8"} and block["dim"] == 24
    assert block["by_dim"]["24"] == block["summary"]

    model, tok = load_dual_encoder(c.model, query_len=16, passage_len=48)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    full = ShardedEmbedder(place_model(model, mesh, rules), tok, mesh, rules, batch_size=c.eval.batch_size,
                           progress=False)
    plain = registry.build(c)[0]  # the evaluator itself, not wrapped by dimension
    for d in (48, 24, 8):
        want = plain.run(ByHand(full, d)).summary
        got = block["by_dim"][str(d)]
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-9, atol=1e-12)
    # The dimensions change the rankings: the test can tell them apart.
    assert block["by_dim"]["8"]["multi_map"] != block["by_dim"]["48"]["multi_map"]
    from mlret.eval import EvalResult

    table = format_table({"xquad_r": EvalResult(block["summary"], details=block, step=None)})
    assert "xquad_r by embedding dimension" in table and "multi mAP" in table and "rank distance" in table


def test_dimension_fields_are_checked_naming_the_field(shared_data):
    from mlret.config import validate

    c = default_config()
    for field, value, message in (("dim", -1, "config.eval.dim: must be >= 0"),
                                  ("dims", "64,x", "config.eval.dims: '64,x' is not a comma-separated"),
                                  ("dims", "8,8", "config.eval.dims: '8,8' must be distinct positive"),
                                  ("dim_metrics", "", "config.eval.dim_metrics: empty")):
        bad = default_config()
        bad.eval[field] = value
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    # A dimension above the embedding size is named when the embeddings exist.
    c.data.data_dir = str(shared_data)
    c.eval.dim = 64
    c.eval.xquad_r.languages = "en"
    c.eval.xquad_r.max_paragraphs = 1
    with pytest.raises(ConfigError, match="config.eval.dim: 64 exceeds the embedding size 48"):
        build_evaluators(c)[0].run(NgramEmbedder(dim=48))


def test_export_records_the_dimensions_and_loads_with_truncate_dim(random_bert_path, xquad_sentences, tmp_path):
    """config_sentence_transformers.json and the card name the trained dimensions; SentenceTransformer with
    truncate_dim=d (unit vectors: normalize_embeddings=True) gives mlret's embeddings at d, queries and passages."""
    from mlret.export import export_model

    run = default_config()
    run.model.update(dict(model_config(random_bert_path)))
    run.loss.matryoshka_dims = "48,16"
    run.data.query_len = run.data.passage_len = 48
    model, tok = load_dual_encoder(run.model, query_len=48, passage_len=48)
    out = export_model(model, tok, run.model, tmp_path / "mrl", run_config=run)
    st_json = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_json["matryoshka_dims"] == [48, 16] and "truncate_dim" not in st_json
    card = (out / "README.md").read_text()
    assert "truncate_dim=16" in card and "Matryoshka: at the first 48, 16 dimensions" in card

    texts = xquad_sentences[::6]
    st = SentenceTransformer(str(out), device="cpu", truncate_dim=16)
    b = tok.queries(texts)
    mine_q = truncate(np.asarray(encode_q(model, b["query_ids"], b["query_mask"])), 16, True)
    b = tok.passages(texts)
    mine_p = truncate(np.asarray(encode_p(model, b["passage_ids"], b["passage_mask"])), 16, True)
    st_q = st.encode_query(texts, convert_to_numpy=True, normalize_embeddings=True)
    st_p = st.encode_document(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert st_q.shape == (len(texts), 16)
    assert max(np.abs(st_q - mine_q).max(), np.abs(st_p - mine_p).max()) <= 1e-4
    # The prefix is not the whole embedding re-scaled: truncation really happened on both sides.
    full = SentenceTransformer(str(out), device="cpu").encode_query(texts, convert_to_numpy=True)
    assert full.shape[1] == 48 and np.abs(full[:, :16] - st_q).max() > 1e-3


def test_export_results_card_has_the_by_dimension_table(random_bert_path, tmp_path):
    """`python -m mlret.export --results F` with F as `python -m mlret.evaluate --out` writes it after an evaluation
    by dimension: the card's xquad_r section has the by-dimension table, the same lines as the end-of-training
    export's card (which is given the evaluators' blocks)."""
    from mlret.eval.base import EvalResult
    from mlret.eval.report import by_dimension
    from mlret.export import export_model, main

    rng = np.random.default_rng(0)
    by_dim = {d: {"multi_map": float(rng.uniform()), "mono_map": float(rng.uniform()),
                  "multi_rank_distance": float(rng.uniform(0, 50))} for d in (48, 24, 8)}
    result = EvalResult(dict(by_dim[24]), step=30, by_dim=by_dim, dim=24,
                        dim_metrics=("mono_map", "multi_map", "multi_rank_distance"))
    report = tmp_path / "r.json"  # the shape of mlret.evaluate's --out file
    report.write_text(json.dumps({"summary": {"xquad_r": result.summary}, "results": {"xquad_r": result.block()}}))
    assert main(["--hf", str(random_bert_path), "--out", str(tmp_path / "cli"), "--query_len", "48", "--passage_len",
                 "48", "--results", str(report)]) == 0
    card = (tmp_path / "cli" / "README.md").read_text()
    table = by_dimension("xquad_r", json.loads(report.read_text())["results"]["xquad_r"]["by_dim"],
                         result.dim_metrics).markdown()
    assert "By embedding dimension" in card and "\n".join(table) in card
    assert all(f"| {d} | {by_dim[d]['mono_map']:.3f} | {by_dim[d]['multi_map']:.3f} |" in card for d in by_dim)

    model, tok = load_dual_encoder(model_config(random_bert_path), query_len=48, passage_len=48)
    end = export_model(model, tok, model_config(random_bert_path), tmp_path / "end",
                       results={"xquad_r": result.block()})
    section = lambda text: text.split("### xquad_r", 1)[1].split("All metrics:", 1)[0]
    assert section((end / "README.md").read_text()) == section(card)


class ByHandLocal(ByHand):
    """`ByHand` for the sharded corpus path too (`local_passages`, each process's own passages)."""

    def local_passages(self, texts, dtype=np.float32):
        return self._cut(self.inner.local_passages(texts, dtype=np.float32)).astype(dtype)


@pytest.mark.parametrize("method", ["exact", "scann"])
def test_sharded_corpus_search_at_a_dimension_equals_truncating_by_hand(random_bert_path, shared_data, tmp_path,
                                                                        method):
    """A MIRACL / Mr. TyDi style evaluation (one corpus, read, encoded and searched through the sharded corpus path:
    `ShardedEmbedder.local_passages`) with `config.eval.dim` = 16 of the 48 gives the run and the summary of the
    same evaluation on embeddings cut to 16 and re-normalised by hand; at 48 they differ (the cut is real)."""
    import importlib.util

    from mlret.eval import dims
    from mlret.eval.retrieval import RetrievalOptions
    from mlret.eval.trec import TrecEvaluator

    spec = importlib.util.spec_from_file_location("xquad_trec", __import__("pathlib").Path(__file__).resolve()
                                                  .parents[1] / "scripts" / "xquad_trec.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.build(shared_data / "xquad-r", tmp_path / "set", ["en", "de"], paragraphs=20)
    opts = dict(method=method) if method == "exact" else dict(method="scann", num_leaves=4, leaves_to_search=2,
                                                              recall_floor=0.0)
    ev = lambda: TrecEvaluator("mrtydi", "mrtydi", str(tmp_path / "set"), str(tmp_path / "set" / "corpus"),
                               ["en", "de"], retrieval=RetrievalOptions(**opts))
    c = default_config()
    c.model.update(dict(model_config(random_bert_path)))
    c.data.query_len = c.data.passage_len = 48
    c.eval.dim, c.eval.dims = 16, ""
    model, tok = load_dual_encoder(c.model, query_len=48, passage_len=48)
    mesh = parallel.make_mesh(c.mesh)
    embedder = ShardedEmbedder(place_model(model, mesh, parallel.parse_rules(c.mesh.rules)), tok, mesh,
                               progress=False)
    assert hasattr(embedder, "local_passages")
    (wrapped,) = dims.wrap([ev()], c)
    got = wrapped.run(embedder)
    want = ev().run(ByHandLocal(embedder, 16))
    full = ev().run(embedder)
    assert got.summary == pytest.approx(want.summary, abs=1e-6) and got.summary["ndcg10"] > 0
    for lang in ("en", "de"):
        run_got, _ = ev().retrieve(dims.Truncated(embedder, 16, True), lang)
        run_want, _ = ev().retrieve(ByHandLocal(embedder, 16), lang)
        assert {q: list(d) for q, d in run_got.items()} == {q: list(d) for q, d in run_want.items()}
    assert full.summary["ndcg10"] != got.summary["ndcg10"]
