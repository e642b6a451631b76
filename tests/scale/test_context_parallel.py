"""Context parallelism on the 8-device CPU mesh: ring and all-gather attention (and splash in
Pallas interpret mode) against the plain XLA attention, forward and gradients; the model routes to
it when the mesh has a context axis, and a whole forward/backward matches one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_inputs import packed_qkv
from flax import nnx

from lt_jax.model import context_parallel as cp
from lt_jax.model import sharding as shd
from lt_jax.model.attention import xla_attention
from lt_jax.model.config import ModelConfig
from lt_jax.model.transformer import init_model


def _packed(batch, seq, heads, kv_heads, dim, seed=0):
    """q/k/v and packed rows: several documents per row (some crossing shard boundaries), padding."""
    return packed_qkv(batch, seq, heads, kv_heads, dim, seed, pad_per_row=5)


def _loss_and_grads(fn, q, k, v, seg):
    """sum(out^2) over real tokens, and its gradients w.r.t. q, k, v."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(seg[..., None, None] > 0, out, 0.0) ** 2), out

    (val, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return val, out, grads


def _reference(q, k, v, seg, pos):
    fn = lambda q, k, v: xla_attention(q, k, v, seg, seg, pos, pos, True, q.shape[-1] ** -0.5)  # noqa: E731
    return jax.jit(lambda q, k, v: _loss_and_grads(fn, q, k, v, seg))(q, k, v)


def _context(q, k, v, seg, pos, mesh, strategy, kernel="xla", interpret=False):
    def fn(q, k, v):
        return cp.context_attention(q, k, v, seg, seg, pos, pos, mesh=mesh, strategy=strategy, kernel=kernel,
                                    interpret=interpret)

    seq_sharded = shd.logical_to_sharding(("act_batch", "act_seq", None, None), mesh)
    args = [jax.device_put(jnp.asarray(a), seq_sharded) for a in (q, k, v)]
    with jax.set_mesh(mesh):
        return jax.jit(lambda q, k, v: _loss_and_grads(fn, q, k, v, seg))(*args)


def _assert_close(got, want, seg):
    (val_g, out_g, grads_g), (val_w, out_w, grads_w) = got, want
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out_g)[real], np.asarray(out_w)[real], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(float(val_g), float(val_w), rtol=1e-5)
    for g, w in zip(grads_g, grads_w):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "strategy,mesh_cfg,heads",
    [
        ("ring", dict(data=1, fsdp=2, context=4), (4, 2)),
        ("ring", dict(data=1, fsdp=1, context=8), (4, 2)),
        # heads over tensor: 4 q heads / 2 kv heads on tensor=4 slices one kv head per device
        ("ring", dict(data=1, fsdp=1, context=2, tensor=4), (4, 2)),
        ("all_gather", dict(data=2, fsdp=1, context=2, tensor=2), (4, 2)),
    ],
)
def test_context_attention_matches_xla_forward_and_grads(strategy, mesh_cfg, heads):
    q, k, v, seg, pos = _packed(batch=2, seq=64, heads=heads[0], kv_heads=heads[1], dim=16, seed=3)
    mesh = shd.make_mesh(shd.MeshConfig(**mesh_cfg))
    assert mesh.shape["context"] == mesh_cfg["context"]
    _assert_close(_context(q, k, v, seg, pos, mesh, strategy), _reference(q, k, v, seg, pos), seg)


def test_splash_all_gather_interpret_matches_xla():
    """Splash built with q_seq_shards = context: each device's block-sparsity rows (interpret mode)."""
    q, k, v, seg, pos = _packed(batch=2, seq=256, heads=2, kv_heads=1, dim=32, seed=5)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, context=2, tensor=2), devices=jax.devices()[:8])
    got = _context(q, k, v, seg, pos, mesh, "all_gather", kernel="splash", interpret=True)
    _assert_close(got, _reference(q, k, v, seg, pos), seg)


def test_context_errors_name_the_problem():
    q, k, v, seg, pos = _packed(batch=1, seq=12, heads=2, kv_heads=1, dim=8)
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=1, context=8))
    with pytest.raises(ValueError, match="seq_len 12 is not divisible by the context axis"):
        cp.context_attention(q, k, v, seg, seg, pos, pos, mesh=mesh)
    with pytest.raises(ValueError, match="seq_len / context divisible by 128"):
        cp.choose("splash", "tpu", 96)
    assert cp.choose("auto", "tpu", 4096) == ("all_gather", "splash")
    assert cp.choose("auto", "gpu", 4096) == ("ring", "xla")


CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, attention_bias=True, remat="full")


def _model_loss(model, ids, seg, pos):
    logits = model(ids[:, :-1], pos[:, :-1], seg[:, :-1])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(logp * (seg[:, 1:] > 0)) / jnp.sum(seg[:, 1:] > 0)


@nnx.jit
def _model_grads(model, ids, seg, pos):
    return nnx.value_and_grad(_model_loss)(model, ids, seg, pos)


def test_model_on_a_context_mesh_matches_one_device():
    """The model shards sequences over context (and weights over fsdp x context) and routes
    attention to the ring: loss and every gradient equal the single-device run."""
    rng = np.random.RandomState(0)
    _, _, _, seg, pos = _packed(batch=4, seq=33, heads=1, kv_heads=1, dim=1, seed=7)
    ids = rng.randint(1, CFG.vocab_size, size=seg.shape).astype(np.int32) * (seg > 0)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, context=4))
    assert shd.rules_for(mesh.axis_names) != shd.LOGICAL_RULES
    sharded = init_model(CFG, mesh=mesh, seed=3)
    kernel = sharded.layers.attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec[1] == ("fsdp", "context")  # ZeRO-3 over both axes
    single = init_model(CFG, seed=3)
    loss_1, grads_1 = _model_grads(single, ids, seg, pos)
    batch = shd.logical_to_sharding(("act_batch", None), mesh)  # 33 tokens: the step shifts to 32
    with jax.set_mesh(mesh):
        args = [jax.device_put(a, batch) for a in (ids, seg, pos)]
        hlo = _model_grads.lower(sharded, *args).as_text()
        loss_c, grads_c = _model_grads(sharded, *args)
    assert "collective-permute" in hlo or "collective_permute" in hlo  # the ring really runs
    np.testing.assert_allclose(float(loss_c), float(loss_1), rtol=1e-5)
    flat_1 = dict(nnx.to_flat_state(grads_1))
    for path, g in nnx.to_flat_state(grads_c):
        np.testing.assert_allclose(np.asarray(g.get_value()), np.asarray(flat_1[path].get_value()), atol=2e-5,
                                   err_msg=".".join(map(str, path)))


@pytest.mark.slow
def test_sampling_on_a_context_mesh_matches_one_device():
    """A training mesh reused for sampling: prefill rows split over context (or, for a prompt
    bucket that does not divide, take the plain path) and decode gives the same tokens."""
    from lt_jax.sample.sampler import greedy

    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=1, context=8))
    prompts = [list(range(1, 20)), [5, 6, 7]]
    on_mesh = greedy(prompts, init_model(cfg, mesh=mesh, seed=2), 5, mesh=mesh)
    assert on_mesh == greedy(prompts, init_model(cfg, seed=2), 5)
