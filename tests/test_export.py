"""Export: the folder loads in transformers.AutoModel and sentence_transformers.SentenceTransformer with no extra
code and reproduces mlret's embeddings (<= 1e-4); export -> import -> export is the identity on the weights."""

import json

import numpy as np
import pytest
import torch
import transformers
from model_fixtures import encode_p, encode_q, model_config
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer

from mlret.export import PASSAGE_TOWER_DIR, export_model, main
from mlret.models import load_dual_encoder

TOL = 1e-4


def ours(model, tok, texts, side="query"):
    if side == "query":
        b = tok.queries(texts)
        return np.asarray(encode_q(model, b["query_ids"], b["query_mask"]))
    b = tok.passages(texts)
    return np.asarray(encode_p(model, b["passage_ids"], b["passage_mask"]))


def automodel_mean(path, tok, texts, prefix="", max_length=256):
    """Mean pooling + L2 normalisation of AutoModel's last_hidden_state, by hand (no mlret code)."""
    model, info = transformers.AutoModel.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    enc = tok.hf([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                 return_tensors="pt")
    with torch.no_grad():
        h = model.eval()(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(e, dim=-1).numpy()


def same_tensors(a, b):
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def minilm_export(minilm_path, tmp_path_factory):
    model, tok = load_dual_encoder(model_config(minilm_path), query_len=128, passage_len=256)
    out = export_model(model, tok, model_config(minilm_path), tmp_path_factory.mktemp("minilm-export"),
                       results={"xquad-r": {"map@20": 0.5}, "note": "test"})
    return model, tok, out


def test_minilm_export_loads_and_matches(minilm_export, xquad_sentences, minilm_path):
    model, tok, out = minilm_export
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
              "1_Pooling/config.json", "config_sentence_transformers.json", "README.md"):
        assert (out / f).is_file(), f
    texts = xquad_sentences[::3]  # 24 sentences, 6 languages
    mine = ours(model, tok, texts, "passage")
    st = SentenceTransformer(str(out), device="cpu")
    st_emb = st.encode(texts, convert_to_numpy=True)
    auto_emb = automodel_mean(out, tok, texts)
    d_st, d_auto = np.abs(st_emb - mine).max(), np.abs(auto_emb - mine).max()
    print(f"MiniLM export: SentenceTransformer {d_st:.2e}, AutoModel {d_auto:.2e}")
    assert d_st <= TOL and d_auto <= TOL
    # The export kept the original weights exactly (the pooler too).
    src = load_file(str(minilm_path / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == {k for k in src if k != "embeddings.position_ids"}
    for k in got:
        assert np.array_equal(got[k], src[k]), k
    card = (out / "README.md").read_text()
    assert "| xquad-r | map@20 | 0.5000 |" in card and "| pooling | mean |" in card


def test_roundtrip_identical(minilm_export, tmp_path):
    model, tok, out = minilm_export
    again, tok2 = load_dual_encoder(model_config(out), query_len=128, passage_len=256)
    out2 = export_model(again, tok2, model_config(out), tmp_path / "again")
    same_tensors(out, out2)
    assert json.loads((out / "config.json").read_text()) == json.loads((out2 / "config.json").read_text())
    assert (out / "modules.json").read_text() == (out2 / "modules.json").read_text()


def test_xlmr_export_with_prompts(random_xlmr_path, tmp_path):
    cfg = model_config(random_xlmr_path, query_prefix="query: ", passage_prefix="passage: ")
    model, tok = load_dual_encoder(cfg, query_len=32, passage_len=64)
    out = export_model(model, tok, cfg, tmp_path / "xlmr")
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "document": "passage: ", "passage": "passage: "}
    queries = ["Wer hat den Bahnhof gebaut?", "東京の人口は?", "hi"]
    passages = ["Der Bahnhof wurde 1882 eröffnet und mehrfach umgebaut. " * 3, "x"]
    st = SentenceTransformer(str(out), device="cpu")
    dq = np.abs(st.encode(queries, prompt_name="query", convert_to_numpy=True) - ours(model, tok, queries)).max()
    dp = np.abs(st.encode(passages, prompt_name="passage", convert_to_numpy=True)
                - ours(model, tok, passages, "passage")).max()
    da = np.abs(automodel_mean(out, tok, queries, "query: ", max_length=32) - ours(model, tok, queries)).max()
    # encode_query / encode_document pick the prompts themselves.
    dq2 = np.abs(st.encode_query(queries, convert_to_numpy=True) - ours(model, tok, queries)).max()
    dp2 = np.abs(st.encode_document(passages, convert_to_numpy=True) - ours(model, tok, passages, "passage")).max()
    print(f"XLM-R export: SentenceTransformer query {dq:.2e} passage {dp:.2e}, AutoModel {da:.2e}")
    assert max(dq, dp, da, dq2, dp2) <= TOL
    # Without the prompt the embeddings differ: the prompt really is applied.
    assert np.abs(st.encode(queries, convert_to_numpy=True) - ours(model, tok, queries)).max() > 1e-3
    # Round trip on the XLM-R layout too.
    again, tok2 = load_dual_encoder(model_config(out), query_len=32, passage_len=64)
    same_tensors(out, export_model(again, tok2, model_config(out), tmp_path / "again"))


def test_pooler_export_matches(random_bert_path, tmp_path):
    cfg = model_config(random_bert_path, pooling="pooler")
    model, tok = load_dual_encoder(cfg, query_len=32, passage_len=32)
    out = export_model(model, tok, cfg, tmp_path / "labse-style")
    texts = ["a pooled sentence", "another, somewhat longer, pooled sentence"]
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(texts, convert_to_numpy=True) - ours(model, tok, texts)).max() <= TOL
    auto = transformers.AutoModel.from_pretrained(str(out)).eval()
    enc = tok.hf(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(auto(**enc).pooler_output, dim=-1).numpy()
    assert np.abs(pooled - ours(model, tok, texts)).max() <= TOL


def test_untied_export_writes_passage_tower(random_xlmr_path, tmp_path):
    cfg = model_config(random_xlmr_path, tied=False)
    model, tok = load_dual_encoder(cfg, query_len=16, passage_len=16)
    emb = model.towers.passage.embeddings.norm.scale
    emb.set_value(emb.get_value() * 1.5)  # make the towers differ, as after training
    out = export_model(model, tok, cfg, tmp_path / "untied")
    texts = ["eins zwei", "drei"]
    q = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_numpy=True)
    p = SentenceTransformer(str(out / PASSAGE_TOWER_DIR), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.abs(q - ours(model, tok, texts)).max() <= TOL
    assert np.abs(p - ours(model, tok, texts, "passage")).max() <= TOL
    assert np.abs(p - q).max() > 1e-3
    assert PASSAGE_TOWER_DIR in (out / "README.md").read_text()


def test_cli_hf_reexport(minilm_path, minilm_export, tmp_path, capsys):
    _, _, out = minilm_export
    report = tmp_path / "eval.json"  # the shape `python -m mlret.evaluate --out` writes
    report.write_text(json.dumps({"summary": {"xquad_r": {"multi_map": 0.1234}},
                                  "results": {"xquad_r": {"mono": {"en": {"map": 0.5}}}}}))
    assert main(["--hf", str(minilm_path), "--out", str(tmp_path / "cli"), "--passage_len", "256",
                 "--results", str(report)]) == 0
    assert "exported to" in capsys.readouterr().out
    assert "| xquad_r | multi_map | 0.1234 |" in (tmp_path / "cli" / "README.md").read_text()
    same_tensors(out, tmp_path / "cli")
    # Pooling and normalisation were read from the source folder's sentence-transformers files.
    assert json.loads((tmp_path / "cli" / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert "Normalize" in (tmp_path / "cli" / "modules.json").read_text()


def test_cli_checkpoint_export(random_bert_path, tmp_path):
    """--checkpoint: the exported weights are the checkpoint's (changed from the source), not the source's."""
    from flax import nnx

    from mlret.checkpoint import Checkpointer
    from mlret.config import default_config

    config = default_config()
    config.model.name = str(random_bert_path)
    config.model.query_prefix = "query: "
    config.data.query_len, config.data.passage_len = 16, 32
    config.checkpoint.async_save = False
    model, tok = load_dual_encoder(config)
    scale = model.towers.query.embeddings.norm.scale
    scale.set_value(scale.get_value() + 0.25)  # "trained" weights
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ck = Checkpointer(tmp_path / "run", config)
    ck.save(7, {"params": {"model": params}, "step": np.int32(7)}, None, config, force=True)
    ck.close()
    assert main(["--checkpoint", str(tmp_path / "run"), "--step", "7", "--out", str(tmp_path / "out")]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    np.testing.assert_array_equal(got["embeddings.LayerNorm.weight"], np.asarray(scale.get_value()))
    src = load_file(str(random_bert_path / "model.safetensors"))
    assert not np.array_equal(got["embeddings.LayerNorm.weight"], src["embeddings.LayerNorm.weight"])
    assert json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())["prompts"]["query"] == \
        "query: "
    texts = ["checkpoint export", "second text"]
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert np.abs(st.encode(texts, prompt_name="query", convert_to_numpy=True) - ours(model, tok, texts)).max() <= TOL


@pytest.fixture(scope="module")
def long_sentences(shared_data, minilm_path):
    """12 real XQuAD-R sentences (el, ru) of 200 to 600 MiniLM tokens: longer than a training length, some
    longer than MiniLM's max_seq_length of 256."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    out = []
    for lang in ("el", "ru"):
        data = json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text())
        sents = [s for art in data["data"] for p in art["paragraphs"] for s in p["sentences"]]
        out += [s for s in sents if 200 < len(tok(s)["input_ids"]) <= 600][:6]
    lengths = [len(tok(s)["input_ids"]) for s in out]
    assert len(out) == 12 and min(lengths) > 200 and max(lengths) > 256, lengths
    return out


def _automodel_pooled(path, texts):
    """AutoTokenizer (truncation at its model_max_length) + AutoModel, mean pooled: the transformers user's view."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def test_unchanged_reexport_is_the_identity_on_long_texts(minilm_path, long_sentences, tmp_path):
    """python -m mlret.export --hf (import, then export) of the real all-MiniLM-L6-v2: sentence-transformers and
    transformers give the source's embeddings on texts of 200-600 tokens, so max_seq_length stays 256."""
    out = tmp_path / "minilm"
    assert main(["--hf", str(minilm_path), "--out", str(out)]) == 0
    st_config = json.loads((out / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == 256 and "query_length" not in st_config
    src, exp = SentenceTransformer(str(minilm_path), device="cpu"), SentenceTransformer(str(out), device="cpu")
    assert exp.max_seq_length == src.max_seq_length == 256
    for encode in ("encode", "encode_query", "encode_document"):
        a = getattr(src, encode)(long_sentences, convert_to_numpy=True)
        b = getattr(exp, encode)(long_sentences, convert_to_numpy=True)
        assert np.abs(a - b).max() <= 1e-6, encode
    a, b = _automodel_pooled(minilm_path, long_sentences), _automodel_pooled(out, long_sentences)
    assert np.abs(a - b).max() <= 1e-6


def test_trained_export_truncates_like_mlret(minilm_path, long_sentences, tmp_path):
    """A run's export: max_seq_length stays the model's 256, and encode_query / encode_document truncate at the
    lengths the run evaluated with, giving mlret's own embeddings on long texts; the card states both lengths."""
    from mlret.config import default_config

    run = default_config()
    run.model.update(dict(model_config(minilm_path)))
    run.data.query_len, run.data.passage_len = 24, 48  # training
    run.eval.query_len, run.eval.passage_len = 32, 128  # evaluation: what the folder reproduces
    model, tok = load_dual_encoder(run.model, query_len=32, passage_len=128)
    out = export_model(model, tok, run.model, tmp_path / "trained", run_config=run)
    st_config = json.loads((out / "sentence_bert_config.json").read_text())
    assert st_config == {"max_seq_length": 256, "do_lower_case": False, "query_length": 32, "document_length": 128}
    st = SentenceTransformer(str(out), device="cpu")
    dq = np.abs(st.encode_query(long_sentences, convert_to_numpy=True) - ours(model, tok, long_sentences)).max()
    dd = np.abs(st.encode_document(long_sentences, convert_to_numpy=True)
                - ours(model, tok, long_sentences, "passage")).max()
    assert max(dq, dd) <= TOL, (dq, dd)
    # encode() has one maximum for every text: 256, so it differs from both truncations on these texts.
    assert np.abs(st.encode(long_sentences, convert_to_numpy=True) - ours(model, tok, long_sentences)).max() > 1e-3
    card = (out / "README.md").read_text()
    assert "| trained with query / passage length | 24 / 48 tokens |" in card
    assert "| encode_query / encode_document truncate at | 32 / 128 tokens |" in card
    assert "| max_seq_length (sentence-transformers, every text) | 256 tokens |" in card
