"""The `serve` fixture for the eval tests: the project's real server (lt_jax.sample.server) on loopback
with a tiny rule-based backend from tests/eval_stubs.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def serve():
    """serve(backend, **ServerConfig fields) -> base URL; servers stop at teardown."""
    from lt_jax.sample.server import ServerConfig, ServerThread

    started = []

    def start(backend, **cfg):
        srv = ServerThread(backend, ServerConfig(port=0, **cfg)).start()
        started.append(srv)
        return srv.url

    yield start
    for srv in started:
        srv.stop()
