"""The engine's configuration: slots, pages, chunking, and the defaults derived from the model and
the device's memory."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from lt_jax.sample import paged

STOP_WIDTH = 8  # stop-token columns on device (a power of two; more only if a request needs it)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Slots, pages and chunking. None: derived from the model (see `resolve`)."""

    num_slots: int = 16
    page_size: int = 16
    num_pages: Optional[int] = None  # default: every slot can hold max_len tokens (capped by memory)
    max_len: Optional[int] = None  # prompt + new tokens per sample; default max_position_embeddings
    decode_steps: int = 16  # decode steps per device call
    prefill_chunk: int = 256  # prompt tokens per prefill call
    cache_dtype: Optional[str] = None
    attn_impl: str = "auto"  # paged attention: auto | xla | pallas
    max_logprobs: int = 20  # top-N alternatives a request may ask for

    def __post_init__(self):
        for name in ("num_slots", "page_size", "decode_steps", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk & (self.prefill_chunk - 1):
            raise ValueError(f"EngineConfig.prefill_chunk must be a power of two, got {self.prefill_chunk}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"EngineConfig.num_pages must be >= 2, got {self.num_pages}")

    def resolve(self, model_config) -> "EngineConfig":
        """The config with max_len and num_pages filled in."""
        max_len = self.max_len or model_config.max_position_embeddings
        num_pages = self.num_pages
        if num_pages is None:
            num_pages = self.num_slots * paged.pages_for(max_len, self.page_size) + 1
            budget = _device_kv_budget()
            if budget is not None:
                per_page = paged.page_bytes(model_config, self.page_size, cache_dtype(self.cache_dtype))
                num_pages = max(2, min(num_pages, budget // per_page))
        return dataclasses.replace(self, max_len=max_len, num_pages=num_pages)


def cache_dtype(name: Optional[str]):
    """The KV pages' dtype (None: the model's compute dtype)."""
    return None if name is None else jnp.dtype(name)


def _device_kv_budget() -> Optional[int]:
    """Half the accelerator memory still free (None on CPU, where the demand is allocated)."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) // 2
