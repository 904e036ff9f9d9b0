"""Load on the real server: concurrent /predict + /webhook + /health against waitress, loopback only, bounded.

    python bench/load.py [--seconds 30] [--max-requests 5000] [--predict-clients 4] [--webhook-clients 2]
                         [--health-clients 2] [--tasks 2] [--images 24]

Starts ``python -m backend serve --demo`` (waitress, one process, 8 threads, the bundled tiny models) on a free
port of 127.0.0.1 with images under LOCAL_FILES_DOCUMENT_ROOT, measures /health alone for a few seconds (the
baseline), then runs client threads for ``--seconds`` or until ``--max-requests`` answers, whichever comes first:
/predict with ``--tasks`` tasks each (repeated images, so the feature cache serves many), /webhook with
ANNOTATION_CREATED events (learning jobs run in the server's job thread), /health as Label Studio polls it.
Every request is counted: an answer other than 2xx, a timeout or a broken connection is "lost". The server's
resident memory (its process tree) is sampled every 0.2 s. Prints requests/s, p50/p99 per route and peak RSS;
the last line is the summary. The server is stopped by its PID at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.demo.shapes import KNOWN_SHAPES, scenes  # noqa: E402

LABELS = "".join(f'<Label value="{s}"/>' for s in KNOWN_SHAPES)
CONFIG = (f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{LABELS}'
          f'</RectangleLabels></View>')
TIMEOUT_S = 120.0
SECRET = "bench-url-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kib(path: str, field: str) -> int:
    with open(path) as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field))


def memory(pid: int) -> tuple[int, int]:
    """(PSS of the process tree, largest RSS of one process), bytes. The PSS sum counts each page shared
    between processes once."""
    pss = rss = 0
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            rss = max(rss, _kib(f"/proc/{p}/status", "VmRSS:") * 1024)
            pss += _kib(f"/proc/{p}/smaps_rollup", "Pss:") * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return pss, rss


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Recorder:
    def __init__(self, max_requests: int):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.lost: dict[str, list[str]] = defaultdict(list)
        self.count = 0
        self.max_requests = max_requests

    def add(self, route: str, seconds: float, error: str | None) -> bool:
        """Record one answer; False once the request budget is spent."""
        with self.lock:
            self.count += 1
            if error is None:
                self.latencies[route].append(seconds)
            else:
                self.lost[route].append(error)
            return self.count < self.max_requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--predict-clients", type=int, default=4)
    parser.add_argument("--webhook-clients", type=int, default=2)
    parser.add_argument("--health-clients", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2, help="tasks per /predict")
    parser.add_argument("--images", type=int, default=24, help="distinct images the tasks draw from")
    parser.add_argument("--size", type=int, default=480, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=8, help="server request threads")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    images = work / "images"
    images.mkdir()
    for i, scene in enumerate(scenes(9100, args.images)):
        scene.image.resize((args.size, args.size)).save(images / f"scene_{i}.png")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_USER", "URL_SECRET")}
    env.update(LOCAL_FILES_DOCUMENT_ROOT=str(images), MODEL_DIR=str(work / "state"), TORCH_THREADS="2",
               LOG_LEVEL="WARNING", PYTHONPATH=str(REPO), URL_SECRET=SECRET)   # webhooks are believed under it
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "backend", "serve", "--demo", "--host", "127.0.0.1", "--port",
                               str(port), "--threads", str(args.threads)], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return run(args, server, url, work)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def wait_for_health(server: subprocess.Popen, url: str, log: Path | None = None, timeout: float = 300) -> None:
    """Until the server answers /health; it exiting first (its log's tail printed) or ``timeout`` ends the bench."""
    started = time.monotonic()
    while True:
        if server.poll() is not None:
            if log is not None:
                print(log.read_text()[-3000:])
            raise SystemExit("the server exited before answering /health")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() - started > timeout:
            raise SystemExit(f"no /health after {timeout:.0f} s")
        time.sleep(0.2)


def run(args, server: subprocess.Popen, url: str, work: Path) -> int:
    started = time.monotonic()
    wait_for_health(server, url, work / "server.log")
    print(f"server {url} pid {server.pid} up in {time.monotonic() - started:.1f} s, "
          f"PSS {memory(server.pid)[0] / 2**20:.0f} MiB", flush=True)

    session = requests.Session()
    idle = []
    for _ in range(100):
        t = time.perf_counter()
        session.get(url + "/health", timeout=5).raise_for_status()
        idle.append(time.perf_counter() - t)

    recorder = Recorder(args.max_requests)
    stop = threading.Event()
    mem_start = memory(server.pid)
    mem_peak = list(mem_start)

    def sample_rss():
        while not stop.is_set():
            pss, rss = memory(server.pid)
            mem_peak[0], mem_peak[1] = max(mem_peak[0], pss), max(mem_peak[1], rss)
            time.sleep(0.2)

    def task(i: int) -> dict:
        n = random.randrange(args.images)
        return {"id": i, "data": {"image": f"/data/local-files/?d=scene_{n}.png"}, "annotations": [], "predictions": []}

    def predict_body(rng: random.Random) -> dict:
        return {"tasks": [task(rng.randrange(10**6)) for _ in range(args.tasks)], "label_config": CONFIG,
                "project": "1.1716400000", "params": {"login": None, "password": None, "context": None}}

    def webhook_body(rng: random.Random) -> dict:
        t = task(rng.randrange(10**6))
        region = {"id": "r1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                  "original_width": args.size, "original_height": args.size, "image_rotation": 0,
                  "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0,
                            "rectanglelabels": [rng.choice(KNOWN_SHAPES)]}}
        annotation = {"id": rng.randrange(10**6), "result": [region], "was_cancelled": False, "ground_truth": False,
                      "task": t["id"], "project": 1, "updated_at": "2026-01-01T00:00:00Z"}
        return {"action": "ANNOTATION_CREATED", "annotation": annotation, "task": t,
                "project": {"id": 1, "label_config": CONFIG}}

    def client(route: str, seed: int):
        rng = random.Random(seed)
        own = requests.Session()
        while not stop.is_set():
            t = time.perf_counter()
            error = None
            try:
                if route == "/health":
                    response = own.get(url + route, timeout=TIMEOUT_S)
                else:
                    body = predict_body(rng) if route == "/predict" else webhook_body(rng)
                    response = own.post(f"{url}/{SECRET}{route}", data=json.dumps(body), timeout=TIMEOUT_S,
                                        headers={"Content-Type": "application/json"})
                if not response.ok:
                    error = f"HTTP {response.status_code}: {response.text[:100]}"
                elif route == "/predict" and len(response.json()["results"]) not in (1, args.tasks):
                    error = "wrong number of results"
            except requests.RequestException as failure:
                error = f"{type(failure).__name__}: {failure}"
            if not recorder.add(route, time.perf_counter() - t, error):
                stop.set()
            if route != "/predict":
                time.sleep(0.05 if route == "/health" else 0.1)   # polls and annotators' submits, not a flood

    threads = [threading.Thread(target=sample_rss, daemon=True)]
    for route, n in (("/predict", args.predict_clients), ("/webhook", args.webhook_clients),
                     ("/health", args.health_clients)):
        threads += [threading.Thread(target=client, args=(route, 1000 * len(threads) + i), daemon=True)
                    for i in range(n)]
    load_start = time.perf_counter()
    for thread in threads:
        thread.start()
    stop.wait(args.seconds)
    stop.set()
    for thread in threads[1:]:
        thread.join(TIMEOUT_S + 5)
    wall = time.perf_counter() - load_start
    alive = server.poll() is None and requests.get(url + "/health", timeout=5).ok

    figures = {"seconds": round(wall, 1), "requests": recorder.count, "routes": {},
               "health_idle_p50_ms": 1000 * statistics.median(idle), "health_idle_p99_ms": 1000 * percentile(idle, .99),
               "pss_start_mib": mem_start[0] / 2**20, "pss_peak_mib": mem_peak[0] / 2**20,
               "worker_rss_peak_mib": mem_peak[1] / 2**20, "server_alive": alive}
    print(f"\n{recorder.count} requests in {wall:.1f} s, {args.predict_clients} /predict ({args.tasks} tasks each), "
          f"{args.webhook_clients} /webhook, {args.health_clients} /health clients; server threads {args.threads}")
    print("| route | answered | lost | requests/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|")
    lost_total = 0
    for route in ("/predict", "/webhook", "/health"):
        ok, lost = recorder.latencies[route], recorder.lost[route]
        lost_total += len(lost)
        row = {"answered": len(ok), "lost": len(lost), "rps": len(ok) / wall,
               "p50_ms": 1000 * percentile(ok, .5), "p99_ms": 1000 * percentile(ok, .99),
               "max_ms": 1000 * max(ok, default=float("nan"))}
        figures["routes"][route] = row
        print(f"| {route} | {row['answered']} | {row['lost']} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['max_ms']:.0f} |")
        for reason in sorted(set(lost))[:3]:
            print(f"    lost on {route}: {reason}")
    print(f"| /health idle (baseline) | 100 | 0 | | {figures['health_idle_p50_ms']:.1f} | "
          f"{figures['health_idle_p99_ms']:.1f} | |")
    print(f"server memory (PSS of the process tree): {mem_start[0] / 2**20:.0f} MiB at start, "
          f"{mem_peak[0] / 2**20:.0f} "
          f"MiB peak; largest process RSS peak {mem_peak[1] / 2**20:.0f} MiB; still serving after the load: {alive}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    health = figures["routes"]["/health"]
    print(f"load: {recorder.count} requests in {wall:.0f} s ({recorder.count / wall:.1f} req/s), {lost_total} lost; "
          f"/predict {figures['routes']['/predict']['rps']:.1f} req/s "
          f"p50 {figures['routes']['/predict']['p50_ms']:.0f} ms; "
          f"/health p50 {health['p50_ms']:.1f} ms p99 {health['p99_ms']:.1f} ms under load "
          f"(idle p99 {figures['health_idle_p99_ms']:.1f} ms); peak PSS {mem_peak[0] / 2**20:.0f} MiB "
          f"(start {mem_start[0] / 2**20:.0f})")
    return 0 if lost_total == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
