"""Target hardware for ahead-of-time compilation: TPU slices and GPU nodes, described without the
hardware.

A `Target` names the chips (kind, count, slices) and their memory. `target_devices` turns it into
JAX devices that a mesh can be built on and a jit compiled for:

  TPU  `jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:8x8x4",
       num_slices=n)` gives compile-only TPU devices from libtpu on any host (this CPU included).
       libtpu is found through `find_libtpu` and loaded only here, so the rest of lt_jax (and every
       `import jax`) never sees it.
  GPU  XLA's GPU compiler needs the CUDA plugin and, without a GPU, a target description; here
       the attached GPUs are used when they cover the target (one node), otherwise a clear error.

Capacities are HBM per chip as sold; the fit check compares XLA's per-device memory analysis
against them (GPU: times the fraction the JAX allocator may take, XLA_PYTHON_CLIENT_MEM_FRACTION).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
from typing import Optional

import jax
from jax.experimental import topologies

GiB = 1024**3

# device_kind substring (first match wins) -> HBM bytes per device.
HBM_BYTES: tuple[tuple[str, int], ...] = (
    ("TPU v6 lite", 32 * GiB),  # v6e (Trillium)
    ("TPU v5 lite", 16 * GiB),  # v5e
    ("TPU v5", 95 * GiB),  # v5p
    ("TPU v4", 32 * GiB),
    ("H200", 141 * 10**9),
    ("H100", 80 * GiB),
    ("A100", 80 * GiB),
)

# Names users write -> (the topology prefix libtpu wants, device_kind it reports).
TPU_GENERATIONS: dict[str, str] = {"v4": "v4", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}
GPU_KINDS: dict[str, str] = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "a100": "NVIDIA A100-SXM4-80GB"}

# Default search path for a libtpu installed with `pip install --target DIR libtpu==...`.
LIBTPU_DIRS: tuple[str, ...] = ("~/.cache/lt_jax/libtpu", "/tmp/libtpu_site")
LIBTPU_PIP = 'pip install --target ~/.cache/lt_jax/libtpu "libtpu==0.0.42.*"  # matches jax 0.10.2'


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for: `platform` "tpu" or "gpu", `name` as the user wrote it."""

    platform: str
    name: str
    topology: str  # tpu: "v5p:2x2x1"; gpu: "h100x8"
    num_slices: int = 1  # tpu: slices over DCN; gpu: nodes
    mem_fraction: float = 1.0  # share of HBM the runtime may use (GPU allocator fraction)

    @property
    def chips_per_slice(self) -> int:
        if self.platform == "gpu":
            return int(self.topology.split("x")[1])
        return math.prod(int(n) for n in self.topology.split(":")[1].split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices


def parse_tpu(spec: str, num_slices: int = 1) -> Target:
    """"v5p:8x8x4" (generation:chip grid) -> Target; errors say the accepted form."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", spec.strip())
    if not m or m.group(1) not in TPU_GENERATIONS:
        raise ValueError(
            f"--topology {spec!r}: expected GENERATION:CHIPS like v5p:2x2x1, v5p:8x8x4, v6e:4x4 "
            f"(generations: {', '.join(TPU_GENERATIONS)})"
        )
    if num_slices < 1:
        raise ValueError(f"--slices must be >= 1, got {num_slices}")
    return Target("tpu", spec, f"{TPU_GENERATIONS[m.group(1)]}:{m.group(2)}", num_slices)


def parse_gpu(spec: str, nodes: int = 1, mem_fraction: float = 0.9) -> Target:
    """"h100x8" (kind x GPUs per node) -> Target."""
    m = re.fullmatch(r"([a-z]\d+)x(\d+)", spec.strip().lower())
    if not m or m.group(1) not in GPU_KINDS:
        raise ValueError(f"--gpu {spec!r}: expected KINDxCOUNT like h100x8 (kinds: {', '.join(GPU_KINDS)})")
    if nodes < 1 or not 0 < mem_fraction <= 1:
        raise ValueError("--nodes must be >= 1 and --mem-fraction in (0, 1]")
    return Target("gpu", spec, spec.lower(), nodes, mem_fraction)


def hbm_bytes(device_kind: str) -> Optional[int]:
    """HBM per device for a jax `device_kind`, or None when unknown."""
    for key, size in HBM_BYTES:
        if key.lower() in device_kind.lower():
            return size
    return None


# ---------------------------------------------------------------------------------------------
# libtpu


def find_libtpu(extra_dirs: tuple[str, ...] = ()) -> Optional[str]:
    """Path of libtpu.so: $TPU_LIBRARY_PATH, an importable `libtpu` package, or a --target install
    under $LT_JAX_LIBTPU_DIR / LIBTPU_DIRS. None when there is none."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return path
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if os.path.isfile(os.path.join(loc, "libtpu.so")):
                return os.path.join(loc, "libtpu.so")
    dirs = (*extra_dirs, os.environ.get("LT_JAX_LIBTPU_DIR", ""), *LIBTPU_DIRS)
    for d in filter(None, dirs):
        hits = glob.glob(os.path.join(os.path.expanduser(d), "libtpu", "libtpu.so"))
        if hits:
            return hits[0]
    return None


def _on_tpu_host() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def prepare_libtpu() -> str:
    """Points JAX at libtpu for compile-only use; returns its path or raises with the pip line.

    Off a TPU VM, libtpu would probe the GCE metadata server for the host's accelerator and
    print warnings, and would refuse to load in a second process (its lockfile guards a real
    TPU); the variables below tell it there is no real TPU here (only set when unset and no TPU
    device files exist, so a real TPU VM keeps its own settings).
    """
    path = find_libtpu()
    if path is None:
        raise RuntimeError(
            "libtpu not found: compiling for TPU needs it (no TPU required). Install it outside the "
            f"global site-packages with:\n    {LIBTPU_PIP}\nor set TPU_LIBRARY_PATH to a libtpu.so"
        )
    os.environ.setdefault("TPU_LIBRARY_PATH", path)
    if not _on_tpu_host():
        for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                           ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                           ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
            os.environ.setdefault(key, value)
    return path


# ---------------------------------------------------------------------------------------------
# Devices


def target_devices(target: Target) -> list:
    """Devices to build the mesh on for `target` (compile-only on TPU)."""
    if target.platform == "tpu":
        prepare_libtpu()
        kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **kwargs).devices)
    return _gpu_devices(target)


def _gpu_devices(target: Target) -> list:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    kind = target.topology.split("x")[0]
    if not gpus:
        raise RuntimeError(
            f"--gpu {target.name}: no GPU attached. XLA's GPU compiler runs only with the CUDA plugin "
            "(pip install 'jax[cuda12]') on a GPU host, so run this check on one node of the cluster "
            "(it compiles for the attached GPUs), or use a TPU topology here."
        )
    if kind not in gpus[0].device_kind.lower():
        raise RuntimeError(f"--gpu {target.name}: the attached GPUs are {gpus[0].device_kind!r}")
    if target.num_chips != len(gpus):
        raise RuntimeError(
            f"--gpu {target.name} --nodes {target.num_slices} needs {target.num_chips} GPUs but this process sees "
            f"{len(gpus)}; compile per node (--nodes 1 with the per-node mesh) or run under the cluster launcher"
        )
    return list(gpus)


def capacity_bytes(target: Target, device_kind: str) -> Optional[int]:
    """Usable memory per device: HBM times the allocator fraction."""
    hbm = hbm_bytes(device_kind)
    return None if hbm is None else int(hbm * target.mem_fraction)


__all__ = ["Target", "parse_tpu", "parse_gpu", "hbm_bytes", "find_libtpu", "prepare_libtpu", "target_devices",
           "capacity_bytes", "LIBTPU_PIP", "GiB"]
