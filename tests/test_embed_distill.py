"""Multilingual embedding distillation (issue 28, item 3; `mlret.losses.embed_distill`, `mlret.teacher`): the loss
against sentence-transformers' `MSELoss` and a float64 reference with units left out, on 8 simulated devices with
both gather paths and gradient caching, the teacher's rows in real batches, the bad fields, and a training run with
a tiny teacher."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import VARIANTS, _batch, _built_against_single_device, dist  # noqa: F401  (dist: the 8-device fixture)

from mlret import losses
from mlret.config import default_config
from mlret.errors import ConfigError


def _term(matryoshka_normalize=True):
    family = losses.get("embed_distill")
    section = family.defaults()
    section.teacher = "t"
    loss = default_config().loss
    loss.matryoshka_normalize = matryoshka_normalize
    return family.build(family.options(section, loss), losses.LossSetup())


def _targets(B, D, seed):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(2, B, D))
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    return t[0].astype(np.float32), t[1].astype(np.float32)


def _value_and_grad(q, p, tq, tp, mask, term=None):
    term = term or _term()
    fields = {"teacher_query": jnp.asarray(tq), "teacher_passage": jnp.asarray(tp), "teacher_mask": jnp.asarray(mask)}
    f = lambda q, p: term({"query": q, "passage": p}, fields, 0.05)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(q), jnp.asarray(p))


def test_embed_distill_equals_sentence_transformers_mse():
    """Every unit with a target: value and gradient equal sentence-transformers' MSELoss (float64 torch) on the
    query and positive columns; the hard negatives get no gradient."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MSELoss

    q, p, _ = _batch(6, G=3, D=16, seed=1)
    tq, tp = _targets(6, 16, 2)
    (loss, metrics), (gq, gp) = _value_and_grad(q, p, tq, tp, np.ones(6, np.float32))
    sq = torch.tensor(np.asarray(q, np.float64), requires_grad=True)
    sp = torch.tensor(np.asarray(p[:, 0], np.float64), requires_grad=True)
    want = MSELoss(None).compute_loss_from_embeddings(
        [sq, sp], [torch.tensor(tq, dtype=torch.float64), torch.tensor(tp, dtype=torch.float64)])
    want.backward()
    want = want.detach()
    assert float(want) > 1e-3 and float(metrics["distilled_rows"]) == 1.0
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gq), sq.grad.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(gp[:, 0]), sp.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert float(np.abs(np.asarray(gp[:, 1:])).max()) == 0.0


def mse_reference(q, p, tq, tp, mask) -> float:
    """The stated rule in float64 loops: the mean squared error over the query and positive rows of the units
    with a source-language text (mask 1); none: 0."""
    errs = []
    for i in range(len(q)):
        if mask[i]:
            errs += list((np.float64(q[i]) - tq[i]) ** 2) + list((np.float64(p[i, 0]) - tp[i]) ** 2)
    return float(np.mean(errs)) if errs else 0.0


def test_units_without_a_source_text_are_left_out():
    """Units with mask 0 (no source-language text): value and gradient follow the stated rule (float64 reference,
    central difference), those rows get exactly zero gradient, and a batch with none gives 0."""
    q, p, _ = _batch(6, G=2, D=8, seed=3)
    tq, tp = _targets(6, 8, 4)
    mask = np.array([1, 0, 1, 1, 0, 1], np.float32)
    (loss, _), (gq, gp) = _value_and_grad(q, p, tq, tp, mask)
    ref = lambda q, p: mse_reference(q, p, tq, tp, mask)
    np.testing.assert_allclose(float(loss), ref(q, p), rtol=1e-6)
    rng = np.random.default_rng(5)
    vq, vp = rng.normal(size=q.shape), rng.normal(size=p.shape)
    h = 1e-5
    numeric = (ref(q + h * vq, p + h * vp) - ref(q - h * vq, p - h * vp)) / (2 * h)
    np.testing.assert_allclose(float(np.sum(gq * vq) + np.sum(gp * vp)), numeric, rtol=1e-4)
    assert float(np.abs(np.asarray(gq)[mask == 0]).max()) == 0.0 and float(np.abs(np.asarray(gp)[mask == 0]).max()) == 0
    (empty, _), (gq0, _) = _value_and_grad(q, p, tq, tp, np.zeros(6, np.float32))
    assert float(empty) == 0.0 and float(np.abs(np.asarray(gq0)).max()) == 0.0


def test_matryoshka_prefix_is_compared_with_the_teachers_prefix():
    """At a Matryoshka dimension d the student's prefix (re-normalised by the wrapper) is pulled to the teacher's
    first d components, re-normalised the same way; the full dimension uses the teacher's embedding as it is."""
    q, p, _ = _batch(4, G=2, D=8, seed=6)
    tq, tp = _targets(4, 8, 7)
    spec = losses.LossSpec(terms=(losses.TermSpec("embed_distill", 1.0, ("t", "en", True)),),
                           matryoshka=((8, 1.0), (4, 0.5)))
    fn = losses.build(spec, losses.LossSetup())
    fields = {"teacher_query": tq, "teacher_passage": tp, "teacher_mask": np.ones(4, np.float32)}
    total, metrics = fn({"query": q, "passage": p}, fields, 0.05)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    one = np.ones(4)
    full = mse_reference(unit(np.float64(q)), unit(np.float64(p)), tq, tp, one)
    four = mse_reference(unit(np.float64(q[:, :4])), unit(np.float64(p[..., :4])), unit(np.float64(tq[:, :4])),
                         unit(np.float64(tp[:, :4])), one)
    np.testing.assert_allclose(float(metrics["loss_dim8"]), full, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_dim4"]), four, rtol=1e-5)
    np.testing.assert_allclose(float(total), full + 0.5 * four, rtol=1e-5)


@pytest.mark.parametrize("gather", ["constraint", "shard_map", "grad_cache"])
def test_embed_distill_with_contrastive_sharded_and_cached_equal_single_device(dist, gather):  # noqa: F811
    """contrastive + 0.5 x embed_distill (two units without a target) on the 8-device mesh, both gather paths and
    gradient caching: the single-device loss and gradients; max abs differences printed for the closing note."""
    feats, _, mesh = dist
    B = feats["q"].shape[0]
    tq, tp = _targets(B, 8, 11)
    mask = np.ones(B, np.float32)
    mask[[3, 10]] = 0
    feats = {**feats, "teacher_query": tq, "teacher_passage": tp, "teacher_mask": mask}
    dist_gather = "shard_map" if gather == "grad_cache" else gather
    fam = losses.get("embed_distill")

    def spec(g):
        return losses.LossSpec(terms=(losses.TermSpec("contrastive", 1.0, VARIANTS["infonce"]),
                                      losses.TermSpec("embed_distill", 0.5, ("t", "en", True))), gather=g)

    assert fam.fields == ("teacher_query", "teacher_passage", "teacher_mask")
    single = losses.build(spec("constraint"), losses.LossSetup())
    sharded = losses.build(spec(dist_gather), losses.LossSetup(dist_gather, mesh, ("data",)))
    names = ("unit_id", *fam.fields)

    got, want = _built_against_single_device(single, sharded, names, gather, dist, feats)
    (lw, mw), gw = want
    (lg, mg), gg = got
    dv = abs(float(lg) - float(lw))
    dg = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(gg),
                                                                                jax.tree.leaves(gw), strict=True))
    print(f"embed_distill {gather}: loss {float(lw):.4f}, max |value diff| {dv:.2e}, max |grad diff| {dg:.2e}")
    assert dv <= 2e-5 * max(1.0, abs(float(lw)))
    for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    assert float(mw["loss_embed_distill"]) > 1e-3
    np.testing.assert_allclose(float(mg["loss_embed_distill"]), float(mw["loss_embed_distill"]), rtol=1e-5)


def test_bad_embed_distill_fields_are_refused_naming_the_field():
    from mlret.config import validate

    c = default_config()
    c.loss.terms = "contrastive,embed_distill"
    with pytest.raises(ConfigError, match="config.loss.embed_distill.teacher: empty"):
        validate(c)
    c.loss.embed_distill.teacher, c.loss.embed_distill.source_lang = "some/model", ""
    with pytest.raises(ConfigError, match="config.loss.embed_distill.source_lang: empty"):
        validate(c)


# ------------------------------------------------------------------------------------------- the data side


def test_teacher_rows_travel_with_their_units_and_units_without_the_source_language_are_masked(tmp_path, minilm_path):
    """In real batches (jsonl -> TFDS -> hybrid schedule), each pair's teacher_query / teacher_passage are its
    unit's rows of the targets whatever languages the pair was drawn in, and the units without an 'en' text (a
    monolingual 'sw' source, with missing_source_lang=leave_out) have teacher_mask 0; by default such a source is
    refused naming source_lang."""
    from mlret.data import pipeline
    from mlret.data.units import LANGUAGES, LangText, ParallelUnit, dumps_unit
    from mlret.models import TextTokenizer
    from mlret.teacher import source_texts

    par = [ParallelUnit(f"u{i}", "par", {x: LangText(f"q{i} {x}", f"p{i} {x}", (f"n{i} {x}",))
                                         for x in ("de", "en", "es")}) for i in range(16)]
    mono = [ParallelUnit(f"m{i}", "mono", {"sw": LangText(f"mq{i}", f"mp{i}", (f"mn{i}",))}) for i in range(8)]
    for name, units in (("par", par), ("mono", mono)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(dumps_unit(u) for u in units), encoding="utf-8")
    c = default_config()
    c.data.tfds_dir = str(tmp_path / "tfds")
    c.data.sources = ({"name": "jsonl", "path": str(tmp_path / "par.jsonl")},
                      {"name": "jsonl", "path": str(tmp_path / "mono.jsonl")})
    c.data.global_batch, c.data.group_size, c.data.alpha = 8, 2, 0.5
    srcs = pipeline.load_sources(c)
    with pytest.raises(ConfigError, match="config.loss.embed_distill.source_lang: no unit of the training source "
                                          "jsonl:.*mono.jsonl.* has a 'en' text"):
        source_texts(srcs, "en")
    queries, positives, has = source_texts(srcs, "en", "leave_out")
    assert has.tolist() == [True] * 16 + [False] * 8
    n = len(has)
    rng = np.random.default_rng(0)
    targets = pipeline.TeacherTargets(query=rng.normal(size=(n, 4)).astype(np.float32),
                                      passage=rng.normal(size=(n, 4)).astype(np.float32),
                                      mask=has.astype(np.float32))
    schedule, _ = pipeline.make_schedule(c, srcs)
    asm = pipeline.BatchAssembler(schedule, srcs, TextTokenizer(minilm_path, query_len=8, passage_len=8),
                                  process_index=0, process_count=1, teacher=targets)
    seen_langs, masked = set(), 0
    for step in range(8):
        batch = asm(step)
        plan, sl, qs, _ = asm.texts(step)
        for i, u in enumerate(plan.unit[sl]):
            np.testing.assert_array_equal(batch["teacher_query"][i], targets.query[u])
            np.testing.assert_array_equal(batch["teacher_passage"][i], targets.passage[u])
            assert batch["teacher_mask"][i] == float(has[u])
            if has[u]:
                assert queries[u] == qs[i].rsplit(" ", 1)[0] + " en"  # the en text of the pair's own unit
                seen_langs.add(LANGUAGES[plan.query_lang[sl][i]])
            else:
                masked += 1
    assert masked > 0 and {"de", "es"} <= seen_langs


def _tiny_config(random_bert_path, shared_data, tmp_path, teacher):
    from mlret.config import apply_overrides, load_config_file

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    c = load_config_file(str(repo / "configs" / "smoke.py"))
    apply_overrides(c, [f"--config.model.name={random_bert_path}", f"--config.data.data_dir={shared_data}",
                        f"--config.data.tfds_dir={tmp_path / 'tfds'}", "--config.data.global_batch=8",
                        "--config.data.query_len=16", "--config.data.passage_len=32", "--config.train.log_every=1",
                        "--config.eval.progress=false"])
    c.data.sources = ({"name": "mlqa_r", "path": "mlqa-r", "languages": "de,en,es"},)
    c.loss.terms, c.loss.embed_distill.weight = "contrastive,embed_distill", 0.5
    c.loss.embed_distill.teacher = str(teacher)
    c.mesh.data = jax.device_count()
    c.train.steps, c.optim.warmup_steps = 3, 1
    c.eval.every = c.checkpoint.every = 0
    return c


def test_training_with_a_tiny_teacher(random_bert_path, random_xlmr_path, shared_data, tmp_path):
    """contrastive + 0.5 x embed_distill trains on MLQA-R de/en/es with a tiny teacher (the random BERT's folder,
    loaded again and frozen: the student's start): finite losses, every pair distilled (each unit has an en text),
    and the distillation loss is > 0 (the de / es texts are away from their en targets). A teacher of another
    width (the random XLM-R, 32 vs 48) and a folder that does not exist are refused naming
    config.loss.embed_distill.teacher."""
    from mlret.config import validate
    from mlret.train import train

    c = _tiny_config(random_bert_path, shared_data, tmp_path, random_bert_path)
    validate(c, devices=jax.device_count(), processes=1)
    result = train(c, tmp_path / "run")
    assert result.end_step == 3 and all(np.isfinite(v) for v in result.losses.values())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distilled = [r for r in logged if "loss_embed_distill" in r]
    assert len(distilled) == 3 and all(r["distilled_rows"] == 1.0 and r["loss_embed_distill"] > 0 for r in distilled)
    for teacher, why in ((random_xlmr_path, "embeds in 32 dimensions, the student in 48"),
                         (tmp_path / "nowhere", "is not a model mlret loads")):
        bad = _tiny_config(random_bert_path, shared_data, tmp_path, teacher)
        with pytest.raises(ConfigError, match=f"config.loss.embed_distill.teacher: .*{why}"):
            train(bad, tmp_path / "bad")


def test_the_teachers_prefixes_are_its_own(minilm_path, random_bert_path):
    """A sentence-transformers teacher without prompts (all-MiniLM-L6-v2) embeds without the student's prefixes,
    with its own pooling and normalisation, at most at the student's lengths; a plain transformers folder (a
    frozen copy of the start) keeps config.model's."""
    from mlret.teacher import load_teacher

    c = default_config()
    c.model.query_prefix, c.model.passage_prefix, c.model.pooling = "query: ", "passage: ", "cls"
    c.data.query_len, c.data.passage_len = 32, 300
    c.loss.embed_distill.teacher = str(minilm_path)
    t, model = load_teacher(c)
    assert (t.model.query_prefix, t.model.passage_prefix, t.model.pooling, t.model.normalize) == ("", "", "mean", True)
    assert (t.data.query_len, t.data.passage_len, model.embed_dim) == (32, 256, 384)
    c.loss.embed_distill.teacher = str(random_bert_path)
    c.data.passage_len = 64
    t, _ = load_teacher(c)
    assert (t.model.query_prefix, t.model.passage_prefix) == ("query: ", "passage: ")
