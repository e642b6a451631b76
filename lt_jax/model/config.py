"""The model's architecture config: one dataclass covers every family in lt_jax.model.families.

Families differ only in a few switches (q/k/v bias, q/k RMSNorm, explicit head_dim, rope
scaling, tied embeddings), so one decoder reads them rather than one class per family.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from lt_jax.model import families

Family = str  # a key of lt_jax.model.families.FAMILIES (validated in __post_init__)
DType = Literal["float32", "bfloat16", "float16"]
RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out"]
AttentionImpl = Literal["auto", "xla", "cudnn", "splash"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("llama3"); None in ModelConfig means plain RoPE."""

    rope_type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder architecture plus dtypes and the remat policy used when training."""

    family: Family = "qwen2"
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads (Qwen3 and Llama may differ)
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: Optional[bool] = None  # q/k/v bias; None: the family's (True for Qwen2/2.5 only)
    qk_norm: Optional[bool] = None  # RMSNorm on q and k per head; None: the family's (True for Qwen3 only)
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Union[int, tuple[int, ...], None] = None  # several ids (Llama 3.1 lists three): a tuple
    param_dtype: DType = "float32"
    compute_dtype: DType = "float32"
    remat: RematPolicy = "none"
    attention: AttentionImpl = "auto"
    # cuDNN packed attention: most contiguous runs per row (documents, plus one for trailing
    # padding); the loader packs at most max_segments - 1 documents per row. The kernel keeps
    # fp32 softmax statistics [batch * max_segments, num_heads, seq] per layer for the backward
    # (at 32k with 28 heads: 3.7 MB per segment slot, 235 MB at 64), so it is not set to the worst
    # case; 64 keeps them at the size of q in bf16 with head_dim 128 (README: "GPU attention").
    max_segments: int = 64

    def __post_init__(self):
        if isinstance(self.eos_token_id, (list, tuple)):  # one id stays an int, several a tuple
            ids = tuple(dict.fromkeys(int(i) for i in self.eos_token_id))
            object.__setattr__(self, "eos_token_id", ids[0] if len(ids) == 1 else (ids or None))
        # Family defaults, resolved once so the rest of the code sees plain booleans.
        spec = families.get(self.family)
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", spec.attention_bias)
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", spec.qk_norm)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim"
            )
        if self.max_segments < 2:
            raise ValueError(f"max_segments must be >= 2 (a document and padding), got {self.max_segments}")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.resolved_head_dim}")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every EOS id (none, one or several)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the decoder this config describes."""
        h, hd, L = self.hidden_size, self.resolved_head_dim, self.num_layers
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        n = L * layer + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            n += self.vocab_size * h  # the LM head is a matmul, unlike the embedding lookup
        return n
