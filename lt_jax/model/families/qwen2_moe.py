"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with Qwen3-MoE's
router and experts plus a shared expert: a dense SwiGLU every token runs, scaled by
sigmoid(shared_expert_gate(x)), added to the routed experts' output."""

from typing import Any

from lt_jax.model.families.qwen3_moe import MOE_EXPERTS, MOE_ROUTER, moe_from_hf, moe_to_hf
from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, QKV_BIAS,
                                        FamilySpec, L, UnsupportedConfig, row)

SHARED_EXPERT = tuple(
    row(f"{L}mlp.shared_expert.{p}_proj.weight", f"layers.mlp.shared_expert.{p}_proj.kernel") for p in ("gate", "up", "down")
) + (row(f"{L}mlp.shared_expert_gate.weight", "layers.mlp.shared_expert_gate.kernel"),)


def _from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2MoeConfig's defaults for absent keys differ from Qwen3-MoE's (60 experts, top-4)."""
    fields = moe_from_hf({"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408, **hf})
    return dict(fields, shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size", 5632)))


def _to_hf(config) -> dict[str, Any]:
    return dict(moe_to_hf(config), shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                qkv_bias=True)


def _check(hf: dict[str, Any]) -> None:
    if not hf.get("qkv_bias", True):
        raise UnsupportedConfig("qkv_bias=false is not supported for qwen2_moe (its attention has q/k/v biases)")
    if not hf.get("shared_expert_intermediate_size", 5632):
        raise UnsupportedConfig("shared_expert_intermediate_size 0 is not supported for qwen2_moe")


SPEC = FamilySpec(
    name="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + QKV_BIAS + NORMS + MOE_ROUTER + MOE_EXPERTS + SHARED_EXPERT + HEAD,
    attention_bias=True,
    hf_defaults={"max_position_embeddings": 32768, "head_dim": None},
    export_switches={"use_sliding_window": False, "sliding_window": None},
    check_supported=_check,
    moe=True,
    shared_expert=True,
    dense_mlp=MLP_GATE_UP + MLP_DOWN,
    moe_from_hf=_from_hf,
    moe_to_hf=_to_hf,
)
