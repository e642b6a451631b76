"""Tiny data and configs for the training tests.

Token data is the synthetic arithmetic task (lt_jax.data.synthetic) encoded one character per token
(ASCII, vocab 128) and written as real token shards (lt_jax.data.shards) with a manifest, so the
loader reads them through the same TokenizedSource as `lt-jax tokenize` output. The loss mask is 1
on the teacher's response, 0 on the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import functools
import sys
import types

import pytest
import yaml

from token_data import VOCAB, encode, random_data, random_records, synthetic_records, write_tokenized  # noqa: F401

TINY_MODEL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  attention_bias=True,  # Qwen2 has q/k/v biases; export-hf expects them
                  max_position_embeddings=1024)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_config(output_dir: str, train_data: str, eval_data=None, **sections) -> dict:
    """A tiny run config as plain data; `sections` are merged into the defaults section by section."""
    cfg = {
        "model": dict(TINY_MODEL),
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "data": {"train": train_data, "eval": eval_data, "seq_len": 384, "pack_window": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.01},
        "train": {"output_dir": output_dir, "global_batch": 8, "steps": 12, "seed": 0},
        "checkpoint": {"every": 4, "keep": 10},
        "logging": {"every": 1},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def write_config(path: str, cfg: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def read_metrics(output_dir: str, kind: str = "train") -> dict[int, dict]:
    """{step: record} from metrics.jsonl (local or gs://); fails on a step written twice."""
    from lt_jax import storage

    seen: dict[int, dict] = {}
    for line in storage.read_text(storage.join(output_dir, "metrics.jsonl")).splitlines():
        rec = json.loads(line)
        if rec["kind"] != kind:
            continue
        assert rec["step"] not in seen, f"step {rec['step']} written twice"
        seen[rec["step"]] = rec
    return seen


def train_subprocess(config_path: str, *extra: str, device_count: int = 2, cache_dir=None, env=None) -> subprocess.Popen:
    """`lt-jax train` in a child process (inherits the GCS emulator variables set by conftest).

    Children given the same `cache_dir` share a persistent compilation cache, so only the first compiles.
    """
    child_env = dict(os.environ, **(env or {}))
    child_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    child_env["PYTHONUNBUFFERED"] = "1"
    if cache_dir:
        child_env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        child_env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        child_env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return subprocess.Popen(
        [sys.executable, "-m", "lt_jax.cli", "train", "--config", config_path, *extra],
        cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Local tokenized train (240 records) and held-out (48 records) folders of the synthetic task."""
    root = tmp_path_factory.mktemp("tiny_data")
    train = write_tokenized(str(root / "train"), synthetic_records(240))
    held = write_tokenized(str(root / "eval"), synthetic_records(48, split="heldout"))
    return types.SimpleNamespace(train=train, eval=held, root=str(root))


@pytest.fixture(scope="session")
def helpers(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    return types.SimpleNamespace(
        encode=encode, synthetic_records=synthetic_records, random_records=random_records, write_tokenized=write_tokenized, run_config=run_config,
        write_config=write_config, read_metrics=read_metrics,
        train_subprocess=functools.partial(train_subprocess, cache_dir=cache), TINY_MODEL=TINY_MODEL,
    )
