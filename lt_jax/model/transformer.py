"""The decoder: Qwen2/2.5, Qwen3 and Llama 3.x in one Flax NNX module with scanned layers.

Parameter paths and shapes are the contract in `lt_jax/model/__init__.py`. Every parameter carries
`logical_axes` metadata that `lt_jax.model.sharding.LOGICAL_RULES` maps to mesh axes.

Layers are stacked (leading L axis, built with `nnx.vmap`) and run with `jax.lax.scan` over their
split state, so compile time is flat in depth and the remat policy wraps one layer body.

Turning tensors into a live model (what `lt_jax.model.hf` does):

    abstract = abstract_model(config, mesh)           # leaves: ShapeDtypeStruct with .sharding
    specs = {path: leaf for path, leaf in flat_abstract_state(abstract).items()}
    flat = {path: jax.make_array_from_callback(s.shape, s.sharding, read_slice(path))
            for path, s in specs.items()}             # paths like "layers.attn.q_proj.kernel"
    model = model_from_state(abstract, flat)          # checks names/shapes, casts dtypes, nnx.merge
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lt_jax.model import expert_parallel, moe
from lt_jax.model import sharding as shd
from lt_jax.model.attention import attention
from lt_jax.model.config import ModelConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_INIT = nnx.initializers.normal(0.02)  # HF's initializer_range for Qwen and Llama


def dtype_of(name: str):
    """The jnp dtype of a config dtype name ("float32", "bfloat16", "float16")."""
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
    d = config.resolved_head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type {rs.rope_type!r} is not supported; use llama3 or none")
    old_len = np.float32(rs.original_max_position_embeddings)
    low_wavelen = old_len / np.float32(rs.low_freq_factor)
    high_wavelen = old_len / np.float32(rs.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rs.factor), inv_freq)
    smooth = (old_len / wavelen - np.float32(rs.low_freq_factor)) / np.float32(
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / np.float32(rs.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [batch, seq, head_dim] in `dtype`: computed in fp32, then cast like HF does."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, head_dim] rotated with HF's half-rotation (`rotate_half`) layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nnx.Module):
    """RMSNorm as HF computes it: normalise in fp32, cast back, multiply by the weight."""

    def __init__(self, size: int, eps: float, param_dtype, compute_dtype):
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), logical_axes=("norm",))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.get_value().astype(self.compute_dtype) * y.astype(self.compute_dtype)


def _flat(x: jax.Array) -> jax.Array:
    """[batch, seq, features] -> [tokens, features] (a free reshape) for the projections.

    With one contracted token dim, XLA:CPU computes the kernel gradient x^T @ dy straight from the
    row-major operands; with (batch, seq) both contracted it first writes dy transposed, which made
    the backward of every projection about 2x slower. Other backends run the same dots either way.
    """
    return _shard_tokens(x.reshape(-1, x.shape[-1]), "act_embed")


def _shard_tokens(x: jax.Array, features: str) -> jax.Array:
    """Constrain flattened [tokens, features] activations: tokens over the batch and sequence axes
    together (where the rows already are), features by their logical name. Without it, the
    partitioner all-gathers sequence-sharded (context) activations around the reshape."""
    mesh = shd.active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, shd.token_spec(mesh, features))


def _linear(cfg: ModelConfig, n_in: int, n_out: int, axes: tuple, *, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype_of(cfg.compute_dtype), param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=_INIT, rngs=rngs,
        kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]},
    )


class KVCache(NamedTuple):
    """Decode cache. k, v: [L, batch, max_len, Nkv, D]; segment_ids, positions: [batch, max_len]
    (segment 0 = empty slot); index: int32 scalar, the next slot written (same for every row)."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array


class Attention(nnx.Module):
    """GQA self-attention with RoPE; optional q/k bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h = cfg.resolved_head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = _linear(cfg, h, cfg.num_heads * d, ("embed", "q_heads"), bias=cfg.attention_bias, rngs=rngs)
        self.k_proj = _linear(cfg, h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.attention_bias, rngs=rngs)
        self.v_proj = _linear(cfg, h, cfg.num_kv_heads * d, ("embed", "kv_heads"), bias=cfg.attention_bias, rngs=rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * d, h, ("q_heads", "embed"), bias=False, rngs=rngs)
        if cfg.qk_norm:
            pd, cd = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, pd, cd)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, pd, cd)
        else:
            self.q_norm = self.k_norm = None
        self.impl, self.max_segments = cfg.attention, cfg.max_segments

    def project(self, x, cos, sin):
        """x [B, S, H] -> q [B, S, Nq, D], k, v [B, S, Nkv, D], with norms and RoPE applied (the part
        of attention the paged decode path in lt_jax.sample.paged shares)."""
        b, s, _ = x.shape
        tokens = _flat(x)
        q = self.q_proj(tokens).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(tokens).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(tokens).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = shd.shard_activation(q, ("act_batch", "act_seq", "act_heads", "act_head_dim"))
        k = shd.shard_activation(k, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
        v = shd.shard_activation(v, ("act_batch", "act_seq", "act_kv_heads", "act_head_dim"))
        return q, k, v

    def __call__(self, x, cos, sin, segment_ids, positions, cache=None):
        """x [B, S, H] -> ([B, S, H], (k_cache, v_cache) or None).

        With `cache` = (k_buf, v_buf, kv_segment_ids, kv_positions, index) for this layer, the new
        k/v are written at `index` and attention runs over the whole buffer.
        """
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        kv_seg, kv_pos, new_cache = segment_ids, positions, None
        if cache is not None:
            k_buf, v_buf, kv_seg, kv_pos, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_buf, k.astype(k_buf.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_buf, v.astype(v_buf.dtype), index, axis=1)
            new_cache = (k, v)
        out = attention(
            q, k.astype(q.dtype), v.astype(q.dtype),
            q_segment_ids=segment_ids, kv_segment_ids=kv_seg, q_positions=positions, kv_positions=kv_pos,
            impl=self.impl, max_segments=self.max_segments,
        )
        out = checkpoint_name(out, "attn_out")
        return self.o_proj(out.reshape(b * s, self.num_heads * self.head_dim)).reshape(x.shape), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, width: Optional[int] = None):
        h, i = cfg.hidden_size, width or cfg.intermediate_size
        self.gate_proj = _linear(cfg, h, i, ("embed", "mlp"), bias=False, rngs=rngs)
        self.up_proj = _linear(cfg, h, i, ("embed", "mlp"), bias=False, rngs=rngs)
        self.down_proj = _linear(cfg, i, h, ("mlp", "embed"), bias=False, rngs=rngs)

    def __call__(self, x):
        tokens = _flat(x)
        hidden = _shard_tokens(jax.nn.silu(self.gate_proj(tokens)) * self.up_proj(tokens), "act_mlp")
        return self.down_proj(hidden).reshape(x.shape)


class Experts(nnx.Module):
    """E SwiGLU experts' weights, stacked on a leading expert axis: gate/up [E, H, I], down [E, I, H]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, h, i, pd = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype_of(cfg.param_dtype)
        self.gate_proj = nnx.Param(_INIT(rngs.params(), (e, h, i), pd), logical_axes=("experts", "embed", "moe_mlp"))
        self.up_proj = nnx.Param(_INIT(rngs.params(), (e, h, i), pd), logical_axes=("experts", "embed", "moe_mlp"))
        self.down_proj = nnx.Param(_INIT(rngs.params(), (e, i, h), pd), logical_axes=("experts", "moe_mlp", "embed"))


class MoEBlock(nnx.Module):
    """A sparse layer's MLP: router (`moe.route`) and top-k of `Experts` (`moe.experts_ffn`), plus
    Qwen2-MoE's shared expert (a dense MLP every token runs, scaled by a sigmoid gate) when set."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.router = _linear(cfg, cfg.hidden_size, cfg.num_experts, ("embed", None), bias=False, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg, rngs=rngs, width=cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = _linear(cfg, cfg.hidden_size, 1, ("embed", None), bias=False, rngs=rngs)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.capacity_factor, self.compute_dtype = cfg.capacity_factor, dtype_of(cfg.compute_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, S, H] -> [B, S, H] (every token counted as real)."""
        return self.routed(x, jnp.ones(x.shape[:2], bool))[0]

    def routed(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, moe.RouterStats]:
        """(output [B, S, H], router statistics over the tokens where `valid` [B, S] is True).

        Dropless, every token is computed; with a capacity factor, invalid (padding) tokens take
        no expert capacity."""
        tokens, valid = _flat(x), valid.reshape(-1)
        logits = self.router(tokens)
        weights, experts = moe.route(logits, self.top_k, self.norm_topk_prob)
        w = [getattr(self.experts, n).get_value().astype(self.compute_dtype) for n in ("gate_proj", "up_proj", "down_proj")]
        capped = self.capacity_factor is not None
        # A mesh with an expert axis (or a TPU mesh, where megablox must run under shard_map)
        # takes the expert-parallel path: the same function per device, tokens gathered to it.
        ffn = expert_parallel.expert_parallel_ffn if expert_parallel.needed(shd.active_mesh()) else moe.experts_ffn
        out = ffn(tokens, weights, experts, *w, capacity_factor=self.capacity_factor, valid=valid if capped else None)
        dropped = moe.dropped_slots(experts, w[0].shape[0], self.capacity_factor, valid) if capped else None
        out = out.reshape(x.shape)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(tokens)).reshape(*x.shape[:2], 1)
            out = out + gate * self.shared_expert(x)
        return out, moe.router_stats(logits, experts, valid, dropped)


class Block(nnx.Module):
    """Pre-norm decoder layer; its MLP is the dense `MLP` or, in a sparse layer, a `MoEBlock`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, sparse: bool = False):
        pd, cd = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cd)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, cd)
        self.mlp = MoEBlock(cfg, rngs=rngs) if sparse else MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, segment_ids, positions, cache=None):
        """-> (x, new cache or None, RouterStats of a sparse layer or None)."""
        attn_out, new_cache = self.attn(self.input_norm(x), cos, sin, segment_ids, positions, cache)
        x = x + attn_out
        stats = None
        if isinstance(self.mlp, MoEBlock):
            out, stats = self.mlp.routed(self.post_attn_norm(x), segment_ids > 0)
        else:
            out = self.mlp(self.post_attn_norm(x))
        return shd.shard_activation(x + out, ("act_batch", "act_seq", "act_embed")), new_cache, stats


_CACHE_AXES = ("cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")

_SAVE_ATTN_OUT = jax.checkpoint_policies.save_only_these_names("attn_out")
# The cuDNN forward's primitive in JAX (jax._src.cudnn.fused_attention_stablehlo); its outputs are
# the attention output and the fp32 softmax statistics its backward needs.
_CUDNN_FWD = "dot_product_attention_fwd_wrapper"


def _save_attention_out(prim, *avals, **params) -> bool:
    """Saves the attention output and, on the cuDNN path, the kernel's softmax statistics: the
    backward then reruns the layer's projections, norms and MLP but not the attention forward.
    On the XLA and splash paths only the output is saved and the attention forward is recomputed
    (the XLA path's probabilities are [B, N, S, S]; splash keeps its statistics internal)."""
    return getattr(prim, "name", "") == _CUDNN_FWD or _SAVE_ATTN_OUT(prim, *avals, **params)


_REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing, recompute the layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": _save_attention_out,
}


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, count: int, sparse: bool) -> Block:
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None, "logical_axes": "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs, sparse=sparse)

    return make(rngs)


def layer_runs(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(stack, start, stop): the layers in order as runs of consecutive layers of one stack
    (`ModelConfig.layer_groups`); one run over "layers" unless dense and sparse layers mix."""
    where = {i: (stack, j) for stack, ids in config.layer_groups.items() for j, i in enumerate(ids)}
    runs: list[tuple[str, int, int]] = []
    for i in range(config.num_layers):
        stack, j = where[i]
        if runs and runs[-1][0] == stack and runs[-1][2] == j:
            runs[-1] = (stack, runs[-1][1], j + 1)
        else:
            runs.append((stack, j, j + 1))
    return runs


# ---------------------------------------------------------------------------------------------
# The model


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__` returns fp32 logits [batch, seq, vocab] (and a new cache if given one)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pd, cd = dtype_of(config.param_dtype), dtype_of(config.compute_dtype)
        self.embed = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=cd, param_dtype=pd, embedding_init=_INIT,
            rngs=rngs, embedding_metadata={"logical_axes": ("vocab", "embed")},
        )
        groups, sparse = config.layer_groups, config.sparse_layers
        self.layers = _stacked_blocks(config, rngs, len(groups["layers"]), sparse[groups["layers"][0]])
        dense = groups.get("dense_layers")
        self.dense_layers = _stacked_blocks(config, rngs, len(dense), False) if dense else None
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pd, cd)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=cd, param_dtype=pd,
                kernel_init=_INIT, preferred_element_type=jnp.float32, rngs=rngs,
                kernel_metadata={"logical_axes": ("embed", "vocab")},
            )

    def __call__(
        self,
        input_ids: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
    ):
        """Logits [B, S, V] float32; with `cache`, (logits, updated cache): `logits(hidden_states(...))`.

        positions default to 0..S-1 per row (or continue from the cache index); segment_ids default to
        ones. Tokens attend to earlier-or-equal positions with the same segment id; 0 marks padding.
        """
        out = self.hidden_states(input_ids, positions, segment_ids, cache)
        if cache is None:
            return self.logits(out)
        hidden, cache = out
        return self.logits(hidden), cache

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        cache: Optional[KVCache] = None,
    ):
        """Final-norm hidden states [B, S, H] in the compute dtype (with `cache`: (hidden, new cache)).

        The model without its LM head, so a loss can run the head in chunks (`logits`). Arguments
        as for `__call__`.
        """
        hidden, cache, _ = self._hidden(input_ids, positions, segment_ids, cache)
        return hidden if cache is None else (hidden, cache)

    def hidden_states_and_router_stats(
        self, input_ids: jax.Array, positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
    ) -> tuple[jax.Array, Optional[moe.RouterStats]]:
        """(`hidden_states`, the router statistics summed over sparse layers and real tokens; None
        for a model without experts): what the training loss adds the load-balancing term from."""
        hidden, _, stats = self._hidden(input_ids, positions, segment_ids, None)
        return hidden, stats

    def _hidden(self, input_ids, positions, segment_ids, cache):
        b, s = input_ids.shape
        if positions is None:
            start = 0 if cache is None else cache.index
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + start, (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
        x = shd.shard_activation(self.embed_tokens(input_ids), ("act_batch", "act_seq", "act_embed"))
        cos, sin = rope_tables(positions, rope_inv_freq(self.config), dtype_of(self.config.compute_dtype))
        if cache is not None:
            x, cache = self._run_cached_layers(x, cos, sin, segment_ids, positions, cache)
            return self.final_norm(x), cache, None
        x, stats = self._run_layers(x, cos, sin, segment_ids, positions)
        return self.final_norm(x), None, stats

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits [B, S, V] (sharded on the vocab axis) from `hidden_states` [B, S, H]."""
        return shd.shard_activation(self.head_logits(hidden), ("act_batch", "act_seq", "act_vocab"))

    def head_logits(self, x):
        """fp32 logits [B, S, V] from the final hidden states [B, S, H], without `logits`' vocab-axis
        sharding constraint (the generation engine runs it on one token per row).

        Tokens are flattened to one [B*S, H] matrix first: with two contracted dims (batch, seq) in
        the backward, XLA:CPU writes the [B, S, V] logits gradient transposed (and recomputes the
        softmax grad to do so), which made this head's backward ~3x slower than the 2-D matmul.
        """
        b, s, _ = x.shape
        x = _flat(x)
        if self.lm_head is None:
            emb = self.embed.embedding.get_value().astype(x.dtype)
            logits = jnp.einsum("nh,vh->nv", x, emb, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32).reshape(b, s, -1)

    def embed_tokens(self, input_ids):
        """Token embeddings [B, S, H] in the compute dtype (ids past the table are clipped)."""
        # Gather the table's fsdp shards first (as FSDP does for every weight): a lookup into a
        # table sharded on its embed axis makes the partitioner replicate the whole gather.
        table = shd.shard_activation(self.embed.embedding.get_value(), ("vocab", None))
        # clip, not fill: an out-of-range pad id would otherwise give NaN rows that leak through 0*NaN.
        return jnp.take(table, input_ids, axis=0, mode="clip").astype(dtype_of(self.config.compute_dtype))

    def layer_runs(self) -> list[tuple[nnx.GraphDef, nnx.State]]:
        """(graphdef, stacked state) of each run of layers, in layer order (`layer_runs`): scan a
        layer body over each in turn to run the decoder."""
        out = []
        for stack, lo, hi in layer_runs(self.config):
            graphdef, state = nnx.split(getattr(self, stack))
            if (lo, hi) != (0, len(self.config.layer_groups[stack])):
                state = jax.tree.map(lambda a: a[lo:hi], state)
            out.append((graphdef, state))
        return out

    def _run_layers(self, x, cos, sin, segment_ids, positions):
        """jax.lax.scan of one layer body over each run's stacked layer state (see
        `_run_cached_layers`) -> (x, summed RouterStats of the sparse layers or None)."""
        total = None
        for graphdef, layer_state in self.layer_runs():

            def body(carry, state, graphdef=graphdef):
                out, _, stats = nnx.merge(graphdef, state)(carry, cos, sin, segment_ids, positions)
                return out, stats

            if self.config.remat != "none":
                body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False)
            x, stats = jax.lax.scan(body, x, layer_state)
            if stats is not None:
                stats = jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
                total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        return x, total

    def _run_cached_layers(self, x, cos, sin, segment_ids, positions, cache: KVCache):
        """The layer scan with a KV cache: writes the S new tokens' k/v at `cache.index`.

        The whole k/v buffers ride in the scan carry and each layer writes back only its S new
        slots. Scanning them as xs/ys instead makes XLA stack a fresh output buffer and copy every
        layer's slice into it, two cache-sized copies per decode step that the carry lets it update
        in place (and the sampler's donation then reaches all the way down). No remat: this path
        is inference only.
        """
        s, index = x.shape[1], jnp.asarray(cache.index, jnp.int32)
        # Slot metadata is written once and shared by every layer.
        seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, index, axis=1)
        pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, index, axis=1)
        keep = functools.partial(shd.shard_activation, logical_axes=_CACHE_AXES)

        def write_back(buf, layer_buf, i):
            # Attention clamps `index` like dynamic_slice does, so this reads exactly what it wrote.
            new = jax.lax.dynamic_slice_in_dim(layer_buf, index, s, axis=1)
            zero = jnp.zeros((), index.dtype)
            return keep(jax.lax.dynamic_update_slice(buf, new[None], (i, zero, index, zero, zero)))

        def body(carry, state, graphdef):
            h, k_all, v_all, i = carry
            layer_cache = (jax.lax.dynamic_index_in_dim(k_all, i, keepdims=False),
                           jax.lax.dynamic_index_in_dim(v_all, i, keepdims=False), seg, pos, index)
            h, (k_layer, v_layer), _ = nnx.merge(graphdef, state)(h, cos, sin, segment_ids, positions, layer_cache)
            return (h, write_back(k_all, k_layer, i), write_back(v_all, v_layer, i), i + 1), None

        carry = (x, keep(cache.k), keep(cache.v), jnp.zeros((), jnp.int32))
        for graphdef, layer_state in self.layer_runs():  # i counts layers across runs
            carry, _ = jax.lax.scan(functools.partial(body, graphdef=graphdef), carry, layer_state)
        x, k, v, _ = carry
        return x, KVCache(k, v, seg, pos, cache.index + s)


# ---------------------------------------------------------------------------------------------
# Construction


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, mesh=None) -> KVCache:
    """An empty cache (all slots segment 0), sharded by the cache_* rules when `mesh` is given."""
    dtype = dtype_of(config.compute_dtype) if dtype is None else dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.resolved_head_dim)

    def make():
        z = jnp.zeros(shape, dtype)
        ids = jnp.zeros((batch, max_len), jnp.int32)
        return KVCache(z, z, ids, ids, jnp.zeros((), jnp.int32))

    if mesh is None:
        return make()
    kv = shd.logical_to_sharding(_CACHE_AXES, mesh)
    ids = shd.logical_to_sharding(("cache_batch", "cache_seq"), mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(make, out_shardings=KVCache(kv, kv, ids, ids, rep))()


def abstract_model(config: ModelConfig, mesh=None) -> Transformer:
    """The model with every parameter a jax.ShapeDtypeStruct (with `.sharding` when `mesh` is given).

    No memory is allocated. See the module docstring for filling it with `model_from_state`.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    if mesh is None:
        return abstract
    graphdef, state = nnx.split(abstract)
    shardings = shd.state_shardings(state, mesh)

    def attach(v, s):
        value = v.get_value()
        return v.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=s.get_value()))

    state = jax.tree.map(attach, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def init_model(config: ModelConfig, mesh=None, seed: int = 0) -> Transformer:
    """A randomly initialised model whose parameters are created directly in their shardings."""
    graphdef, init = _compiled_init(config, mesh)
    if mesh is None:
        return nnx.merge(graphdef, init(jax.random.key(seed)))
    with jax.set_mesh(mesh):
        return nnx.merge(graphdef, init(jax.random.key(seed)))


@functools.lru_cache(maxsize=16)
def _compiled_init(config: ModelConfig, mesh):
    """(graphdef, jitted key -> state); cached because compiling the RNG graph takes seconds on CPU."""
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))

    def make(key):
        return nnx.state(Transformer(config, rngs=nnx.Rngs(key)))

    if mesh is None:
        return graphdef, jax.jit(make)
    return graphdef, jax.jit(make, out_shardings=shd.state_shardings(abs_state, mesh))


def flat_abstract_state(model: Transformer) -> dict[str, jax.ShapeDtypeStruct | jax.Array]:
    """{"layers.attn.q_proj.kernel": leaf, ...}: the model's parameters by contract path."""
    return {".".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(nnx.state(model))}


def model_from_state(abstract: Transformer, flat: dict[str, jax.Array]) -> Transformer:
    """A live model from an abstract one and {path: array}. Every path must be given, with its shape;
    arrays of another dtype are cast to the parameter dtype (e.g. bf16 checkpoint, fp32 params)."""
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_flat_state(state)
    names = {".".join(str(p) for p in path) for path, _ in expected}
    missing, extra = sorted(names - set(flat)), sorted(set(flat) - names)
    if missing or extra:
        raise KeyError(f"model_from_state: missing parameters {missing}, unexpected parameters {extra}")
    leaves = []
    for path, var in expected:
        name = ".".join(str(p) for p in path)
        want, got = var.get_value(), flat[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"model_from_state: {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        if got.dtype != want.dtype:
            got = got.astype(want.dtype)
        leaves.append((path, var.replace(got)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))
