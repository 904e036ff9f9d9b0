"""Background work: RQ on Redis when REDIS_URL is set, an in-process worker thread otherwise.

The webhook only queues a job and answers; the job (download the image, embed the corrected regions, store the
memory) runs elsewhere:

- with REDIS_URL: on the RQ queue ``clip-ls``, run by any number of workers on any machines sharing that Redis::

      rq worker --url "$REDIS_URL" --worker-class rq.worker.SimpleWorker \
          --serializer rq.serializers.JSONSerializer clip-ls

  A worker loads the models once, at its first job, from the same settings (environment) as the backend.
  ``SimpleWorker`` runs jobs in the worker process itself, so the models stay loaded between jobs; RQ's default
  worker forks a fresh process per job and would load them for every job (it works, just slower).
- without: one daemon thread in the backend process runs the jobs in order (``InProcessJobs``).

Jobs are plain data (``kind``, ``payload``: JSON-like dicts) run by ``learning.Learner.run`` (on RQ through
``backend.worker.run_job``, the worker processes' composition root). On Redis they are
JSON (RQ's JSONSerializer on every queue and worker): whoever can write to Redis can queue work, but never run
code by unpickling. Payloads hold no secrets (workers read Label Studio's key from their own settings), live
an hour (a day when failed), and are capped in size.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

QUEUE_NAME = "clip-ls"
JOB_TIMEOUT_S = {"learn": 30 * 60, "rebuild": 12 * 3600}
RESULT_TTL_S = 3600
FAILURE_TTL_S = 24 * 3600
MAX_PAYLOAD_BYTES = 4 * 2**20
SERIALIZER = "rq.serializers.JSONSerializer"
WORKER_OPTIONS = ("--worker-class", "rq.worker.SimpleWorker", "--serializer", SERIALIZER)   # the documented worker

Runner = Callable[[str, dict], Any]


class InProcessJobs:
    """A bounded queue and one daemon thread: jobs run one at a time, in the order they came.

    The thread starts at the first job, in the process that submits it: gunicorn ``--preload`` builds the app in
    its master process and forks the worker, and threads do not survive a fork."""

    def __init__(self, run: Runner, max_pending: int = 10_000):
        self._run = run
        self._max_pending = max_pending
        self._pid = None
        self._start_lock = threading.Lock()

    def _started(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._queue: queue.Queue = queue.Queue(self._max_pending)
            self._idle = threading.Condition()
            self._pending = 0
            threading.Thread(target=self._work, args=(self._queue,), name="clip-ls-jobs", daemon=True).start()
            self._pid = os.getpid()

    def submit(self, kind: str, payload: dict) -> str:
        self._started()
        job_id = uuid.uuid4().hex[:12]
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait((job_id, kind, payload))
        except queue.Full:
            with self._idle:
                self._pending -= 1
            raise RuntimeError("too many learning jobs waiting; try again later") from None
        return job_id

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished; False on timeout."""
        if self._pid != os.getpid():
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _work(self, jobs: queue.Queue) -> None:
        while True:
            job_id, kind, payload = jobs.get()
            try:
                self._run(kind, payload)
            except Exception:   # noqa: BLE001 - a failed job must not stop the worker
                log.exception("background job %s (%s) failed", job_id, kind)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


class RQJobs:
    """Jobs on the RQ queue ``clip-ls`` of the Redis at ``url``."""

    def __init__(self, url: str, queue_name: str = QUEUE_NAME):
        import redis

        self.connection = redis.Redis.from_url(url)
        self.queue = rq_queue(self.connection, queue_name)

    def submit(self, kind: str, payload: dict) -> str:
        size = len(json.dumps(payload))
        if size > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a {kind} job of {size:,} bytes is above the limit of {MAX_PAYLOAD_BYTES:,}")
        job = self.queue.enqueue("backend.worker.run_job", kind, payload, job_timeout=JOB_TIMEOUT_S.get(kind, 3600),
                                 result_ttl=RESULT_TTL_S, failure_ttl=FAILURE_TTL_S,
                                 description=f"clip-ls {kind} project {payload.get('project')}")
        return job.id


def rq_queue(connection, name: str = QUEUE_NAME):
    """An RQ queue that stores jobs as JSON (the worker must be started with the same serializer)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    return Queue(name, connection=connection, serializer=JSONSerializer)
