"""Llama 3.x: the plain layout, with llama3 RoPE frequency scaling."""

from typing import Any

from lt_jax.model.families.spec import (ATTN_O, ATTN_QKV, EMBED, HEAD, MLP_DOWN, MLP_GATE_UP, NORMS, FamilySpec,
                                        UnsupportedConfig)


def _check(hf: dict[str, Any]) -> None:
    if hf.get("attention_bias"):
        raise UnsupportedConfig("attention_bias=true (llama with q/k/v/o biases) is not supported")


SPEC = FamilySpec(
    name="llama",
    architecture="LlamaForCausalLM",
    tensors=EMBED + ATTN_QKV + ATTN_O + NORMS + MLP_GATE_UP + MLP_DOWN + HEAD,
    hf_defaults={"max_position_embeddings": 2048, "head_dim": None},
    export_switches={"attention_bias": False, "mlp_bias": False},
    check_supported=_check,
)
