"""Bulk pre-annotation of a whole Label Studio project over RQ workers.

    python -m backend preannotate --project 3 [--url http://label-studio:8080] [--workers N] [--demo]

The command (the *coordinator*) pages through the project's tasks through the Label Studio API, skips tasks
that already carry a prediction of our model version, and enqueues the rest in chunks on the RQ queue
``clip-ls``. Any number of workers on any machines sharing the Redis compute the predictions and write them
back with ``POST /api/predictions`` under our model version, so a later "Retrieve predictions" skips them::

    rq worker --url "$REDIS_URL" --worker-class rq.worker.SimpleWorker \
        --serializer rq.serializers.JSONSerializer clip-ls

(``SimpleWorker`` keeps the models loaded between jobs; each worker loads them once, at its first job, from its
own environment: the same settings as the server, plus ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY`` as seen
from that machine.) ``--workers N`` starts N such workers on this machine for the duration of the run.

Progress lives in Redis, per project and model version (``clip-ls:preannotate:<project>:<version>:*``), so a
run survives a crash of anything:

- ``done`` (task → ``predicted`` | ``existing``) and ``failed`` (task → reason) record every outcome;
- ``jobs`` (job id → task ids) the chunks in flight; it is written in the same transaction as the enqueue, so a
  coordinator that dies mid-run leaves no untracked chunk, and the next run of the same command follows the live
  chunks and enqueues only tasks neither done nor in flight;
- a worker that dies mid-chunk: RQ notices when the chunk's heartbeat lapses (``PREANNOTATE_JOB_TIMEOUT`` + 60 s
  for ``SimpleWorker``) and re-queues the chunk (``Retry``); the coordinator runs that check every few seconds.
  Tasks already ``done`` are skipped; a task the dead worker had started (``attempted``) is looked up in Label
  Studio first, so a prediction written just before the crash is not written twice;
- a chunk that keeps failing (3 tries) marks its remaining tasks failed with RQ's reason.

An image that cannot be fetched or decoded is a failed task with its reason, never a failed chunk. The run ends
with a summary: predicted / already there / failed, with the reasons. Exit status 0 when nothing failed, 1 when
some tasks failed, 2 when the run could not start.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from redis.exceptions import LockError
from redis.lock import Lock

from .jobs import QUEUE_NAME as QUEUE  # learning jobs and bulk chunks share the queue
from .jobs import WORKER_OPTIONS, rq_queue
from .studio.api import LabelStudioAPI, LabelStudioAPIError

log = logging.getLogger(__name__)

PREFIX = "clip-ls:preannotate"
STATE_TTL_S = 30 * 24 * 3600           # progress is kept this long after the last activity
RETRIES = 2                            # a chunk runs at most 1 + RETRIES times
LOCK_TTL_S = 30                        # one coordinator per project and version; a dead one's lock lapses
COORDINATOR_TIMEOUT_S = 10             # per Label Studio call of the coordinator: well inside the lock's life
POLL_S = 0.5
CLEANUP_EVERY_S = 5.0                  # how often the coordinator asks RQ to re-queue abandoned chunks
REPO_ROOT = Path(__file__).resolve().parent.parent


class LockLost(RuntimeError):
    """Another coordinator took over this project and version."""


class StartError(RuntimeError):
    """The run cannot start (no Redis, no Label Studio, no project); the message says how to fix it."""


def task_versions(task: dict) -> set[str]:
    """The model versions of a listed task's predictions (``predictions`` objects, else the DM's summary)."""
    versions = {p.get("model_version") for p in task.get("predictions") or [] if isinstance(p, dict)}
    summary = task.get("predictions_model_versions")
    if isinstance(summary, list):
        versions |= {v for v in summary if isinstance(v, str)}
    elif isinstance(summary, str) and summary:
        versions |= {v.strip() for v in summary.split(",")}
    return {v for v in versions if v}


# ---------------------------------------------------------------------------------------------- progress
class RunState:
    """A project's progress for one model version, in Redis; shared by the coordinator and every worker."""

    def __init__(self, redis, project: int, version: str):
        self.redis = redis
        self.project = project
        self.version = version
        base = f"{PREFIX}:{project}:{version}"
        self.done_key, self.failed_key = f"{base}:done", f"{base}:failed"
        self.attempted_key, self.jobs_key, self.lock_key = f"{base}:attempted", f"{base}:jobs", f"{base}:lock"
        self._locks: dict[str, Lock] = {}

    # -- workers
    def done_among(self, ids: list[int]) -> set[int]:
        flags = self.redis.hmget(self.done_key, [str(i) for i in ids]) if ids else []
        return {i for i, flag in zip(ids, flags) if flag is not None}

    def attempt(self, ids: list[int]) -> set[int]:
        """Mark tasks as started; returns those some earlier attempt had started already."""
        pipe = self.redis.pipeline(transaction=False)
        for i in ids:
            pipe.sadd(self.attempted_key, str(i))
        return {i for i, added in zip(ids, pipe.execute()) if not added}

    def mark_done(self, task: int, outcome: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.done_key, str(task), outcome).hdel(self.failed_key, str(task)).execute()

    def mark_failed(self, task: int, reason: str) -> None:
        self.redis.hset(self.failed_key, str(task), reason[:2000])

    # -- coordinator
    def counts(self) -> tuple[int, int]:
        pipe = self.redis.pipeline(transaction=False)
        done, failed = pipe.hlen(self.done_key).hlen(self.failed_key).execute()
        return int(done), int(failed)

    def outcomes(self) -> tuple[dict[int, str], dict[int, str]]:
        done = {int(k): v.decode() for k, v in self.redis.hgetall(self.done_key).items()}
        failed = {int(k): v.decode(errors="replace") for k, v in self.redis.hgetall(self.failed_key).items()}
        return done, failed

    def jobs(self) -> dict[str, list[int]]:
        return {k.decode(): json.loads(v) for k, v in self.redis.hgetall(self.jobs_key).items()}

    def touch(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key in (self.done_key, self.failed_key, self.attempted_key, self.jobs_key):
            pipe.expire(key, STATE_TTL_S)
        pipe.execute()

    def _lock(self, token: str) -> Lock:
        """redis-py's lock on this run's key, as held by ``token`` (one per token: the token is its identity)."""
        if token not in self._locks:
            self._locks[token] = self.redis.lock(self.lock_key, timeout=LOCK_TTL_S, blocking=False,
                                                 thread_local=False)
        return self._locks[token]

    def acquire(self, token: str) -> bool:
        return bool(self._lock(token).acquire(token=token)) or self.refresh(token)

    def refresh(self, token: str) -> bool:
        """Extend the lock if this run still holds it (one atomic step); False when another run took it."""
        try:
            return bool(self._lock(token).reacquire())
        except LockError:   # never held by this token, or taken over since
            return False

    def hold(self, token: str) -> None:
        if not self.refresh(token):
            raise LockLost(f"this run lost its lock {self.lock_key} (Label Studio or Redis answered slower than "
                           f"{LOCK_TTL_S} s) and another run took over; it stops here, the other one goes on")

    def release(self, token: str) -> None:
        try:
            self._lock(token).release()
        except LockError:   # not ours (any more): nothing to release
            pass


class Coordinator:
    """Enqueues a project's tasks in chunks, follows the chunks to the end, and reports."""

    def __init__(self, redis, queue, api: LabelStudioAPI, project: int, *, demo: bool = False, chunk: int = 16,
                 job_timeout: int = 900, out=sys.stderr, progress: bool = True):
        self.redis = redis
        self.queue = queue
        self.api = api
        self.project = project
        self.demo = demo
        self.chunk = max(1, chunk)
        self.job_timeout = job_timeout
        self.out = out
        self.progress = progress
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    # -- the steps
    def run_spec(self) -> dict:
        project = self.api.project(self.project)
        config = project.get("label_config") if isinstance(project, dict) else None
        if not isinstance(config, str) or not config.strip():
            raise StartError(f"project {self.project} has no labeling config")
        return {"project": self.project, "ls_url": self.api.url, "demo": self.demo, "label_config": config}

    def probe(self, run: dict, timeout: float = 900.0) -> str:
        """Ask a worker for the model version (the same code as the server's /setup)."""
        from rq import Worker
        from rq.job import JobStatus

        job = self.queue.enqueue("backend.worker.probe_version", run, job_timeout=max(self.job_timeout, 600),
                                 result_ttl=600, failure_ttl=3600,
                                 description=f"clip-ls version of project {run['project']}")
        started = time.monotonic()
        deadline, hinted = started + timeout, False
        while True:
            status = job.get_status()
            if status == JobStatus.FINISHED:
                return job.return_value()
            if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                raise StartError(f"a worker could not load the models: {_reason(job)}")
            if not hinted and status == JobStatus.QUEUED and time.monotonic() > started + 5 \
                    and not Worker.count(queue=self.queue):
                self.say(f"waiting for an RQ worker on queue {self.queue.name!r}: start one with `rq worker --url "
                         f"$REDIS_URL {' '.join(WORKER_OPTIONS)} {self.queue.name}` or pass --workers N")
                hinted = True
            if time.monotonic() > deadline:
                job.cancel()
                raise StartError(f"no worker answered within {timeout:.0f} s")
            time.sleep(POLL_S)

    def enqueue(self, state: RunState, run: dict, tasks: list[dict]) -> str:
        """One chunk; the job and its entry in ``jobs`` are written in one transaction."""
        from rq import Retry

        job_id = f"clip-ls-pre-{self.project}-{uuid.uuid4().hex[:16]}"
        slim = [{"id": t["id"], "data": t.get("data") or {}} for t in tasks]
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.multi()   # MULTI first: RQ then adds its commands to the same transaction
            pipe.hset(state.jobs_key, job_id, json.dumps([t["id"] for t in tasks]))
            pipe.hdel(state.failed_key, *[str(t["id"]) for t in tasks])
            self.queue.enqueue("backend.worker.run_chunk", run, slim, job_id=job_id, job_timeout=self.job_timeout,
                               retry=Retry(max=RETRIES), result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                               description=f"clip-ls pre-annotate project {self.project}: {len(tasks)} tasks",
                               pipeline=pipe)
            pipe.execute()
        return job_id

    def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        from rq.job import Job

        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        return {j: (s.decode() if s else None) for j, s in zip(job_ids, pipe.execute())}

    def settle(self, state: RunState, final: bool) -> int:
        """Drop finished chunks from ``jobs``; a failed or vanished chunk's unfinished tasks fail (``final``) or
        are left to the listing to enqueue again. Returns the number of chunks still in flight."""
        from rq.job import Job

        jobs = state.jobs()
        statuses = self.statuses(list(jobs))   # before ``done``: a task done meanwhile must count as done
        done = state.done_among([t for ids in jobs.values() for t in ids])
        live = 0
        for job_id, status in statuses.items():
            if status in ("queued", "started", "deferred", "scheduled"):
                live += 1
                continue
            leftover = [t for t in jobs[job_id] if t not in done]
            if status == "finished" or not leftover or not final:
                pass
            else:
                try:
                    reason = _reason(Job.fetch(job_id, connection=self.redis, serializer=self.queue.serializer))
                except Exception:   # noqa: BLE001 - the job expired or vanished
                    reason = "its job vanished from Redis"
                failed = state.redis.hmget(state.failed_key, [str(t) for t in leftover])
                for task, already in zip(leftover, failed):
                    if already is None:
                        state.mark_failed(task, f"chunk failed {1 + RETRIES} times: {reason}")
            state.redis.hdel(state.jobs_key, job_id)
        return live

    def run(self) -> int:
        import redis as redis_lib
        from rq.registry import StartedJobRegistry

        try:
            run = self.run_spec()
            self.say(f"project {self.project}: asking a worker for the model version …")
            version = self.probe(run)
        except (LabelStudioAPIError, StartError, redis_lib.RedisError) as error:
            self.say(f"error: {error}")
            return 2
        run["version"] = version
        state = RunState(self.redis, self.project, version)
        if not state.acquire(self.token):
            self.say(f"another run for project {self.project} holds {state.lock_key}: waiting up to {LOCK_TTL_S} s "
                     "for it to lapse (a crashed run's lock does)")
            deadline = time.monotonic() + LOCK_TTL_S + 5
            while not state.acquire(self.token):
                if time.monotonic() > deadline:
                    self.say(f"error: another preannotate run for project {self.project} (version {version}) is "
                             "still active; wait for it to finish, or stop it")
                    return 2
                time.sleep(1.0)
        try:
            return self._run(run, state, StartedJobRegistry(queue=self.queue))
        except KeyboardInterrupt:
            self.say("\ninterrupted: the queued chunks stay with the workers; run the same command again to "
                     "follow them and enqueue what is left")
            return 130
        except (LabelStudioAPIError, redis_lib.RedisError, LockLost) as error:
            self.say(f"error: {error}\nprogress is kept in Redis: run the same command again to resume")
            return 2
        finally:
            state.release(self.token)

    def _run(self, run: dict, state: RunState, started_registry) -> int:
        version = run["version"]
        self.settle(state, final=False)                        # chunks of an earlier, interrupted run
        in_flight = {t for ids in state.jobs().values() for t in ids}
        enqueued = existing = 0
        listed: set[int] = set()
        batch: list[dict] = []
        for page in self.api.pages(self.project):
            page = [t for t in page if isinstance(t.get("id"), int)]
            listed.update(t["id"] for t in page)
            done = state.done_among([t["id"] for t in page])
            for task in page:
                if task["id"] in in_flight or task["id"] in done:
                    continue
                if version in task_versions(task):
                    state.mark_done(task["id"], "existing")
                    existing += 1
                    continue
                batch.append(task)
                if len(batch) >= self.chunk:
                    self.enqueue(state, run, batch)
                    enqueued, batch = enqueued + len(batch), []
            state.hold(self.token)
        if batch:
            self.enqueue(state, run, batch)
            enqueued += len(batch)
        self.say(f"project {self.project}: {len(listed)} tasks, model version {version}: {enqueued} enqueued in chunks "
                 f"of {self.chunk}, {len(in_flight)} still in flight from an earlier run, {existing} already predicted")
        self._follow(state, started_registry, len(listed))
        return self.summary(state, listed)

    def _follow(self, state: RunState, started_registry, total: int) -> None:
        from rq import Worker

        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="task", desc=f"project {self.project}", file=self.out, mininterval=0.5)
        last_cleanup = last_hint = 0.0
        try:
            while True:
                done, failed = state.counts()
                if bar is not None:
                    bar.n = min(done + failed, total)
                    bar.refresh()
                now = time.monotonic()
                if now - last_cleanup > CLEANUP_EVERY_S:
                    started_registry.cleanup()                 # re-queues chunks of dead workers (RQ Retry)
                    if not self.settle(state, final=True):
                        break
                    state.hold(self.token)
                    state.touch()
                    last_cleanup = now
                    if now - last_hint > 60 and not Worker.count(queue=self.queue):
                        self.say(f"\nno RQ worker is listening on {self.queue.name!r}: chunks wait in the queue")
                        last_hint = now
                time.sleep(POLL_S)
        finally:
            if bar is not None:
                done, failed = state.counts()
                bar.n = min(done + failed, total)
                bar.close()

    def summary(self, state: RunState, listed: set[int]) -> int:
        """What became of the tasks the project has now (tasks deleted since an earlier run do not count)."""
        done, failed = ({k: v for k, v in outcome.items() if k in listed} for outcome in state.outcomes())
        predicted = sum(1 for v in done.values() if v == "predicted")
        existing = len(done) - predicted
        self.say(f"project {self.project}, model version {state.version}: {len(listed)} tasks: {predicted} predicted, "
                 f"{existing} already had a prediction of this version, {len(failed)} failed")
        for task, reason in sorted(failed.items())[:20]:
            self.say(f"  failed task {task}: {reason}")
        if len(failed) > 20:
            self.say(f"  … and {len(failed) - 20} more (Redis hash {state.failed_key})")
        return 1 if failed else 0


def _reason(job) -> str:
    try:
        result = job.latest_result()
        text = (result.exc_string if result is not None else None) or job.exc_info or "unknown"
    except Exception:   # noqa: BLE001
        text = "unknown"
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "unknown"


# ---------------------------------------------------------------------------------------------- local workers
def start_workers(n: int, redis_url: str, queue: str, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """N ``rq worker`` processes (SimpleWorker: models stay loaded) on this machine, this repo on PYTHONPATH."""
    rq_exe = Path(sys.executable).with_name("rq")
    command = [str(rq_exe)] if rq_exe.exists() else [sys.executable, "-m", "rq.cli"]
    env = {**os.environ, "REDIS_URL": redis_url,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    workers = []
    for i in range(n):
        out = open(log_dir / f"worker-{i}.log", "ab") if log_dir else subprocess.DEVNULL
        try:
            workers.append(subprocess.Popen(
                [*command, "worker", "--url", redis_url, *WORKER_OPTIONS, queue],
                env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
    return workers


def stop_workers(workers: list[subprocess.Popen], timeout: float = 30.0) -> None:
    """Warm shutdown (SIGTERM: finish the current chunk) of the workers we started, by PID; SIGKILL if stuck."""
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--url", help="Label Studio URL; default: LABEL_STUDIO_URL")
    parser.add_argument("--workers", type=int, default=0,
                        help="start N local RQ workers for this run (default 0: use the workers already running)")
    parser.add_argument("--redis", help="Redis URL; default: REDIS_URL")
    parser.add_argument("--queue", default=QUEUE, help=f"RQ queue (default {QUEUE})")
    parser.add_argument("--chunk", type=int, help="tasks per job; default: PREANNOTATE_CHUNK")
    parser.add_argument("--job-timeout", type=int, help="seconds a chunk may run; default: PREANNOTATE_JOB_TIMEOUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    parser.add_argument("--demo", action="store_true", help="workers use the bundled tiny shapes models")


def preannotate_command(args) -> int:
    import redis

    from .config import Settings  # plain data: the coordinator loads no models and no torch

    settings = Settings.from_env()
    redis_url = args.redis or settings.redis_url
    ls_url = args.url or settings.label_studio_url
    if not redis_url:
        print("error: bulk pre-annotation runs on RQ: set REDIS_URL (or --redis), e.g. redis://localhost:6379/0",
              file=sys.stderr)
        return 2
    if not ls_url:
        print("error: set LABEL_STUDIO_URL or pass --url, e.g. http://localhost:8080", file=sys.stderr)
        return 2
    connection = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=60)
    try:
        connection.ping()
    except redis.RedisError as error:
        print(f"error: cannot reach Redis at {redis_url}: {error}", file=sys.stderr)
        return 2
    queue = rq_queue(connection, args.queue)
    api = LabelStudioAPI(ls_url, settings.label_studio_api_key or None, timeout=COORDINATOR_TIMEOUT_S)
    workers = []
    if args.workers > 0:
        import tempfile

        log_dir = Path(tempfile.mkdtemp(prefix="clip-ls-workers-"))
        workers = start_workers(args.workers, redis_url, args.queue, log_dir)
        print(f"started {args.workers} local RQ worker(s), logs in {log_dir}", file=sys.stderr)
    try:
        return Coordinator(connection, queue, api, args.project, demo=args.demo,
                           chunk=args.chunk or settings.preannotate_chunk,
                           job_timeout=args.job_timeout or settings.preannotate_job_timeout,
                           progress=not args.no_progress).run()
    finally:
        stop_workers(workers)
