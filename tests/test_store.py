"""The state stores, each against the real thing: SQLite under a temporary MODEL_DIR, and a real Redis (conftest's
``redis_url``: a database of its own on 127.0.0.1:6379, else a private `redis-server`).

What is checked: updates are atomic and versioned, late or older writes never win, deletions stick, every
process sees the same state, state survives reopening, and concurrent readers never see half an update.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from e2e.local_http import free_port

from backend.labeling.adapter import Examples
from backend.store import Change, RedisStore, SqliteStore, StoreUnavailable

REPO = Path(__file__).resolve().parent.parent


def open_test_store(kind: str, tmp_path: Path, redis_url: str | None, prefix: str):
    return SqliteStore(tmp_path / "state") if kind == "sqlite" else RedisStore(redis_url, prefix=prefix)


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """Opens stores on one shared state (as separate processes would); each test gets its own state."""
    prefix = f"clip-ls-test-{uuid.uuid4().hex[:8]}"
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    opened = []

    def make():
        store = open_test_store(request.param, tmp_path, url, prefix)
        opened.append(store)
        return store

    yield make
    for store in opened:
        if isinstance(store, RedisStore):
            for key in store.redis.scan_iter(f"{prefix}:*"):
                store.redis.delete(key)
        store.close()


def examples(n: int, label: str = "diamond", seed: int = 0, task: int | None = 1) -> Examples:
    generator = torch.Generator().manual_seed(seed)
    return Examples(("label",) * n, (label,) * n, F.normalize(torch.randn(n, 16, generator=generator), dim=-1), task)


# ---------------------------------------------------------------- tests
def test_examples_round_trip_in_float16():
    original = Examples(("label", "label", "scene"), ("diamond", None, "Outdoor"),
                        F.normalize(torch.randn(3, 32), dim=-1), task=9)
    decoded = Examples.from_bytes(original.to_bytes())
    assert decoded.heads == original.heads and decoded.labels == original.labels and decoded.task == 9
    assert torch.allclose(decoded.embeddings, original.embeddings, atol=1e-3)
    empty = Examples.from_bytes(Examples((), (), torch.zeros(0, 0)).to_bytes())
    assert len(empty) == 0


def test_apply_bumps_the_revision_once_per_update(make_store):
    store = make_store()
    assert store.revision(1, "s") == 0 and store.memory(1, "s")[1].token == ""
    revision = store.apply(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes(), 1),
                                    Change("annotation:2", 1.0, examples(3, "pentagon").to_bytes(), 2)])
    assert revision == 1 == store.revision(1, "s")
    revision, memory = store.memory(1, "s")
    assert revision == 1 and len(memory) == 5 and memory.counts("label") == {"diamond": 2, "pentagon": 3}
    assert memory.token
    assert store.apply(1, "s", []) == 1   # nothing changed: same revision


def test_older_writes_lose_and_equal_or_newer_win(make_store):
    store = make_store()
    store.apply(1, "s", [Change("annotation:1", 10.0, examples(2).to_bytes())])
    assert store.apply(1, "s", [Change("annotation:1", 5.0, examples(7).to_bytes())]) == 1
    assert len(store.memory(1, "s")[1]) == 2
    assert store.apply(1, "s", [Change("annotation:1", 10.0, examples(4).to_bytes())]) == 2
    assert store.apply(1, "s", [Change("annotation:1", 11.0, examples(1).to_bytes())]) == 3
    assert len(store.memory(1, "s")[1]) == 1


def test_forgetting_sticks_until_the_memory_is_replaced(make_store):
    store = make_store()
    store.apply(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes(), task=4)])
    assert store.apply(1, "s", [Change("annotation:1", 2.0, None)]) == 2
    assert len(store.memory(1, "s")[1]) == 0 and store.memory(1, "s")[1].token == ""
    # a slow job that started before the deletion cannot bring the annotation back
    assert store.apply(1, "s", [Change("annotation:1", 99.0, examples(2).to_bytes())]) == 2
    assert store.records(1, "s") == {}
    # nor can START_TRAINING's rebuild, from a listing fetched before the deletion
    assert store.replace(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes(), task=4)]) == 3
    assert store.records(1, "s") == {} and store.memory(1, "s")[1].token == ""


def test_a_rebuild_drops_what_the_listing_lacks_and_keeps_newer_records(make_store):
    store = make_store()
    store.apply(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes(), task=4),
                         Change("annotation:2", 5.0, examples(1).to_bytes(), task=5)])
    listed = [Change("annotation:2", 3.0, examples(3).to_bytes(), task=5),   # updated since the listing
              Change("annotation:3", 1.0, examples(2).to_bytes(), task=6)]
    assert store.replace(1, "s", listed) == 2
    records = store.records(1, "s")
    assert set(records) == {"annotation:2", "annotation:3"} and records["annotation:2"][0] == 5.0
    assert sorted(store.tasks_sources(1, "s", {5, 6})) == ["annotation:2", "annotation:3"]
    assert store.tasks_sources(1, "s", {4}) == []


def test_projects_and_embedding_spaces_are_separate(make_store):
    store = make_store()
    store.apply(1, "a", [Change("annotation:1", 1.0, examples(2).to_bytes())])
    assert store.revision(2, "a") == 0 and store.revision(1, "b") == 0
    assert len(store.memory(2, "a")[1]) == 0 and len(store.memory(1, "b")[1]) == 0


def test_state_is_shared_by_every_opener_and_survives_reopening(make_store):
    writer, reader = make_store(), make_store()
    assert reader.memory(1, "s")[0] == 0
    writer.apply(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes())])
    revision, memory = reader.memory(1, "s")   # the reader's cached revision 0 is stale: reloaded
    assert revision == 1 and len(memory) == 2
    assert reader.memory(1, "s")[1] is memory   # cached while the revision stays
    writer.close()
    reopened = make_store()
    assert reopened.memory(1, "s")[1].token == memory.token


def test_another_process_sees_the_update(make_store, tmp_path):
    store = make_store()
    store.apply(1, "s", [Change("annotation:1", 1.0, examples(2).to_bytes())])
    if isinstance(store, SqliteStore):
        opener = f"SqliteStore({str(store.path.parent)!r})"
    else:
        opener = f"RedisStore({store.url!r}, prefix={store.prefix!r})"
    code = (f"from backend.store import *\nstore = {opener}\nrevision, memory = store.memory(1, 's')\n"
            f"print(revision, len(memory), memory.token)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2", store.memory(1, "s")[1].token]


def test_readers_never_see_half_an_update(make_store):
    """Writers apply pairs of records in one update while readers take snapshots: every snapshot holds whole
    pairs only, and exactly as many as its revision says."""
    writers, per_writer = 3, 15
    stores = [make_store() for _ in range(writers + 2)]
    failures, done = [], threading.Event()

    def write(w: int):
        for i in range(per_writer):
            pair = [Change(f"w{w}-{i}-{half}", 1.0, examples(1, seed=i).to_bytes()) for half in "ab"]
            stores[w].apply(1, "s", pair)

    def read(store):
        while not done.is_set():
            revision, records = store.snapshot(1, "s")
            sources = set(records)
            halves = {s[:-2] for s in sources}
            if any(f"{h}-a" not in sources or f"{h}-b" not in sources for h in halves):
                failures.append(f"half an update at revision {revision}: {sorted(sources)}")
            if len(sources) != 2 * revision:
                failures.append(f"revision {revision} with {len(sources)} records")

    readers = [threading.Thread(target=read, args=(s,)) for s in stores[writers:]]
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not failures, failures[:3]
    assert stores[0].revision(1, "s") == writers * per_writer
    assert len(stores[0].memory(1, "s")[1]) == 2 * writers * per_writer


def test_prediction_records(make_store):
    store = make_store()
    assert store.prediction(1, 5) is None
    store.record_predictions(1, {5: {"model_version": "v", "result": [{"type": "rectanglelabels"}]}, 6: {"result": []}})
    assert make_store().prediction(1, 5) == {"model_version": "v", "result": [{"type": "rectanglelabels"}]}
    assert store.prediction(2, 5) is None and store.prediction(1, 6) == {"result": []}
    store.record_predictions(1, {5: {"result": []}})
    assert store.prediction(1, 5) == {"result": []}


def test_an_unreadable_record_is_skipped(make_store):
    store = make_store()
    store.apply(1, "s", [Change("annotation:1", 1.0, b"garbage"), Change("annotation:2", 1.0, examples(2).to_bytes())])
    assert len(store.memory(1, "s")[1]) == 2



def test_unreachable_redis_is_one_clear_error():
    with pytest.raises(StoreUnavailable, match=r"REDIS_URL=redis://:\*\*\*@127.0.0.1:\d+/0.*MODEL_DIR"):
        RedisStore(f"redis://:secret@127.0.0.1:{free_port()}/0")


def test_unwritable_model_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="MODEL_DIR"):
        SqliteStore(blocker / "state")
