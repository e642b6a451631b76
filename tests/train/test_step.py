"""Gradient accumulation: 4 micro-batches of b rows give the loss and gradients of one batch of 4b,
on one device and on a (data=2, fsdp=2, tensor=2) mesh."""

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
from lt_jax.train import step as st

CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def packed_batch(rows: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rows):
        sizes = rng.integers(3, seq_len // 2, size=3)
        sizes = sizes[np.cumsum(sizes) <= seq_len]
        examples.append([{"input_ids": rng.integers(1, 96, n), "loss_mask": rng.integers(0, 2, n)} for n in sizes])
    return packing.pack_rows(examples, seq_len)


def grads_and_sums(mesh, accum: int, batch, lm_head_chunk: int = 0):
    with jax.set_mesh(mesh):
        graphdef, params = st.split_model(tfm.init_model(CFG, mesh, seed=1))
        sharding = loader_lib.batch_sharding(mesh)
        options = st.StepOptions(grad_accum=accum, lm_head_chunk=lm_head_chunk)
        fn = jax.jit(lambda p, b: st.loss_and_grads(p, b, graphdef=graphdef, options=options))
        global_batch = {k: jax.device_put(jnp.asarray(v), sharding) for k, v in batch.items()}
        grads, sums = jax.device_get(fn(params, global_batch))
    return grads, sums


def assert_same(a, b):
    grads_a, sums_a = a
    grads_b, sums_b = b
    assert float(sums_a["loss_tokens"]) == float(sums_b["loss_tokens"]) > 0
    np.testing.assert_allclose(sums_a["nll"], sums_b["nll"], rtol=2e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7), grads_a, grads_b)


def test_accumulation_equals_one_big_batch_on_one_device():
    mesh = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    batch = packed_batch(16, 32)
    # the chunked LM head rides along: it must not change the result either
    assert_same(grads_and_sums(mesh, 1, batch), grads_and_sums(mesh, 4, batch, lm_head_chunk=8))


@pytest.mark.slow
def test_accumulation_equals_one_big_batch_on_a_data_fsdp_tensor_mesh():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    batch = packed_batch(16, 32, seed=1)
    single = shd.make_mesh(shd.MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    reference = grads_and_sums(single, 1, batch)
    assert_same(reference, grads_and_sums(mesh, 1, batch))
    assert_same(reference, grads_and_sums(mesh, 4, batch))


def test_micro_batches_take_strided_rows():
    x = jnp.arange(8)
    micro = st._split_micro(x, 4)
    assert micro.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
