"""The cuDNN packed path, proven on CPU: JAX's own offset conversion on our operands (GQA), the
platform rule with faked GPU properties, what save_attention_out keeps, and that a model lowers
for CUDA with the fused attention calls. Nothing here runs a GPU kernel (tools/gpu_smoke.py does)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_gpu import H100, use_hopper, use_platform
from jax._src.cudnn import fused_attention_stablehlo as fa

from lt_jax.model import attention as attn
from lt_jax.model import transformer as tfm
from lt_jax.model.config import ModelConfig


def _segments(batch: int, seq: int) -> np.ndarray:
    """Rows of documents of varied lengths (1 token included) with trailing padding."""
    rows = [[1, 7, 5, 3], [16], [2, 2, 9], [4, 11]]
    seg = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        at = 0
        for i, n in enumerate(rows[b % len(rows)], start=1):
            seg[b, at : at + n] = i
            at += n
    return seg


def _encoded(batch, seq, heads, dim):
    """Values that name their own (row, token, head): k[b, t, n, :] = 1e4*b + 10*t + n."""
    b, t, n = np.meshgrid(np.arange(batch), np.arange(seq), np.arange(heads), indexing="ij")
    return np.broadcast_to((1e4 * b + 10 * t + n)[..., None], (batch, seq, heads, dim)).astype(np.float32)


def _check_landing(nq: int, nkv: int, batch=4, seq=16, dim=8, max_segments=6):
    """Runs JAX's conversion on what cudnn_operands hands to JAX and reads, for every segment of
    every row, the k/v elements cuDNN would read for each query head; they must be the segment's own."""
    seg = _segments(batch, seq)
    q, k = _encoded(batch, seq, nq, dim), _encoded(batch, seq, nkv, dim)
    q_in, k_in, v_in, lens, offsets = attn.cudnn_operands(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k), seg, max_segments)
    np.testing.assert_array_equal(np.asarray(k_in), np.asarray(v_in))
    q_lens, kv_lens, q_off, kv_off = (np.asarray(a).reshape(-1) for a in fa._fix_seqlen_offsets(
        lens, lens, offsets, offsets, q_in, k_in))
    k_buf, q_buf = np.asarray(k_in).reshape(-1), np.asarray(q_in).reshape(-1)
    kv_stride, q_stride = k_in.shape[2] * dim, nq * dim
    per_kv = nq // k_in.shape[2]  # q heads per kv head as cuDNN sees the operands
    expected = [(b, s) for b in range(batch) for s in range(len(seg[b])) if s == 0 or seg[b, s] != seg[b, s - 1]]
    for i, (b, start) in enumerate(expected):
        n = int(kv_lens[i])
        assert n == q_lens[i] and n > 0 and seg[b, start : start + n].tolist() == [seg[b, start]] * n
        for j in range(n):
            for h in range(nq):
                at = int(kv_off[i]) + j * kv_stride + (h // per_kv) * dim
                assert at + dim <= k_buf.size, f"segment {i} (row {b}) reads past the k buffer"
                got = k_buf[at : at + dim]
                np.testing.assert_array_equal(got, k[b, start + j, h // (nq // nkv)], err_msg=f"row {b} segment {i}")
                q_at = int(q_off[i]) + j * q_stride + h * dim
                np.testing.assert_array_equal(q_buf[q_at : q_at + dim], q[b, start + j, h])


@pytest.mark.parametrize("nq,nkv", [(4, 2), (4, 4), (4, 1), (6, 2)])
def test_gqa_segments_land_on_their_own_kv(nq, nkv):
    _check_landing(nq, nkv)


def test_landing_check_catches_the_jax_0_10_2_bug(monkeypatch):
    """Without the repeat (the code before the fix), installed JAX sends GQA segments to other k/v."""
    if not attn._kv_offsets_use_query_heads():
        pytest.skip("the installed JAX converts k/v offsets with the key's heads (fixed upstream)")
    monkeypatch.setattr(attn, "_kv_offsets_use_query_heads", lambda: False)
    with pytest.raises(AssertionError):
        _check_landing(4, 2)
    _check_landing(4, 4)  # equal heads were never affected


def test_fixed_jax_skips_the_repeat(monkeypatch):
    """A JAX that scales k/v offsets by the key's heads (jax-ml/jax#39521) is detected, and k/v go unrepeated."""
    original = fa._fix_seqlen_offsets

    def fixed(q_lens, kv_lens, q_off, kv_off, query, key):
        q_part = original(q_lens, kv_lens, q_off, kv_off, query, key)
        as_query = jnp.zeros((query.shape[0], query.shape[1], key.shape[2], key.shape[3]), query.dtype)
        kv_part = original(q_lens, kv_lens, q_off, kv_off, as_query, key)
        return q_part[0], q_part[1], q_part[2], kv_part[3]

    monkeypatch.setattr(fa, "_fix_seqlen_offsets", fixed)
    attn._kv_offsets_use_query_heads.cache_clear()
    try:
        assert attn._kv_offsets_use_query_heads() is False
        _, k_in, _, _, _ = attn.cudnn_operands(jnp.zeros((1, 8, 4, 8)), jnp.zeros((1, 8, 1, 8)), jnp.zeros((1, 8, 1, 8)),
                                               np.ones((1, 8), np.int32), 4)
        assert k_in.shape[2] == 1
        _check_landing(4, 1)
    finally:
        attn._kv_offsets_use_query_heads.cache_clear()


# ---------------------------------------------------------------------------------------------
# Platform rule


@pytest.fixture
def fake_platform(monkeypatch):
    yield lambda info: use_platform(monkeypatch, info)
    attn._warn_fallback.cache_clear()


@pytest.mark.parametrize("info,why", [
    (attn.Platform("gpu", "NVIDIA A100-SXM4-80GB", (8, 0), 90800), "Hopper"),
    (attn.Platform("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 90501), "9.5.1 found"),
    (attn.Platform("gpu", "NVIDIA H100 80GB HBM3", (9, 0), None), "cuDNN was not found"),
    (attn.Platform("gpu", "NVIDIA GB300", (10, 3), 91000), "needs >= 9.11.0"),
    (attn.Platform("gpu", "AMD Instinct MI300X"), "NVIDIA GPU"),
    (attn.Platform("cpu"), "NVIDIA GPU"),
])
def test_unsupported_gpu_falls_back_with_one_warning_or_refuses(fake_platform, caplog, info, why):
    fake_platform(info)
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        assert attn.resolve_impl("auto", 256, 256) in ("xla",)
        assert attn.resolve_impl("auto", 256, 256) == "xla"
    warned = [r for r in caplog.records if r.name == attn.__name__]
    assert len(warned) == (1 if info.backend == "gpu" else 0)
    if warned:
        assert why in warned[0].getMessage() and "\n" not in warned[0].getMessage()
    with pytest.raises(ValueError, match=f"cannot run here: .*{why}"):
        attn.resolve_impl("cudnn", 256, 256)


def test_supported_gpu_takes_cudnn(fake_platform):
    fake_platform(H100)
    assert attn.resolve_impl("auto", 256, 256) == "cudnn"
    assert attn.resolve_impl("cudnn", 256, 256) == "cudnn"
    assert attn.resolve_impl("auto", 256, 256, jnp.float32) == "xla"  # fp32 debugging runs keep working
    assert attn.resolve_impl("auto", 256, 256, head_dim=320) == "xla"
    assert attn.resolve_impl("auto", 1, 256) == "xla"  # decode
    fake_platform(attn.Platform("gpu", "NVIDIA B200", (10, 0), 90600))
    assert attn.resolve_impl("auto", 256, 256) == "cudnn"


# ---------------------------------------------------------------------------------------------
# The model on a faked Hopper: what is saved for the backward, and the lowered CUDA program


@pytest.fixture
def fake_hopper(monkeypatch):
    """JAX's cuDNN checks and ours see an H100 with cuDNN 9.8: tracing and CUDA lowering work on CPU."""
    use_hopper(monkeypatch)
    yield
    attn._warn_fallback.cache_clear()


def _loss_fn(remat: str, max_segments: int = 4):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      param_dtype="bfloat16", compute_dtype="bfloat16", remat=remat, max_segments=max_segments)
    model = tfm.init_model(cfg)
    from flax import nnx

    graphdef, params = nnx.split(model)
    seg = jnp.asarray(_segments(2, 16)[:2])

    def loss(params, ids):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=seg)
        return jnp.mean(logits**2)

    return loss, params, jnp.ones((2, 16), jnp.int32)


def _count(jaxpr_text: str, prim: str) -> int:
    return jaxpr_text.count(f" {prim}[")


def test_save_attention_out_keeps_cudnn_softmax_stats(fake_hopper):
    """Under save_attention_out the backward does not rerun the cuDNN forward (one fwd call per
    layer body, not two as with full remat), and the fp32 stats [B*M, N, T] are a saved residual."""
    counts = {}
    for remat in ("full", "save_attention_out"):
        loss, params, ids = _loss_fn(remat)
        text = str(jax.make_jaxpr(jax.grad(loss))(params, ids))
        counts[remat] = _count(text, tfm._CUDNN_FWD)
        assert "callback" not in text  # no host round trip per layer: the loader checks segment counts
    assert counts == {"full": 2, "save_attention_out": 1}
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    loss, params, ids = _loss_fn("save_attention_out")
    shapes = [r[0].str_short() for r in saved_residuals(loss, params, ids)]
    # stacked over the 2 layers: [L, B*M, N, T] = [2, 2*4, 4, 16]
    assert "float32[2,8,4,16]" in shapes, shapes


def test_model_lowers_for_cuda_with_fused_attention(fake_hopper):
    """attention=auto on a (faked) H100 in bf16: the CUDA lowering holds cuDNN's fused forward and
    backward custom calls, with the overflow guard and the GQA repeat compiled in."""
    loss, params, ids = _loss_fn("full")
    text = jax.jit(jax.value_and_grad(loss)).trace(params, ids).lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmhaSoftmax" in text
    assert "__cudnn$fmhaSoftmaxBackward" in text


def test_segment_overflow_marks_rows_over_the_ceiling():
    seg = np.array([[1, 2, 3, 4, 0, 0], [1, 1, 1, 2, 2, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    np.testing.assert_array_equal(attn.segment_overflow(jnp.asarray(seg), 5), [False, False, True])
    np.testing.assert_array_equal(attn.segment_overflow(jnp.asarray(seg), 6), [False, False, False])


def test_max_segments_is_a_validated_model_setting():
    assert ModelConfig().max_segments == attn.DEFAULT_MAX_SEGMENTS == 64
    with pytest.raises(ValueError, match="max_segments must be >= 2"):
        ModelConfig(max_segments=1)
