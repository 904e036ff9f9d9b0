"""Fixtures shared by every test module (tests/e2e included)."""
from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest
from e2e.local_http import free_port


def _answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url():
    """A Redis database nobody else uses during the session: a free numbered database of the Redis on 6379
    (claimed with a lock key, emptied afterwards), else a private redis-server on a free port, stopped by its PID.
    Processes the tests start (RQ workers) can use the URL too."""
    import redis

    if _answers(6379):
        client = redis.Redis(port=6379)
        claim = f"clip-ls-test-claim-{uuid.uuid4().hex}"
        for db in range(15, 0, -1):
            candidate = redis.Redis(port=6379, db=db)
            try:
                if candidate.dbsize() == 0 and candidate.set("clip-ls-test-claim", claim, nx=True, ex=3600):
                    break
            except redis.RedisError:   # fewer databases configured
                continue
        else:
            pytest.skip("no empty Redis database on 127.0.0.1:6379 to run in")
        try:
            yield f"redis://127.0.0.1:6379/{db}"
        finally:
            if candidate.get("clip-ls-test-claim") == claim.encode():
                candidate.flushdb()
            client.close()
        return
    if not shutil.which("redis-server"):
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start (scripts/setup.sh installs it)")
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if time.monotonic() > deadline or process.poll() is not None:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def ls():
    """test_images' fake Label Studio on loopback (test_images and test_security use it)."""
    from test_images import FakeLabelStudio, Server

    app = FakeLabelStudio()
    server = Server(app)
    app.url = server.url
    yield app
    server.close()
