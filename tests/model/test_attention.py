"""attention(): the XLA path against a per-segment numpy reference, splash (Pallas interpret mode)
against XLA with segment ids, and the cuDNN packed-layout offsets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_inputs import packed_qkv

from lt_jax.model import sharding as shd
from lt_jax.model.attention import attention, resolve_impl, segment_offsets, splash_attention
from lt_jax.model.kernels import _attend, query_block, xla_attention


def _packed_inputs(batch=4, seq=128, heads=4, kv_heads=2, dim=32, seed=0):
    """Random q/k/v plus rows holding several documents and trailing padding (segment 0)."""
    return packed_qkv(batch, seq, heads, kv_heads, dim, seed, pad_per_row=3)


def _reference(q, k, v, seg, pos):
    """Each document separately: plain causal softmax attention with kv heads repeated per group."""
    batch, seq, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for s in set(seg[b].tolist()) - {0}:
            idx = np.nonzero(seg[b] == s)[0]
            for h in range(heads):
                qs, ks, vs = q[b, idx, h], k[b, idx, h // group], v[b, idx, h // group]
                logits = qs @ ks.T / np.sqrt(dim)
                logits = np.where(np.tril(np.ones((len(idx), len(idx)), bool)), logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                out[b, idx, h] = (p / p.sum(-1, keepdims=True)) @ vs
    return out


def _call(impl, q, k, v, seg, pos):
    return attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg, kv_segment_ids=seg,
        q_positions=pos, kv_positions=pos, impl=impl,
    )


def test_xla_matches_per_segment_reference():
    q, k, v, seg, pos = _packed_inputs()
    out = np.asarray(jax.jit(_call, static_argnums=0)("xla", q, k, v, seg, pos))
    ref = _reference(q, k, v, seg, pos)
    real = seg > 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(out).all(), "padding tokens must not produce NaN/inf"


def test_xla_causality_uses_positions_for_a_cache():
    """A query at position p sees cache slots with positions <= p in its segment, and nothing else."""
    q, k, v, _, _ = _packed_inputs(batch=1, seq=8, heads=2, kv_heads=1, dim=8)
    q1 = q[:, 5:6]
    kv_seg = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int32)  # last two slots empty
    kv_pos = np.array([[0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
    out = attention(
        jnp.asarray(q1), jnp.asarray(k), jnp.asarray(v), q_segment_ids=np.ones((1, 1), np.int32),
        kv_segment_ids=kv_seg, q_positions=np.array([[5]], np.int32), kv_positions=kv_pos,
    )
    full = _reference(q[:, :6], k[:, :6], v[:, :6], np.ones((1, 6), np.int32), None)
    np.testing.assert_allclose(np.asarray(out)[0, 0], full[0, 5], atol=1e-5)


def test_gqa_group_layout_matches_hf_repeat_kv():
    """q head h reads kv head h // group (HF's repeat_kv): permuting kv heads must change the output."""
    q, k, v, seg, pos = _packed_inputs(batch=1, seq=16, heads=4, kv_heads=2, dim=8)
    out = np.asarray(_call("xla", q, k, v, seg, pos))
    swapped = np.asarray(_call("xla", q, k[:, :, ::-1], v[:, :, ::-1], seg, pos))
    np.testing.assert_allclose(out[:, :, :2], _reference(q, k, v, seg, pos)[:, :, :2], atol=1e-5)
    assert not np.allclose(out[:, :, :2], swapped[:, :, :2])


def test_splash_interpret_matches_xla_with_segments_and_grads():
    q, k, v, seg, pos = _packed_inputs(batch=2, seq=128, heads=4, kv_heads=2, dim=64)
    scale = 64**-0.5

    def loss(impl, q, k, v):
        if impl == "splash":
            out = splash_attention(q, k, v, seg, seg, True, scale, interpret=True)
        else:
            out = _call("xla", q, k, v, seg, pos)
        return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0.0) ** 2)

    args = tuple(jnp.asarray(a) for a in (q, k, v))
    val_s, grads_s = jax.value_and_grad(lambda *a: loss("splash", *a), argnums=(0, 1, 2))(*args)
    val_x, grads_x = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(val_s, val_x, rtol=1e-5)
    for gs, gx in zip(grads_s, grads_x):
        np.testing.assert_allclose(gs, gx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tensor", [2, 4])
def test_splash_shard_map_on_mesh_matches_xla(tensor):
    """Batch over data/fsdp, heads over tensor; tensor=4 > kv_heads=2 exercises the kv-head slicing."""
    q, k, v, seg, pos = _packed_inputs(batch=4, seq=128, heads=4, kv_heads=2, dim=32, seed=1)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=-1, tensor=tensor))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, seg, True, 32**-0.5, interpret=True))
        out = np.asarray(fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    ref = np.asarray(_call("xla", q, k, v, seg, pos))
    real = seg > 0
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


def test_splash_rejects_unaligned_length():
    q, k, v, seg, _ = _packed_inputs(batch=1, seq=96, heads=2, kv_heads=1, dim=8)
    with pytest.raises(ValueError, match="divisible by 128"):
        splash_attention(q, k, v, seg, seg, True, 1.0, interpret=True)


def test_cudnn_segment_offsets_follow_packed_layout():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
    lens, offsets = segment_offsets(jnp.asarray(seg), max_segments=5)
    np.testing.assert_array_equal(lens, [[3, 2, 1, 2, -1], [8, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1, -1], [0, -1, -1, -1, -1, -1]])
    # offsets and lengths tile each row exactly
    for row_lens, row_offs in zip(np.asarray(lens), np.asarray(offsets)):
        n = (row_lens > 0).sum()
        assert row_offs[n - 1] + row_lens[n - 1] == seg.shape[1]
        np.testing.assert_array_equal(row_offs[1:n], (row_offs[:-1] + row_lens)[: n - 1])


def test_resolve_impl():
    assert resolve_impl("auto", 128, 128) == {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "xla")
    assert resolve_impl("auto", 128, 128, jnp.float32) in ("xla", "splash")  # cuDNN flash has no fp32
    assert resolve_impl("splash", 1, 64) == "xla"  # decoding against a cache
    if jax.default_backend() != "gpu":  # the platform rule itself: tests/model/test_cudnn_attention.py
        with pytest.raises(ValueError, match="cudnn' cannot run here"):
            resolve_impl("cudnn", 64, 64)
    with pytest.raises(ValueError, match="unknown attention impl"):
        q = jnp.zeros((1, 4, 2, 8))
        attention(q, q, q, q_segment_ids=jnp.ones((1, 4), jnp.int32), kv_segment_ids=jnp.ones((1, 4), jnp.int32),
                  q_positions=jnp.zeros((1, 4), jnp.int32), kv_positions=jnp.zeros((1, 4), jnp.int32), impl="bogus")


def _doc_bounds(seg_row):
    starts = [0] + [i for i in range(1, len(seg_row)) if seg_row[i] != seg_row[i - 1]]
    return list(zip(starts, starts[1:] + [len(seg_row)]))


@pytest.mark.parametrize("causal", [True, False])
def test_xla_segments_are_isolated_forward_and_backward(causal):
    """Changing one document's k/v leaves every other document's outputs bit-identical, and the
    gradient of one document's outputs reaches no other document's q/k/v; with causal, a token's
    output ignores later tokens of its own document."""
    q, k, v, seg, pos = _packed_inputs(batch=2, seq=32, heads=4, kv_heads=2, dim=8, seed=3)

    def run(q, k, v):
        return attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
                         causal=causal, impl="xla")

    base = np.asarray(run(q, k, v))
    b = 1
    (lo, hi), *_ = [d for d in _doc_bounds(seg[b]) if seg[b, d[0]] > 0 and d[1] - d[0] > 2]
    k2, v2 = k.copy(), v.copy()
    k2[b, lo:hi] += 1.0
    v2[b, lo:hi] -= 2.0
    changed = np.asarray(run(q, k2, v2))
    other = np.ones(seg.shape, bool)
    other[b, lo:hi] = False
    np.testing.assert_array_equal(changed[other], base[other])
    assert not np.allclose(changed[b, lo:hi], base[b, lo:hi])
    if causal:  # the last token of the document changed: earlier tokens of it must not see that
        k3 = k.copy()
        k3[b, hi - 1] += 5.0
        np.testing.assert_array_equal(np.asarray(run(q, k3, v))[b, lo : hi - 1], base[b, lo : hi - 1])

    def doc_loss(q, k, v):
        return jnp.sum(run(q, k, v)[b, lo:hi] ** 2)

    grads = jax.grad(doc_loss, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    for g in grads:
        g = np.asarray(g)
        assert np.all(g[other] == 0) and np.any(g[b, lo:hi] != 0)


def test_query_block_only_for_causal_self_attention_long_enough_to_gain():
    assert query_block(512, 512, causal=True) == 64
    assert query_block(64, 64, causal=True) == 32
    for q_len, kv_len, causal in [(512, 512, False), (1, 512, True), (64, 512, True), (48, 48, True), (100, 100, True)]:
        assert query_block(q_len, kv_len, causal) == q_len, (q_len, kv_len, causal)


def test_causal_xla_runs_by_query_block_and_matches_the_full_square():
    """Causal self-attention never builds the [S, S] logits (only each query block against the keys up
    to its end) and agrees with the unchunked kernel, forward and backward, on every real token."""
    q, k, v, seg, pos = _packed_inputs(batch=3, seq=256, heads=4, kv_heads=2, dim=8, seed=5)
    real = jnp.asarray(seg > 0)

    def loss(kernel, q, k, v):
        out = kernel(q, k, v, seg, seg, pos, pos, True, 8**-0.5)
        return jnp.sum(jnp.where(real[:, :, None, None], out, 0.0) ** 2), out

    step = jax.value_and_grad(functools.partial(loss, xla_attention), argnums=(0, 1, 2), has_aux=True)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    largest = max(int(np.prod(var.aval.shape)) for eqn in jax.make_jaxpr(step)(*args).eqns for var in eqn.outvars)
    assert largest <= 3 * 4 * 256 * 256 // 8, largest  # one block of 32 queries against all 256 keys
    (_, out), grads = jax.jit(step)(*args)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, _attend), argnums=(0, 1, 2), has_aux=True))(*args)
    np.testing.assert_allclose(np.asarray(out)[seg > 0], np.asarray(ref)[seg > 0], atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4)
