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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("LT_JAX_SHARED", os.path.join(os.path.dirname(REPO), "shared"))


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
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared not found at {SHARED}; set LT_JAX_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(shared_dir):
    return os.path.join(shared_dir, "tokenizers", "qwen2.5")
