"""/health while slow clients hold connections: the real server, loopback only.

    python bench/slowloris.py [--connections 32] [--checks 20] [--tiny]

Starts ``python -m backend serve --demo`` (waitress, 8 threads) on a free port of 127.0.0.1 and asks /health
``--checks`` times with nothing else going on (the baseline), then opens ``--connections`` client connections
that never finish their request (half of them send part of the headers and stop, half drip one header byte
every 0.5 s), and asks /health ``--checks`` times again while they are held. A /health that takes longer than
5 s counts as failed. Prints both maxima and their ratio; the last line is the summary. The server is stopped by
its PID at the end. ``--tiny``: 8 connections, 5 checks (the smoke test).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from load import free_port, wait_for_health  # the load bench's server helpers (bench/ is on sys.path)

REPO = Path(__file__).resolve().parent.parent
CHECK_TIMEOUT_S = 5.0


def health_checks(url: str, n: int) -> tuple[list[float], int]:
    """Latencies (s) of the answered checks, and how many failed. A fresh connection each time, like LS."""
    times, failed = [], 0
    for _ in range(n):
        started = time.perf_counter()
        try:
            ok = requests.get(url + "/health", timeout=CHECK_TIMEOUT_S).ok
        except requests.RequestException:
            ok = False
        if ok:
            times.append(time.perf_counter() - started)
        else:
            failed += 1
        time.sleep(0.05)
    return times, failed


def hold(port: int, n: int, stop: threading.Event) -> list[socket.socket]:
    """n connections that never complete a request: half stop mid-headers, half drip a byte every 0.5 s."""
    sockets = []
    for _i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sockets.append(s)

    def drip():
        while not stop.wait(0.5):
            for s in sockets[::2]:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass

    threading.Thread(target=drip, daemon=True).start()
    return sockets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--checks", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="8 connections, 5 checks")
    args = parser.parse_args()
    if args.tiny:
        args.connections, args.checks = 8, 5
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BASIC_AUTH_USER", "URL_SECRET")}
    env.update(MODEL_DIR=tempfile.mkdtemp(prefix="clip-ls-slowloris-"), TORCH_THREADS="1", LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--demo", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        wait_for_health(server, url)
        idle, idle_failed = health_checks(url, args.checks)
        sockets = hold(port, args.connections, stop)
        held, held_failed = health_checks(url, args.checks)
        stop.set()
        for s in sockets:
            s.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    idle_max = max(idle, default=float("nan")) * 1000
    held_max = max(held, default=float("nan")) * 1000
    print(f"/health idle: {len(idle)}/{args.checks} answered, max {idle_max:.1f} ms")
    print(f"/health with {args.connections} slow connections held: {len(held)}/{args.checks} answered, "
          f"max {held_max:.1f} ms")
    print(f"slowloris: {len(held)}/{args.checks} /health answered under {args.connections} slow connections, "
          f"max {held_max:.1f} ms vs {idle_max:.1f} ms idle ({held_max / idle_max:.1f}x)")
    return 0 if not (idle_failed or held_failed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
