"""The contrastive loss against a float64 numpy reference written from the definition, loop by loop.

G >= 3 and repeated unit ids, so the layout of hard negatives ([B, G] flattened, label at column i*G) and the
same-unit mask are both exercised (sentence-transformers once got the gathered layout wrong: PR #3453).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlret.losses import contrastive_loss


def reference_loss(q, p, unit, *, tau, symmetric, in_batch_positives, variance_penalty):
    """Plain float64 loops: for each query, the list of (logit, is_label) candidates."""
    q = np.asarray(q, np.float64)
    p = np.asarray(p, np.float64)
    B, G, _ = p.shape
    q2p, variances = [], []
    for i in range(B):
        cand, negs = [], []
        for j, k in itertools.product(range(B), range(G)):
            if j != i and (not in_batch_positives or unit[j] == unit[i]):
                continue  # not a candidate: another pair's passage (off) or a same-unit passage
            s = float(q[i] @ p[j, k])
            cand.append(s / tau)
            if not (j == i and k == 0):
                negs.append(s)
        label = float(q[i] @ p[i, 0]) / tau
        m = max(cand)
        q2p.append(m + np.log(sum(np.exp(c - m) for c in cand)) - label)
        variances.append(np.var(negs) if negs else 0.0)
    loss = np.mean(q2p)
    if symmetric:
        p2q = []
        for i in range(B):
            cand = [float(p[i, 0] @ q[j]) / tau for j in range(B) if j == i or unit[j] != unit[i]]
            m = max(cand)
            p2q.append(m + np.log(sum(np.exp(c - m) for c in cand)) - float(p[i, 0] @ q[i]) / tau)
        loss = 0.5 * (loss + np.mean(p2q))
    return loss + variance_penalty * np.mean(variances)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    B, G, D = 6, 3, 16
    q = rng.normal(size=(B, D))
    p = rng.normal(size=(B, G, D))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    p /= np.linalg.norm(p, axis=-1, keepdims=True)
    unit = np.array([4, 7, 4, 9, 7, 4], np.int32)  # units 4 (three pairs) and 7 (two pairs) repeat
    return q.astype(np.float32), p.astype(np.float32), unit


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("in_batch_positives", [True, False])
@pytest.mark.parametrize("variance_penalty", [0.0, 0.3])
def test_matches_float64_reference(batch, symmetric, in_batch_positives, variance_penalty):
    q, p, unit = batch
    tau = 0.07
    loss, metrics = contrastive_loss(jnp.asarray(q), jnp.asarray(p), jnp.asarray(unit), temperature=tau,
                                     symmetric=symmetric, in_batch_positives=in_batch_positives,
                                     variance_penalty=variance_penalty)
    want = reference_loss(q, p, unit, tau=tau, symmetric=symmetric, in_batch_positives=in_batch_positives,
                          variance_penalty=variance_penalty)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss))


def test_same_unit_passages_are_masked(batch):
    """Query 0's gradient ignores the passages of pair 2 (same unit 4) but not those of pair 1 (unit 7)."""
    q, p, unit = batch
    grad_q0 = jax.jit(jax.grad(lambda q, p: contrastive_loss(q, p, unit, temperature=0.05)[0]))

    base = grad_q0(q, p)[0]
    p_same = p.copy()
    p_same[2, 1:] = q[0]  # pair 2's hard negatives become copies of query 0: masked for query 0
    np.testing.assert_allclose(grad_q0(q, p_same)[0], base, rtol=1e-5, atol=1e-7)
    p_other = p.copy()
    p_other[1, 1:] = q[0]  # pair 1 is another unit: its passages are query 0's negatives
    assert np.abs(grad_q0(q, p_other)[0] - base).max() > 1e-3


def test_bfloat16_inputs_are_computed_in_float32(batch):
    q, p, unit = batch
    qb, pb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)
    loss, _ = contrastive_loss(qb, pb, unit, temperature=0.05)
    want = reference_loss(np.asarray(qb.astype(jnp.float32)), np.asarray(pb.astype(jnp.float32)), unit, tau=0.05,
                          symmetric=False, in_batch_positives=True, variance_penalty=0.0)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_learnable_temperature_gradient(batch):
    """d loss / d log_tau through exp(log_tau) matches a float64 central difference of the reference."""
    q, p, unit = batch
    log_tau = np.log(0.1)

    def f(lt):
        return contrastive_loss(q, p, unit, temperature=jnp.exp(lt), symmetric=True)[0]

    grad = float(jax.grad(f)(jnp.float32(log_tau)))
    h = 1e-5
    ref = lambda lt: reference_loss(q, p, unit, tau=np.exp(lt), symmetric=True, in_batch_positives=True,
                                    variance_penalty=0.0)
    fd = (ref(log_tau + h) - ref(log_tau - h)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-3)
