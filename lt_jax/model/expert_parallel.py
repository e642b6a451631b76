"""Expert parallelism: the MoE experts' FFN with the experts split over the `expert` mesh axis.

`expert_parallel_ffn(x [T, H], weights [T, k], experts [T, k], w_gate [E, H, I], w_up [E, H, I],
w_down [E, I, H], capacity_factor, valid) -> [T, H]` is `lt_jax.model.moe.experts_ffn` (sum_j
weights[t, j] * FFN_{experts[t, j]}(x[t]), SwiGLU experts) inside `jax.shard_map` over the whole
active mesh:

  tokens   [T, ...] split over the batch and sequence axes (act_batch + act_seq: data, fsdp,
           expert, context, dcn_data), as every activation is; replicated over tensor.
  experts  w_* split over `expert` on their E dimension (the `experts` rule) and over `tensor` on
           their I dimension (the `moe_mlp` rule); their fsdp shards (the `embed` rule) are gathered at
           the shard_map boundary, as FSDP gathers every weight, and the gradient reduce-scattered.

Per MoE layer each device
  1. all-gathers the tokens (and their routing) of the devices that differ from it only along
     `expert`: afterwards the e devices of an expert group hold the same tokens, e x T_local;
  2. runs `lt_jax.model.moe.experts_ffn` with its E/e local experts on the (token, slot) pairs
     routed to them, dropless: pairs sorted by local expert, one grouped matmul per projection
     (lt_jax.model.grouped_matmul, megablox on TPU); pairs routed elsewhere get an id past the last
     local expert, so they sort past the last group, where the grouped matmul gives zero rows and
     megablox does no work;
  3. sums the partial outputs: psum_scatter over `expert` returns each device its own tokens, with
     every expert's contribution; a psum over `tensor` adds the I shards (Megatron's row-parallel
     down projection).

Why all-gather and reduce-scatter rather than all-to-all: with dropless routing and static shapes
the receiving buffer must hold the worst case (every pair routed to one device's experts), which is
the e x T_local x k rows of the gathered layout anyway, so an all-to-all saves no memory without a
ragged all-to-all; it also sends each token once per slot (k x T x H, k = 8 for Qwen3-MoE) where the
all-gather sends it once per expert device ((e - 1) x T x H), no more for e <= k + 1. The two
collectives are each other's transpose, every backend runs them (the CPU test mesh included), and
their sizes do not depend on the routing. What grows with e is the index work (sort, gather,
scatter) on the e x T_local x k gathered pairs, not the grouped matmuls' FLOPs.

`needed(mesh)` says when a layer must take this path: an expert axis above 1, or a TPU mesh of
several devices (XLA cannot partition the Mosaic megablox kernel, so it runs inside shard_map).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lt_jax.model import grouped_matmul as gm
from lt_jax.model import moe
from lt_jax.model import sharding as shd

AXIS = "expert"


def needed(mesh) -> bool:
    """True when the MoE experts must run through `expert_parallel_ffn` on `mesh` (a Mesh or the
    active AbstractMesh; None: no mesh)."""
    if mesh is None or mesh.size == 1:
        return False
    return shd.axis_size(mesh, AXIS) > 1 or gm.resolve_impl("auto", shd.target_platform(mesh)) == "megablox"


token_spec = shd.token_spec  # [tokens, features]: split like the flattened activations


def expert_parallel_ffn(x, weights, experts, w_gate, w_up, w_down, capacity_factor: Optional[float] = None,
                        valid: Optional[jax.Array] = None, *, mesh=None) -> jax.Array:
    """`moe.experts_ffn` ([T, H], x's dtype) over the active mesh (or `mesh`); see the module doc.

    `capacity_factor` (optional) limits each expert per expert group: ceil(factor * k * tokens of
    the group / E) slots, so the same factor keeps about the same share of slots as on one device,
    but which slots are dropped depends on how tokens are split (as in every per-device capacity).
    """
    mesh = shd.active_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("expert_parallel_ffn needs a mesh (jax.set_mesh or mesh=)")
    e = shd.axis_size(mesh, AXIS)
    if w_gate.shape[0] % e:
        raise ValueError(f"num_experts {w_gate.shape[0]} is not divisible by mesh.expert {e}")
    tokens = token_spec(mesh)
    if e > 1 and AXIS not in (tokens[0] or ()):
        raise ValueError(f"the act_batch rule must include the {AXIS!r} axis on an expert mesh, got {tokens[0]!r}")
    up_spec = shd.mesh_spec(("experts", None, "moe_mlp"), mesh)
    down_spec = shd.mesh_spec(("experts", "moe_mlp", None), mesh)
    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid.astype(bool)
    local = functools.partial(_local, e=e, sum_axes=shd.spec_axes(up_spec[2]), capacity_factor=capacity_factor)
    specs = (tokens, tokens, tokens, PartitionSpec(tokens[0]), up_spec, up_spec, down_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False)(
        x, weights, experts, valid, w_gate, w_up, w_down)


def _local(x, weights, experts, valid, w_gate, w_up, w_down, *, e, sum_axes, capacity_factor):
    """One device: gather its expert group's tokens, run its experts, reduce-scatter the outputs."""
    local_experts = w_gate.shape[0]
    if e > 1:
        gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=0, tiled=True)
        x, weights, experts, valid = gather(x), gather(weights), gather(experts), gather(valid)
        experts = experts - jax.lax.axis_index(AXIS) * local_experts
        # Pairs routed to other devices' experts get id E_local: experts_ffn sorts them past its
        # last group, where the grouped matmul gives zero rows (and megablox does no work).
        experts = jnp.where((experts >= 0) & (experts < local_experts), experts, local_experts)
        # experts_ffn's capacity is ceil(factor * slots / E_local); slots here are the group's
        # tokens times k, so factor / e gives factor * slots / E, as on one device.
        capacity_factor = None if capacity_factor is None else capacity_factor / e
    out = moe.experts_ffn(x, weights, experts, w_gate, w_up, w_down, capacity_factor, valid)
    if e > 1:
        out = jax.lax.psum_scatter(out, AXIS, scatter_dimension=0, tiled=True)
    if sum_axes:
        out = jax.lax.psum(out, sum_axes)
    return out


__all__ = ["expert_parallel_ffn", "needed", "token_spec", "AXIS"]
