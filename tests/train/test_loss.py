"""The loss: targets shifted within segments, chunked LM head == full, packing leaks nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lt_jax.data import packing
from lt_jax.model import transformer as tfm
from lt_jax.model.config import ModelConfig
from lt_jax.train import loss as loss_lib
from lt_jax.train import step as st

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_shift_targets_stays_inside_segments():
    ids = jnp.array([[10, 11, 12, 20, 21, 0]])
    mask = jnp.array([[0, 1, 1, 1, 1, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    targets, weights = loss_lib.shift_targets(ids, mask, seg)
    assert targets.tolist() == [[11, 12, 20, 21, 0, 0]]
    # 10->11, 11->12 trained; 12->20 crosses segments; 20->21 trained; 21->pad and pad->nothing not
    assert weights.tolist() == [[1, 1, 0, 1, 0, 0]]


def test_token_nll_is_log_softmax_in_fp32():
    logits = jnp.array([[[2.0, 0.0, -1.0]]], dtype=jnp.bfloat16)
    nll, lse = loss_lib.token_nll(logits, jnp.array([[1]]))
    ref = -jax.nn.log_softmax(np.array([2.0, 0.0, -1.0], np.float32))[1]
    assert nll.dtype == jnp.float32 and float(nll[0, 0]) == pytest.approx(float(ref), rel=1e-6)


def test_chunked_head_equals_full_logits_in_value_and_gradient():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(8, 40)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, (2, 16)))
    weights = jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.float32)

    def full(h, k):
        nll, z = loss_lib.loss_sums(h @ k, targets, weights)
        return nll + 0.1 * z

    def chunked(h, k):
        nll, z = loss_lib.chunked_loss_sums(h, lambda x: x @ k, targets, weights, 4)
        return nll + 0.1 * z

    v1, g1 = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, kernel)
    v2, g2 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lm_head_chunk"):
        loss_lib.chunked_loss_sums(hidden, lambda x: x @ kernel, targets, weights, 5)


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_states_plus_head_equal_the_models_logits(tied):
    model = tfm.init_model(CFG if not tied else ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": True}))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 12)))
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    pos = jnp.array([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3])
    ref = nnx.jit(lambda m, *a: m(*a))(model, ids, pos, seg)
    ours = nnx.jit(lambda m, *a: m.logits(m.hidden_states(*a)))(model, ids, pos, seg)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(ours))


@nnx.jit
def _per_token(model, batch):
    targets, weights = loss_lib.shift_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    nll, _ = loss_lib.token_nll(model(batch["input_ids"], batch["positions"], batch["segment_ids"]), targets)
    return nll * weights, weights


def per_token_losses(model, batch):
    nll, weights = _per_token(model, batch)
    return np.asarray(nll), np.asarray(weights)


def test_packing_leaks_nothing_between_segments():
    """Changing one example of a packed row changes only that example's losses."""
    model = tfm.init_model(CFG, seed=3)
    rng = np.random.default_rng(2)
    examples = [{"input_ids": rng.integers(1, 64, n), "loss_mask": np.ones(n, np.int32)} for n in (7, 9, 6)]
    changed = [dict(e) for e in examples]
    changed[1] = {"input_ids": rng.integers(1, 64, 9), "loss_mask": np.r_[np.zeros(3), np.ones(6)].astype(np.int32)}
    a = {k: jnp.asarray(v) for k, v in packing.pack_rows([examples], 24).items()}
    b = {k: jnp.asarray(v) for k, v in packing.pack_rows([changed], 24).items()}
    la, wa = per_token_losses(model, a)
    lb, wb = per_token_losses(model, b)
    seg = np.asarray(a["segment_ids"])
    for k in (1, 3):
        np.testing.assert_array_equal(la[seg == k], lb[seg == k])
        np.testing.assert_array_equal(wa[seg == k], wb[seg == k])
    assert not np.allclose(la[seg == 2], lb[seg == 2])
    # and each example alone in a row gives the same losses as packed with the others
    alone = {k: jnp.asarray(v) for k, v in packing.pack_rows([[e] for e in examples], 24).items()}
    l1, _ = per_token_losses(model, alone)
    for k, ex in enumerate(examples, start=1):
        np.testing.assert_allclose(la[seg == k], l1[k - 1, : len(ex["input_ids"])], rtol=2e-5, atol=2e-6)


def test_z_loss_and_normalisation_by_target_count():
    model = tfm.init_model(CFG, seed=4)
    graphdef, params = nnx.split(model)
    params = params.to_pure_dict()
    rows = [[{"input_ids": np.arange(1, 9), "loss_mask": np.r_[0, 0, np.ones(6)]}], [{"input_ids": np.arange(5, 15), "loss_mask": np.ones(10)}]]
    batch = {k: jnp.asarray(v) for k, v in packing.pack_rows(rows + [[]], 24).items()}
    fn = jax.jit(lambda p, b: st.loss_and_grads(p, b, graphdef=graphdef, options=st.StepOptions(z_loss=1e-3))[1])
    sums = fn(params, batch)
    nll, w = per_token_losses(model, batch)
    assert float(sums["loss_tokens"]) == w.sum() == 6 + 9
    np.testing.assert_allclose(float(sums["nll"]), nll.sum(), rtol=1e-5)

    # z is sum over targets of log(Z)^2, Z the softmax normaliser of the logits (PaLM's z-loss) ...
    logits = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, batch["input_ids"], batch["positions"], batch["segment_ids"]), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(float(sums["z"]), (w * log_z**2).sum(), rtol=1e-4)

    # ... and the gradient is that of (NLL + c * z) / target count, computed here from the logits alone.
    c = 0.05
    targets, weights = loss_lib.shift_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])

    def reference(p):
        out = nnx.merge(graphdef, p)(batch["input_ids"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
        lse = jax.nn.logsumexp(out, axis=-1)
        picked = jnp.take_along_axis(out, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * ((lse - picked) + c * lse**2)) / jnp.sum(weights)

    def grads(z_loss):
        return jax.jit(lambda p, b: st.loss_and_grads(p, b, graphdef=graphdef, options=st.StepOptions(z_loss=z_loss))[0])(params, batch)

    want, got, without = jax.grad(reference)(params), grads(c), grads(0.0)
    for a, b, n in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(without)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
    moved = sum(float(jnp.abs(a - n).sum()) for a, n in zip(jax.tree.leaves(got), jax.tree.leaves(without)))
    assert moved > 1e-3  # the z term changes the update
