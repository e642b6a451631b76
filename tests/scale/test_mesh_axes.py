"""The optional mesh axes: `context` (sequence sharding) and `dcn_data` (data parallelism across
slices). Their config and rules, and the real train step (accumulation, chunked LM head, AdamW)
on a (dcn_data, fsdp, context) CPU mesh matching one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.data import loader as loader_lib
from lt_jax.data import packing
from lt_jax.model import sharding as shd
from lt_jax.model import transformer as tfm
from lt_jax.model.config import ModelConfig
from lt_jax.train import optim
from lt_jax.train import step as st
from lt_jax.train.config import OptimConfig


def test_optional_axes_join_the_mesh_only_above_one():
    assert shd.MeshConfig().axis_names() == ("data", "fsdp", "tensor")
    cfg = shd.MeshConfig(fsdp=-1, context=2, dcn_data=2)
    assert cfg.axis_names() == ("dcn_data", "data", "fsdp", "context", "tensor")
    assert cfg.resolve(16) == {"dcn_data": 2, "data": 1, "fsdp": 4, "context": 2, "tensor": 1}
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, context=2, dcn_data=2))
    assert dict(mesh.shape) == {"dcn_data": 2, "data": 1, "fsdp": 2, "context": 2, "tensor": 1}
    with pytest.raises(ValueError, match="dcn_data is the number of slices"):
        shd.MeshConfig(dcn_data=-1)
    with pytest.raises(ValueError, match=r"data\*fsdp\*context\*tensor = .*context\(3\).* = 12, but there are 8"):
        shd.MeshConfig(data=2, fsdp=2, context=3).resolve(8)
    with pytest.raises(ValueError, match="does not divide 8; change data, context"):
        shd.MeshConfig(data=1, fsdp=-1, context=3).resolve(8)


def test_rules_extend_only_with_the_axes_a_mesh_has():
    assert shd.rules_for(("data", "fsdp", "tensor")) == shd.LOGICAL_RULES
    table = dict(shd.rules_for(("dcn_data", "data", "fsdp", "context", "tensor")))
    assert table["act_batch"] == ("dcn_data", "data", "fsdp")
    assert table["cache_batch"] == ("dcn_data", "data", "fsdp")
    assert table["act_seq"] == "context"
    assert table["embed"] == ("fsdp", "context")  # ZeRO-3 over both
    assert table["vocab"] == dict(shd.LOGICAL_RULES)["vocab"]
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, context=2, dcn_data=2))
    assert loader_lib.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("dcn_data", "data", "fsdp"), "context")
    # a rule naming an axis the mesh lacks is dropped, not an error (a user's 1-axis mesh)
    small = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("fsdp",))
    assert shd.logical_to_sharding(("act_batch", "act_seq"), small).spec == jax.sharding.PartitionSpec("fsdp", None)


CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  remat="full")


def _batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(rows):
        sizes = rng.integers(3, seq_len // 2, size=4)
        sizes = sizes[np.cumsum(sizes) <= seq_len]
        examples.append([{"input_ids": rng.integers(1, 96, n), "loss_mask": rng.integers(0, 2, n)} for n in sizes])
    return packing.pack_rows(examples, seq_len)


def _one_step(mesh, batch, accum):
    # eps well above float noise: Adam's first step is g / (|g| + eps), which amplifies the
    # summation-order noise of near-zero gradients to full-size updates when eps is tiny.
    optimizer, schedule = optim.make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-4), 10)
    with jax.set_mesh(mesh):
        graphdef, params = st.split_model(tfm.init_model(CFG, mesh, seed=1))
        shardings = st.state_shardings(params, optimizer, mesh)
        state = st.init_state(params, optimizer, shardings, seed=0)
        sharding = loader_lib.batch_sharding(mesh)
        step = st.jit_train_step(graphdef, optimizer, schedule, st.StepOptions(accum, 0.0, 8), shardings, sharding)
        state, metrics = step(state, {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()})
        return jax.device_get((state.params, metrics))


@pytest.mark.slow
def test_train_step_on_a_dcn_fsdp_context_mesh_matches_one_device():
    batch = _batch(8, 32)
    single = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    params_1, metrics_1 = _one_step(single, batch, accum=1)
    mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, context=2, dcn_data=2))
    params_m, metrics_m = _one_step(mesh, batch, accum=2)
    for key in ("loss", "grad_norm", "loss_tokens"):
        np.testing.assert_allclose(metrics_m[key], metrics_1[key], rtol=2e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_m, params_1)
