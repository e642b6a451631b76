"""Expert parallelism: the MoE experts' FFN on an (expert, fsdp, tensor) CPU mesh equals one device,
values and gradients; and the TPU path (megablox inside shard_map) compiles ahead of time for a
v5p slice through libtpu."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.model import expert_parallel as ep
from lt_jax.model import moe
from lt_jax.model import sharding as shd
from lt_jax.scale import topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T, H, I, E, K = 64, 16, 24, 8, 2


def _inputs():
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (T, H))
    logits = jax.random.normal(keys[1], (T, E)).at[:8].set(0.0)  # ties in the router
    logits = logits.at[8:24, 3].set(9.0)  # an expert that takes most of the load...
    logits = logits.at[:, 6].set(-9.0)  # ...and one that gets nothing
    weights, experts = moe.route(logits, K, norm_topk_prob=True)
    ws = [jax.random.normal(k, shape) * 0.3 for k, shape in zip(keys[2:5], [(E, H, I), (E, H, I), (E, I, H)])]
    valid = jnp.arange(T) % 7 != 0  # padding tokens
    return x, weights, experts, valid, ws, jax.random.normal(keys[5], (T, H))


@pytest.mark.parametrize("axes", [dict(expert=2, fsdp=2, tensor=2), dict(data=2, fsdp=1, context=2, expert=2)])
def test_experts_on_an_expert_mesh_equal_one_device(axes):
    """Values and gradients with experts over `expert`, their width over `tensor`, tokens over
    data/fsdp/context/expert; routing with ties, a crowded expert, an idle one and padding."""
    x, weights, experts, valid, (wg, wu, wd), cotangent = _inputs()
    assert not np.any(np.asarray(experts) == 6)

    def loss(fn, x, weights, wg, wu, wd):
        return jnp.sum(fn(x, weights, experts, wg, wu, wd, None, valid) * cotangent)

    args = (x, weights, wg, wu, wd)
    ref = moe.experts_ffn(x, weights, experts, wg, wu, wd, None, valid)
    ref_grads = jax.grad(loss, argnums=(1, 2, 3, 4, 5))(moe.experts_ffn, *args)
    mesh = shd.make_mesh(shd.MeshConfig(**axes))
    tokens = jax.sharding.NamedSharding(mesh, ep.token_spec(mesh))
    up, down = ("experts", "embed", "moe_mlp"), ("experts", "moe_mlp", "embed")
    put = [tokens, tokens] + [shd.logical_to_sharding(a, mesh) for a in (up, up, down)]
    assert put[2].spec[0] == "expert" and "expert" in tokens.spec[0]
    sharded = [jax.device_put(a, s) for a, s in zip(args, put)]
    with jax.set_mesh(mesh):
        assert ep.needed(jax.sharding.get_abstract_mesh())
        out = jax.jit(lambda *a: ep.expert_parallel_ffn(a[0], a[1], experts, *a[2:], None, valid))(*sharded)
        grads = jax.jit(jax.grad(lambda *a: loss(ep.expert_parallel_ffn, *a), argnums=(0, 1, 2, 3, 4)))(*sharded)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out)[~np.asarray(valid)])
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not ep.needed(None) and not ep.needed(shd.make_mesh(shd.MeshConfig(fsdp=2), jax.devices()[:2]))


def test_the_expert_axis_in_the_mesh_and_the_table():
    cfg = shd.MeshConfig(fsdp=-1, expert=2, tensor=2)
    assert cfg.axis_names() == ("data", "fsdp", "expert", "tensor") and cfg.resolve(8)["fsdp"] == 2
    assert shd.parse_mesh("expert=4,fsdp=-1").expert == 4
    table = dict(shd.rules_for(cfg.axis_names()))
    assert table["experts"] == "expert" and table["act_batch"] == ("data", "fsdp", "expert")
    assert table["embed"] == ("fsdp", "expert") and dict(shd.LOGICAL_RULES)["experts"] is None
    # an expert weight takes `expert` on its E dimension, so its embed dimension keeps fsdp alone
    assert shd.logical_to_spec(("experts", "embed", "moe_mlp"), shd.rules_for(cfg.axis_names())) == \
        jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    with pytest.raises(ValueError, match="not divisible by mesh.expert 3"):
        ep.expert_parallel_ffn(*[jnp.zeros((6, 2))] * 3, *[jnp.zeros((4, 2, 2))] * 3,
                               mesh=shd.make_mesh(shd.MeshConfig(expert=3, fsdp=1), jax.devices()[:3]))


_AOT = """
import jax, jax.numpy as jnp
from lt_jax.scale import topology
from lt_jax.model import sharding as shd, expert_parallel as ep, moe
mesh = shd.make_mesh(shd.MeshConfig(expert=2, fsdp=2), topology.target_devices(topology.parse_tpu("v5p:2x2x1")))
T, H, I, E, K = 1024, 256, 384, 8, 2
sds = lambda shape, dtype, axes: jax.ShapeDtypeStruct(shape, dtype, sharding=shd.logical_to_sharding(axes, mesh))
x, logits = sds((T, H), jnp.bfloat16, ("act_batch", None)), sds((T, E), jnp.float32, ("act_batch", None))
up, down = ((E, H, I), ("experts", "embed", "moe_mlp")), ((E, I, H), ("experts", "moe_mlp", "embed"))
ws = [sds(s, jnp.bfloat16, a) for s, a in (up, up, down)]
def loss(x, logits, wg, wu, wd):
    weights, experts = moe.route(logits, K, True)
    return jnp.sum(ep.expert_parallel_ffn(x, weights.astype(x.dtype), experts, wg, wu, wd).astype(jnp.float32) ** 2)
with jax.set_mesh(mesh):
    print("needed", ep.needed(jax.sharding.get_abstract_mesh()))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(x, logits, *ws).lower()
    text = lowered.as_text()
    compiled = lowered.compile()
print("mosaic", text.count("tpu_custom_call"), "ragged_dot", text.count("ragged_dot"))
print("temp", compiled.memory_analysis().temp_size_in_bytes)
"""


@pytest.mark.skipif(topology.find_libtpu() is None, reason=f"libtpu not installed: {topology.LIBTPU_PIP}")
def test_the_tpu_path_runs_megablox_inside_shard_map_and_compiles_for_v5p():
    """Forward and backward of the expert-parallel FFN for 4 v5p chips (expert 2 x fsdp 2): the switch
    reads the TPU target from the mesh and the Mosaic kernels (gmm forward, gmm + tgmm backward) compile."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _AOT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["needed"] == "True"
    mosaic, ragged = lines["mosaic"].split()[0], lines["mosaic"].split()[-1]
    # the Mosaic kernels (gmm forward; gmm and tgmm backward, each lowered once per shape), no ragged_dot
    assert int(mosaic) >= 3 and ragged == "0", proc.stdout
    assert int(lines["temp"]) > 0


CFG = dict(family="qwen3_moe", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
           num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           mlp_only_layers=(0,), norm_topk_prob=True, router_aux_loss_coef=0.01)


def _logits_loss_grads(mesh, ids, segment_ids, positions):
    from flax import nnx

    from lt_jax.model import transformer as tfm
    from lt_jax.model.config import ModelConfig

    model = tfm.init_model(ModelConfig(**CFG), mesh, seed=3)
    rows = shd.logical_to_sharding(("act_batch", "act_seq"), mesh)
    batch = [jax.device_put(a, rows) for a in (ids, segment_ids, positions)]

    def loss_fn(model, ids, segment_ids, positions):
        hidden, stats = model.hidden_states_and_router_stats(ids[:, :-1], positions[:, :-1], segment_ids[:, :-1])
        logits = model.logits(hidden)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
        keep = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
        loss = jnp.sum(nll * keep) / jnp.sum(keep) + CFG["router_aux_loss_coef"] * moe.load_balancing_loss(stats)
        return loss, logits

    with jax.set_mesh(mesh):
        (loss, logits), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, *batch)
        return jax.device_get((logits, loss, nnx.to_flat_state(nnx.state(grads))))


@pytest.mark.slow
def test_qwen3_moe_on_an_expert_fsdp_tensor_mesh_equals_one_device(monkeypatch):
    """Logits, loss (with the load-balancing term) and every gradient of a tiny Qwen3-MoE (one dense
    layer, one sparse) on expert=2 x fsdp=2 x tensor=2 equal one device, on packed and padded rows;
    the sparse layer takes the expert-parallel path on the mesh only."""
    calls = []
    real = ep.expert_parallel_ffn
    monkeypatch.setattr(ep, "expert_parallel_ffn", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 96, (8, 17)).astype(np.int32)
    segment_ids = np.where(np.arange(17) < 9, 1, 2).repeat(8).reshape(17, 8).T.astype(np.int32)
    segment_ids[::3, 13:] = 0  # padding
    positions = np.where(np.arange(17) < 9, np.arange(17), np.arange(17) - 9)[None].repeat(8, 0).astype(np.int32)
    one = _logits_loss_grads(shd.make_mesh(shd.MeshConfig(fsdp=1), jax.devices()[:1]), ids, segment_ids, positions)
    mesh = shd.make_mesh(shd.MeshConfig(expert=2, fsdp=2, tensor=2))
    assert not calls and ep.needed(mesh)
    many = _logits_loss_grads(mesh, ids, segment_ids, positions)
    assert calls
    np.testing.assert_allclose(many[0], one[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(many[1], one[1], rtol=1e-6)
    names = [".".join(map(str, path)) for path, _ in one[2]]
    assert any("experts.gate_proj" in n for n in names)
    for name, (_, g1), (_, gm_) in zip(names, one[2], many[2]):
        np.testing.assert_allclose(gm_.get_value(), g1.get_value(), rtol=1e-4, atol=1e-6, err_msg=name)
