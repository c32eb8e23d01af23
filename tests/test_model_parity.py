"""Parity of the NNX encoder with the reference PyTorch implementations (float32, max-abs diff <= 1e-4).

(a) real all-MiniLM-L6-v2 vs sentence-transformers on XQuAD-R sentences in 6 languages;
(b) a random XLM-R with the real XLM-R tokenizer vs transformers' XLMRobertaModel, lengths 3..~120 tokens;
(c) a random BERT with token types and a pooler, `pooler` pooling (LaBSE style), vs transformers' BertModel.
"""

import jax
import numpy as np
import torch
import transformers
from model_fixtures import encode_p, model_config

from mlret.models import load_dual_encoder

TOL = 1e-4


def test_minilm_matches_sentence_transformers(minilm_path, xquad_sentences):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path), device="cpu")
    # Same truncation as the reference: its max_seq_length (256) as our static length.
    model, tok = load_dual_encoder(model_config(minilm_path), query_len=32, passage_len=st.max_seq_length)
    batch = tok.passages(xquad_sentences)
    assert len(xquad_sentences) >= 64
    lengths = batch["passage_mask"].sum(1)
    assert lengths.min() < 20 and lengths.max() > 60  # the batch really mixes short and long sentences
    ours = np.asarray(encode_p(model, batch["passage_ids"], batch["passage_mask"]))
    ref = st.encode(xquad_sentences, batch_size=16, convert_to_numpy=True)
    diff = np.abs(ours - ref).max()
    print(f"MiniLM vs SentenceTransformer, {len(xquad_sentences)} sentences: max-abs diff {diff:.2e}")
    assert diff <= TOL
    # Different sentences give different embeddings (the comparison is not between constants).
    assert np.abs(ref[0] - ref[1]).max() > 1e-2


def _xlmr_texts() -> list[str]:
    return ["Hi", "Wo ist der Bahnhof?", "東京は日本の首都です。" * 3,
            "The quick brown fox jumps over the lazy dog, again and again, " * 6, "हिन्दी वाक्य", "Да."]


def test_random_xlmr_matches_transformers(random_xlmr_path):
    ref_model = transformers.XLMRobertaModel.from_pretrained(random_xlmr_path).eval()
    model, tok = load_dual_encoder(model_config(random_xlmr_path, normalize=False), query_len=16, passage_len=128)
    assert tok.vocab_size == 250002
    texts = _xlmr_texts()
    batch = tok.passages(texts)
    lengths = batch["passage_mask"].sum(1)
    assert lengths.min() <= 4 and lengths.max() >= 60, lengths  # padding covers most of the short rows
    ids, mask = batch["passage_ids"], batch["passage_mask"]
    with torch.no_grad():
        out = ref_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    hidden_ref = out.last_hidden_state.numpy()
    hidden = np.asarray(jax.jit(lambda m, i, k: m.towers.passage(i, k))(model, ids, mask))
    m = mask.astype(bool)
    hdiff = np.abs(hidden - hidden_ref)[m].max()
    m3 = mask[..., None].astype(np.float32)
    pooled_ref = (hidden_ref * m3).sum(1) / m3.sum(1)
    pdiff = np.abs(np.asarray(encode_p(model, ids, mask)) - pooled_ref).max()
    print(f"random XLM-R vs XLMRobertaModel: hidden (real tokens) {hdiff:.2e}, mean-pooled {pdiff:.2e}")
    assert hdiff <= TOL and pdiff <= TOL


def test_random_bert_pooler_matches_transformers(random_bert_path):
    ref_model = transformers.BertModel.from_pretrained(random_bert_path).eval()
    model, tok = load_dual_encoder(model_config(random_bert_path, pooling="pooler", normalize=False),
                                   query_len=16, passage_len=64)
    # Sentence pairs give real token types (0 for the first segment, 1 for the second).
    pairs = [("what is a fox?", "A fox is a small omnivorous mammal."), ("why?", "because " * 20)]
    enc = tok.hf([a for a, _ in pairs], [b for _, b in pairs], padding="max_length", max_length=64,
                 truncation=True, return_tensors="np")
    ids, mask, types = (enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    types[:, -5:] = 2  # type_vocab_size is 3: exercise the third row too (on padding and real tokens alike)
    assert (types[mask.astype(bool)] == 1).any()
    with torch.no_grad():
        out = ref_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                        token_type_ids=torch.tensor(types, dtype=torch.long))
    ours = np.asarray(jax.jit(lambda m, i, k, t: m.encode_query(i, k, t))(model, ids, mask, types))
    diff = np.abs(ours - out.pooler_output.numpy()).max()
    # Without token types both sides use type 0.
    with torch.no_grad():
        ref0 = ref_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    diff0 = np.abs(np.asarray(encode_p(model, ids, mask)) - ref0.pooler_output.numpy()).max()
    print(f"random BERT pooler vs BertModel.pooler_output: {diff:.2e} (token types), {diff0:.2e} (none)")
    assert diff <= TOL and diff0 <= TOL
    # Token types matter in this model, so the test would see them being dropped.
    assert np.abs(out.pooler_output.numpy() - ref0.pooler_output.numpy()).max() > 1e-3


def test_random_bert_cls_normalized(random_bert_path):
    ref_model = transformers.BertModel.from_pretrained(random_bert_path).eval()
    model, tok = load_dual_encoder(model_config(random_bert_path, pooling="cls"), query_len=24, passage_len=24)
    b = tok.queries(["one", "a longer query with several words in it"])
    with torch.no_grad():
        h = ref_model(input_ids=torch.tensor(b["query_ids"], dtype=torch.long),
                      attention_mask=torch.tensor(b["query_mask"])).last_hidden_state[:, 0].numpy()
    ref = h / np.linalg.norm(h, axis=-1, keepdims=True)
    ours = np.asarray(jax.jit(lambda m, i, k: m.encode_query(i, k))(model, b["query_ids"], b["query_mask"]))
    assert np.abs(ours - ref).max() <= TOL
