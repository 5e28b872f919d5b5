"""Shared pytest fixtures.

Redis
-----
``redis_server`` (session): a throwaway ``redis-server`` on a free 127.0.0.1
port, started once per session (``redis-server`` must be installed:
``apt-get install redis-server``).  When ``GEM_TEST_REDIS_URL`` is set, that
server is used instead; its DB is FLUSHED by ``redis_url``, so point it at a
scratch database.

``redis_url`` (function): URL of ``redis_server`` with its DB flushed.

``restartable_redis`` (function): always a server started by these fixtures
(even with ``GEM_TEST_REDIS_URL``), with ``.stop()`` / ``.start()`` for outage
tests; flushed before and running again after each test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    """True if a Redis at host:port answers an inline PING (no auth)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedisServer:
    """A ``redis-server`` child process on 127.0.0.1:``port`` (no persistence)."""

    def __init__(self, binary: str, port: int, workdir: Path):
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.log_path = workdir / "redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, same port) and wait until it answers PING."""
        if self.running:
            return
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()  # the child holds its own descriptor
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.port):
                return
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server on port {self.port} did not come up; log:\n"
                    + self.log_path.read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        """Terminate the server; clients get connection errors until ``start()``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None


class ExternalRedisServer:
    """The server named by ``GEM_TEST_REDIS_URL``; cannot be stopped by tests."""

    def __init__(self, url: str):
        self.url = url
        self.port = urlsplit(url).port or 6379

    def stop(self) -> None:
        pytest.fail("redis_server is external (GEM_TEST_REDIS_URL) and cannot be stopped; "
                    "use the restartable_redis fixture for outage tests")

    start = stop


def _flush(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="session")
def local_redis_server(tmp_path_factory):
    """A redis-server started by us for the whole session (see module docstring)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH: install it (apt-get install redis-server) "
                    "to run the Redis tests")
    server = LocalRedisServer(binary, _free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(request):
    """Object with ``.url``, ``.port``, ``.stop()``, ``.start()``; see module docstring."""
    external = os.environ.get("GEM_TEST_REDIS_URL")
    if external:
        yield ExternalRedisServer(external)
    else:
        yield request.getfixturevalue("local_redis_server")


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of a Redis with an empty DB."""
    if isinstance(redis_server, LocalRedisServer):
        redis_server.start()  # no-op unless an earlier test left it stopped
    _flush(redis_server.url)
    return redis_server.url


@pytest.fixture
def restartable_redis(local_redis_server):
    """A local server the test may ``.stop()``/``.start()``; restarted afterwards."""
    local_redis_server.start()
    _flush(local_redis_server.url)
    yield local_redis_server
    local_redis_server.start()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = usefixtures(...)``): on a small
    shared CPU box two threads spin against other processes and run small models slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
