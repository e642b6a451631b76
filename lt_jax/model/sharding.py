"""Device mesh and the one table that maps logical axis names to mesh axes.

Every parameter is created with a `logical_axes` metadata tuple (one name per dimension) and every
activation constraint names its dimensions the same way; `LOGICAL_RULES` below is the only place
that says which mesh axes those names land on. Changing the parallelism layout means editing that
table, never the model.

Mesh axes:
  data    pure data parallelism: parameters replicated, batch split.
  fsdp    batch split AND parameters sharded (ZeRO-3 style); weights all-gathered per layer.
  tensor  Megatron-style tensor parallelism over heads / MLP width / vocab.
A later `context` axis (sequence sharding for ring attention) slots in as a fourth name here and
one more rule for `act_seq`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

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
    ("layers", None),  # the scanned axis: every device holds its slice of every layer
    ("norm", None),
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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 (at most one) takes whatever devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        wild = [name for name, n in sizes.items() if n == -1]
        if len(wild) > 1:
            raise ValueError(f"MeshConfig: only one axis may be -1, got -1 for {', '.join(wild)}")
        bad = [f"{name}={n}" for name, n in sizes.items() if n == 0 or n < -1]
        if bad:
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {', '.join(bad)}")

    def sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_AXES}

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Concrete axis sizes for `num_devices`, or a ValueError naming the fields to change."""
        sizes = self.sizes()
        fixed = math.prod(n for n in sizes.values() if n != -1)
        wild = [name for name, n in sizes.items() if n == -1]
        if wild:
            if num_devices % fixed:
                raise ValueError(
                    f"MeshConfig: {_describe(sizes)} cannot fill {num_devices} devices: the fixed axes "
                    f"multiply to {fixed}, which does not divide {num_devices}; change "
                    f"{', '.join(n for n in MESH_AXES if n not in wild)}"
                )
            sizes[wild[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(
                f"MeshConfig: data*fsdp*tensor = {_describe(sizes)} = {fixed}, but there are {num_devices} "
                "devices; make the product match or set one of data/fsdp/tensor to -1"
            )
        return sizes


def _describe(sizes: dict[str, int]) -> str:
    return "*".join(f"{k}({v})" for k, v in sizes.items())


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") of Auto type (NNX needs Auto, not Explicit).

    Uses `jax.experimental.mesh_utils` to lay the axes onto the physical topology so that
    `tensor` (the chattiest axis) lands on the fastest links, when given the default devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(logical_axes: Sequence[Optional[str]], mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """NamedSharding on `mesh` for an array whose dimensions carry `logical_axes`."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def variable_logical_axes(variable) -> tuple:
    """The logical axes a parameter was created with (every lt_jax parameter has them)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"variable of shape {variable.get_value().shape} has no logical_axes metadata")
    return tuple(axes)


def state_shardings(state, mesh: Mesh, rules=LOGICAL_RULES):
    """The state tree with every Variable's value replaced by its NamedSharding.

    `state` is an `nnx.State` (abstract or live); the result has the same structure, so it can be
    given to `jax.jit(out_shardings=...)` or read leaf by leaf.
    """
    from flax import nnx

    def one(v):
        spec = logical_to_sharding(variable_logical_axes(v), mesh, rules)
        if len(spec.spec) != len(v.get_value().shape):
            raise ValueError(f"logical_axes {variable_logical_axes(v)} do not match shape {v.get_value().shape}")
        return v.replace(spec)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(model, mesh: Mesh, rules=LOGICAL_RULES) -> dict[str, NamedSharding]:
    """{"embed.embedding": NamedSharding, ...} for every parameter of an NNX model (live or abstract)."""
    from flax import nnx

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


def shard_activation(x: jax.Array, logical_axes: Sequence[Optional[str]], rules=LOGICAL_RULES) -> jax.Array:
    """Constrain an activation's sharding by logical names when a mesh is active; no-op otherwise."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(logical_axes, rules)
    # Drop mesh axes the active mesh lacks (e.g. a 1-axis mesh in a user script).
    names = set(mesh.axis_names)

    def keep(entry):
        if entry is None:
            return None
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in names)
        return None if not axes else axes[0] if len(axes) == 1 else axes

    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(keep(e) for e in spec)))
