"""What a model family is, declared once: `FamilySpec`, the tensor rows and the transforms.

A family spec holds everything lt_jax knows about one Hugging Face `model_type`: the name table
(each HF tensor, the parameter path(s) of the tree in `lt_jax.model` it fills, and a transform),
config conversion both ways (family defaults for absent keys, the switches written on export, the
features it refuses), the ModelConfig switches it implies, and its FLOPs per token. The generic
machinery in `lt_jax.model.hf` reads nothing else, so a dense family that fits the decoder is one
module in this package plus one line in `lt_jax.model.families.FAMILIES`.

This module is a leaf (numpy only): `lt_jax.model.config` reads the registry to resolve defaults.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from lt_jax.model.config import ModelConfig


class UnsupportedConfig(ValueError):
    """A config.json switch this decoder does not implement (the generic layer adds the file name)."""


# ---------------------------------------------------------------------------------------------
# Transforms: one HF tensor block <-> one lt_jax parameter block, both directions in one object


@dataclasses.dataclass(frozen=True)
class Copy:
    """Same layout on both sides (embeddings, norm scales, biases)."""

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    def hf_index(self, index: tuple) -> tuple:
        return tuple(index)

    def from_hf(self, block: np.ndarray) -> np.ndarray:
        return block

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return array


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch's Linear.weight [out, in] <-> our kernel [in, out]: a transpose each way."""

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)[::-1]

    def hf_index(self, index: tuple) -> tuple:
        return tuple(index)[::-1]

    def from_hf(self, block: np.ndarray) -> np.ndarray:
        return block.T

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return array.T


@dataclasses.dataclass(frozen=True)
class Stack:
    """One HF tensor per expert ("{e}" in the name) <-> one parameter with an expert axis.

    The parameter's axis after the layer axis is the expert; `inner` converts each expert's block.
    `lt_jax.model.hf` reads and writes the experts' tensors one by one (so a host reads only the
    experts and the rows its devices hold) and stacks or unstacks them.
    """

    inner: Any = None

    stacked = True

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self.inner.hf_shape(tuple(shape)[1:])

    def hf_index(self, index: tuple) -> tuple:
        return self.inner.hf_index(tuple(index)[1:])

    def from_hf(self, block: np.ndarray) -> np.ndarray:
        return self.inner.from_hf(block)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        return self.inner.to_hf(array)


COPY = Copy()
LINEAR = Linear()
STACKED_LINEAR = Stack(LINEAR)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor ("{i}" in the name: one per layer, stacked on axis 0 of a scanned parameter).

    With several `paths` the HF tensor is those parameters fused: their HF layouts concatenated
    along the HF tensor's axis 0 in this order (Phi-3's qkv_proj, gate_up_proj). Loading splits
    it, saving fuses it again; the part sizes come from the parameter shapes.
    """

    hf_name: str
    paths: tuple[str, ...]
    transform: Any = LINEAR

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def row(hf_name: str, path: str, transform: Any = LINEAR) -> Tensor:
    """A tensor row filling one parameter."""
    return Tensor(hf_name, (path,), transform)


def fused(hf_name: str, paths: Sequence[str], transform: Any = LINEAR) -> Tensor:
    """A tensor row split into `paths` on load and fused from them on save."""
    return Tensor(hf_name, tuple(paths), transform)


# ---------------------------------------------------------------------------------------------
# Rows shared by the Llama-style families (each family module picks what it ships)

L = "model.layers.{i}."
EMBED = (row("model.embed_tokens.weight", "embed.embedding", COPY),)
ATTN_QKV = tuple(row(f"{L}self_attn.{p}_proj.weight", f"layers.attn.{p}_proj.kernel") for p in "qkv")
ATTN_O = (row(f"{L}self_attn.o_proj.weight", "layers.attn.o_proj.kernel"),)
QKV_BIAS = tuple(row(f"{L}self_attn.{p}_proj.bias", f"layers.attn.{p}_proj.bias", COPY) for p in "qkv")
QK_NORM = tuple(row(f"{L}self_attn.{p}_norm.weight", f"layers.attn.{p}_norm.scale", COPY) for p in "qk")
NORMS = (
    row(f"{L}input_layernorm.weight", "layers.input_norm.scale", COPY),
    row(f"{L}post_attention_layernorm.weight", "layers.post_attn_norm.scale", COPY),
)
MLP_GATE_UP = tuple(row(f"{L}mlp.{p}_proj.weight", f"layers.mlp.{p}_proj.kernel") for p in ("gate", "up"))
MLP_DOWN = (row(f"{L}mlp.down_proj.weight", "layers.mlp.down_proj.kernel"),)
HEAD = (
    row("model.norm.weight", "final_norm.scale", COPY),
    row("lm_head.weight", "lm_head.kernel"),  # dropped when embeddings are tied
)
TIED_HEAD = "lm_head.weight"
EMBED_NAME = "model.embed_tokens.weight"


def _no_checks(hf: dict[str, Any]) -> None:
    return None


def refuse_attention_bias(family: str) -> Callable[[dict[str, Any]], None]:
    """A `check_supported` for families whose HF config may switch on q/k/v/o biases we lack."""

    def check(hf: dict[str, Any]) -> None:
        if hf.get("attention_bias"):
            raise UnsupportedConfig(f"attention_bias=true ({family} with q/k/v/o biases) is not supported")

    return check


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One Hugging Face model_type as the Llama-style decoder reads it."""

    name: str  # HF model_type and ModelConfig.family
    architecture: str  # config.json "architectures" on export
    tensors: tuple[Tensor, ...]
    attention_bias: bool = False  # ModelConfig defaults this family implies
    qk_norm: bool = False
    # What the family's transformers config class assumes for absent config.json keys.
    hf_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    export_switches: dict[str, Any] = dataclasses.field(default_factory=dict)  # written on export
    rope_types: tuple[str, ...] = ("default", "llama3")
    # Raises UnsupportedConfig for a switch of this family the decoder lacks (generic ones are
    # checked by lt_jax.model.hf for every family).
    check_supported: Callable[[dict[str, Any]], None] = _no_checks
    # Mixture of experts: `tensors` lay out the sparse layers; `dense_mlp` are the rows of the
    # dense MLP layers among them; the two functions convert the MoE keys of config.json.
    moe: bool = False
    shared_expert: bool = False  # every sparse layer also has Qwen2-MoE's gated shared expert
    dense_mlp: tuple[Tensor, ...] = ()
    moe_from_hf: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None
    moe_to_hf: Optional[Callable[["ModelConfig"], dict[str, Any]]] = None

    def default(self, key: str, fallback: Any = None) -> Any:
        return self.hf_defaults.get(key, fallback)

    def tensor_rows(self, config: "ModelConfig") -> list[Tensor]:
        """The rows that apply to `config` (no lm_head when embeddings are tied)."""
        rows = list(self.tensors)
        if self.moe:
            rows = _layer_kind_rows(rows, self.dense_mlp, config)
        if config.tie_word_embeddings:
            rows = [r for r in rows if r.hf_name != TIED_HEAD]
        return rows

    def config_to_hf(self, config: "ModelConfig") -> dict[str, Any]:
        """Family keys of config.json on export (the generic ones come from lt_jax.model.hf)."""
        moe = self.moe_to_hf(config) if self.moe_to_hf else {}
        return {"architectures": [self.architecture], "model_type": self.name, **self.export_switches, **moe}

    def flops_per_token(self, config: "ModelConfig", attention_pairs_per_token: float = 0.0) -> float:
        """Training (forward + backward) model FLOPs per token: 6 x matmul weights plus attention.

        Matmul weights include the LM head (also when tied) and exclude the embedding lookup;
        of a mixture of experts only the active ones count (router, k experts, shared expert);
        attention is 12 * L * Nq * D per (query, key) pair (QK^T and PV, 2 FLOPs a multiply-add,
        x3 for the backward); `attention_pairs_per_token` is pairs / tokens of the batch.
        """
        matmul = config.num_params(include_embeddings=False, active=True)
        if config.tie_word_embeddings:
            matmul += config.vocab_size * config.hidden_size
        attn = 12.0 * config.num_layers * config.num_heads * config.resolved_head_dim * attention_pairs_per_token
        return 6.0 * matmul + attn


def _is_mlp(r: Tensor) -> bool:
    return all(p.startswith("layers.mlp.") for p in r.paths)


def _prefixed(r: Tensor, stack: str) -> Tensor:
    return dataclasses.replace(r, paths=tuple(stack + p[len("layers."):] for p in r.paths))


def _layer_kind_rows(rows: list[Tensor], dense_mlp: Sequence[Tensor], config: "ModelConfig") -> list[Tensor]:
    """A MoE family's rows for `config`'s mix of layers (ModelConfig.layer_groups): the sparse
    layers in the "layers" stack and, when some layers are dense, those in "dense_layers"."""
    if not any(config.sparse_layers):
        return [r for r in rows if not _is_mlp(r)] + list(dense_mlp)
    if "dense_layers" not in config.layer_groups:
        return rows
    dense = [r for r in rows if r.per_layer and not _is_mlp(r)] + list(dense_mlp)
    return rows + [_prefixed(r, "dense_layers.") for r in dense]


def check_paths(spec: FamilySpec, params: Sequence[str], config: "ModelConfig") -> None:
    """The spec's table and the model's parameter tree must name exactly the same paths."""
    mapped = {p for r in spec.tensor_rows(config) for p in r.paths}
    if mapped != set(params):
        raise AssertionError(
            f"{spec.name} table out of sync with the model: unmapped {sorted(set(params) - mapped)}, "
            f"unknown {sorted(mapped - set(params))}"
        )


def optional_int(value: Optional[Any]) -> Optional[int]:
    return None if value is None else int(value)
