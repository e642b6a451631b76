"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter is created with a `logical_axes` metadata tuple (one name per dimension) and every
activation constraint names its dimensions the same way; `LOGICAL_RULES` below is the only place
that says which mesh axes those names land on. Changing the parallelism layout means editing that
table, never the model.

Mesh axes:
  data    pure data parallelism: parameters replicated, batch split.
  fsdp    batch split AND parameters sharded (ZeRO-3 style); weights all-gathered per layer.
  tensor  Megatron-style tensor parallelism over heads / MLP width / vocab.
Two optional axes join the mesh only when their size is above 1 (so a plain mesh keeps exactly
the three names above):
  context   sequence sharding for long rows: activations split along the sequence, attention
            runs context-parallel (lt_jax/model/context_parallel.py), and weights are sharded over
            fsdp x context together (ZeRO-3 over both), since context devices hold different tokens
            of the same rows just as fsdp devices hold different rows.
  dcn_data  data parallelism across TPU slices (multi-slice over the data-center network): the batch
            is split over it, parameters are replicated per slice, so the only cross-slice traffic
            is one gradient all-reduce per step.
  expert    expert parallelism for mixture-of-experts layers: the experts' weights are split over it
            (the `experts` dimension), and, since its devices would otherwise hold the same tokens,
            the batch is split over it too and the other weights are sharded over it as over fsdp.
            The MoE layer brings tokens to their experts' devices and back
            (lt_jax/model/expert_parallel.py).
`rules_for(mesh.axis_names)` is the table for a given mesh: the base table plus these extensions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lt_jax.config import ConfigError, from_dict

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")  # every mesh has these
# Every axis a mesh may have, outermost (slowest links) first: mesh_utils lays the last axes onto
# the nearest chips, so tensor and context (one collective per layer each) get the fastest links.
ALL_MESH_AXES: tuple[str, ...] = ("dcn_data", "data", "fsdp", "context", "expert", "tensor")
OPTIONAL_AXES: tuple[str, ...] = ("dcn_data", "context", "expert")

MeshAxes = Union[None, str, tuple[str, ...]]

# (logical name, mesh axes). Parameter names first, then activations (prefixed act_), then the
# KV cache. A name missing here is an error, so a typo cannot silently replicate a tensor.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),  # fused Nq * head_dim output of q_proj / input of o_proj
    ("kv_heads", "tensor"),  # fused Nkv * head_dim output of k_proj / v_proj
    ("mlp", "tensor"),
    ("experts", None),  # the expert dimension of MoE weights [E, ...]: over `expert` when the mesh has it
    ("layers", None),  # the scanned axis: every device holds its slice of every layer
    ("norm", None),
    ("moe_mlp", "tensor"),  # an expert's intermediate width
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache [layers, batch, max_len, kv_heads, head_dim] and its per-slot metadata [batch, max_len]
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

# What the optional axes add to LOGICAL_RULES when a mesh has them: (logical name, axes appended
# to its entry, or prepended when the key is marked "first").
AXIS_EXTENSIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "dcn_data": (("act_batch", "first"), ("cache_batch", "first")),
    "context": (("act_seq", "last"), ("embed", "last")),
    "expert": (("experts", "last"), ("act_batch", "last"), ("cache_batch", "last"), ("embed", "last")),
}


def rules_for(axis_names: Sequence[str], rules=LOGICAL_RULES) -> tuple[tuple[str, MeshAxes], ...]:
    """The logical-axis table for a mesh with `axis_names`: `rules` plus the optional axes' entries."""
    extra = [(axis, name, where) for axis in OPTIONAL_AXES if axis in axis_names
             for name, where in AXIS_EXTENSIONS[axis]]
    if not extra:
        return tuple(rules)
    table = {name: spec_axes(target) for name, target in rules}
    for axis, name, where in extra:
        table[name] = (axis, *table[name]) if where == "first" else (*table[name], axis)
    return tuple((name, None if not t else t[0] if len(t) == 1 else t) for name, t in table.items())


def spec_axes(target: MeshAxes) -> tuple[str, ...]:
    """The mesh axis names of one PartitionSpec entry or rule target (a name, names, or None)."""
    return (target,) if isinstance(target, str) else tuple(target or ())


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 (at most one of data/fsdp/context/tensor) takes whatever devices
    the others leave. `context` > 1 shards sequences (long rows); `dcn_data` is the number of TPU
    slices (multi-slice), over which only the batch is split; `expert` > 1 splits MoE experts."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1
    dcn_data: int = 1
    expert: int = 1

    def __post_init__(self):
        if self.dcn_data == -1:
            raise ValueError("MeshConfig: dcn_data is the number of slices and cannot be -1")
        sizes = self.sizes()
        wild = [name for name, n in sizes.items() if n == -1]
        if len(wild) > 1:
            raise ValueError(f"MeshConfig: only one axis may be -1, got -1 for {', '.join(wild)}")
        bad = [f"{name}={n}" for name, n in sizes.items() if n == 0 or n < -1]
        if bad:
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {', '.join(bad)}")

    def sizes(self) -> dict[str, int]:
        """Sizes of the axes this mesh has, in mesh order (optional axes only when above 1)."""
        return {name: getattr(self, name) for name in ALL_MESH_AXES
                if name not in OPTIONAL_AXES or getattr(self, name) != 1}

    def axis_names(self) -> tuple[str, ...]:
        return tuple(self.sizes())

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices`, or a ValueError naming the fields to change."""
        sizes = self.sizes()
        fixed = math.prod(n for n in sizes.values() if n != -1)
        wild = [name for name, n in sizes.items() if n == -1]
        product = "*".join(sizes)
        if wild:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig: {_describe(sizes)} cannot fill {num_devices} devices: the fixed axes "
                    f"multiply to {fixed}, which does not divide {num_devices}; change "
                    f"{', '.join(n for n in sizes if n not in wild)}"
                )
            sizes[wild[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig: {product} = {_describe(sizes)} = {fixed}, but there are {num_devices} "
                f"devices; make the product match or set one of {', '.join(n for n in sizes if n != 'dcn_data')} to -1"
            )
        return sizes


def _describe(sizes: dict[str, int]) -> str:
    return "*".join(f"{k}({v})" for k, v in sizes.items())


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh with axes `cfg.axis_names()` (data, fsdp, tensor, plus context/dcn_data/expert when above 1)
    of Auto type (NNX needs Auto, not Explicit).

    Uses `jax.experimental.mesh_utils` to lay the axes onto the physical topology so that
    `tensor` (the chattiest axis) lands on the fastest links. With dcn_data > 1 the devices must
    span that many TPU slices (`slice_index`): each slice holds the same ICI mesh, and only
    dcn_data crosses slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    names = tuple(sizes)
    shape = tuple(sizes.values())
    if cfg.dcn_data > 1:
        grid = _hybrid_grid(sizes, devices, mesh_utils)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _hybrid_grid(sizes: dict[str, int], devices, mesh_utils) -> np.ndarray:
    """Devices for a multi-slice mesh: dcn_data across slices, the other axes within each slice."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    n = sizes["dcn_data"]
    ici = tuple(1 if a == "dcn_data" else s for a, s in sizes.items())
    dcn = tuple(n if a == "dcn_data" else 1 for a in sizes)
    if None in slices or len(slices) == 1:
        # No slice structure (CPU tests, one GPU cluster): dcn_data is just an outer data axis.
        return np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    if len(slices) != n:
        raise ValueError(
            f"MeshConfig: dcn_data={n} but the devices span {len(slices)} slices; set dcn_data={len(slices)}"
        )
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)


def logical_to_spec(logical_axes: Sequence[Optional[str]], rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names (None = replicated dimension).

    A mesh axis already used by an earlier dimension is dropped from later ones, since one mesh
    axis can shard only one dimension of an array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in lt_jax.model.sharding.LOGICAL_RULES")
        target = table[name]
        axes = tuple(a for a in spec_axes(target) if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[Optional[str]], mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding on `mesh` for an array whose dimensions carry `logical_axes` (default rules:
    `rules_for(mesh.axis_names)`)."""
    rules = rules_for(mesh.axis_names) if rules is None else rules
    return NamedSharding(mesh, restrict_spec(logical_to_spec(logical_axes, rules), mesh.axis_names))


def restrict_spec(spec: PartitionSpec, axis_names: Sequence[str]) -> PartitionSpec:
    """`spec` without the mesh axes a mesh lacks (e.g. a 1-axis mesh in a user script)."""
    names = set(axis_names)

    def keep(entry):
        if entry is None:
            return None
        axes = tuple(a for a in spec_axes(entry) if a in names)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return PartitionSpec(*(keep(e) for e in spec))


def mesh_spec(logical_axes: Sequence[Optional[str]], mesh) -> PartitionSpec:
    """The PartitionSpec of `logical_axes` on `mesh` (its own rules, its own axes): for shard_map."""
    return restrict_spec(logical_to_spec(logical_axes, rules_for(mesh.axis_names)), mesh.axis_names)


def variable_logical_axes(variable) -> tuple:
    """The logical axes a parameter was created with (every lt_jax parameter has them)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"variable of shape {variable.get_value().shape} has no logical_axes metadata")
    return tuple(axes)


def state_shardings(state, mesh: Mesh, rules=None):
    """The state tree with every Variable's value replaced by its NamedSharding.

    `state` is an `nnx.State` (abstract or live); the result has the same structure, so it can be
    given to `jax.jit(out_shardings=...)` or read leaf by leaf.
    """
    def one(v):
        spec = logical_to_sharding(variable_logical_axes(v), mesh, rules)
        if len(spec.spec) != len(v.get_value().shape):
            raise ValueError(f"logical_axes {variable_logical_axes(v)} do not match shape {v.get_value().shape}")
        return v.replace(spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model, mesh: Mesh, rules=None) -> dict[str, NamedSharding]:
    """{"embed.embedding": NamedSharding, ...} for every parameter of an NNX model (live or abstract)."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {
        ".".join(str(p) for p in path): logical_to_sharding(variable_logical_axes(v), mesh, rules)
        for path, v in flat
    }


def active_mesh():
    """The mesh set by `jax.set_mesh` (abstract inside jit), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def target_platform(mesh=None) -> str:
    """"tpu", "gpu" or "cpu": the devices of `mesh` (default: the active mesh) when there is one (so
    `lt-jax compile --topology v5p:...` on a CPU host picks the TPU kernels), else the default backend."""
    mesh = active_mesh() if mesh is None else mesh
    if isinstance(mesh, Mesh):
        mesh = mesh.abstract_mesh
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def token_spec(mesh, features: Optional[str] = None) -> PartitionSpec:
    """PartitionSpec of flattened [tokens, features] activations on `mesh`: tokens over the batch and
    sequence axes together (where the [batch, seq] rows already are), features by their logical name."""
    batch, seq, feat = mesh_spec(("act_batch", "act_seq", features), mesh)
    axes = spec_axes(batch) + spec_axes(seq)
    return PartitionSpec(axes or None, feat)


def shard_activation(x: jax.Array, logical_axes: Sequence[Optional[str]], rules=None) -> jax.Array:
    """Constrain an activation's sharding by logical names when a mesh is active; no-op otherwise."""
    mesh = active_mesh()
    if mesh is None:
        return x
    rules = rules_for(mesh.axis_names) if rules is None else rules
    return jax.lax.with_sharding_constraint(x, restrict_spec(logical_to_spec(logical_axes, rules), mesh.axis_names))


def parse_mesh(text: str) -> MeshConfig:
    """'data=2,fsdp=-1' (a --mesh flag) -> MeshConfig(data=2, fsdp=-1, tensor=1); errors name the flag."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"--mesh: expected axis=size, got {part!r}")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh: {key.strip()}: expected an integer, got {value!r}") from None
    return from_dict(MeshConfig, sizes, prefix="--mesh")


def axes_size(mesh, axes) -> int:
    """Product of the sizes of mesh `axes` (a name, a tuple of names, or None for 1); as in
    `axis_size`, an axis the mesh lacks (and no mesh at all) counts 1."""
    if mesh is None or axes is None:
        return 1
    return math.prod(axis_size(mesh, a) for a in spec_axes(axes))


def axis_size(mesh, name: str) -> int:
    """Size of mesh axis `name`, 1 when the mesh lacks it (or there is no mesh)."""
    if mesh is None or name not in mesh.axis_names:
        return 1
    return int(mesh.shape[name])
