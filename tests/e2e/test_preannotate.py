"""Bulk pre-annotation for real: a Label Studio project, `python -m backend preannotate`, two `rq worker` processes
(SimpleWorker, the tiny models) sharing a Redis, one of them killed (SIGKILL, by its PID) in the middle of a chunk,
the coordinator killed too and started again: every task ends with exactly one prediction of our model version, and
a later "Retrieve predictions" from the connected backend adds none.

Tasks: uploads (served by Label Studio with the legacy token) and plain URLs on a slow image host on 127.0.0.1
(each image takes 0.3 s, workers download one at a time: a chunk lasts long enough to be killed in), plus one URL
that does not exist (a failed task with its reason, no prediction).

    bash scripts/test.sh tests/e2e/test_preannotate.py -s
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.demo.demo_data import write_demo_data
from backend.jobs import WORKER_OPTIONS

from .backend_process import REPO_ROOT, BackendProcess
from .label_studio import LEGACY_TOKEN
from .local_http import QuietHandler

pytestmark = pytest.mark.e2e

SEED = 7000
N_UPLOADED = 4
N_URLS = 14
CHUNK = 3
JOB_TIMEOUT = 20          # a killed SimpleWorker's chunk is re-queued JOB_TIMEOUT + 60 s after it started
IMAGE_DELAY_S = 0.3


class SlowImages(QuietHandler):
    directory: Path

    def do_GET(self):  # noqa: N802
        path = self.directory / self.path.lstrip("/").split("?")[0]
        time.sleep(IMAGE_DELAY_S)
        try:
            body = path.read_bytes() if path.parent == self.directory else None
        except OSError:
            body = None
        self.send_body(body)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preannotate-data")
    write_demo_data(out, N_UPLOADED + N_URLS, SEED)
    return out


@pytest.fixture(scope="module")
def slow_host(images):
    handler = type("Handler", (SlowImages,), {"directory": images / "images"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def environ(label_studio, redis_url: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "REDIS_URL",
                                                            "MODEL_DIR", "DEMO", "LOCAL_FILES_DOCUMENT_ROOT")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN, REDIS_URL=redis_url,
               MODEL_DIR=str(tmp / "model-state"), DEMO="true", TORCH_THREADS="1", DOWNLOAD_WORKERS="1",
               PYTHONUNBUFFERED="1", ALLOW_PRIVATE_HOSTS="127.0.0.1")   # the slow image host is on loopback
    return env


def rq_executable() -> str:
    here = Path(sys.executable).with_name("rq")
    return str(here if here.exists() else Path(os.environ["VENV"]) / "bin" / "rq")


class Workers:
    """`rq worker` processes we started; stopped by their PIDs only."""

    def __init__(self, env: dict[str, str], redis_url: str, tmp: Path):
        self.env, self.redis_url, self.tmp = env, redis_url, tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [rq_executable(), "worker", "--url", self.redis_url, *WORKER_OPTIONS, "--name", name, "clip-ls"],
            env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        return self.procs[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def coordinator(env: dict[str, str], project: int, tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    with open(tmp / f"{name}.out", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "backend", "preannotate", "--project", str(project), "--demo", "--chunk",
             str(CHUNK), "--job-timeout", str(JOB_TIMEOUT), "--no-progress", *extra], env=env, cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def current_job(redis_url: str, worker_name: str) -> str | None:
    import redis
    from rq import Worker

    connection = redis.Redis.from_url(redis_url)
    for worker in Worker.all(connection=connection):
        if worker.name == worker_name:
            return worker.get_current_job_id()
    return None


def test_bulk_preannotation_survives_a_killed_worker_and_a_killed_coordinator(
        label_studio, redis_url, images, slow_host, tmp_path, e2e_timings):
    ls = label_studio
    config = (images / "label_config.xml").read_text()
    project = ls.create_project("bulk pre-annotation", config)["id"]
    files = sorted((images / "images").glob("*.png"))
    ls.import_files(project, files[:N_UPLOADED])
    ls.import_tasks(project, [{"image": f"{slow_host}/{f.name}"} for f in files[N_UPLOADED:]]
                    + [{"image": f"{slow_host}/missing.png"}])
    tasks = sorted(ls.tasks(project), key=lambda t: t["id"])
    assert len(tasks) == N_UPLOADED + N_URLS + 1
    missing = next(t["id"] for t in tasks if t["data"]["image"].endswith("/missing.png"))

    env = environ(ls, redis_url, tmp_path)
    workers = Workers(env, redis_url, tmp_path)
    started = time.monotonic()
    try:
        victim = workers.start("worker-a")
        workers.start("worker-b")
        first = coordinator(env, project, tmp_path, "run-1")

        # Kill worker A (SIGKILL: no goodbye) while it is in the middle of a chunk.
        deadline = time.monotonic() + 240
        while not (current_job(redis_url, "worker-a") or "").startswith("clip-ls-pre-"):
            assert time.monotonic() < deadline, f"worker A never took a chunk:\n{workers.log('worker-a')[-3000:]}"
            assert first.poll() is None, (tmp_path / "run-1.out").read_text()
            time.sleep(0.05)
        time.sleep(IMAGE_DELAY_S * 1.5)       # inside the chunk: downloads under way
        victim.kill()
        victim.wait(10)
        killed_at = time.monotonic()

        # Kill the coordinator too, then run the same command again: it follows the chunks still in flight.
        time.sleep(1.0)
        first.kill()
        first.wait(10)
        second = coordinator(env, project, tmp_path, "run-2")
        rc = second.wait(timeout=JOB_TIMEOUT + 240)
        output = (tmp_path / "run-2.out").read_text()
        elapsed = time.monotonic() - started
        e2e_timings(f"bulk pre-annotation of {len(tasks)} tasks, 2 workers, one killed: {elapsed:.1f} s "
                    f"(worker killed at {killed_at - started:.1f} s; its chunk is re-queued by RQ after "
                    f"{JOB_TIMEOUT} + 60 s)")
        print(output)
        assert rc == 1, output              # 1: some task failed (the missing image)
        assert re.search(rf"failed task {missing}: .*not found", output), output
        assert re.search(r": \d+ predicted, \d+ already had a prediction of this version, 1 failed", output), output

        version = re.search(r"model version (\S+):", output).group(1)
        interface = LabelInterface(config)
        for task in tasks:
            predictions = ls.predictions(task["id"])
            if task["id"] == missing:
                assert predictions == []
                continue
            assert len(predictions) == 1, (task["id"], predictions)     # exactly one, none lost, none twice
            assert predictions[0]["model_version"] == version
            assert interface.validate_prediction({"result": predictions[0]["result"]}, return_errors=True) == []
        assert any(p["result"] for t in tasks if t["id"] != missing for p in ls.predictions(t["id"]))

        # Running it again does nothing twice: every task is done, only the failed one is tried again, this time
        # by a worker the command starts itself (--workers 1) and stops at the end.
        workers.stop()
        third = coordinator(env, project, tmp_path, "run-3", "--workers", "1")
        assert third.wait(timeout=240) == 1
        again = (tmp_path / "run-3.out").read_text()
        assert "1 enqueued" in again, again
        assert all(len(ls.predictions(t["id"])) == (0 if t["id"] == missing else 1) for t in tasks)
    finally:
        workers.stop()
        for name in ("run-1", "run-2", "run-3"):
            print(f"--- {name}\n" + ((tmp_path / f"{name}.out").read_text() if (tmp_path / f"{name}.out").exists()
                                     else "(not run)"))

    # The connected backend reports the same version, so "Retrieve predictions" skips the predicted tasks.
    backend = BackendProcess(tmp_path / "backend", env={"LABEL_STUDIO_URL": ls.url,
                                                        "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
                                                        "ALLOW_PRIVATE_HOSTS": "127.0.0.1"})
    with backend:
        ls.connect_ml_backend(project, backend.url, title="clip")
        ls.retrieve_predictions(project)
    for task in tasks:
        predictions = ls.predictions(task["id"])
        assert len(predictions) == 1 and predictions[0]["model_version"] == version, (task["id"], predictions)
