"""The registry of model families: one spec module each (see `lt_jax.model.families.spec`)."""

from lt_jax.model.families import llama, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe
from lt_jax.model.families.spec import FamilySpec, UnsupportedConfig

FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (qwen2.SPEC, qwen3.SPEC, llama.SPEC, phi3.SPEC,
                                                   qwen3_moe.SPEC, qwen2_moe.SPEC)}


def get(name: str) -> FamilySpec:
    """The spec of family `name`; a ValueError listing the supported ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"family {name!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "FamilySpec", "UnsupportedConfig", "get"]
