"""Faked NVIDIA GPU properties for CPU tests of the cuDNN path: lt_jax's platform rule and JAX's
own cuDNN checks see the given GPU, so the cuDNN attention traces and lowers for CUDA on CPU."""

from __future__ import annotations

from lt_jax.model import attention as attn

H100 = attn.Platform("gpu", "NVIDIA H100 80GB HBM3", (9, 0), 90800)


def use_platform(monkeypatch, info: attn.Platform) -> None:
    """lt_jax's attention sees `info` (and warns afresh)."""
    monkeypatch.setattr(attn, "platform", lambda: info)
    attn._warn_fallback.cache_clear()


def use_hopper(monkeypatch, info: attn.Platform = H100) -> None:
    """Both lt_jax and JAX's cuDNN checks see a Hopper GPU with info's cuDNN version."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    use_platform(monkeypatch, info)
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: info.cudnn_version)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda capability: False)
