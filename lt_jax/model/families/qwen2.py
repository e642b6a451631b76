"""Qwen2 / Qwen2.5: q/k/v biases, otherwise the Llama layout."""

from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, QKV_BIAS,
                                        FamilySpec)

SPEC = FamilySpec(
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + QKV_BIAS + NORMS + MLP_GATE_UP + MLP_DOWN + HEAD,
    attention_bias=True,
    hf_defaults={"max_position_embeddings": 32768, "head_dim": None},
    export_switches={"use_sliding_window": False},
)
