"""Tiny random-init transformers models (saved with save_pretrained) as references for HF I/O."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hf_models import TINY, redrawn_model

# variant -> (config class name, extra config fields)
VARIANTS = {
    "qwen2_tied": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "qwen2_untied": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-5)),
    # head_dim 32 != hidden/heads = 16: q/o projections are not square.
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # original_max_position_embeddings small enough that all three llama3 frequency bands occur at head_dim 16.
    "llama3": (
        "LlamaConfig",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def build_hf_model(variant: str, seed: int = 0):
    """A transformers model of `variant` with every weight redrawn (see hf_models.redrawn_model)."""
    cls_name, extra = VARIANTS[variant]
    return redrawn_model(cls_name, extra, seed)


def hf_logits(model, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """transformers fp32 logits for right-padded rows, with the attention mask hiding padding."""
    import torch

    mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    return out.float().numpy()


@pytest.fixture(scope="session")
def prompts():
    """(ids [4, 12], lengths): right-padded prompts of different lengths (padding id 0)."""
    rng = np.random.RandomState(1)
    lengths = np.array([12, 7, 3, 10])
    ids = rng.randint(1, TINY["vocab_size"], size=(4, 12))
    ids[np.arange(12)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """hf_folder(variant, max_shard_size=None, dtype=None) -> (folder, torch model); cached per session."""
    cache = {}

    def make(variant: str, max_shard_size=None, dtype=None):
        key = (variant, max_shard_size, dtype)
        if key not in cache:
            import torch

            model = build_hf_model(variant)
            if dtype is not None:
                model = model.to(getattr(torch, dtype))
            folder = str(tmp_path_factory.mktemp(f"hf_{variant}"))
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(folder, safe_serialization=True, **kwargs)
            cache[key] = (folder, model)
        return cache[key]

    return make


def real_token_diff(ours: np.ndarray, ref: np.ndarray, lengths: np.ndarray) -> float:
    """Max abs difference over real (non-padding) positions."""
    return max(float(np.abs(ours[b, :n] - ref[b, :n]).max()) for b, n in enumerate(lengths))


def segment_ids(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)


def safetensors_dict(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a HF folder (single file or sharded), as numpy arrays."""
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


@pytest.fixture(scope="session")
def hfx():
    """The helpers above, for test modules (conftest modules are not imported directly)."""
    import types

    return types.SimpleNamespace(
        build_hf_model=build_hf_model,
        hf_logits=hf_logits,
        real_token_diff=real_token_diff,
        segment_ids=segment_ids,
        safetensors_dict=safetensors_dict,
    )
