"""The bulk job's bookkeeping without Label Studio or models: a chunk posts each prediction once, even when an
earlier attempt died after posting; failures are recorded per task; paging and version detection. The whole run
against a real Label Studio with real workers is tests/e2e/test_preannotate.py."""
from __future__ import annotations

import uuid

import pytest

from backend.config import Settings
from backend.preannotate import LabelStudioAPIError, RunState, task_versions
from backend.worker import process_chunk


class FakeAPI:
    def __init__(self):
        self.posted: list[tuple[int, str]] = []
        self.stored: dict[int, set[str]] = {}
        self.refuse: set[int] = set()
        self.down = False

    def prediction_versions(self, task):
        return self.stored.get(task, set())

    def post_prediction(self, task, prediction, version):
        if self.down:
            raise LabelStudioAPIError("cannot reach Label Studio", None)
        if task in self.refuse:
            raise LabelStudioAPIError("task not found", 404)
        self.posted.append((task, version))
        self.stored.setdefault(task, set()).add(version)
        return {"id": len(self.posted)}


class FakeBackend:
    settings = Settings.from_env({})

    def __init__(self, version="clip-v1", broken=()):
        self.version = version
        self.broken = set(broken)
        self.calls: list[list[int]] = []

    def model_version(self, config, project=None):
        return self.version

    def predict_each(self, tasks, label_config, project):
        self.calls.append([t["id"] for t in tasks])
        return self.version, [({"result": [], "score": 0.5, "model_version": self.version},
                               "cannot decode image" if t["id"] in self.broken else None) for t in tasks]


@pytest.fixture
def state(redis_url):
    import redis

    project = int(uuid.uuid4().int % 10**6)
    state = RunState(redis.Redis.from_url(redis_url), project, "clip-v1")
    yield state
    state.redis.delete(state.done_key, state.failed_key, state.attempted_key, state.jobs_key, state.lock_key)


CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="bee"/></RectangleLabels></View>')
RUN = {"project": 1, "version": "clip-v1", "label_config": CONFIG}


def tasks(*ids):
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


def test_a_chunk_posts_each_prediction_once_and_records_failures(state):
    api, backend = FakeAPI(), FakeBackend(broken={3})
    api.refuse = {4}
    counts = process_chunk(backend, api, state, RUN, tasks(1, 2, 3, 4))
    assert counts == {"predicted": 2, "existing": 0, "failed": 2, "skipped": 0}
    assert api.posted == [(1, "clip-v1"), (2, "clip-v1")]
    done, failed = state.outcomes()
    assert done == {1: "predicted", 2: "predicted"}
    assert failed[3] == "cannot decode image" and "refused" in failed[4]
    again = process_chunk(backend, api, state, RUN, tasks(1, 2))          # a retried chunk: nothing twice
    assert again["skipped"] == 2 and api.posted == [(1, "clip-v1"), (2, "clip-v1")]


def test_a_task_posted_by_an_attempt_that_died_is_not_posted_again(state):
    api, backend = FakeAPI(), FakeBackend()
    state.attempt([5, 6])                    # an earlier attempt started both ...
    api.stored[5] = {"clip-v1"}              # ... and posted 5 before it died, without recording it
    counts = process_chunk(backend, api, state, RUN, tasks(5, 6))
    assert counts["existing"] == 1 and counts["predicted"] == 1
    assert api.posted == [(6, "clip-v1")] and backend.calls == [[6]]
    assert state.outcomes()[0] == {5: "predicted", 6: "predicted"}


def test_label_studio_down_fails_the_chunk_so_rq_retries_it(state):
    api, backend = FakeAPI(), FakeBackend()
    api.down = True
    with pytest.raises(LabelStudioAPIError):
        process_chunk(backend, api, state, RUN, tasks(7, 8))
    api.down = False
    process_chunk(backend, api, state, RUN, tasks(7, 8))   # the retry: both attempted before, neither posted
    assert sorted(api.posted) == [(7, "clip-v1"), (8, "clip-v1")]


def test_a_newer_version_from_learning_is_what_the_predictions_carry(state):
    api, backend = FakeAPI(), FakeBackend(version="clip-v1-abcd1234")
    process_chunk(backend, api, state, RUN, tasks(9))
    assert api.posted == [(9, "clip-v1-abcd1234")]


def test_a_later_run_takes_over_a_crashed_coordinators_lock_only_after_it_lapses(state):
    assert state.acquire("first")
    assert not state.acquire("second")
    assert state.refresh("first") and not state.refresh("second")
    state.release("second")                  # not its lock: nothing happens
    assert not state.acquire("second")
    state.release("first")
    assert state.acquire("second")


def test_the_coordinator_reads_the_settings_without_importing_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, backend.__main__, backend.preannotate; from backend.config import Settings; "
            "Settings.from_env(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_versions_are_read_from_listed_tasks():
    assert task_versions({"predictions": [{"model_version": "a"}, {"model_version": ""}, 3]}) == {"a"}
    assert task_versions({"predictions_model_versions": "a, b"}) == {"a", "b"}
    assert task_versions({"predictions_model_versions": ["c"]}) == {"c"}
    assert task_versions({}) == set()
