"""Expert parallelism: the MoE experts' FFN with the experts split over the `expert` mesh axis.

`expert_parallel_ffn(x [T, H], weights [T, k], experts [T, k], w_gate [E, H, I], w_up [E, H, I],
w_down [E, I, H]) -> [T, H]` computes sum_j weights[t, j] * FFN_{experts[t, j]}(x[t]) (SwiGLU experts)
inside `jax.shard_map` over the whole active mesh:

  tokens   [T, ...] split over the batch and sequence axes (act_batch + act_seq: data, fsdp,
           expert, context, dcn_data), as every activation is; replicated over tensor.
  experts  w_* split over `expert` on their E dimension (the `experts` rule) and over `tensor` on
           their I dimension (the `mlp` rule); their fsdp shards (the `embed` rule) are gathered at
           the shard_map boundary, as FSDP gathers every weight, and the gradient reduce-scattered.

Per MoE layer each device
  1. all-gathers the tokens (and their routing) of the devices that differ from it only along
     `expert`: afterwards the e devices of an expert group hold the same tokens, e x T_local;
  2. runs its E/e local experts on the (token, slot) pairs routed to them, dropless: pairs sorted
     by local expert, one grouped matmul per projection (lt_jax.model.grouped_matmul, megablox on
     TPU), pairs routed elsewhere sorted past the last group, where the grouped matmul gives zeros
     and megablox does no work;
  3. sums the partial outputs: psum_scatter over `expert` returns each device its own tokens, with
     every expert's contribution; a psum over `tensor` adds the I shards (Megatron's row-parallel
     down projection).

Why all-gather and reduce-scatter rather than all-to-all: with dropless routing and static shapes
the receiving buffer must hold the worst case (every pair routed to one device's experts), which is
the e x T_local x k rows of the gathered layout anyway, so an all-to-all saves no memory without a
ragged all-to-all; it also sends each token once per slot (k x T x H, k = 8 for Qwen3-MoE) where the
all-gather sends it once per expert device ((e - 1) x T x H), no more for e <= k + 1. The two
collectives are each other's transpose, every backend runs them (the CPU test mesh included), and
their sizes do not depend on the routing. The cost is compute on the e x T_local x k sorted rows'
index work (sort, gather, scatter), not on the grouped matmuls, which skip the rows routed away.

`needed(mesh)` says when a layer must take this path: an expert axis above 1, or a TPU mesh of
several devices (XLA cannot partition the Mosaic megablox kernel, so it runs inside shard_map).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lt_jax.model import grouped_matmul as gm
from lt_jax.model import sharding as shd

AXIS = "expert"


def needed(mesh, impl: gm.Impl = "auto") -> bool:
    """True when the MoE experts must run through `expert_parallel_ffn` on `mesh` (None: no mesh)."""
    if mesh is None or mesh.size == 1:
        return False
    return shd.axis_size(mesh, AXIS) > 1 or gm.resolve_impl(impl) == "megablox"


def token_spec(mesh) -> PartitionSpec:
    """[tokens, features] split like flattened [batch, seq, features] activations (see `_shard_tokens`
    in lt_jax/model/transformer.py): tokens over the batch and sequence axes together."""
    batch, seq = shd.mesh_spec(("act_batch", "act_seq"), mesh)
    axes = tuple(a for entry in (batch, seq) if entry for a in ((entry,) if isinstance(entry, str) else entry))
    return PartitionSpec(axes or None, None)


def expert_parallel_ffn(x, weights, experts, w_gate, w_up, w_down, *, mesh=None, impl: gm.Impl = "auto",
                        interpret: bool = False) -> jax.Array:
    """The MoE experts' output [T, H] (x's dtype) over the active mesh (or `mesh`); see the module doc."""
    mesh = shd.active_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("expert_parallel_ffn needs a mesh (jax.set_mesh or mesh=)")
    e = shd.axis_size(mesh, AXIS)
    num_experts = w_gate.shape[0]
    if num_experts % e:
        raise ValueError(f"num_experts {num_experts} is not divisible by mesh.expert {e}")
    tokens = token_spec(mesh)
    if e > 1 and AXIS not in (tokens[0] or ()):
        raise ValueError(f"the act_batch rule must include the {AXIS!r} axis on an expert mesh, got {tokens[0]!r}")
    up_spec = shd.mesh_spec(("experts", None, "mlp"), mesh)
    down_spec = shd.mesh_spec(("experts", "mlp", None), mesh)
    local = functools.partial(_local, e=e, sum_axes=_axes(up_spec[2]), impl=gm.resolve_impl(impl),
                              interpret=interpret)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, up_spec, up_spec, down_spec), out_specs=tokens,
        check_vma=False,
    )(x, weights, experts, w_gate, w_up, w_down)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _local(x, weights, experts, w_gate, w_up, w_down, *, e, sum_axes, impl, interpret):
    """One device: gather its expert group's tokens, run its experts, reduce-scatter the outputs."""
    if e > 1:
        gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=0, tiled=True)
        x, weights, experts = gather(x), gather(weights), gather(experts)
        first = jax.lax.axis_index(AXIS) * w_gate.shape[0]
    else:
        first = 0
    out = local_experts_ffn(x, weights, experts - first, w_gate, w_up, w_down, impl=impl, interpret=interpret)
    if e > 1:
        out = jax.lax.psum_scatter(out, AXIS, scatter_dimension=0, tiled=True)
    if sum_axes:
        out = jax.lax.psum(out, sum_axes)
    return out


def local_experts_ffn(x, weights, experts, w_gate, w_up, w_down, *, impl: gm.Impl = "auto",
                      interpret: bool = False) -> jax.Array:
    """sum_j weights[t, j] * FFN_{experts[t, j]}(x[t]) over the pairs whose expert id is in
    [0, E) (E = w_gate.shape[0]); pairs with other ids (experts on other devices) add nothing."""
    num_experts, k = w_gate.shape[0], experts.shape[1]
    mine = (experts >= 0) & (experts < num_experts)
    key = jnp.where(mine, experts, num_experts).reshape(-1)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.sum(key[None, :] == jnp.arange(num_experts)[:, None], axis=1).astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)
    mm = functools.partial(gm.grouped_matmul, group_sizes=group_sizes, impl=impl, interpret=interpret)
    w_gate, w_up, w_down = (w.astype(x.dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up)
    scale = jnp.where(mine, weights, 0).reshape(-1)[order].astype(x.dtype)
    return jnp.zeros_like(x).at[order // k].add(mm(hidden, w_down) * scale[:, None])


__all__ = ["expert_parallel_ffn", "local_experts_ffn", "needed", "token_spec", "AXIS"]
