"""The Grain pipeline: the batch contract, hard negatives, exact resume (threads, worker processes, orbax),
and per-host slices that form the one-process global batch (in-process and with two jax.distributed
processes).

MLQA-R is prepared once per module into a temporary TFDS directory; the tokenizer is the real MiniLM one with
short static lengths (the pipeline's properties do not depend on the model).
"""

import json
import os
import sys
import textwrap

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scale_runs import free_port, run_together

from mlret.config import default_config
from mlret.data import pipeline
from mlret.data.units import LANGUAGES, MONOLINGUAL, LangText, ParallelUnit, dumps_unit
from mlret.errors import ConfigError, DataError
from mlret.models import TextTokenizer

Lq, Lp = 16, 24


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def tok(minilm_path):
    return TextTokenizer(minilm_path, query_len=Lq, passage_len=Lp)


def _config(shared_data, tfds_dir, **data):
    c = default_config()
    c.seed = 3
    c.data.data_dir = str(shared_data)
    c.data.tfds_dir = str(tfds_dir)
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r"},)
    c.data.global_batch = 16
    c.data.group_size = 3
    c.data.query_len, c.data.passage_len = Lq, Lp
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def sources(shared_data, tfds_dir):
    return pipeline.load_sources(_config(shared_data, tfds_dir))


def _equal(a, b):  # teacher_scores holds NaN where no teacher scored a passage: equal where both are NaN
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)


def test_batch_contract_and_pair_texts(shared_data, tfds_dir, tok, sources):
    config = _config(shared_data, tfds_dir, alpha=0.5)
    schedule, _ = pipeline.make_schedule(config, sources)
    asm = pipeline.BatchAssembler(schedule, sources, tok, process_index=0, process_count=1)
    units = [u for _, store in sources for u in store.get(range(len(store)))]
    G, B = 3, 16
    seen_types = set()
    for step in range(12):
        batch = asm(step)
        assert batch["query_ids"].shape == batch["query_mask"].shape == (B, Lq)
        assert batch["passage_ids"].shape == batch["passage_mask"].shape == (B, G, Lp)
        for k in ("unit_id", "query_lang", "passage_lang", "batch_type"):
            assert batch[k].shape == (B,)
        assert all(v.dtype == np.int32 for k, v in batch.items() if k != "teacher_scores")
        assert batch["teacher_scores"].shape == (B, G) and batch["teacher_scores"].dtype == np.float32
        assert np.isnan(batch["teacher_scores"]).all()  # MLQA-R carries no teacher scores
        assert len(set(batch["batch_type"].tolist())) == 1
        seen_types.add(int(batch["batch_type"][0]))
        plan, sl, queries, groups = asm.texts(step)
        # The tokens are the texts' tokens.
        assert np.array_equal(batch["query_ids"], tok.queries(queries)["query_ids"])
        assert np.array_equal(batch["passage_ids"].reshape(B * G, Lp),
                              tok.passages([t for g in groups for t in g])["passage_ids"])
        batch_positives = {(int(y), units[u].texts[LANGUAGES[y]].positive)
                           for u, y in zip(plan.unit, plan.passage_lang)}
        for i in range(B):
            unit = units[batch["unit_id"][i]]
            x, y = LANGUAGES[batch["query_lang"][i]], LANGUAGES[batch["passage_lang"][i]]
            assert (x == y) == (batch["batch_type"][i] == MONOLINGUAL)
            assert queries[i] == unit.texts[x].query and groups[i][0] == unit.texts[y].positive
            for neg in groups[i][1:]:
                assert (int(batch["passage_lang"][i]), neg) not in batch_positives  # never a batch positive
                own = neg in unit.texts[y].negatives
                # otherwise: the positive in Y of a unit outside the batch (the fill), never this unit's
                other = [v for k, v in enumerate(units) if y in v.texts and v.texts[y].positive == neg]
                assert own or (other and all(k not in plan.unit for k in
                                             [units.index(v) for v in other]))
            assert len(set(groups[i])) == G
    assert seen_types == {0, 1}


def test_fill_when_units_have_no_negatives(tmp_path, tfds_dir, tok):
    rng = np.random.default_rng(0)
    units = [ParallelUnit(f"u{i}", "mine", {lang: LangText(f"q{i} {lang}", f"p{i} {lang}")
                                            for lang in rng.choice(["de", "en", "fr"], 2, replace=False)})
             for i in range(60)]
    (tmp_path / "u.jsonl").write_text("\n".join(dumps_unit(u) for u in units), encoding="utf-8")
    c = default_config()
    c.data.tfds_dir = str(tfds_dir)
    c.data.sources = ({"name": "jsonl", "path": str(tmp_path / "u.jsonl")},)
    c.data.global_batch, c.data.group_size, c.data.alpha = 8, 4, 0.5
    srcs = pipeline.load_sources(c)
    schedule, _ = pipeline.make_schedule(c, srcs)
    asm = pipeline.BatchAssembler(schedule, srcs, tok, process_index=0, process_count=1)
    for step in range(10):
        plan, _, _, groups = asm.texts(step)
        in_batch = {f"u{u}" for u in plan.unit}
        for g, y in zip(groups, plan.passage_lang):
            lang = LANGUAGES[y]
            assert len(set(g)) == 4
            for neg in g[1:]:
                uid, nlang = neg.split(" ")
                assert nlang == lang and "u" + uid[1:] not in in_batch


def test_host_slices_form_the_global_batch(shared_data, tfds_dir, tok, sources):
    config = _config(shared_data, tfds_dir, alpha=0.5)
    schedule, _ = pipeline.make_schedule(config, sources)
    whole = pipeline.BatchAssembler(schedule, sources, tok, process_index=0, process_count=1)
    hosts = [pipeline.BatchAssembler(schedule, sources, tok, process_index=p, process_count=4) for p in range(4)]
    for step in (0, 5, 77):
        parts = [h(step) for h in hosts]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert _equal(joined, whole(step))
    with pytest.raises(DataError, match="global_batch=16 is not divisible by the 3 processes"):
        pipeline.BatchAssembler(schedule, sources, tok, process_index=0, process_count=3)


def test_restore_mid_stream_threads_and_orbax(shared_data, tfds_dir, tok, sources, tmp_path):
    config = _config(shared_data, tfds_dir, alpha=0.5, read_threads=3, prefetch=3)
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    head = [next(it) for _ in range(4)]
    state = it.get_state()
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    uninterrupted = [next(it) for _ in range(3)]
    resumed = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    resumed.set_state(state)
    assert all(_equal(a, b) for a, b in zip(uninterrupted, [next(resumed) for _ in range(3)]))
    restored = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert all(_equal(a, b) for a, b in zip(uninterrupted, [next(restored) for _ in range(3)]))
    # Batches are those of steps 0..6 of the schedule, whatever the threads and prefetching (tokenising in
    # several threads at once must not mix up the static lengths).
    asm = pipeline.BatchAssembler(pipeline.make_schedule(config, sources)[0], sources, tok, process_index=0,
                                  process_count=1)
    assert all(_equal(b, asm(step)) for step, b in enumerate(head + uninterrupted))


def test_restore_with_worker_processes(shared_data, tfds_dir, tok, sources):
    config = _config(shared_data, tfds_dir, alpha=0.5, worker_count=1, prefetch=2)
    it = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    resumed = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    resumed.set_state(state)
    assert all(_equal(a, b) for a, b in zip(rest, [next(resumed) for _ in range(2)]))
    # Workers yield what the in-process pipeline yields.
    config.data.worker_count = 0
    plain = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    assert all(_equal(a, next(plain)) for a in first + rest)
    for x in (it, resumed):
        x.close()


def test_config_errors(shared_data, tfds_dir, tok):
    c = _config(shared_data, tfds_dir)
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r", "languages": "de,xx"},)
    with pytest.raises(ConfigError, match=r"config.data.sources\[0\].languages: unknown language code"):
        pipeline.make_train_iterator(c, tok, process_index=0, process_count=1)
    c.data.sources = ({"name": "mlqa", "path": "mlqa-r", "passages": "context"},)
    with pytest.raises(ConfigError, match=r"config.data.sources\[0\]: unknown key\(s\) \['passages'\]"):
        pipeline.make_train_iterator(c, tok, process_index=0, process_count=1)
    c.data.sources = ({"name": "mlqa", "path": "mlqa-r", "passage": "paragraph"},)
    with pytest.raises(ConfigError, match=r"config.data.sources\[0\].passage: 'paragraph' is not one of context"):
        pipeline.make_train_iterator(c, tok, process_index=0, process_count=1)
    c.data.sources = ()
    with pytest.raises(DataError, match="config.data.sources is empty"):
        pipeline.make_train_iterator(c, tok, process_index=0, process_count=1)


_WORKER = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    port, pid, out, cfg_json, tok_path = sys.argv[1:6]
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid), initialization_timeout=60,
                               heartbeat_timeout_seconds=30)
    from mlret.config import default_config
    from mlret.data import pipeline
    from mlret.models import TextTokenizer

    c = default_config()
    for k, v in json.loads(cfg_json).items():
        c.data[k] = tuple(v) if isinstance(v, list) else v
    c.seed = 3
    tok = TextTokenizer(tok_path, query_len=c.data.query_len, passage_len=c.data.passage_len)
    it = pipeline.make_train_iterator(c, tok)  # process index / count from jax
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    result = {}
    for step in range(3):
        local = next(it)
        for k, v in local.items():
            # The global batch, sharded over the 8 devices of both processes.
            arr = jax.make_array_from_process_local_data(sharding, v)
            assert arr.shape[0] == c.data.global_batch
            result[f"{step}/{k}"] = np.asarray(multihost_utils.process_allgather(arr, tiled=True))
    if jax.process_index() == 0:
        np.savez(out, **result)
    multihost_utils.sync_global_devices("done")
""")


def test_two_processes_form_the_one_process_global_batch(shared_data, tfds_dir, tok, sources, minilm_path,
                                                         tmp_path):
    data = {"data_dir": str(shared_data), "tfds_dir": str(tfds_dir), "sources": [{"name": "mlqa_r", "path": "mlqa-r"}],
            "global_batch": 16, "group_size": 3, "query_len": Lq, "passage_len": Lp, "alpha": 0.5}
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "global.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = run_together([[sys.executable, str(script), str(port), str(i), str(out), json.dumps(data),
                           str(minilm_path)] for i in range(2)], [env, env], 240, tmp_path / "logs")
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    got = np.load(out)
    config = _config(shared_data, tfds_dir, alpha=0.5)
    one = pipeline.make_train_iterator(config, tok, process_index=0, process_count=1, sources=sources)
    for step in range(3):
        expected = next(one)
        for k, v in expected.items():
            assert np.array_equal(got[f"{step}/{k}"], v, equal_nan=v.dtype.kind == "f"), (step, k)


def _score(text: str) -> float:
    """A made-up teacher score that names its passage."""
    return float(sum(map(ord, text)) % 997) / 10.0


def test_teacher_scores_travel_with_their_passages_and_fills_have_none(tmp_path, tfds_dir, tok):
    """Units' teacher scores (jsonl -> TFDS -> batch) land on their own passages in `teacher_scores`; the negatives
    filled from other units, and every passage of a unit without scores, are NaN."""
    rng = np.random.default_rng(1)
    units = []
    for i in range(48):
        texts = {}
        for lang in ("de", "en"):
            negs = tuple(f"n{i}.{j} {lang}" for j in range(int(rng.integers(0, 3))))
            scored = i % 4 != 0  # every fourth unit has no teacher scores
            texts[lang] = LangText(f"q{i} {lang}", f"p{i} {lang}", negs,
                                   tuple(_score(t) for t in (f"p{i} {lang}", *negs)) if scored else ())
        units.append(ParallelUnit(f"u{i}", "distill", texts))
    (tmp_path / "u.jsonl").write_text("\n".join(dumps_unit(u) for u in units), encoding="utf-8")
    c = default_config()
    c.data.tfds_dir = str(tfds_dir)
    c.data.sources = ({"name": "jsonl", "path": str(tmp_path / "u.jsonl")},)
    c.data.global_batch, c.data.group_size, c.data.alpha = 8, 4, 0.5
    srcs = pipeline.load_sources(c)
    schedule, _ = pipeline.make_schedule(c, srcs)
    asm = pipeline.BatchAssembler(schedule, srcs, tok, process_index=0, process_count=1)
    by_id = {u.id: u for u in units}
    seen = {"scored": 0, "fill": 0, "unscored unit": 0}
    for step in range(6):
        batch = asm(step)
        plan, _, _, groups = asm.texts(step)
        for i, group in enumerate(groups):
            unit = by_id[f"u{plan.unit[i]}"]
            t = unit.texts[LANGUAGES[plan.passage_lang[i]]]
            for k, text in enumerate(group):
                got = batch["teacher_scores"][i, k]
                if text in (t.positive, *t.negatives) and t.scores:
                    assert got == np.float32(_score(text)), (step, i, k)
                    seen["scored"] += 1
                else:
                    assert np.isnan(got), (step, i, k)
                    seen["unscored unit" if text in (t.positive, *t.negatives) else "fill"] += 1
    assert min(seen.values()) > 0, seen


def test_bad_teacher_scores_are_refused():
    from mlret.data.units import unit_from_json

    unit = {"id": "u", "texts": {"de": {"query": "q", "positive": "p", "negatives": ["n"], "scores": [1.0]}}}
    with pytest.raises(ValueError, match="1 scores for the positive and 1 negative"):
        unit_from_json(unit)
    unit["texts"]["de"]["scores"] = [1.0, float("nan")]
    with pytest.raises(ValueError, match="scores must be finite numbers"):
        unit_from_json(unit)
    unit["texts"]["de"]["scores"] = [2.5, 1]
    assert unit_from_json(unit).texts["de"].scores == (2.5, 1)
