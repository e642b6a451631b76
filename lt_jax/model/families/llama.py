"""Llama 3.x: the plain layout, with llama3 RoPE frequency scaling."""

from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, FamilySpec,
                                        refuse_attention_bias)

SPEC = FamilySpec(
    name="llama",
    architecture="LlamaForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + NORMS + MLP_GATE_UP + MLP_DOWN + HEAD,
    hf_defaults={"max_position_embeddings": 2048, "head_dim": None},
    export_switches={"attention_bias": False, "mlp_bias": False},
    check_supported=refuse_attention_bias("llama"),
)
