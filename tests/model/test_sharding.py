"""Mesh construction, the logical-axis table, and the model on the 8-device CPU mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lt_jax.model import sharding as shd
from lt_jax.model.config import ModelConfig
from lt_jax.model.transformer import abstract_model, flat_abstract_state, init_model, model_from_state

CFG = ModelConfig(vocab_size=256, attention_bias=True, num_heads=4, num_kv_heads=2)


def test_mesh_config_errors_name_the_fields():
    with pytest.raises(ValueError, match="only one axis may be -1.*data, fsdp"):
        shd.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="tensor=0"):
        shd.MeshConfig(tensor=0)
    with pytest.raises(ValueError, match=r"data\*fsdp\*tensor = data\(2\)\*fsdp\(2\)\*tensor\(3\) = 12.*8 devices"):
        shd.MeshConfig(data=2, fsdp=2, tensor=3).resolve(8)
    with pytest.raises(ValueError, match="does not divide 8; change data, tensor"):
        shd.MeshConfig(data=3, fsdp=-1, tensor=1).resolve(8)


def test_make_mesh_resolves_and_uses_auto_axes():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    small = shd.make_mesh(shd.MeshConfig(), devices=jax.devices()[:2])
    assert dict(small.shape) == {"data": 1, "fsdp": 2, "tensor": 1}


def test_logical_to_spec_rules():
    assert shd.logical_to_spec(("act_batch", "act_seq", "act_heads", None)) == PartitionSpec(
        ("data", "fsdp"), None, "tensor", None
    )
    # one mesh axis shards at most one dimension
    assert shd.logical_to_spec(("embed", "embed")) == PartitionSpec("fsdp", None)
    with pytest.raises(KeyError, match="'heds' has no rule"):
        shd.logical_to_spec(("heds",))


def test_axes_size_counts_axes_the_mesh_lacks_as_one():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    assert shd.axes_size(mesh, ("data", "fsdp")) == 4 and shd.axes_size(mesh, "tensor") == 2
    assert shd.axes_size(mesh, None) == 1 and shd.axes_size(None, ("data", "fsdp")) == 1
    # dcn_data and context only exist on meshes that use them (MeshConfig.axis_names)
    assert "context" not in mesh.axis_names and "dcn_data" not in mesh.axis_names
    assert shd.axes_size(mesh, ("dcn_data", "data", "context")) == 2
    data_only = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert shd.axes_size(data_only, shd.logical_to_spec(("act_batch",))[0]) == 4  # ("data", "fsdp"): no fsdp


def _expected_spec(logical_axes):
    """What the table says, read straight from LOGICAL_RULES (independent of logical_to_spec)."""
    table = dict(shd.LOGICAL_RULES)
    return PartitionSpec(*(table[name] for name in logical_axes))


@pytest.fixture(scope="module")
def mesh():
    return shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def sharded_model(mesh):
    return init_model(CFG, mesh=mesh, seed=7)


def test_every_parameter_carries_its_rule_sharding(mesh, sharded_model):
    state = nnx.to_flat_state(nnx.state(sharded_model))
    assert len(state) == 15
    for path, var in state:
        name = ".".join(map(str, path))
        axes = shd.variable_logical_axes(var)
        assert len(axes) == var.get_value().ndim, name
        value = var.get_value()
        expected = NamedSharding(mesh, _expected_spec(axes))
        assert value.sharding.is_equivalent_to(expected, value.ndim), (name, value.sharding.spec, expected.spec)
        assert value.sharding.spec == expected.spec, name
    # Spot-check the annotations against the parameter contract, and that sharding really splits data.
    axes = {".".join(map(str, p)): shd.variable_logical_axes(v) for p, v in state}
    assert axes["layers.attn.q_proj.kernel"] == ("layers", "embed", "q_heads")
    assert axes["layers.attn.k_proj.bias"] == ("layers", "kv_heads")
    assert axes["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert axes["embed.embedding"] == ("vocab", "embed")
    kernel = sharded_model.layers.attn.q_proj.kernel.get_value()
    L, H, Q = kernel.shape
    assert {s.data.shape for s in kernel.addressable_shards} == {(L, H // 2, Q // 2)}


def test_abstract_model_carries_the_same_shardings(mesh, sharded_model):
    abstract = flat_abstract_state(abstract_model(CFG, mesh))
    live = flat_abstract_state(sharded_model)
    assert set(abstract) == set(live)
    for name, leaf in abstract.items():
        assert isinstance(leaf, jax.ShapeDtypeStruct)
        assert leaf.sharding == live[name].sharding, name
    assert shd.model_shardings(sharded_model, mesh) == {k: v.sharding for k, v in abstract.items()}


def _loss(model, ids, seg, pos):
    logits = model(ids[:, :-1], pos[:, :-1], seg[:, :-1])
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(logp * (seg[:, 1:] > 0)) / jnp.sum(seg[:, 1:] > 0), logits


@nnx.jit
def loss_and_grad(model, ids, seg, pos):
    (loss, logits), grads = nnx.value_and_grad(_loss, has_aux=True)(model, ids, seg, pos)
    return loss, logits, grads


def test_mesh_matches_single_device_forward_and_grads(mesh, sharded_model):
    rng = np.random.RandomState(0)
    ids = rng.randint(0, CFG.vocab_size, (4, 17)).astype(np.int32)
    seg = np.ones((4, 17), np.int32)
    seg[1, 9:] = 2
    seg[3, 12:] = 0
    pos = np.where(seg == 2, np.arange(17) - 9, np.arange(17)).astype(np.int32)

    one_device = {k: jax.device_put(v, jax.devices()[0]) for k, v in flat_abstract_state(sharded_model).items()}
    single = model_from_state(abstract_model(CFG), one_device)
    loss1, logits1, grads1 = loss_and_grad(single, ids, seg, pos)

    batch = shd.logical_to_sharding(("act_batch", "act_seq"), mesh)
    with jax.set_mesh(mesh):
        loss8, logits8, grads8 = loss_and_grad(
            sharded_model, *(jax.device_put(a, batch) for a in (ids, seg, pos))
        )
    assert logits8.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
    g1 = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads1)}
    for path, v in nnx.to_flat_state(grads8):
        name = ".".join(map(str, path))
        np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(g1[name]), atol=1e-5, rtol=1e-4,
                                   err_msg=name)
        assert len(v.get_value().sharding.device_set) == 8


def test_shard_activation_is_a_noop_without_mesh_and_constrains_with_one(mesh):
    x = jnp.ones((4, 8, 16))
    assert shd.shard_activation(x, ("act_batch", "act_seq", "act_mlp")) is x
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: shd.shard_activation(a * 2, ("act_batch", "act_seq", "act_mlp")))(x)
    assert y.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
