"""The RQ worker's composition root: what ``rq worker ... clip-ls`` runs, for learning jobs (``run_job``) and bulk
pre-annotation chunks (``probe_version``, ``run_chunk``).

A worker process reads its settings from its own environment and loads the models once, at its first job, shared
by every kind of job (``worker_models``); ``SimpleWorker`` keeps them loaded between jobs. ``jobs.py`` only puts
jobs on the queue and ``preannotate.py`` only coordinates a bulk run; neither imports this module (RQ finds these
functions by their dotted names), so the import graph has no cycle.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from rq import get_current_job

from . import wiring
from .config import Settings, demo_from_env
from .labeling.factory import build_labeler, set_threads
from .model import ClipBackend
from .preannotate import RunState, StartError
from .studio.api import LabelStudioAPI, LabelStudioAPIError

log = logging.getLogger(__name__)

_models: dict[bool, tuple[Any, Any]] = {}
_learners: dict[bool, Any] = {}
_worker_lock = threading.Lock()


def run_job(kind: str, payload: dict):
    """What an RQ worker runs. Models load once per worker process, at the first job (lazily)."""
    return worker_learner(bool(payload.get("demo"))).run(kind, payload)


def worker_models(demo: bool) -> tuple[Any, Any]:
    """The worker process's settings (from its environment) and models (a ``Labeler``), loaded once at the first
    job that needs them and shared by learning jobs and bulk pre-annotation chunks. ``demo`` (or ``DEMO=true`` in
    the worker's environment): the bundled tiny models."""
    demo = demo or demo_from_env()
    with _worker_lock:
        if demo not in _models:
            settings = Settings.from_env(demo=demo)
            set_threads(settings.torch_threads)
            started = time.perf_counter()
            _models[demo] = settings, build_labeler(settings.model_spec())
            log.info("worker: models loaded in %.1f s (%s)", time.perf_counter() - started,
                     "demo" if demo else settings.clip_model)
        return _models[demo]


def worker_learner(demo: bool):
    """The worker process's ``Learner``."""
    settings, labeler = worker_models(demo)
    with _worker_lock:
        if settings.demo not in _learners:
            _learners[settings.demo] = wiring.learner(settings, labeler)
        return _learners[settings.demo]


_backends: dict[tuple[str, bool], Any] = {}
_backends_lock = threading.Lock()


def worker_backend(ls_url: str | None, demo: bool):
    """The worker process's ``ClipBackend`` for one Label Studio, around the worker's models (loaded once).

    The worker's own ``LABEL_STUDIO_URL`` wins over the coordinator's: it is how this machine reaches Label
    Studio (a container name, say), while the coordinator may run elsewhere."""
    base, labeler = worker_models(demo)
    url = base.label_studio_url or ls_url or ""
    with _backends_lock:
        if (url, base.demo) not in _backends:
            if not base.redis_url:
                log.warning("worker: REDIS_URL is not set in this worker's environment, so it shares neither the "
                            "feature cache nor the learned corrections of the server; its predictions may carry "
                            "another model version than the server's /setup. Set REDIS_URL as for the server")
            settings = base.replace(label_studio_url=url)
            _backends[(url, base.demo)] = ClipBackend(settings, labeler)
        return _backends[(url, base.demo)]


def _worker_api(backend) -> LabelStudioAPI:
    url = backend.settings.label_studio_url   # the worker's own, else the coordinator's (worker_backend)
    if not url:
        raise StartError("the worker does not know Label Studio's address: set LABEL_STUDIO_URL")
    return LabelStudioAPI(url, backend.settings.label_studio_api_key or None)


def _connection():
    job = get_current_job()
    if job is not None:
        return job.connection
    return redis.Redis.from_url(os.environ["REDIS_URL"])


def probe_version(run: dict) -> str:
    """RQ job: the model version this worker's settings give the project (the coordinator keys progress by it)."""
    backend = worker_backend(run.get("ls_url"), bool(run.get("demo")))
    config = backend.settings.project_config(run["label_config"])
    return backend.model_version(config, run["project"])


def run_chunk(run: dict, tasks: list[dict]) -> dict:
    """RQ job: predict a chunk of tasks and write each prediction back to Label Studio."""
    backend = worker_backend(run.get("ls_url"), bool(run.get("demo")))
    state = RunState(_connection(), run["project"], run["version"])
    return process_chunk(backend, _worker_api(backend), state, run, tasks)


def process_chunk(backend, api: LabelStudioAPI, state: RunState, run: dict, tasks: list[dict]) -> dict:
    """Skip done tasks, settle the ones an earlier attempt started, predict the rest and post them.

    Per task failures (image, a task Label Studio no longer has) are recorded and the chunk goes on; anything
    else (Label Studio or Redis unreachable) raises, so RQ retries the chunk, whose done tasks are then skipped.
    """
    counts = {"predicted": 0, "existing": 0, "failed": 0, "skipped": 0}
    ids = [t["id"] for t in tasks]
    done = state.done_among(ids)
    todo = [t for t in tasks if t["id"] not in done]
    counts["skipped"] = len(tasks) - len(todo)
    if not todo:
        return counts
    started_before = state.attempt([t["id"] for t in todo])
    if started_before:
        config = backend.settings.project_config(run["label_config"])
        ours = {run["version"], backend.model_version(config, run["project"])}
        settled = set()
        for task in [t for t in todo if t["id"] in started_before]:
            try:
                versions = api.prediction_versions(task["id"])
            except LabelStudioAPIError as failure:
                if failure.status not in (400, 404):
                    raise
                state.mark_failed(task["id"], f"Label Studio no longer has the task: {failure}")
                counts["failed"] += 1
                settled.add(task["id"])
                continue
            if versions & ours:   # written by an attempt that died before recording it
                state.mark_done(task["id"], "predicted")
                counts["existing"] += 1
                settled.add(task["id"])
        todo = [t for t in todo if t["id"] not in settled]
    if not todo:
        return counts
    version, outcomes = backend.predict_each(todo, run["label_config"], run["project"])
    if version != run["version"]:
        log.warning("project %s: this worker's model version %s differs from the run's %s (learned corrections "
                    "since the start, or different settings); predictions carry %s", run["project"], version,
                    run["version"], version)
    for task, (prediction, error) in zip(todo, outcomes):
        if error:
            state.mark_failed(task["id"], error)
            counts["failed"] += 1
            continue
        try:
            api.post_prediction(task["id"], prediction, version)
        except LabelStudioAPIError as failure:
            if failure.status in (400, 404):   # the task is gone, or Label Studio refuses this prediction
                state.mark_failed(task["id"], f"Label Studio refused the prediction: {failure}")
                counts["failed"] += 1
                continue
            raise
        state.mark_done(task["id"], "predicted")
        counts["predicted"] += 1
    log.info("project %s: chunk of %d tasks: %s", run["project"], len(tasks), counts)
    return counts


# ---------------------------------------------------------------------------------------------- coordinator
