"""Phi-3 / Phi-4 (model_type "phi3"): the Llama layout with fused qkv_proj and gate_up_proj.

HF stores q, k and v as one Linear (rows: Nq*D, then Nkv*D, then Nkv*D) and gate and up as one
(rows: I of gate, then I of up); loading splits them into our separate kernels, saving fuses them
again. No biases, no q/k norms. Refused: RoPE on part of each head (`partial_rotary_factor` < 1,
Phi-4-mini), sliding windows shorter than the context (Phi-3-mini's 2047), and longrope/su
scaling (the 128k variants): the decoder implements none of them.
"""

from typing import Any

from lt_jax.model.families.spec import (ATTN_O, EMBED, HEAD, L, MLP_DOWN, NORMS, FamilySpec, UnsupportedConfig,
                                        fused)


def _check(hf: dict[str, Any]) -> None:
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedConfig(f"partial_rotary_factor {partial} is not supported; only 1.0 (RoPE on whole heads)")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if window is not None and window < context:
        raise UnsupportedConfig(
            f"sliding_window {window} (< max_position_embeddings {context}) is not supported; "
            "every layer must use full attention"
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UnsupportedConfig("phi3 with biases is not supported")


SPEC = FamilySpec(
    name="phi3",
    architecture="Phi3ForCausalLM",
    tensors=EMBED
    + (fused(f"{L}self_attn.qkv_proj.weight", [f"layers.attn.{p}_proj.kernel" for p in "qkv"]),)
    + ATTN_O
    + NORMS
    + (fused(f"{L}mlp.gate_up_proj.weight", ["layers.mlp.gate_proj.kernel", "layers.mlp.up_proj.kernel"]),)
    + MLP_DOWN
    + HEAD,
    hf_defaults={"max_position_embeddings": 4096, "head_dim": None, "rms_norm_eps": 1e-5},
    # pad_token_id: Phi3Config's default (32000) would index past a smaller vocabulary.
    export_switches={"sliding_window": None, "pad_token_id": None},
    rope_types=("default",),
    check_supported=_check,
)
