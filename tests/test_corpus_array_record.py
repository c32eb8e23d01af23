"""The ArrayRecord form of a corpus (`mlret.eval.corpus`), on real text (`xquad_corpus`: XQuAD-R sentences as
MIRACL / Mr. TyDi records): converted from jsonl it reads back the same docids and texts; per-process shards are
cut by record count (contiguous, in order, balanced within one record, global offsets right); sharded encoding and
search give the jsonl corpus's embeddings and top k; bad records, mixed folders and incomplete shard sets are
errors naming the file (and the record); the writer leaves no partial file under a final name."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from gcs_fixtures import DATA as GCS_DATA

from mlret import parallel
from mlret.config import default_config
from mlret.errors import DataError
from mlret.eval import corpus as C
from mlret.eval.corpus import read_corpus, write_array_record
from mlret.eval.retrieval import RetrievalOptions, build_index, merge_topk
from mlret.eval.sharded import encode_corpus_shard, global_docids, read_corpus_shard, sharded_topk


def test_writer_makes_named_shards_that_read_back_the_jsonl_corpus(xquad_corpus, xquad_array_record, tmp_path):
    plain, folder, _ = xquad_corpus
    assert sorted(os.listdir(xquad_array_record)) == [f"corpus-0000{i}-of-00003.array_record" for i in range(3)]
    whole = read_corpus(str(plain))
    assert len(whole[0]) == 1200
    assert read_corpus(str(xquad_array_record)) == whole == read_corpus(str(folder))
    # One shard file on its own is a corpus too (the second 400 records).
    one = read_corpus(str(xquad_array_record / "corpus-00001-of-00003.array_record"))
    assert one == (whole[0][400:800], whole[1][400:800])
    # The plain file as one shard, through the command line, with its progress line.
    out = tmp_path / "one"
    err = io.StringIO()
    written = write_array_record(str(plain), str(out), progress=err)
    assert written == [str(out / "corpus-00000-of-00001.array_record")]
    assert err.getvalue().endswith("1200 records, shard 1 of 1\n")
    assert read_corpus(str(out)) == whole
    assert [p for p in os.listdir(out) if not p.startswith("corpus-")] == []  # no temporary file left
    with pytest.raises(FileExistsError, match="holds .array_record files already"):
        write_array_record(str(plain), str(out))


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_are_contiguous_and_balanced_by_records(xquad_array_record, count):
    whole = read_corpus(str(xquad_array_record))
    shards = [read_corpus_shard(str(xquad_array_record), i, count) for i in range(count)]
    assert [d for s in shards for d in s[0]] == whole[0] and [t for s in shards for t in s[1]] == whole[1]
    sizes = [len(s[0]) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    # Shard i starts at the global position shard_offset gives (the sizes of the shards before it).
    starts = np.cumsum([0, *sizes[:-1]])
    assert [whole[0].index(s[0][0]) for s in shards] == list(starts)


@pytest.fixture(scope="module")
def embedder(random_bert_path):
    from mlret.eval.encode import ShardedEmbedder, place_model
    from mlret.models import load_dual_encoder

    c = default_config()
    c.model.name = str(random_bert_path)
    model, tok = load_dual_encoder(c.model, query_len=16, passage_len=32)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    return ShardedEmbedder(place_model(model, mesh, rules), tok, mesh, rules, batch_size=64, progress=False)


def test_sharded_encoding_and_search_equal_the_jsonl_corpus(embedder, xquad_corpus, xquad_array_record):
    plain, _, questions = xquad_corpus
    jsonl = encode_corpus_shard(embedder, str(plain))
    arrec = encode_corpus_shard(embedder, str(xquad_array_record))
    assert arrec.docids == jsonl.docids and (arrec.offset, arrec.total) == (0, 1200) == (jsonl.offset, jsonl.total)
    np.testing.assert_array_equal(arrec.embeddings, jsonl.embeddings)
    q = embedder.queries(questions)
    opts = RetrievalOptions(method="exact")
    top_j, top_a = (sharded_topk(q, s.embeddings, s.offset, 10, opts) for s in (jsonl, arrec))
    np.testing.assert_array_equal(top_a.indices, top_j.indices)
    assert global_docids(top_a.indices, arrec) == global_docids(top_j.indices, jsonl)
    # Three hosts' shards (read and encoded apart, searched apart at their offsets, merged) find the same top 10.
    idx, val = [], []
    for i in range(3):
        docids, texts = read_corpus_shard(str(xquad_array_record), i, 3)
        offset = jsonl.docids.index(docids[0])
        top = build_index(embedder.passages(texts), 10, opts).search(q, 10)
        idx.append(top.indices + offset)
        val.append(top.scores)
    merged, scores = merge_topk(idx, val, 10)
    np.testing.assert_array_equal(merged, top_j.indices)
    np.testing.assert_allclose(scores, top_j.scores, atol=1e-5)


def _write_records(path, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def test_bad_records_name_the_file_and_the_record(tmp_path):
    good = [json.dumps({"id": str(i), "contents": f"passage {i}"}).encode() for i in range(40)]
    bad = tmp_path / "bad.array_record"
    _write_records(bad, good[:30] + [b'{"id": "30", "contents": '] + good[31:])
    with pytest.raises(DataError, match=r"bad.array_record\[30\]: not JSON"):
        read_corpus_shard(str(bad), 1, 2)  # records 20..39: shard 1 of 2 holds it
    assert read_corpus_shard(str(bad), 0, 2)[0] == [str(i) for i in range(20)]  # shard 0 never reads it
    _write_records(bad, good[:7] + [b"\xff\xfe not utf-8"])
    with pytest.raises(DataError, match=r"bad.array_record\[7\]: not JSON"):
        read_corpus(str(bad))
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_records(folder / "corpus-00000-of-00002.array_record", good[:20])
    _write_records(folder / "corpus-00001-of-00002.array_record", good[20:25] + [b'{"doc": "z"}'])
    with pytest.raises(DataError, match=r"corpus-00001-of-00002.array_record\[5\]: a corpus record needs"):
        read_corpus(str(folder))
    (tmp_path / "junk.array_record").write_bytes(b"not an array record")
    with pytest.raises(DataError, match=r"junk.array_record: not a readable ArrayRecord file"):
        read_corpus(str(tmp_path / "junk.array_record"))


def test_folders_hold_one_form_and_a_complete_shard_set(xquad_corpus, tmp_path):
    plain, _, _ = xquad_corpus
    mixed = tmp_path / "mixed"
    write_array_record(str(plain), str(mixed), shards=2, progress=False)
    (mixed / "extra.jsonl").write_text('{"id": "x", "contents": "y"}\n')
    with pytest.raises(DataError, match=r"mixed: folder holds both jsonl and ArrayRecord corpus shards"):
        read_corpus_shard(str(mixed), 0, 2)
    (mixed / "extra.jsonl").unlink()
    (mixed / "corpus-00001-of-00002.array_record").unlink()
    with pytest.raises(DataError, match=r"incomplete .* missing corpus-00001-of-00002.array_record"):
        read_corpus(str(mixed))


def test_a_failed_write_leaves_no_file(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "contents": "x"}) + "\n" for i in range(50)) + "{oops\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"c.jsonl:51: not JSON"):
        write_array_record(str(src), str(out), shards=3, progress=False)
    assert not out.exists() or os.listdir(out) == []
    ready = tmp_path / "ok.array_record"
    _write_records(ready, [b'{"id": "a", "contents": "b"}'])
    with pytest.raises(DataError, match="already in the ArrayRecord form"):
        write_array_record(str(ready), str(out))


def test_cli_writes_the_shards(xquad_corpus, tmp_path, capsys):
    plain, _, _ = xquad_corpus
    C.main(["--to-array-record", str(plain), str(tmp_path / "cli"), "--shards", "4"])
    printed = capsys.readouterr()
    assert printed.out.split() == [str(tmp_path / "cli" / f"corpus-0000{i}-of-00004.array_record") for i in range(4)]
    assert "1200 of 1200 records, shard 4 of 4" in printed.err
    assert [len(read_corpus_shard(str(tmp_path / "cli" / f"corpus-0000{i}-of-00004.array_record"))[0])
            for i in range(4)] == [300] * 4
    with pytest.raises(SystemExit, match="--shards 0: must be at least 1"):
        C.main(["--to-array-record", str(plain), str(tmp_path / "cli0"), "--shards", "0"])


@pytest.mark.usefixtures("gcs_url")
def test_a_gs_corpus_is_read_from_its_local_mirror(xquad_array_record, xquad_corpus, tmp_path, monkeypatch):
    """fake-gcs-server (tests/test_gcs.py's session server): shards uploaded to a bucket, or written there by
    `write_array_record`, read back through `storage.download_file`'s local mirror, each file fetched once."""
    from mlret import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    remote = f"gs://{GCS_DATA}/corpus-ar"
    storage.sync_dir(storage.path(str(xquad_array_record)), storage.path(remote))
    whole = read_corpus(str(xquad_array_record))
    assert read_corpus(remote) == whole
    assert read_corpus_shard(remote, 1, 3) == (whole[0][400:800], whole[1][400:800])
    mirror = storage.local_mirror(remote)
    assert sorted(os.listdir(mirror)) == sorted(os.listdir(xquad_array_record))
    written = write_array_record(str(xquad_corpus[0]), f"gs://{GCS_DATA}/corpus-written", shards=2, progress=False)
    assert written == [f"gs://{GCS_DATA}/corpus-written/corpus-0000{i}-of-00002.array_record" for i in range(2)]
    assert read_corpus(f"gs://{GCS_DATA}/corpus-written") == whole
