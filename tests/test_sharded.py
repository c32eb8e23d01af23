"""A corpus spread over hosts: byte-range shards of a real corpus read back the whole corpus once, in order;
sharded encoding equals the replicated encoder; 2 jax.distributed processes (127.0.0.1) give the same exact top
k as 1 process (up to candidates whose scores tie to float32 noise), and ScaNN on per-host shards overlaps
1-process ScaNN on at least 99% of its entries; ScaNN trees that must pad give, in one process and two, full lists
that equal exact search on the candidates they hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scale_runs import REPO, free_port, run_together, scale_env

from mlret.errors import DataError
from mlret.eval.corpus import read_corpus
from mlret.eval.sharded import read_corpus_shard

WORKER = str(REPO / "tests" / "sharded_worker.py")


def assert_same_topk_up_to_ties(idx_a, scores_a, idx_b, scores_b, atol=1e-5):
    """Two top-k lists agree up to float32 noise: the scores rank by rank within `atol`, and the candidates only
    where noise can decide: a candidate in one list and not the other scores within 2 `atol` of the k-th score (a
    tie at the cut), and one both lists hold at other ranks scores within 2 `atol` of what it is swapped with."""
    np.testing.assert_allclose(scores_b, scores_a, atol=atol)
    for q, (a, sa, b, sb) in enumerate(zip(idx_a, scores_a, idx_b, scores_b)):
        score_a, score_b = dict(zip(a.tolist(), sa.tolist())), dict(zip(b.tolist(), sb.tolist()))
        for doc in set(score_a) ^ set(score_b):
            s = score_a.get(doc, score_b.get(doc))
            assert abs(s - min(sa[-1], sb[-1])) <= 2 * atol, (q, doc, s, sa[-1], sb[-1])
        for r in np.flatnonzero(a != b):
            if a[r] in score_b and b[r] in score_a:
                assert abs(score_a[a[r]] - score_a[b[r]]) <= 2 * atol, (q, r, a[r], b[r])


@pytest.fixture(scope="module")
def corpus(xquad_corpus) -> tuple[Path, Path, list[str]]:
    """Real XQuAD-R sentences as a plain docs.jsonl and a folder of three .jsonl.gz shards (`xquad_corpus`)."""
    return xquad_corpus


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_corpus_in_order(corpus, count):
    plain, folder, _ = corpus
    for path in (plain, folder):
        whole = read_corpus(str(path))
        shards = [read_corpus_shard(str(path), i, count) for i in range(count)]
        assert [d for s in shards for d in s[0]] == whole[0] and [t for s in shards for t in s[1]] == whole[1]
    sizes = [len(read_corpus_shard(str(plain), i, count)[0]) for i in range(count)]
    assert max(sizes) - min(sizes) <= 0.1 * len(whole[0]) + 2  # byte ranges: about equal shards of a plain file


def test_shard_errors_name_the_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text("".join(json.dumps({"id": str(i), "contents": "x" * 50}) + "\n" for i in range(40))
                   + '{"doc": "z"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:41: a corpus record needs"):
        read_corpus_shard(str(bad), 1, 2)


def _run(model, corpus, queries, out, processes, tmp_path, cache=None, dtype="float32", pad_check=False):
    port = free_port()
    cmds = []
    for i in range(processes):
        cmd = [sys.executable, WORKER, "--model", str(model), "--corpus", str(corpus), "--queries", str(queries),
               "--out", str(out), "--k", "10", "--dtype", dtype]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--processes", str(processes), "--process-id", str(i)]
        if cache:
            cmd += ["--cache", str(cache)]
        if pad_check:
            cmd += ["--pad-check"]
        cmds.append(cmd)
    # 4 simulated devices in all (1 x 4 or 2 x 2): the shard encoder splits its rows over devices, and 8 of them
    # cost more on 2 cores without covering more.
    procs = run_together(cmds, [scale_env(4 // processes)] * processes, 600, tmp_path / f"logs{processes}")
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{p.stderr[-4000:]}"
    reports = [json.loads(p.stdout.strip().splitlines()[-1]) for p in procs]
    with np.load(out) as z:
        return {k: z[k] for k in z.files}, reports


@pytest.fixture(scope="module")
def one_process(random_bert_path, corpus, tmp_path_factory) -> dict:
    """The 1-process search of the jsonl corpus with the random BERT, the yardstick of both 2-process tests."""
    plain, _, _ = corpus
    tmp = tmp_path_factory.mktemp("one_process")
    one, _ = _run(random_bert_path, plain, plain.parent / "queries.json", tmp / "one.npz", 1, tmp)
    return one


def test_two_processes_search_like_one(random_bert_path, corpus, one_process, tmp_path):
    plain, folder, _ = corpus
    queries = plain.parent / "queries.json"
    one = one_process
    two, reports = _run(random_bert_path, plain, queries, tmp_path / "two.npz", 2, tmp_path, cache=tmp_path / "c")
    assert int(two["processes"]) == 2 and [r["offset"] for r in reports] == [0, reports[0]["rows"]]
    assert sum(r["rows"] for r in reports) == 1200 and min(r["rows"] for r in reports) > 500
    # Exact search: the same global top 10, up to float32 noise (the shards pad to other lengths, which moves
    # scores by ~1e-7 and can swap two candidates whose scores tie to that).
    assert_same_topk_up_to_ties(one["exact"], one["exact_scores"], two["exact"], two["exact_scores"])
    # In one process, the shard encoder gives the replicated encoder's embeddings, row for row.
    assert float(one["vs_replicated"]) < 1e-5
    # ScaNN (a tree per host, searched in full, AH + reordering of 500): per-host shards change the trees and the
    # quantisation, not the answer.
    overlap = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(one["scann"], two["scann"])])
    assert overlap >= 0.99, overlap
    # The shards were written once; a rerun reads them back (no corpus step) and finds the same.
    again, _ = _run(random_bert_path, plain, queries, tmp_path / "again.npz", 2, tmp_path, cache=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["shard-00000-of-00002.npz",
                                                                   "shard-00001-of-00002.npz"]
    assert int(again["steps"]) < int(two["steps"])
    np.testing.assert_array_equal(again["exact"], two["exact"])


def test_two_processes_split_an_array_record_corpus_by_records(random_bert_path, corpus, xquad_array_record,
                                                                one_process, tmp_path):
    """The ArrayRecord form (three files of 400): 2 processes read 600 records each, the cut inside the second
    file, and search like 1 process on the jsonl corpus (scores to float32 noise; other padding can swap neighbours
    whose scores tie to 1e-5, as in the test above)."""
    plain, _, _ = corpus
    queries = plain.parent / "queries.json"
    one = one_process
    two, reports = _run(random_bert_path, xquad_array_record, queries, tmp_path / "two.npz", 2, tmp_path)
    assert [(r["offset"], r["rows"], r["first"]) for r in reports] == [(0, 600, ["en-0"]), (600, 600, ["de-200"])]
    assert_same_topk_up_to_ties(one["exact"], one["exact_scores"], two["exact"], two["exact_scores"])


def test_scann_lists_that_must_pad_equal_exact_search_on_what_they_found(minilm_path, corpus, tmp_path):
    """Real all-MiniLM-L6-v2 embeddings of 1,200 XQuAD-R sentences; ScaNN with 40 leaves per host, one searched,
    k = 100: the first search reaches fewer than 100 candidates and ScaNN pads (index 0, NaN). For every reordering
    dtype, in 1 process and 2: no list is cut or padded (every query keeps 100 results, no duplicates), and each
    list is exact search on its own candidates: its scores are the float32 dot products, sorted descending."""
    plain, _, _ = corpus
    queries = plain.parent / "queries.json"
    one, _ = _run(minilm_path, plain, queries, tmp_path / "one.npz", 1, tmp_path, pad_check=True)
    two, _ = _run(minilm_path, plain, queries, tmp_path / "two.npz", 2, tmp_path, pad_check=True)
    p, q = one["passages"].astype(np.float64), one["queries"].astype(np.float64)
    for run in (one, two):
        for rd in ("float32", "bfloat16", "int8"):
            idx, scores = run[f"pad_{rd}"], run[f"pad_{rd}_scores"]
            assert int(run[f"pad_{rd}_retried"].sum()) > 0, (rd, "ScaNN never had to pad: the test does not test it")
            assert int(run[f"pad_{rd}_short"]) == 0 and (idx >= 0).all() and idx.shape == (len(q), 100), rd
            assert all(len(set(row)) == 100 for row in idx.tolist()), rd
            exact = np.einsum("qd,qkd->qk", q, p[idx])
            np.testing.assert_allclose(scores, exact, atol=2e-5, err_msg=rd)
            assert (np.diff(scores, axis=1) <= 0).all(), rd
