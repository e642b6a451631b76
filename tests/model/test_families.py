"""The family registry: every spec names exactly the model's parameters; transforms invert; errors."""

from __future__ import annotations

import numpy as np
import pytest

from lt_jax.model import families
from lt_jax.model.config import ModelConfig
from lt_jax.model.families import spec as spec_lib


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_each_spec_maps_every_parameter_once(name, tied):
    from lt_jax.model.transformer import abstract_model, flat_abstract_state

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=(1,), num_layers=3)
    spec = families.get(name)
    moe.update(shared_expert_intermediate_size=24 if spec.shared_expert else 0)
    cfg = ModelConfig(family=name, vocab_size=64, tie_word_embeddings=tied, **(moe if spec.moe else {}))
    params = flat_abstract_state(abstract_model(cfg))
    spec_lib.check_paths(spec, list(params), cfg)  # raises on a missing or unknown path
    paths = [p for r in spec.tensor_rows(cfg) for p in r.paths]
    assert len(paths) == len(set(paths)) == len(params)


def test_family_defaults_and_unknown_family():
    assert ModelConfig(family="qwen2").attention_bias and ModelConfig(family="qwen3").qk_norm
    phi = ModelConfig(family="phi3")
    assert not phi.attention_bias and not phi.qk_norm
    with pytest.raises(ValueError, match="family 'gpt2' is not supported; supported: llama, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        ModelConfig(family="gpt2")


@pytest.mark.parametrize("transform", [spec_lib.COPY, spec_lib.LINEAR])
def test_transforms_go_both_ways(transform):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    hf = transform.to_hf(a)
    assert hf.shape == transform.hf_shape(a.shape)
    np.testing.assert_array_equal(transform.from_hf(hf), a)
    stack = spec_lib.Stack(transform)  # per-expert tensors: one expert's block at a time
    assert stack.hf_shape((3,) + a.shape) == hf.shape
    assert stack.hf_index((slice(0, 2), slice(1, 3), slice(2, 5))) == transform.hf_index((slice(1, 3), slice(2, 5)))
    block = (slice(1, 3), slice(2, 5))  # a block of ours is this block of the HF tensor
    np.testing.assert_array_equal(transform.from_hf(hf[transform.hf_index(block)]), a[block])


def test_flops_per_token_is_the_metrics_formula():
    from lt_jax.train import metrics

    cfg = ModelConfig(family="phi3", vocab_size=64, tie_word_embeddings=True)
    tokens, pairs = 100.0, 2500.0
    want = 6.0 * metrics.matmul_params(cfg) * tokens + 12.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * pairs
    assert metrics.step_flops(cfg, tokens, pairs) == pytest.approx(want, rel=1e-12)
    assert families.get("phi3").flops_per_token(cfg) == 6.0 * metrics.matmul_params(cfg)


def test_moe_fields_are_validated():
    base = dict(family="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    for change, needle in (({"num_experts": 0}, "needs num_experts > 0"), ({"num_experts_per_tok": 5}, "1..num_experts"),
                           ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
                           ({"mlp_only_layers": (2,)}, r"mlp_only_layers \[2\]"),
                           ({"decoder_sparse_step": 0}, "decoder_sparse_step"), ({"capacity_factor": 0.0}, "capacity_factor")):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**{**base, **change})
    with pytest.raises(ValueError, match="has no experts"):
        ModelConfig(family="qwen3", num_experts=4)
    with pytest.raises(ValueError, match="needs shared_expert_intermediate_size > 0"):
        ModelConfig(**dict(base, family="qwen2_moe"))
    cfg = ModelConfig(**base, num_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    assert cfg.sparse_layers == (False, True, False, False) and cfg.mlp_only_layers == (3,)
