"""TextTokenizer: static shapes, int32, prefixes, truncation, and agreement with the Hugging Face tokenizer."""

import numpy as np
import pytest
import transformers

from mlret.models import TextTokenizer


@pytest.fixture(scope="module")
def tok(minilm_path):
    return TextTokenizer(minilm_path, query_len=16, passage_len=24, query_prefix="query: ",
                         passage_prefix="passage: ")


def test_static_shapes_and_dtypes(tok):
    q = tok.queries(["short", "a much longer question " * 20])
    p = tok.passages(["one passage", "two", "three passages here"])
    assert set(q) == {"query_ids", "query_mask"} and set(p) == {"passage_ids", "passage_mask"}
    assert q["query_ids"].shape == q["query_mask"].shape == (2, 16)
    assert p["passage_ids"].shape == p["passage_mask"].shape == (3, 24)
    for a in (*q.values(), *p.values()):
        assert a.dtype == np.int32
    # The long query is truncated to exactly the static length and still ends with [SEP].
    assert q["query_mask"][1].sum() == 16
    assert q["query_ids"][1, -1] == tok.hf.sep_token_id
    # Padding positions carry the pad id and a zero mask.
    n = int(q["query_mask"][0].sum())
    assert n < 16 and (q["query_ids"][0, n:] == tok.pad_token_id).all()


def test_prefix_matches_hf(tok, minilm_path):
    hf = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    want = hf(["query: where is the station?"], padding="max_length", max_length=16, truncation=True)
    got = tok.queries(["where is the station?"])
    np.testing.assert_array_equal(got["query_ids"][0], want["input_ids"][0])
    np.testing.assert_array_equal(got["query_mask"][0], want["attention_mask"][0])
    want_p = hf(["passage: the station is north"], padding="max_length", max_length=24, truncation=True)
    np.testing.assert_array_equal(tok.passages(["the station is north"])["passage_ids"][0], want_p["input_ids"][0])


def test_save_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    again = TextTokenizer(tmp_path, query_len=16, passage_len=24, query_prefix="query: ", passage_prefix="passage: ")
    assert again.vocab_size == tok.vocab_size == 30522
    texts = ["Wie spät ist es?", "日本語のテキスト"]
    for k, v in tok.queries(texts).items():
        np.testing.assert_array_equal(again.queries(texts)[k], v)


def test_rejects_single_string(tok):
    with pytest.raises(TypeError):
        tok.queries("not a list")


def test_threads_do_not_share_padding_state(minilm_path):
    """Queries (Lq) and passages (Lp) tokenised at once from several threads keep their own static lengths:
    a fast tokenizer's padding settings live on its shared Rust object, so TextTokenizer copies it per thread."""
    from concurrent.futures import ThreadPoolExecutor

    tok = TextTokenizer(minilm_path, query_len=16, passage_len=24)
    texts = [f"sentence number {i} with a few words" for i in range(64)]

    def work(i):
        out = tok.queries(texts) if i % 2 else tok.passages(texts)
        return i, next(iter(out.values())).shape

    with ThreadPoolExecutor(8) as pool:
        shapes = list(pool.map(work, range(64)))
    assert all(shape == (64, 16 if i % 2 else 24) for i, shape in shapes)
