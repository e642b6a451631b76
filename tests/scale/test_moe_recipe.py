"""configs/qwen3-30b-a3b-32k.yaml: the model it names is Qwen3-30B-A3B, its mesh and batch divide on
the v5p-64 it targets, and `lt-jax compile` (like MFU) counts the FLOPs of the active parameters.
Its compiled fit itself is measured by `lt-jax compile` (tpu_scripts/README.md), not in CI."""

from __future__ import annotations

import os

import pytest
from jax.sharding import AbstractMesh

from lt_jax.scale import compile as aot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "configs", "qwen3-30b-a3b-32k.yaml")


def test_recipe_is_qwen3_30b_a3b_on_a_v5p_64_mesh():
    cfg = aot.load_config(RECIPE, [])
    model = cfg.model_config()
    # Qwen's published sizes: 30.5B parameters, 3.3B activated per token
    assert round(model.num_params() / 1e9, 1) == 30.5
    assert round(model.num_params(active=True) / 1e9, 1) in (3.3, 3.4)
    assert all(model.sparse_layers) and model.num_experts == 128 and model.num_experts_per_tok == 8
    sizes = cfg.mesh.resolve(32)  # v5p:4x4x2
    assert sizes == {"data": 1, "fsdp": 8, "expert": 4, "tensor": 1}
    aot.check_divisible(cfg, AbstractMesh(tuple(sizes.values()), tuple(sizes)))
    with pytest.raises(ValueError, match=r"dcn_data\*data\*fsdp\*expert = 64"):
        aot.check_divisible(cfg, AbstractMesh((1, 16, 4, 1), tuple(sizes)))  # 32 rows per micro-batch
    assert (cfg.optim.lr, cfg.train.global_batch, cfg.data.seq_len) == (8e-5, 64, 32768)


def test_compile_counts_the_active_parameters():
    model = aot.load_config(RECIPE, []).model_config()
    seq = 32768
    per_token = aot.model_flops(model, 1, seq) / seq
    attention = 12 * model.num_layers * model.num_heads * model.resolved_head_dim * (seq + 1) / 2
    matmul = per_token - attention
    assert matmul == pytest.approx(6 * model.num_params(include_embeddings=False, active=True))
    assert 6 * 3.0e9 < matmul < 6 * 3.1e9  # router + 8 of 128 experts + attention + LM head: 3.04B
    assert matmul < 0.11 * 6 * model.num_params(include_embeddings=False)
    report = {"family": "qwen3_moe", "params_b": model.num_params() / 1e9,
              "active_params_b": model.num_params(active=True) / 1e9}
    assert aot._active(report) == " (3.35B active)"
