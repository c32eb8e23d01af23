"""One process of a sharded corpus search (tests/test_sharded.py): encode this process's shard of a corpus with
`encode_corpus_shard`, search it with `sharded_topk` (exact and ScaNN) and write the global top k.

    python tests/sharded_worker.py --model DIR --corpus FILE --queries FILE --out OUT.npz --k K
        [--coordinator 127.0.0.1:PORT --processes 2 --process-id I] [--cache DIR] [--dtype float32] [--pad-check]

`--pad-check` also searches with ScaNN trees that must pad (many leaves, one searched, k = 100), once per
reordering dtype, and writes each result (`pad_<dtype>`, `pad_<dtype>_scores`, how many queries were searched
again) beside the one-process embeddings (`passages`, `queries`) that the test re-scores them with.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np


def multihost_sum(x: np.ndarray) -> np.ndarray:
    from mlret.eval.sharded import gathered

    return gathered(x).sum(axis=0)


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--model", "--corpus", "--queries", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--coordinator")
    p.add_argument("--processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--cache")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--pad-check", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, force=True)
    import jax

    from mlret import parallel

    parallel.initialize_distributed(a.coordinator, a.processes, a.process_id)
    from mlret.config import default_config
    from mlret.eval.encode import ShardedEmbedder, place_model
    from mlret.eval.retrieval import RetrievalOptions
    from mlret.eval.sharded import encode_corpus_shard, sharded_topk
    from mlret.models import load_dual_encoder

    c = default_config()
    c.model.name = a.model
    model, tok = load_dual_encoder(c.model, query_len=16, passage_len=32)
    mesh = parallel.make_mesh(c.mesh)
    rules = parallel.parse_rules(c.mesh.rules)
    emb = ShardedEmbedder(place_model(model, mesh, rules), tok, mesh, rules, batch_size=16, progress=False)
    shard = encode_corpus_shard(emb, a.corpus, dtype=a.dtype, cache_dir=a.cache, key=a.model)
    queries = emb.queries(json.load(open(a.queries, encoding="utf-8")))
    exact = sharded_topk(queries, shard.embeddings, shard.offset, a.k, RetrievalOptions(method="exact"))
    scann = sharded_topk(queries, shard.embeddings, shard.offset, a.k,
                         RetrievalOptions(method="scann", num_leaves=4, leaves_to_search=4, reorder=500))
    extra = {}
    if a.pad_check:
        from mlret.eval.retrieval import REORDER_DTYPES

        for rd in REORDER_DTYPES:
            top = sharded_topk(queries, shard.embeddings, shard.offset, 100,
                               RetrievalOptions(method="scann", num_leaves=40, leaves_to_search=1, reorder=100,
                                                reorder_dtype=rd, recall_sample=0))
            retried = np.array([top.info.get("retried_queries", 0)])
            extra |= {f"pad_{rd}": top.indices, f"pad_{rd}_scores": top.scores, f"pad_{rd}_short":
                      np.array(top.info["short_queries"]),
                      f"pad_{rd}_retried": multihost_sum(retried)}
    if jax.process_count() == 1 and a.pad_check:
        from mlret.eval.corpus import read_corpus

        extra |= {"passages": emb.passages(read_corpus(a.corpus)[1]), "queries": queries}
    if jax.process_count() == 1:  # the replicated encoder on the same texts, row for row
        from mlret.eval.corpus import read_corpus

        extra["vs_replicated"] = np.abs(emb.passages(read_corpus(a.corpus)[1]) - shard.embeddings).max()
    if jax.process_index() == 0:
        np.savez(a.out, **extra, exact=exact.indices, exact_scores=exact.scores, scann=scann.indices,
                 steps=np.array(emb.steps_run), processes=np.array(jax.process_count()))
    print(json.dumps({"process": jax.process_index(), "offset": shard.offset, "rows": len(shard.docids),
                      "first": shard.docids[:1], "dtype": str(shard.embeddings.dtype)}), flush=True)


if __name__ == "__main__":
    main()
