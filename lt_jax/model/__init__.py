"""The decoder (Qwen2/2.5, Qwen3, Llama 3.x, Phi-3/Phi-4), its sharding, and Hugging Face I/O.

Families are declared in `lt_jax.model.families` (one spec module each).

Parameter tree contract (paths are `nnx.state(model)` paths joined with "."; L = num_layers,
H = hidden_size, D = head_dim, Nq/Nkv = heads, I = intermediate_size, V = vocab_size).
Layers are scanned, so every per-layer tensor carries a leading L axis. Kernels are stored
[in, out] (the transpose of torch's Linear.weight).

    embed.embedding                 [V, H]
    layers.input_norm.scale         [L, H]
    layers.attn.q_proj.kernel       [L, H, Nq*D]     layers.attn.q_proj.bias [L, Nq*D]   (qwen2 only)
    layers.attn.k_proj.kernel       [L, H, Nkv*D]    layers.attn.k_proj.bias [L, Nkv*D]  (qwen2 only)
    layers.attn.v_proj.kernel       [L, H, Nkv*D]    layers.attn.v_proj.bias [L, Nkv*D]  (qwen2 only)
    layers.attn.o_proj.kernel       [L, Nq*D, H]
    layers.attn.q_norm.scale        [L, D]                                                (qwen3 only)
    layers.attn.k_norm.scale        [L, D]                                                (qwen3 only)
    layers.post_attn_norm.scale     [L, H]
    layers.mlp.gate_proj.kernel     [L, H, I]
    layers.mlp.up_proj.kernel       [L, H, I]
    layers.mlp.down_proj.kernel     [L, I, H]
    final_norm.scale                [H]
    lm_head.kernel                  [H, V]           (absent when tie_word_embeddings)
"""

from lt_jax.model.config import ModelConfig, RopeScaling

__all__ = ["ModelConfig", "RopeScaling"]
