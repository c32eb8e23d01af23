"""Every loss variant against a float64 numpy reference written from its paper's definition, loop by loop, and
under the sharded (8 simulated devices, gathered negatives) and gradient-cached computations.

The references follow the papers, not mlret/losses.py:
- Eq. 1 of arXiv 2408.10536: -log e^{s(q_i,p_i+)/τ} / (e^{s(q_i,p_i+)/τ} + Σ_j Σ_k e^{s(q_i,p_j,k^-)/τ}), the
  inner sums over the hard negatives of *every* triplet j of the batch.
- InfoNCE with in-batch negatives: every passage of the batch in the denominator.
- The symmetric form: the mean of the query -> passage and the positive -> query losses; arXiv 2506.09781's
  within-view negatives add the other queries to a query's denominator and the passages to a positive's.
- VRN (arXiv 2506.09781, `solo/losses/vrn.py`): λ · mean over the negative pairs of |cos − δ|^p.
In every variant a column of another pair with the same unit is not a negative (a translation of the answer).

G >= 3 and repeated unit ids, so the layout of hard negatives ([B, G] flattened, label at column i*G) and the
same-unit mask are both exercised (sentence-transformers once got the gathered layout wrong: PR #3453).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mlret import gradcache, parallel
from mlret.config import default_config
from mlret.losses import LossOptions, contrastive_loss, sharded_contrastive_loss, vrn_delta

VARIANTS = {
    "eq1": LossOptions(in_batch_positives=False),
    "infonce": LossOptions(),
    "symmetric": LossOptions(symmetric=True),
    "symmetric_within_view": LossOptions(symmetric=True, within_view=True),
    "within_view": LossOptions(within_view=True),
    "vrn": LossOptions(vrn_weight=0.3, vrn_delta=vrn_delta(1000)),
    "eq1_vrn_p3": LossOptions(in_batch_positives=False, vrn_weight=0.5, vrn_delta=-0.2, vrn_power=3.0),
    "eq1_all": LossOptions(in_batch_positives=False, symmetric=True, within_view=True, vrn_weight=0.2,
                           vrn_delta=0.1),
    "all": LossOptions(symmetric=True, within_view=True, vrn_weight=0.2, vrn_delta=vrn_delta(5)),
}


def _neg_log_softmax(label: float, others: list[float]) -> float:
    logits = np.array([label, *others])
    m = logits.max()
    return float(m + np.log(np.exp(logits - m).sum()) - label)


def reference_loss(q, p, unit, *, tau, opts: LossOptions) -> float:
    """The loss of one batch from the definitions above, in float64 loops."""
    q = np.asarray(q, np.float64)
    p = np.asarray(p, np.float64)
    B, G, _ = p.shape

    def negatives(i):
        """Query i's negative passages (j, k): its own hard negatives; other units' hard negatives; with
        in-batch positives, other units' positives too."""
        return [(j, k) for j, k in itertools.product(range(B), range(G))
                if (j, k) != (i, 0) and (j == i or (unit[j] != unit[i] and (k > 0 or opts.in_batch_positives)))]

    other_queries = [[j for j in range(B) if unit[j] != unit[i]] for i in range(B)]
    q2p = []
    for i in range(B):
        others = [q[i] @ p[j, k] / tau for j, k in negatives(i)]
        if opts.within_view:
            others += [q[i] @ q[j] / tau for j in other_queries[i]]
        q2p.append(_neg_log_softmax(q[i] @ p[i, 0] / tau, others))
    loss = np.mean(q2p)
    if opts.symmetric:
        p2q = []
        for i in range(B):
            others = [p[i, 0] @ q[j] / tau for j in other_queries[i]]
            if opts.within_view:
                others += [p[i, 0] @ p[j, k] / tau for j, k in negatives(i)]
            p2q.append(_neg_log_softmax(p[i, 0] @ q[i] / tau, others))
        loss = 0.5 * (loss + np.mean(p2q))
    if opts.vrn_weight:
        cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        terms = [abs(cos(q[i], p[j, k]) - opts.vrn_delta) ** opts.vrn_power for i in range(B) for j, k in negatives(i)]
        loss += opts.vrn_weight * np.mean(terms)
    return float(loss)


def _batch(B, G=3, D=16, seed=0, unit=None):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, D))
    p = rng.normal(size=(B, G, D))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    if unit is None:
        unit = rng.integers(0, B // 2, B)
    return q.astype(np.float32), (0.9 * p).astype(np.float32), np.asarray(unit, np.int32)  # |p| != 1: VRN's cos


@pytest.fixture(scope="module")
def batch():
    return _batch(6, unit=[4, 7, 4, 9, 7, 4])  # units 4 (three pairs) and 7 (two pairs) repeat


def test_vrn_delta_default():
    assert vrn_delta(2) == -1.0 and vrn_delta(101) == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="at least 2 training instances"):
        vrn_delta(1)


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_float64_reference(batch, name):
    """The value, and the gradient along a random direction (a float64 central difference of the reference)."""
    q, p, unit = batch
    opts, tau = VARIANTS[name], 0.07
    f = lambda q, p: contrastive_loss(q, p, unit, temperature=tau, options=opts)
    (loss, metrics), (gq, gp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(q), jnp.asarray(p))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), reference_loss(q, p, unit, tau=tau, opts=opts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss))
    rng = np.random.default_rng(1)
    vq, vp = rng.normal(size=q.shape), rng.normal(size=p.shape)
    h = 1e-5
    ref = lambda t: reference_loss(q + t * vq, p + t * vp, unit, tau=tau, opts=opts)
    fd = (ref(h) - ref(-h)) / (2 * h)
    np.testing.assert_allclose(float(np.sum(gq * vq) + np.sum(gp * vp)), fd, rtol=1e-3, atol=1e-5)


def test_variants_differ(batch):
    """Each option changes the value on this batch (the parametrized comparison above is not vacuous)."""
    q, p, unit = batch
    values = {name: float(contrastive_loss(q, p, unit, temperature=0.07, options=o)[0]) for name, o in VARIANTS.items()}
    assert len({round(v, 6) for v in values.values()}) == len(values), values


def _grad_q0(options):
    return jax.jit(jax.grad(lambda q, p, unit: contrastive_loss(q, p, unit, temperature=0.05, options=options)[0]))


@pytest.mark.parametrize("name", ["eq1", "infonce", "symmetric_within_view", "vrn"])
def test_same_unit_columns_are_masked(batch, name):
    """Query 0's gradient ignores pair 2 (same unit 4), positive, hard negatives and query, in every variant; a
    pair of another unit (pair 1, unit 7) does move it."""
    q, p, unit = batch
    grad = _grad_q0(VARIANTS[name])
    base = grad(q, p, unit)[0]
    q_same, p_same = q.copy(), p.copy()
    p_same[2] = q[0]
    q_same[2] = q[0]
    changed = grad(q_same, p_same, unit)[0]
    if not VARIANTS[name].symmetric:  # p_2+ . q_0 is in pair 2's own p2q term only when symmetric: masked too
        np.testing.assert_allclose(changed, base, rtol=1e-5, atol=1e-7)
    p_other = p.copy()
    p_other[1, 1:] = q[0]
    assert np.abs(grad(q, p_other, unit)[0] - base).max() > 1e-3


def test_eq1_denominator_holds_every_pairs_hard_negatives_but_not_their_positives(batch):
    q, p, unit = batch
    grad = _grad_q0(VARIANTS["eq1"])
    base = grad(q, p, unit)[0]
    p_pos = p.copy()
    p_pos[3, 0] = q[0]  # pair 3 (another unit): its positive is not in query 0's Eq. 1 denominator
    np.testing.assert_allclose(grad(q, p_pos, unit)[0], base, rtol=1e-5, atol=1e-7)
    p_neg = p.copy()
    p_neg[3, 1] = q[0]  # ... its hard negative is
    assert np.abs(grad(q, p_neg, unit)[0] - base).max() > 1e-3


def test_symmetric_masks_same_unit_queries_for_the_positive(batch):
    q, p, unit = batch
    f = jax.jit(jax.grad(lambda q, p: contrastive_loss(q, p, unit, temperature=0.05,
                                                       options=VARIANTS["symmetric"])[0], argnums=1))
    base = f(q, p)[0, 0]
    q_same = q.copy()
    q_same[2] = p[0, 0]  # pair 2 has unit 4 like pair 0: not a negative of p_0+
    np.testing.assert_allclose(f(q_same, p)[0, 0], base, rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_are_computed_in_float32(batch):
    q, p, unit = batch
    qb, pb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)
    loss, _ = contrastive_loss(qb, pb, unit, temperature=0.05)
    want = reference_loss(np.asarray(qb.astype(jnp.float32)), np.asarray(pb.astype(jnp.float32)), unit, tau=0.05,
                          opts=LossOptions())
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_learnable_temperature_gradient(batch):
    """d loss / d log_tau through exp(log_tau) matches a float64 central difference of the reference."""
    q, p, unit = batch
    log_tau = np.log(0.1)
    opts = VARIANTS["all"]
    grad = float(jax.grad(lambda lt: contrastive_loss(q, p, unit, temperature=jnp.exp(lt), options=opts)[0])(
        jnp.float32(log_tau)))
    h = 1e-5
    ref = lambda lt: reference_loss(q, p, unit, tau=np.exp(lt), opts=opts)
    np.testing.assert_allclose(grad, (ref(log_tau + h) - ref(log_tau - h)) / (2 * h), rtol=1e-3)


# ------------------------------------------------------------------------ sharded and gradient-cached: equal

DIST_B = 16  # two rows per simulated device


@pytest.fixture(scope="module")
def dist():
    """A 16-pair batch of random token features, a linear 'encoder' W, and the 8-device mesh."""
    rng = np.random.default_rng(3)
    feats = {"q": rng.normal(size=(DIST_B, 12)).astype(np.float32),
             "p": rng.normal(size=(DIST_B, 3, 12)).astype(np.float32),
             "unit_id": rng.integers(0, 6, DIST_B).astype(np.int32)}
    params = {"w": rng.normal(size=(12, 8)).astype(np.float32) * 0.5, "log_tau": np.float32(np.log(0.1))}
    mesh = parallel.make_mesh(_mesh_config(), jax.devices()[:8])
    return feats, params, mesh


def _mesh_config():
    c = default_config().mesh
    c.data, c.fsdp, c.tensor = 8, 1, 1
    return c


def _embed(params, batch):
    return batch["q"] @ params["w"], batch["p"] @ params["w"]


def _loss(opts, gather=None, mesh=None):
    def loss_fn(params, emb, batch):
        q, p = emb
        kw = dict(temperature=jnp.exp(params["log_tau"]), options=opts)
        if gather == "shard_map":
            return sharded_contrastive_loss(q, p, batch["unit_id"], mesh=mesh, batch_axes=("data",), **kw)
        sharding = NamedSharding(mesh, P("data", None)) if gather == "constraint" else None
        return contrastive_loss(q, p, batch["unit_id"], score_sharding=sharding, **kw)
    return loss_fn


def _single_device(params, feats, opts):
    loss_fn = _loss(opts)
    return jax.jit(jax.value_and_grad(lambda pr, b: loss_fn(pr, _embed(pr, b), b), has_aux=True))(params, feats)


def _built_against_single_device(single, sharded, names, gather, dist, feats=None):
    """(got, want): value and gradients of the built loss `sharded` on the 8-device mesh (its gather path, or
    gradient caching in chunks of 8 pairs when `gather` is "grad_cache") and of `single` on one device; the loss
    reads the batch fields `names`."""
    _, params, mesh = dist
    feats = dist[0] if feats is None else feats

    def loss_fn(fn):
        def f(pr, emb, b):
            q, p = emb
            return fn({"query": q, "passage": p}, {k: b[k] for k in names}, jnp.exp(pr["log_tau"]))
        return f

    plain = lambda fn: jax.value_and_grad(lambda pr, b: loss_fn(fn)(pr, _embed(pr, b), b), has_aux=True)
    want = jax.jit(plain(single))(params, feats)
    placed = jax.device_put(feats, NamedSharding(mesh, P("data")))
    if gather == "grad_cache":
        got = jax.jit(lambda pr, b: gradcache.value_and_grad(
            _embed, loss_fn(sharded), pr, b, chunk=8, embed_fields=("q", "p"), mesh=mesh,
            batch_axes=("data",)))(params, placed)
    else:
        got = jax.jit(plain(sharded))(params, placed)
    return got, want


def _close(a, b, tol=2e-5):
    (la, ma), ga = a
    (lb, mb), gb = b
    assert abs(float(la) - float(lb)) <= tol * max(1.0, abs(float(lb)))
    assert abs(float(ma["accuracy"]) - float(mb["accuracy"])) <= 1e-6
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=tol)


@pytest.mark.parametrize("name", ["eq1", "infonce", "symmetric_within_view", "vrn"])
@pytest.mark.parametrize("gather", ["constraint", "shard_map"])
def test_sharded_equals_single_device(dist, name, gather):
    feats, params, mesh = dist
    opts = VARIANTS[name]
    want = _single_device(params, feats, opts)
    placed = jax.device_put(feats, NamedSharding(mesh, P("data")))
    loss_fn = _loss(opts, gather, mesh)
    got = jax.jit(jax.value_and_grad(lambda pr, b: loss_fn(pr, _embed(pr, b), b), has_aux=True))(params, placed)
    _close(got, want)
    assert abs(float(want[1]["log_tau"])) > 1e-3 and float(np.abs(want[1]["w"]).max()) > 1e-2


@pytest.mark.parametrize("name", ["eq1", "infonce", "symmetric_within_view", "vrn"])
def test_gradient_cached_equals_single_device(dist, name):
    """Two chunks of 8 pairs over the 8-device mesh, gathered by shard_map inside the loss."""
    feats, params, mesh = dist
    opts = VARIANTS[name]
    placed = jax.device_put(feats, NamedSharding(mesh, P("data")))
    got = jax.jit(lambda pr, b: gradcache.value_and_grad(
        _embed, _loss(opts, "shard_map", mesh), pr, b, chunk=8, embed_fields=("q", "p"), mesh=mesh,
        batch_axes=("data",)))(params, placed)
    _close(got, _single_device(params, feats, opts))


# ------------------------------------------------------------------------------------------- the loss registry


def test_config_selects_the_contrastive_family_and_keeps_the_older_field_names():
    """config.loss.terms names the family; the older flat names (configs, checkpoints, the study's run files) are
    the same fields as the section's, and a checkpoint's saved config from before the registry still works."""
    from mlret import losses
    from mlret.checkpoint import config_from_dict

    c = default_config()
    assert c.loss.terms == "contrastive" and "contrastive" in losses.names()
    c.loss.symmetric, c.loss.contrastive.vrn_weight = True, 0.3
    assert c.loss.contrastive.symmetric and c.loss.vrn_weight == 0.3
    c.loss.update({"in_batch_positives": False, "vrn_instances": 1000})  # the study's loss rows do this
    (term,) = losses.spec(c.loss).terms
    assert term == losses.TermSpec("contrastive", 1.0, LossOptions(symmetric=True, in_batch_positives=False,
                                                                   vrn_weight=0.3, vrn_delta=vrn_delta(1000)))
    saved = default_config().to_dict()
    del saved["loss"]["contrastive"], saved["loss"]["terms"]  # a config saved before the registry
    saved["loss"].update(symmetric=True, within_view=True)
    options = losses.spec(config_from_dict(saved).loss).terms[0].options
    assert options.symmetric and options.within_view


@pytest.mark.parametrize("field,value,message", [
    ("terms", "contrastive,nope", r"config.loss.terms: 'nope' is not a registered loss family \(contrastive"),
    ("terms", " , ", "config.loss.terms: empty"),
    ("terms", "contrastive,contrastive", "config.loss.terms: .* names a family twice"),
    ("contrastive.weight", 0.0, "config.loss.contrastive.weight: 0.0 must be a positive number"),
    ("contrastive.vrn_power", 0.0, "config.loss.contrastive.vrn_power: 0.0 must be positive"),
    ("vrn_instances", 1, "config.loss.contrastive.vrn_instances: 1 must be 0"),
    ("gather", "all_to_all", "config.loss.gather: 'all_to_all' is not one of constraint, shard_map"),
])
def test_bad_loss_fields_are_refused_naming_the_field(field, value, message):
    from mlret.config import apply_overrides, validate
    from mlret.errors import ConfigError

    c = default_config()
    apply_overrides(c, [f"loss.{field}={value}"])
    with pytest.raises(ConfigError, match=message):
        validate(c)


def _teacher_mse_family():
    """A loss family defined here, as a newcomer would: the squared error between the student's scores q . p of
    each pair's passages and a teacher's, a batch field the family declares (issue 28's distillation shape)."""
    import ml_collections

    from mlret.losses import LossFamily

    def defaults():
        s = ml_collections.ConfigDict()
        s.scale = 1.0
        return s

    def validate(s, ctx):
        if s.scale <= 0:
            raise ctx.fail("scale", f"{s.scale} must be positive")

    def build(options, setup):
        def term(emb, fields, temperature):
            assert set(emb) == {"query", "passage"} and set(fields) == {"teacher_scores"}  # exactly what it declares
            student = jnp.einsum("bd,bgd->bg", emb["query"], emb["passage"])
            loss = options * jnp.mean((student - fields["teacher_scores"]) ** 2)
            return loss, {"loss": loss, "student_mean": jnp.mean(student)}
        return term

    return LossFamily("teacher_mse", defaults, lambda s, loss: float(s.scale), build,
                      lambda scale: f"teacher MSE x{scale:g}", validate, fields=("teacher_scores",))


@pytest.fixture()
def teacher_mse():
    from mlret import losses

    family = losses.register(_teacher_mse_family())
    try:
        yield family
    finally:
        losses.unregister(family.name)


def test_terms_are_summed_with_their_weights_and_get_only_their_fields(batch, teacher_mse):
    from mlret import losses
    from mlret.config import validate
    from mlret.errors import ConfigError

    q, p, unit = batch
    teacher = np.random.default_rng(5).normal(size=p.shape[:2]).astype(np.float32)
    c = default_config()
    c.loss.terms = "contrastive,teacher_mse"
    c.loss.symmetric, c.loss.teacher_mse.weight, c.loss.teacher_mse.scale = True, 0.25, 2.0
    validate(c)
    spec = losses.spec(c.loss)
    assert losses.embeddings(spec) == ("query", "passage") and losses.fields(spec) == ("unit_id", "teacher_scores")
    fn = losses.build(spec, losses.LossSetup())
    loss, metrics = fn({"query": q, "passage": p}, {"unit_id": unit, "teacher_scores": teacher}, 0.07)
    want = (reference_loss(q, p, unit, tau=0.07, opts=LossOptions(symmetric=True))
            + 0.25 * 2.0 * np.mean((np.einsum("bd,bgd->bg", q.astype(np.float64), p) - teacher) ** 2))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)
    assert {"loss_contrastive", "loss_teacher_mse", "accuracy", "student_mean", "loss_p2q"} <= set(metrics)
    assert "teacher MSE x2" in losses.describe(spec) and "0.25 x " in losses.describe(spec)
    c.loss.teacher_mse.scale = -1.0
    with pytest.raises(ConfigError, match="config.loss.teacher_mse.scale: -1.0 must be positive"):
        validate(c)


def test_step_passes_declared_fields_and_gradient_caching_encodes_only_the_encoded_ones(teacher_mse):
    """A loss reading a per-passage teacher score trains through the real step: the step hands it the field,
    gradient caching chunks only the token fields and still equals the plain step."""
    from scale_helpers import max_abs_diff, tiny_batch, tiny_config, tiny_model

    from mlret.step import build_train_step

    batch = tiny_batch()
    batch["teacher_scores"] = np.random.default_rng(1).normal(size=batch["unit_id"].shape + (3,)).astype(np.float32)
    got = {}
    for chunk in (0, 8):
        c = tiny_config((8, 1, 1), learnable_temperature=True, symmetric=True)
        c.loss.terms, c.loss.teacher_mse.weight = "contrastive,teacher_mse", 0.5
        c.train.grad_cache_chunk = chunk
        t, params = build_train_step(tiny_model(), c, parallel.make_mesh(c.mesh))
        assert t.spec.pass_fields == ("unit_id", "teacher_scores")
        assert t.spec.encode_fields == ("query_ids", "query_mask", "passage_ids", "passage_mask")
        (loss, metrics), grads = t.grad_fn()(params, t.global_batch(batch))
        got[chunk] = float(loss), float(metrics["loss_teacher_mse"]), jax.device_get(grads)
    (plain, plain_mse, plain_grads), (cached, cached_mse, cached_grads) = got[0], got[8]
    assert plain_mse > 1e-2 and abs(cached_mse - plain_mse) < 1e-5
    assert abs(cached - plain) <= 1e-5 * max(1.0, abs(plain))
    assert max_abs_diff(cached_grads, plain_grads) <= 1e-4
    del batch["teacher_scores"]
    with pytest.raises(KeyError, match="no field.*teacher_scores"):
        t.global_batch(batch)


# ------------------------------------------------------------------------- Matryoshka (issue 28, item 1)

MATRYOSHKA = ((16, 1.0), (8, 0.5), (4, 0.25))


def matryoshka_reference(q, p, unit, *, tau, opts, dims=MATRYOSHKA) -> float:
    """Σ_d w_d · the loss of the first d components, each prefix L2-normalised (sentence-transformers'
    MatryoshkaLoss around a cosine loss), in float64."""
    unit_norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    return sum(w * reference_loss(unit_norm(q[:, :d]), unit_norm(p[..., :d]), unit, tau=tau, opts=opts)
               for d, w in dims)


def _matryoshka_spec(opts, dims=MATRYOSHKA, gather="constraint"):
    from mlret import losses

    return losses.LossSpec(terms=(losses.TermSpec("contrastive", 1.0, opts),), gather=gather, matryoshka=dims)


@pytest.mark.parametrize("name", ["eq1", "symmetric_within_view", "vrn"])
def test_matryoshka_matches_float64_reference(batch, name):
    from mlret import losses

    q, p, unit = batch
    opts, tau = VARIANTS[name], 0.07
    fn = losses.build(_matryoshka_spec(opts), losses.LossSetup())
    f = lambda q, p: fn({"query": q, "passage": p}, {"unit_id": unit}, tau)
    (loss, metrics), (gq, gp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(q), jnp.asarray(p))
    np.testing.assert_allclose(float(loss), matryoshka_reference(q, p, unit, tau=tau, opts=opts), rtol=1e-5)
    for d, _ in MATRYOSHKA:  # each dimension's own loss, unweighted
        np.testing.assert_allclose(float(metrics[f"loss_dim{d}"]),
                                   matryoshka_reference(q, p, unit, tau=tau, opts=opts, dims=((d, 1.0),)), rtol=1e-5)
    rng = np.random.default_rng(2)
    vq, vp = rng.normal(size=q.shape), rng.normal(size=p.shape)
    h = 1e-5
    ref = lambda t: matryoshka_reference(q + t * vq, p + t * vp, unit, tau=tau, opts=opts)
    np.testing.assert_allclose(float(np.sum(gq * vq) + np.sum(gp * vp)), (ref(h) - ref(-h)) / (2 * h), rtol=1e-3,
                               atol=1e-5)
    # A dimension d sees the first d components only: alone, it gives the others no gradient.
    small = losses.build(_matryoshka_spec(opts, dims=((4, 1.0),)), losses.LossSetup())
    g4 = jax.grad(lambda q: small({"query": q, "passage": p}, {"unit_id": unit}, tau)[0])(jnp.asarray(q))
    assert float(jnp.abs(g4[:, 4:]).max()) == 0.0 and float(jnp.abs(g4[:, :4]).max()) > 1e-3


def test_matryoshka_dimension_larger_than_the_embedding_is_refused(batch):
    from mlret import losses
    from mlret.errors import ConfigError

    q, p, unit = batch
    fn = losses.build(_matryoshka_spec(LossOptions(), dims=((32, 1.0),)), losses.LossSetup())
    with pytest.raises(ConfigError, match="config.loss.matryoshka_dims: 32 exceeds the embedding size 16"):
        fn({"query": q, "passage": p}, {"unit_id": unit}, 0.05)


@pytest.mark.parametrize("field,value,message", [
    ("matryoshka_dims", "64,x", "config.loss.matryoshka_dims: '64,x' is not a comma-separated list"),
    ("matryoshka_dims", "64,64", "config.loss.matryoshka_dims: '64,64' must be distinct positive"),
    ("matryoshka_weights", "1", "config.loss.matryoshka_weights: 1 weight.s. for 2 dimension.s."),
    ("matryoshka_weights", "1,-1", "config.loss.matryoshka_weights: '1,-1' must be positive"),
])
def test_bad_matryoshka_fields_are_refused_naming_the_field(field, value, message):
    from mlret.config import validate
    from mlret.errors import ConfigError

    c = default_config()
    c.loss.matryoshka_dims = "64,32"
    c.loss[field] = value
    with pytest.raises(ConfigError, match=message):
        validate(c)


@pytest.mark.parametrize("name", ["symmetric_within_view", "vrn"])  # every coupling: queries, passages, VRN's cos
@pytest.mark.parametrize("gather", ["constraint", "shard_map", "grad_cache"])
def test_matryoshka_sharded_and_cached_equal_single_device(dist, name, gather):
    """Both gather paths on the 8-device mesh, and gradient caching (two chunks, shard_map inside), give the
    single-device Matryoshka loss and gradients (the embeddings are 8-dimensional here: prefixes 8, 4, 2)."""
    from mlret import losses

    mesh = dist[2]
    dims = ((8, 1.0), (4, 0.5), (2, 0.25))
    single = losses.build(_matryoshka_spec(VARIANTS[name], dims), losses.LossSetup())
    dist_gather = "shard_map" if gather == "grad_cache" else gather
    sharded = losses.build(_matryoshka_spec(VARIANTS[name], dims, dist_gather),
                           losses.LossSetup(dist_gather, mesh, ("data",)))

    got, want = _built_against_single_device(single, sharded, ("unit_id",), gather, dist)
    _close(got, want)
    assert abs(float(want[1]["log_tau"])) > 1e-3 and float(np.abs(want[1]["w"]).max()) > 1e-2


# ------------------------------------------------------------------------- score distillation (issue 28, item 2)

DISTILL = {"margin_mse": {}, "kl_distill": {}, "kl_distill_t": {"student_temperature": 0.5, "teacher_temperature": 2.0}}


def _distill_fn(name, **kw):
    from mlret import losses

    family = name.removesuffix("_t")
    section = losses.get(family).defaults()
    section.update(kw)
    return losses.get(family).build(losses.get(family).options(section, None), losses.LossSetup())


def _st_distill(name, q, p, teacher, **kw):
    """sentence-transformers' own loss (torch, float64) on the same embeddings: (value, dL/dq, dL/dp)."""
    import torch
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss

    loss = MarginMSELoss(None) if name == "margin_mse" else DistillKLDivLoss(None, **kw)
    tq = torch.tensor(np.asarray(q, np.float64), requires_grad=True)
    tp = torch.tensor(np.asarray(p, np.float64), requires_grad=True)
    value = loss.compute_loss_from_embeddings([tq] + [tp[:, g] for g in range(tp.shape[1])],
                                              torch.tensor(np.asarray(teacher, np.float64)))
    value.backward()
    return float(value.detach()), tq.grad.numpy(), tp.grad.numpy()


@pytest.mark.parametrize("name", DISTILL)
def test_distillation_equals_sentence_transformers(batch, name):
    """Every candidate scored: value and gradient equal sentence-transformers' MarginMSELoss / DistillKLDivLoss."""
    q, p, _ = batch
    teacher = 3.0 * np.random.default_rng(7).normal(size=p.shape[:2]).astype(np.float32)
    fn = _distill_fn(name, **DISTILL[name])
    f = lambda q, p: fn({"query": q, "passage": p}, {"teacher_scores": jnp.asarray(teacher)}, 0.05)
    (loss, metrics), (gq, gp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(q), jnp.asarray(p))
    want, wq, wp = _st_distill(name.removesuffix("_t"), q, p, teacher, **DISTILL[name])
    assert want > 1e-3 and float(metrics["loss"]) == float(loss)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gq), wq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gp), wp, rtol=1e-4, atol=1e-6)


def distill_reference(name, q, p, teacher, student_temperature=1.0, teacher_temperature=1.0) -> float:
    """The stated rule for unscored (NaN) candidates, in float64 loops: left out of the margins (MarginMSE) and of
    the softmaxes (KL, over the pairs with >= 2 scored candidates)."""
    q, p, t = np.asarray(q, np.float64), np.asarray(p, np.float64), np.asarray(teacher, np.float64)
    terms = []
    for i in range(len(q)):
        s = p[i] @ q[i]
        ok = [k for k in range(len(s)) if np.isfinite(t[i, k])]
        if name == "margin_mse":
            if 0 in ok:
                terms += [((s[0] - s[k]) - (t[i, 0] - t[i, k])) ** 2 for k in ok if k > 0]
        elif len(ok) >= 2:
            ls = s[ok] / student_temperature - np.log(np.sum(np.exp(s[ok] / student_temperature)))
            lt = t[i, ok] / teacher_temperature - np.log(np.sum(np.exp(t[i, ok] / teacher_temperature)))
            terms.append(student_temperature**2 * np.sum(np.exp(lt) * (lt - ls)))
    return float(np.mean(terms)) if terms else 0.0


@pytest.mark.parametrize("name", DISTILL)
def test_distillation_leaves_unscored_candidates_out(batch, name):
    """Candidates filled from other units carry NaN: the value and gradient follow the stated rule (float64
    reference, central difference), no NaN reaches the gradient, and an unscored candidate gets no gradient."""
    q, p, _ = batch
    teacher = 3.0 * np.random.default_rng(8).normal(size=p.shape[:2])
    teacher[0, 2] = teacher[1, 1] = teacher[2, 0] = np.nan  # a negative, another, and a positive unscored
    teacher[3, 1:] = np.nan  # one scored candidate: no distribution, no margin
    teacher = teacher.astype(np.float32)
    kw = DISTILL[name]
    fn = _distill_fn(name, **kw)
    f = lambda q, p: fn({"query": q, "passage": p}, {"teacher_scores": jnp.asarray(teacher)}, 0.05)[0]
    loss, (gq, gp) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(p))
    ref = lambda q, p: distill_reference(name.removesuffix("_t"), q, p, teacher, **kw)
    np.testing.assert_allclose(float(loss), ref(q, p), rtol=1e-5)
    assert np.isfinite(np.asarray(gq)).all() and np.isfinite(np.asarray(gp)).all()
    rng = np.random.default_rng(9)
    vq, vp = rng.normal(size=q.shape), rng.normal(size=p.shape)
    h = 1e-5
    numeric = (ref(q + h * vq, p + h * vp) - ref(q - h * vq, p - h * vp)) / (2 * h)
    np.testing.assert_allclose(float(np.sum(gq * vq) + np.sum(gp * vp)), numeric, rtol=1e-3, atol=1e-5)
    assert float(np.abs(gp[0, 2]).max()) == 0.0 and float(np.abs(gp[3]).max()) == 0.0
    if name == "margin_mse":  # a pair whose positive is unscored has no margin at all
        assert float(np.abs(gp[2]).max()) == 0.0 and float(np.abs(gq[2]).max()) == 0.0
    nothing = np.full_like(teacher, np.nan)
    empty = fn({"query": q, "passage": p}, {"teacher_scores": nothing}, 0.05)[0]
    assert float(empty) == 0.0


@pytest.mark.parametrize("name", ["margin_mse", "kl_distill"])
@pytest.mark.parametrize("gather", ["constraint", "shard_map", "grad_cache"])
def test_distillation_with_contrastive_sharded_and_cached_equal_single_device(dist, name, gather):
    """contrastive + 0.5 x distillation (with unscored candidates) on the 8-device mesh, both gather paths and
    gradient caching: the single-device loss and gradients."""
    from mlret import losses

    feats, _, mesh = dist
    teacher = np.random.default_rng(4).normal(size=feats["p"].shape[:2]).astype(np.float32)
    teacher[::3, 2] = np.nan
    feats = {**feats, "teacher_scores": teacher}
    dist_gather = "shard_map" if gather == "grad_cache" else gather
    family = losses.get(name)

    def spec(g):
        return losses.LossSpec(terms=(losses.TermSpec("contrastive", 1.0, VARIANTS["infonce"]),
                                      losses.TermSpec(name, 0.5, family.options(family.defaults(), None))), gather=g)

    single = losses.build(spec("constraint"), losses.LossSetup())
    sharded = losses.build(spec(dist_gather), losses.LossSetup(dist_gather, mesh, ("data",)))

    got, want = _built_against_single_device(single, sharded, ("unit_id", "teacher_scores"), gather, dist, feats)
    _close(got, want)
    assert float(want[0][1][f"loss_{name}"]) > 1e-3


def test_bad_distillation_fields_are_refused_naming_the_field():
    from mlret.config import validate
    from mlret.errors import ConfigError

    c = default_config()
    c.loss.terms = "kl_distill"
    c.loss.kl_distill.teacher_temperature = 0.0
    with pytest.raises(ConfigError, match="config.loss.kl_distill.teacher_temperature: 0.0 must be a positive"):
        validate(c)
