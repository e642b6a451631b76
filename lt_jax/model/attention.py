"""Causal multi-head attention with GQA and packed rows, behind one function for every platform.

Shapes: q [batch, q_len, num_heads, head_dim]; k, v [batch, kv_len, num_kv_heads, head_dim];
segment ids and positions [batch, len] (int32). A query attends to a key when their segment ids are
equal and (causal) the key's position is <= the query's. Segment id 0 marks padding; padding rows
still see at least themselves, so nothing produces NaN.

Implementations:
  xla     einsum + dense mask. Reference, CPU path, and the decode path (q_len != kv_len).
  cudnn   cuDNN flash attention through JAX's cuDNN custom call, using its packed ("THD") layout:
          segment boundaries become per-row `q_offsets`/`q_seqlen` arrays, so packed rows cost no
          dense mask. `jax.nn.dot_product_attention` only takes one length per row (no segments)
          or a dense [B,1,S,S] mask (4 GiB per row at 32k in bf16, which defeats a flash kernel),
          so we call `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, the function
          the public API wraps, with offsets. Segments must be contiguous runs (what packing makes)
          and at most `max_segments` runs per row, padding included (the loader checks every batch;
          a row over the ceiling comes out NaN rather than attending across documents). Needs a
          Hopper-or-newer GPU and cuDNN >= 9.6 (`cudnn_unsupported_reason`). Under GQA, JAX <= 0.10.2
          scales the k/v offsets by the query's head count (fixed upstream in jax-ml/jax#39521, in
          no release yet), so k/v are repeated to the query heads while the installed JAX has that
          bug (`_kv_offsets_use_query_heads` asks JAX's own offset conversion).
  splash  TPU splash attention (Pallas/Mosaic) with SegmentIds, wrapped in `jax.shard_map` over the
          active mesh (Mosaic kernels cannot be partitioned automatically): batch is split over
          (data, fsdp), heads over tensor, each device runs the kernel on its block.
  auto    splash on TPU, cudnn on GPU (when their shape/dtype/platform constraints hold), xla
          elsewhere; a GPU that cannot run cudnn falls back to xla with a one-line warning.
When the active mesh has a `context` axis above 1 (sequence sharded for long rows), self-attention
goes to lt_jax/model/context_parallel.py instead: all-gathered k/v into splash on TPU, the ring
(ppermute k/v blocks, online softmax) elsewhere; `impl` picks the kernel there the same way.
The fused kernels use index order for causality; packed rows have increasing positions within a
segment, so that matches the position rule of the xla path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from lt_jax.model import context_parallel as cp
from lt_jax.model import kernels
from lt_jax.model import sharding as shd
from lt_jax.model.kernels import make_mask, splash_kernel, splash_local, xla_attention  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

Impl = Literal["auto", "xla", "cudnn", "splash"]

# JAX's packed (offsets) cuDNN layout: Hopper or newer (JAX refuses older GPUs) and cuDNN 9.6+ (what
# JAX's own packed-layout test requires); compute capability 10.3 needs cuDNN 9.11+ (JAX's check).
CUDNN_PACKED_MIN_CC = (9, 0)
CUDNN_PACKED_MIN_VERSION = 90600
DEFAULT_MAX_SEGMENTS = 64  # see ModelConfig.max_segments


@dataclasses.dataclass(frozen=True)
class Platform:
    """What the attention choice depends on: the default backend and, on a GPU, its properties."""

    backend: str
    device_kind: str = ""
    compute_capability: Optional[tuple[int, int]] = None  # CUDA GPUs only
    cudnn_version: Optional[int] = None  # e.g. 90600 for 9.6.0; None when cuDNN is not found


@functools.lru_cache(maxsize=1)
def platform() -> Platform:
    """The default backend's Platform (cached: it cannot change within a process)."""
    backend = jax.default_backend()
    if backend != "gpu":
        return Platform(backend)
    device = jax.devices()[0]
    cc = getattr(device, "compute_capability", None)  # "9.0" on CUDA; absent on ROCm
    try:
        from jax._src.lib import cuda_versions  # jax-private, absent without CUDA: guarded

        cudnn = int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
    except Exception:  # no CUDA plugin: no cuDNN
        cudnn = None
    return Platform(
        backend, device.device_kind, tuple(int(x) for x in str(cc).split(".")[:2]) if cc else None, cudnn
    )


def cudnn_unsupported_reason(info: Platform, dtype=jnp.bfloat16, head_dim: int = 128) -> Optional[str]:
    """Why JAX's packed cuDNN attention cannot run here (None when it can), by the rule in the
    module doc: an NVIDIA GPU of compute capability >= 9.0, cuDNN >= 9.6 (9.11 on cc 10.3),
    bf16/fp16 inputs, head_dim a multiple of 8 up to 256."""
    if info.backend != "gpu" or info.compute_capability is None:
        return f"cuDNN flash attention needs an NVIDIA GPU (backend is {info.backend})"
    where = f"{info.device_kind or 'this GPU'} (compute capability {'.'.join(map(str, info.compute_capability))})"
    if info.compute_capability < CUDNN_PACKED_MIN_CC:
        return f"{where}: JAX's packed cuDNN layout needs Hopper (9.0) or newer"
    if info.cudnn_version is None:
        return f"{where}: cuDNN was not found"
    need = 91100 if info.compute_capability == (10, 3) else CUDNN_PACKED_MIN_VERSION
    if info.cudnn_version < need:
        return f"{where}: cuDNN {_version(info.cudnn_version)} found, packed attention needs >= {_version(need)}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash attention needs head_dim a multiple of 8 up to 256, got {head_dim}"
    return None


def _version(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:
    log.warning("attention=auto: using the XLA path (dense [S, S] logits per head), not cuDNN: %s", reason)


def resolve_impl(impl: Impl, q_len: int, kv_len: int, dtype=jnp.bfloat16, head_dim: int = 128) -> str:
    """The implementation `impl` means on this backend for these shapes.

    Rule: "auto" picks a fused kernel only where its constraints hold (splash: TPU, length a
    multiple of 128; cuDNN: `cudnn_unsupported_reason` is None) and falls back to xla otherwise,
    with a one-line warning (once per reason) when on a GPU. An explicit "cudnn" that cannot run
    here is an error that says why; other explicit impls are taken as asked.
    """
    if q_len != kv_len:
        return "xla"  # decode against a cache: the fused training kernels assume self-attention
    if impl == "cudnn":
        reason = cudnn_unsupported_reason(platform(), dtype, head_dim)
        if reason:
            raise ValueError(f"attention impl 'cudnn' cannot run here: {reason}; use attention=auto or xla")
        return "cudnn"
    if impl != "auto":
        return impl
    info = platform()
    if info.backend == "gpu":
        reason = cudnn_unsupported_reason(info, dtype, head_dim)
        if reason is None:
            return "cudnn"
        _warn_fallback(reason)
    if info.backend == "tpu" and q_len % 128 == 0:
        return "splash"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool = True,
    impl: Impl = "auto",
    scale: Optional[float] = None,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
) -> jax.Array:
    """Attention output [batch, q_len, num_heads, head_dim] in q's dtype (see module doc)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"num_heads {q.shape[2]} is not a multiple of num_kv_heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mesh = shd.active_mesh()
    context = shd.axis_size(mesh, "context")
    # Rows that do not split evenly (a short prompt bucket when sampling) take the plain path,
    # which the partitioner gathers as needed.
    if q.shape[1] == k.shape[1] and context > 1 and q.shape[1] % context == 0:
        strategy, kernel = cp.choose(impl, jax.default_backend(), q.shape[1] // context)
        return cp.context_attention(
            q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, mesh=mesh, causal=causal,
            scale=scale, strategy=strategy, kernel=kernel,
        )
    chosen = resolve_impl(impl, q.shape[1], k.shape[1], q.dtype, q.shape[-1])
    if chosen == "xla":
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal, scale)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, q_segment_ids, causal, scale, max_segments)
    if chosen == "splash":
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal, scale)
    raise ValueError(f"unknown attention impl {impl!r}; use auto, xla, cudnn or splash")


def segment_offsets(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """cuDNN packed layout: (seqlens [B, M], start offsets [B, M+1]) of each contiguous run, -1 padded.

    Padding (segment 0) is its own segment here: its outputs are ignored by the loss anyway, and
    keeping it makes every token belong to exactly one segment.
    """
    b, s = segment_ids.shape
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )

    def row(start_row):
        (idx,) = jnp.nonzero(start_row, size=max_segments, fill_value=-1)
        n = jnp.sum(idx >= 0)
        ends = jnp.where(jnp.arange(max_segments) < n - 1, jnp.roll(idx, -1), s)
        lens = jnp.where(idx >= 0, ends - idx, -1)
        # Start of each segment, -1 padded to M+1 entries (JAX's packed-layout contract).
        offsets = jnp.concatenate([idx, jnp.full((1,), -1, idx.dtype)])
        return lens.astype(jnp.int32), offsets.astype(jnp.int32)

    return jax.vmap(row)(starts)


@functools.lru_cache(maxsize=1)
def _kv_offsets_use_query_heads() -> bool:
    """True when the installed JAX converts packed k/v offsets with the query's head count.

    Asks JAX's own conversion (`_fix_seqlen_offsets`, plain jnp) about a 2-token row with 2 query
    heads and 1 kv head of size 1: the second token's k/v element offset is 1, and the bug makes
    it 2. Anything unexpected (the private function moved) counts as the bug: repeating k/v is
    correct either way, only slower.
    """
    try:
        from jax._src.cudnn.fused_attention_stablehlo import _fix_seqlen_offsets  # jax-private: guarded

        with jax.ensure_compile_time_eval():
            lens = jnp.array([[1, 1]], jnp.int32)
            offsets = jnp.array([[0, 1, -1]], jnp.int32)
            q, k = jnp.zeros((1, 2, 2, 1), jnp.bfloat16), jnp.zeros((1, 2, 1, 1), jnp.bfloat16)
            kv_offsets = _fix_seqlen_offsets(lens, lens, offsets, offsets, q, k)[3]
            return int(kv_offsets[0, 1]) != 1
    except Exception:
        return True


def cudnn_operands(q, k, v, segment_ids, max_segments: int):
    """(q, k, v, seqlens [B, M], offsets [B, M+1]): exactly what `cudnn_attention` hands to JAX.

    Under GQA with a JAX whose offset conversion uses the query's head count for k/v, k and v are
    repeated to the query heads (q head h reads kv head h // group, HF's layout), so the k/v
    per-token stride is the query's and JAX's conversion lands on the right tokens.
    """
    if k.shape[2] != q.shape[2] and _kv_offsets_use_query_heads():
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    seqlens, offsets = segment_offsets(segment_ids, min(max_segments, segment_ids.shape[1]))
    return q, k, v, seqlens, offsets


def segment_overflow(segment_ids: jax.Array, max_segments: int) -> jax.Array:
    """Bool [B]: rows holding more contiguous runs (padding included) than `max_segments`."""
    runs = 1 + jnp.sum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
    return runs > max_segments


def cudnn_attention(q, k, v, segment_ids, causal, scale, max_segments):
    """cuDNN flash attention over packed rows (see module doc). GPU only.

    A row with more runs than `max_segments` would have its tail merged into one segment (its
    documents attending to each other); it comes out NaN instead, so the loss says so at once.
    The loader guarantees this never happens in training (it checks each batch on the host).
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # jax-private: a move breaks cuDNN only

    q, k, v, seqlens, offsets = cudnn_operands(q, k, v, segment_ids, max_segments)
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    out = cudnn.dot_product_attention(
        q, k, v, None, None, seqlens, seqlens, offsets, offsets,
        scale=scale, mask_type=mask_type, qkv_layout="BTNH",
    )
    bad = segment_overflow(segment_ids, offsets.shape[1] - 1)
    return jnp.where(bad[:, None, None, None], jnp.asarray(jnp.nan, out.dtype), out)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, interpret: bool = False):
    """TPU splash attention, shard_mapped over the active mesh (batch over data/fsdp, heads over tensor).

    Splash handles GQA itself (q head i reads kv head i // group, HF's layout). When the kv heads do
    not divide over the tensor axis (e.g. 4 kv heads, tensor=8), k/v stay replicated over tensor and
    each device slices the one kv head its q heads read.
    """
    seq = q.shape[1]
    if seq % 128:
        raise ValueError(f"splash attention needs seq_len divisible by 128, got {seq}; pad the batch or use impl='xla'")
    mesh = shd.active_mesh()
    if mesh is None:
        return _splash_local(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale, interpret=interpret,
                             kv_slice=None)
    heads = shd.mesh_spec(("act_batch", "act_seq", "act_heads", "act_head_dim"), mesh)
    kv_heads = shd.mesh_spec(("act_batch", "act_seq", "act_kv_heads", "act_head_dim"), mesh)
    ids = shd.mesh_spec(("act_batch", "act_seq"), mesh)
    kv_heads, kv_slice = kernels.kv_head_layout(k.shape[2], heads, kv_heads, mesh)
    fn = functools.partial(_splash_local, causal=causal, scale=scale, interpret=interpret, kv_slice=kv_slice)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, ids, ids), out_specs=heads, check_vma=False
    )(q, k, v, q_segment_ids, kv_segment_ids)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, interpret, kv_slice):
    """Splash on one device's block: q [b, s, nq, d], k/v [b, s, nkv, d]."""
    k, v = kernels.slice_kv_heads(k, v, kv_slice)
    kernel = splash_kernel(q.shape[2], q.shape[1], causal, interpret)
    return splash_local(kernel, q, k, v, q_segment_ids, kv_segment_ids, scale)
