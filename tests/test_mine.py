"""Hard-negative mining on real MLQA-R units (lexical n-gram embeddings stand in for a model): no mined negative
is a passage of its own unit in any language, none scores above perc_pos x the positive, the units read back
through the jsonl source kind, and the command line writes them with their provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlret.data import tfds_builders
from mlret.eval.base import NgramEmbedder
from mlret.mine import MiningOptions, mine_units, write_mined


@pytest.fixture(scope="module")
def units(shared_data):
    cfg = tfds_builders.units_config("mlqa_r", local_dir=str(shared_data / "mlqa-r"))
    return tfds_builders.read_source_units(cfg)


def test_mined_negatives_are_never_the_units_own_passages(units, tmp_path):
    emb = NgramEmbedder(dim=256)
    opts = MiningOptions(k=30, perc_pos=0.9, max_negatives=8)
    mined, stats = mine_units(units, emb, opts)
    assert len(mined) == len(units) and stats["kept"] > 0
    # Translations share text (names, numbers): the same-unit filter must fire somewhere on real data.
    assert stats["same_unit"] > 0 and stats["above_perc_pos"] > 0
    for u, m in zip(units, mined):
        own = {t.positive for t in u.texts.values()}
        assert m.texts.keys() == u.texts.keys()
        for lang, t in m.texts.items():
            assert t.positive == u.texts[lang].positive and t.query == u.texts[lang].query
            assert not own & set(t.negatives), (u.id, lang)
            assert len(t.negatives) <= 8
            if t.negatives:
                q = emb.queries([t.query])[0]
                scores = emb.passages(list(t.negatives)) @ q
                assert (scores <= 0.9 * (emb.passages([t.positive])[0] @ q) + 1e-6).all()
    out = tmp_path / "mined"
    write_mined(str(out), mined, {"model": "ngram", "options": {"perc_pos": 0.9}})
    back = tfds_builders.read_source_units(tfds_builders.units_config("jsonl", local_dir=str(out)))
    assert [(u.id, u.texts) for u in back] == [(u.id, u.texts) for u in mined]
    assert json.loads((out / "provenance.json").read_text())["model"] == "ngram"
    changed = np.mean([m.texts[x].negatives != u.texts[x].negatives for u, m in zip(units, mined) for x in u.texts])
    assert changed > 0.5  # mined, not the paragraph negatives passed through


def test_a_teacher_scores_each_positive_and_mined_negative(units, tmp_path):
    """`teacher=`: every unit language carries the teacher's q . p of its positive and of each kept negative, in
    that order, and the scores read back through the jsonl source kind."""
    from mlret.data.units import unit_from_json

    emb, teacher = NgramEmbedder(dim=256), NgramEmbedder(dim=128, n=2)  # the teacher: another embedder
    some = units[:40]
    mined, _ = mine_units(some, emb, MiningOptions(k=20, perc_pos=0.9, max_negatives=4), teacher=teacher)
    plain, _ = mine_units(some, emb, MiningOptions(k=20, perc_pos=0.9, max_negatives=4))
    for m, p in zip(mined, plain):
        for lang, t in m.texts.items():
            assert t.negatives == p.texts[lang].negatives and not p.texts[lang].scores  # the same mining
            want = teacher.passages([t.positive, *t.negatives]) @ teacher.queries([t.query])[0]
            np.testing.assert_allclose(t.scores, want, rtol=1e-6)
    write_mined(str(tmp_path), mined, {"model": "ngram", "teacher": "ngram-2"})
    lines = (tmp_path / "units.jsonl").read_text().splitlines()
    assert [unit_from_json(json.loads(x)) for x in lines] == mined


def test_mine_command_writes_a_source_that_trains(random_bert_path, shared_data, tmp_path):
    """`python -m mlret.mine` (in process) with a model folder (the tiny random BERT: this is about the plumbing;
    a random model ranks most candidates above the positive, hence the wide k) mines MLQA-R de/es units, scored by
    a teacher (`--teacher`, the same folder loaded again); a training run reads the result through the jsonl
    source kind and trains on it with the contrastive loss plus KL distillation from those scores."""
    import jax

    from mlret.config import apply_overrides, load_config_file, validate
    from mlret.data.readers import read_units_jsonl
    from mlret.mine import main
    from mlret.train import train

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg_file = tmp_path / "mine_cfg.py"
    cfg_file.write_text(
        "from mlret.config import load_config_file\n\n\ndef get_config():\n"
        f"    c = load_config_file({str(repo / 'configs' / 'smoke.py')!r})\n"
        "    c.data.sources = ({'name': 'mlqa_r', 'path': 'mlqa-r', 'languages': 'de,es'},)\n"
        "    return c\n")
    overrides = [f"--config.data.data_dir={shared_data}", "--config.data.query_len=16",
                 "--config.data.passage_len=32", "--config.eval.progress=false", "--config.eval.batch_size=256"]
    out = tmp_path / "mined"
    main(["--config", str(cfg_file), "--hf", str(random_bert_path), "--out", str(out), "--k", "5000",
          "--perc_pos", "1.0", "--max_negatives", "4", "--teacher", str(random_bert_path), *overrides])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model"] == {"hf": str(random_bert_path)} and prov["options"]["max_negatives"] == 4
    assert prov["sources"][0]["name"] == "mlqa_r" and prov["date"] and prov["counts"]["kept"] > 0
    mined = read_units_jsonl([out / "units.jsonl"])
    assert {x for u in mined for x in u.texts} == {"de", "es"}
    assert sum(len(t.negatives) for u in mined for t in u.texts.values()) == prov["counts"]["kept"]
    assert prov["teacher"] == {"hf": str(random_bert_path)}
    assert all(len(t.scores) == 1 + len(t.negatives) for u in mined for t in u.texts.values())

    c = load_config_file(str(cfg_file))
    apply_overrides(c, [f"--config.model.name={random_bert_path}", f"--config.data.tfds_dir={tmp_path / 'tfds'}",
                        "--config.data.global_batch=8", "--config.train.log_every=1", *overrides])
    c.data.sources = ({"name": "jsonl", "path": str(out)},)
    c.loss.terms, c.loss.kl_distill.weight = "contrastive,kl_distill", 0.5
    c.mesh.data = jax.device_count()
    c.train.steps = 3
    c.optim.warmup_steps = 1
    c.eval.every = 0
    c.checkpoint.every = 0
    validate(c, devices=jax.device_count(), processes=1)
    result = train(c, tmp_path / "run")
    assert result.end_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in logged if "loss_kl_distill" in r]
    assert distilled and all(np.isfinite(r["loss_kl_distill"]) and r["scored_pairs"] > 0 for r in distilled)
