"""What the benchmarks in tools/ share: model configs from YAML plus overrides, and the peak FLOP/s."""

from __future__ import annotations

import time
from typing import Optional, Sequence


def load_model_config(path: Optional[str], overrides: Sequence[str]):
    """ModelConfig from an optional YAML (plain, or a run config's `model:` section) plus key=value overrides."""
    from lt_jax import config as cfglib
    from lt_jax.model.config import ModelConfig

    data = cfglib.load_yaml(path) if path else {}
    if isinstance(data.get("model"), dict):
        data = data["model"]
    data = cfglib.merge(data, cfglib.parse_overrides(list(overrides)))
    return cfglib.from_dict(ModelConfig, data)


def measured_peak() -> float:
    """FLOP/s of a 2048^3 fp32 matmul on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * 2048**3 / (time.perf_counter() - t)


def peak_flops(device, flag) -> Optional[float]:
    """Peak FLOP/s per device from a --peak-tflops flag: a number of TFLOP/s, "auto" (measure a
    matmul on this device), or None (the data-sheet table lt_jax.train.metrics.PEAK_FLOPS by
    device kind; None on CPU)."""
    from lt_jax.train import metrics

    if flag == "auto":
        return measured_peak()
    if flag:
        return float(flag) * 1e12
    return metrics.peak_flops_per_device(getattr(device, "device_kind", ""))
