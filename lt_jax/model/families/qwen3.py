"""Qwen3 (dense): RMSNorm on q and k per head, an explicit head_dim (128 when absent)."""

from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, QK_NORM,
                                        FamilySpec, refuse_attention_bias)

SPEC = FamilySpec(
    name="qwen3",
    architecture="Qwen3ForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + QK_NORM + NORMS + MLP_GATE_UP + MLP_DOWN + HEAD,
    qk_norm=True,
    hf_defaults={"max_position_embeddings": 32768, "head_dim": 128},
    export_switches={"attention_bias": False, "use_sliding_window": False},
    check_supported=refuse_attention_bias("qwen3"),
)
