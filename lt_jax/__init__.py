"""lt_jax: JAX-native long-thought distillation (distill, grade, select, tokenize, SFT, evaluate, export).

`lt_jax.load_hf` and `lt_jax.save_hf` are imported lazily so that `import lt_jax` stays free of jax.
"""

from __future__ import annotations

__all__ = ["load_hf", "save_hf", "generate", "SamplingParams"]


def __getattr__(name: str):
    if name in ("load_hf", "save_hf"):
        from lt_jax.model import hf  # lazy: `import lt_jax` (every lt-jax command) stays free of jax

        return getattr(hf, name)
    if name in ("generate", "SamplingParams"):  # KV-cache sampling: lt_jax/sample/generate.py
        from lt_jax.sample import generate as gen  # lazy, as above

        return getattr(gen, name)
    raise AttributeError(f"module 'lt_jax' has no attribute {name!r}")
