"""Fixtures: every storage and protocol test runs on SQLite (a temporary file) and on PostgreSQL
(TEST_DATABASE_URL, a fresh schema per test, dropped afterwards)."""

import asyncio
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import runtara_core as rc  # noqa: E402

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")


def _admin_connect():
    import psycopg

    return psycopg.connect(TEST_DATABASE_URL, autocommit=True)


def _with_search_path(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def postgres_url():
    """A URL whose connections live in a schema of their own, removed after the test."""
    if not TEST_DATABASE_URL:
        pytest.skip("TEST_DATABASE_URL is not set; the PostgreSQL half needs a server")
    schema = "rt_" + uuid.uuid4().hex[:12]
    with _admin_connect() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield _with_search_path(TEST_DATABASE_URL, schema)
    with _admin_connect() as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runtara.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def storage(database_url):
    with rc.open_storage(database_url) as storage:
        yield storage


def settings_for(database_url: str, **overrides) -> rc.Settings:
    return rc.Settings.from_env(env={}, database_url=database_url, port=0, **overrides)


@pytest.fixture
def server_factory(database_url):
    """Start a real QUIC server on loopback (an ephemeral port); stopped after the test."""
    started = []

    def start(**overrides) -> rc.ServerThread:
        server = rc.ServerThread(settings_for(database_url, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory):
    return server_factory()


def addr(server: rc.ServerThread) -> str:
    host, port = server.address
    return f"{host}:{port}"


def run(coroutine):
    return asyncio.run(coroutine)


ROOT = Path(__file__).resolve().parent.parent


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(database_url: str, folder, port: int, *args, **popen):
    """`runtara serve` as a real process, which a test may kill."""
    import subprocess

    return subprocess.Popen([sys.executable, str(ROOT / "runtara_core.py"), "serve", "--port", str(port),
                             "--database-url", database_url, "--log-level", "ERROR", *args], cwd=folder,
                            stderr=subprocess.PIPE, text=True, **popen)


async def wait_ready(port: int, process=None) -> None:
    for _ in range(150):
        if process is not None and process.poll() is not None:  # it died at start: say why at once
            raise AssertionError(f"the server exited with {process.returncode}: {process.stderr.read()}")
        transport = rc.QuicTransport("127.0.0.1", port)
        transport.CONNECT_TIMEOUT_S = 0.5
        try:
            await transport.request({"op": "health_check"})
            return
        except rc.ConnectionLost:
            await asyncio.sleep(0.1)
        finally:
            await transport.close()
    raise AssertionError("the server never answered" + (f": {process.stderr.read()}" if process else ""))


def start_server_process(database_url: str, folder, *args, **popen):
    port = free_udp_port()
    process = spawn_server(database_url, folder, port, *args, **popen)
    run(wait_ready(port, process))
    return port, process


def stop_server_process(process) -> None:
    process.terminate()
    _, errors = process.communicate(timeout=30)
    assert "Traceback" not in errors, errors
