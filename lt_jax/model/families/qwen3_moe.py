"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention with a mixture of SwiGLU experts.

Sparse layers hold a router (`mlp.gate`, softmax over experts, top-k, optional renormalisation)
and one HF tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`, ...), stacked
into one [E, ...] parameter per layer (the Stack transform). Layers listed in `mlp_only_layers`,
or not on the `decoder_sparse_step` grid, keep a dense MLP of width `intermediate_size`.
The math is in lt_jax/model/moe.py.
"""

from typing import Any

from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, QK_NORM,
                                        STACKED_LINEAR, FamilySpec, L, refuse_attention_bias, row)

MOE_ROUTER = (row(f"{L}mlp.gate.weight", "layers.mlp.router.kernel"),)
MOE_EXPERTS = tuple(
    row(f"{L}mlp.experts.{{e}}.{p}_proj.weight", f"layers.mlp.experts.{p}_proj", STACKED_LINEAR)
    for p in ("gate", "up", "down")
)


def moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's MoE fields from config.json (Qwen3MoeConfig's defaults for absent keys;
    transformers 5 writes num_experts as num_local_experts)."""
    return dict(
        num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 128))),
        num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )


def moe_to_hf(config) -> dict[str, Any]:
    return dict(
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=config.decoder_sparse_step, mlp_only_layers=list(config.mlp_only_layers),
        router_aux_loss_coef=config.router_aux_loss_coef,
    )


SPEC = FamilySpec(
    name="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + QK_NORM + NORMS + MOE_ROUTER + MOE_EXPERTS + HEAD,
    qk_norm=True,
    hf_defaults={"max_position_embeddings": 32768, "head_dim": 128},
    export_switches={"attention_bias": False, "use_sliding_window": False, "sliding_window": None},
    check_supported=refuse_attention_bias("qwen3_moe"),
    moe=True,
    dense_mlp=MLP_GATE_UP + MLP_DOWN,
    moe_from_hf=moe_from_hf,
    moe_to_hf=moe_to_hf,
)
