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
    # Mixture of experts (families with `moe` in their spec; lt_jax/model/moe.py). A layer i is
    # sparse when num_experts > 0, i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
    # the others run the dense MLP of width intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0  # x the load-balancing loss, added to the training loss
    capacity_factor: Optional[float] = None  # None: dropless; else each expert takes ceil(f * slots / E)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)

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
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        self._check_moe(spec.moe, spec.shared_expert)

    def _check_moe(self, family_moe: bool, shared_expert: bool) -> None:
        """MoE fields only on MoE families, and consistent with each other."""
        if not family_moe:
            if self.num_experts:
                raise ValueError(f"num_experts is set but family {self.family!r} has no experts; use a MoE family")
            return
        if self.num_experts <= 0:
            raise ValueError(f"family {self.family!r} needs num_experts > 0, got {self.num_experts}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                             f"got {self.num_experts_per_tok}")
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a {self.num_layers}-layer model")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive (or null for dropless), got {self.capacity_factor}")
        if shared_expert != (self.shared_expert_intermediate_size > 0):
            raise ValueError(f"family {self.family!r} needs shared_expert_intermediate_size "
                             f"{'> 0' if shared_expert else '0'}, got {self.shared_expert_intermediate_size}")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: does it run the experts (True) or the dense MLP (False)?"""
        return tuple(
            self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_layers)
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every EOS id (none, one or several)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def layer_groups(self) -> dict[str, tuple[int, ...]]:
        """Parameter stack -> the layers it holds, in order: one stack "layers" when every layer is
        of one kind; with dense layers among sparse ones, "layers" holds the sparse ones and
        "dense_layers" the dense ones (each stack scans one layer body)."""
        kinds = self.sparse_layers
        sparse = tuple(i for i, k in enumerate(kinds) if k)
        dense = tuple(i for i, k in enumerate(kinds) if not k)
        if not sparse or not dense:
            return {"layers": tuple(range(self.num_layers))}
        return {"layers": sparse, "dense_layers": dense}

    def num_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Exact parameter count of the decoder this config describes (`active`: only the weights
        one token uses: k of the experts, for the FLOPs of mixture-of-experts models)."""
        h, hd, L = self.hidden_size, self.resolved_head_dim, self.num_layers
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.qk_norm:
            attn += 2 * hd
        sparse = sum(self.sparse_layers)
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = h * self.num_experts + 3 * h * (experts * self.moe_intermediate_size + self.shared_expert_intermediate_size)
        moe += h if self.shared_expert_intermediate_size else 0  # the shared expert's sigmoid gate
        mlp = sparse * moe + (L - sparse) * 3 * h * self.intermediate_size
        n = L * (attn + 2 * h) + mlp + h
        if include_embeddings:
            n += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            n += self.vocab_size * h  # the LM head is a matmul, unlike the embedding lookup
        return n
