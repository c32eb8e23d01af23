"""TextTokenizer: static shapes, int32, prefixes, truncation, and agreement with the Hugging Face tokenizer."""

from pathlib import Path

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
    """Queries (Lq) and passages (Lp) tokenised at once from several threads keep their own static lengths and
    get the ids one thread alone gets: a fast tokenizer's padding settings live on its Rust object, which every
    call sets, so TextTokenizer lets one call at a time use it."""
    from concurrent.futures import ThreadPoolExecutor

    tok = TextTokenizer(minilm_path, query_len=16, passage_len=24)
    texts = [f"sentence number {i} with a few words" for i in range(64)]
    alone = {16: tok.queries(texts)["query_ids"], 24: tok.passages(texts)["passage_ids"]}

    def work(i):
        out = tok.queries(texts) if i % 2 else tok.passages(texts)
        return i, next(iter(out.values()))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(64)))
    for i, ids in results:
        np.testing.assert_array_equal(ids, alone[16 if i % 2 else 24])


def test_threads_add_no_copy_of_the_tokenizer(tmp_path, shared_data):
    """Tokenising from the training data's threads holds no per-thread copy of the Hugging Face tokenizer: the
    real XLM-R tokenizer (250,002 pieces, the demo's) costs a few hundred MiB of malloc'd memory per copy, and the
    bytes in use while two live threads have tokenised stay well under one copy's."""
    import gc
    import threading

    from model_fixtures import _save_xlmr_tokenizer

    from mlret.hostmem import heap_in_use

    if heap_in_use() is None:
        pytest.skip("this C library's malloc reports no bytes in use (mlret.hostmem.heap_in_use)")
    _save_xlmr_tokenizer(shared_data, tmp_path)  # tokenizer.json and tokenizer_config.json of multilingual-e5-small
    gc.collect()
    before = heap_in_use()
    tok = TextTokenizer(tmp_path, query_len=32, passage_len=64, query_prefix="query: ", passage_prefix="passage: ")
    gc.collect()
    one = heap_in_use() - before  # one tokenizer's bytes
    texts = ["Wie spät ist es?", "日本語のテキスト", "a longer sentence about the station " * 4]
    tok.queries(texts), tok.passages(texts)
    gc.collect()
    loaded = heap_in_use()

    done, release = threading.Barrier(3), threading.Event()

    def work(tower):  # like Grain's reader threads, which live as long as the iterator
        for _ in range(3):
            getattr(tok, tower)(texts)
        done.wait()
        release.wait()

    threads = [threading.Thread(target=work, args=(tower,)) for tower in ("queries", "passages")]
    for t in threads:
        t.start()
    done.wait()  # both threads have tokenised and are still alive (a thread's locals die with it)
    gc.collect()
    grown = heap_in_use() - loaded
    release.set()
    for t in threads:
        t.join()
    assert grown < one / 4, (one, grown)


def test_with_lengths_shares_the_tokenizer_and_encodes_as_a_loaded_one(tok, minilm_path):
    """The evaluation's TextTokenizer derived from the run's (other lengths and prefixes) holds no second Hugging
    Face tokenizer and gives the ids a TextTokenizer loaded at those settings gives; the run's keeps its own."""
    from mlret.eval.encode import EmbedSpec

    other = tok.with_lengths(query_len=8, passage_len=40, query_prefix="q: ", passage_prefix="")
    assert other.hf is tok.hf
    loaded = TextTokenizer(minilm_path, query_len=8, passage_len=40, query_prefix="q: ", passage_prefix="")
    texts = ["where is the station?", "a much longer passage about the station and the trains " * 3, "日本語"]
    for name in ("queries", "passages"):
        for k, v in getattr(loaded, name)(texts).items():
            np.testing.assert_array_equal(getattr(other, name)(texts)[k], v)
    assert tok.queries(texts)["query_ids"].shape == (3, 16) and tok.passages(texts)["passage_ids"].shape == (3, 24)
    # EmbedSpec.tokenizer shares the run's only where it is the same folder's.
    spec = EmbedSpec(query_len=8, passage_len=40, query_prefix="q: ", passage_prefix="", batch_size=8,
                     progress=False, length_buckets=False, packing=False, rules=None)
    assert spec.tokenizer(str(minilm_path), shared=tok).hf is tok.hf
    assert spec.tokenizer(str(minilm_path)).hf is not tok.hf


def test_save_writes_the_settings_it_was_loaded_with(tok, minilm_path, tmp_path):
    """tokenizer.json keeps the backend's truncation and padding (all-MiniLM-L6-v2's: 128 tokens); after calls at
    the static lengths (which set them on the shared tokenizer) `save` still writes those of the loaded folder."""
    import tokenizers

    tok.queries(["where is the station?"])
    tok.passages(["the station is north"])
    assert tok.hf.backend_tokenizer.truncation["max_length"] == 24  # the last call's length, on the shared object
    tok.save(tmp_path)
    loaded = tokenizers.Tokenizer.from_file(str(Path(minilm_path) / "tokenizer.json"))
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (saved.truncation, saved.padding) == (loaded.truncation, loaded.padding)
