"""Where learned state lives: Redis when REDIS_URL is set, else an SQLite file under MODEL_DIR.

Two kinds of state, both per Label Studio project:

- the few-shot memory: one record per source (an annotation), with a stamp (the annotation's ``updated_at``)
  so that an older event processed late never overwrites a newer one, and deletions leave a tombstone so that
  a slow job cannot bring a deleted annotation back. Every change bumps the project's revision in the same
  transaction, and readers take revision and records in one transaction: a reader sees a whole state or the
  previous one, never half of an update. Records are kept per embedding ``space`` (the CLIP model and crop
  settings that produced them), so switching models never mixes incomparable embeddings.
- what the backend predicted per task (Label Studio's ``annotation.prediction`` is usually empty), so that boxes
  an annotator deleted can be learned as background.

Both stores are shared by every process that opens them (web workers, RQ workers) and survive restarts.
``open_store(redis_url, model_dir)`` picks one.

>>> import tempfile
>>> store = SqliteStore(tempfile.mkdtemp())
>>> store.apply(7, "space", [Change("a1", 1.0, b"payload", task=3)])
1
>>> store.records(7, "space")
{'a1': (1.0, 3, b'payload')}
>>> store.apply(7, "space", [Change("a1", 0.5, b"older")])   # older than what is stored: ignored
1
>>> store.apply(7, "space", [Change("a1", 2.0, None)])       # forget: a tombstone
2
>>> store.apply(7, "space", [Change("a1", 3.0, b"late")])    # a late write cannot revive it
2
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import NamedTuple

from cachetools import LRUCache

from .labeling.adapter import Examples, Memory

log = logging.getLogger(__name__)

TOMBSTONE = 1e300                  # the stamp of a forgotten source: nothing is newer
CLOCK_SLACK_S = 300                # a stored stamp further ahead of this clock was forged
PREDICTION_TTL_S = 90 * 24 * 3600  # how long the record of a task's prediction is kept (Redis)
SQLITE_FILE = "learning.sqlite3"
MEMORIES_KEPT = 32                 # decoded memories a process keeps, least recently used first to go: a request
                                   # can name any project, and one with 2,000 examples at 512 dimensions holds ~15 MB


class StoreUnavailable(RuntimeError):
    """The configured store cannot be reached or opened; the message says which and how to fix it."""


class Change(NamedTuple):
    """Set one source's record (``payload``), or forget it (``payload=None``: always applies, ``stamp`` unused).
    A record is set only when ``stamp`` is not older than the stored one; a forgotten source stays forgotten."""

    source: str
    stamp: float
    payload: bytes | None
    task: int | None = None


Record = tuple[float, int | None, bytes]   # stamp, task, payload (b"" = tombstone)


class Store:
    """The interface both stores implement, plus the per-process cache of decoded memories."""

    def __init__(self):
        # (project, space) → revision, memory, and per source (payload, decoded) to rebuild the next one from
        self._cache: LRUCache[tuple[int, str], tuple[int, Memory, dict[str, tuple[bytes, Examples]]]] = \
            LRUCache(MEMORIES_KEPT)
        self._cache_lock = threading.Lock()

    # -- implemented per store
    def revision(self, project: int, space: str) -> int:
        raise NotImplementedError

    def snapshot(self, project: int, space: str) -> tuple[int, dict[str, Record]]:
        """Revision and every record, read in one transaction."""
        raise NotImplementedError

    def apply(self, project: int, space: str, changes: Iterable[Change]) -> int:
        """Apply changes atomically; the revision is bumped once when anything changed. Returns the revision."""
        raise NotImplementedError

    def replace(self, project: int, space: str, changes: Iterable[Change]) -> int:
        """Replace the project's memory by a rebuild's listing atomically, bumping the revision (tombstones
        stay: see ``_replacement``)."""
        raise NotImplementedError

    def record_predictions(self, project: int, records: Mapping[int, dict]) -> None:
        raise NotImplementedError

    def prediction(self, project: int, task: int) -> dict | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # -- shared
    def records(self, project: int, space: str) -> dict[str, tuple[float, int | None, bytes]]:
        """Live records (tombstones left out): source → (stamp, task, payload)."""
        return {k: v for k, v in self.snapshot(project, space)[1].items() if v[2]}

    def memory(self, project: int, space: str) -> tuple[int, Memory]:
        """The project's memory, decoded once per revision and process (for the ``MEMORIES_KEPT`` projects used
        last); records unchanged since the last revision are not decoded again, and the memory reuses the last
        one's per-fold Gram matrices (one new annotation: one fold's)."""
        key = (project, space)
        revision = self.revision(project, space)
        with self._cache_lock:
            cached = self._cache.get(key)
        if cached and cached[0] == revision:
            return cached[:2]
        revision, records = self.snapshot(project, space)
        before = cached[2] if cached else {}
        decoded: dict[str, tuple[bytes, Examples]] = {}
        for source in sorted(records):
            payload = records[source][2]
            if not payload:
                continue
            if source in before and before[source][0] == payload:   # unchanged: decoded (and hashed) already
                decoded[source] = before[source]
                continue
            try:
                decoded[source] = (payload, Examples.from_bytes(payload))
            except (ValueError, KeyError, RuntimeError) as error:
                log.warning("project %s: unreadable memory record %r skipped: %s", project, source, error)
        memory = Memory.build([examples for _, examples in decoded.values()], previous=cached[1] if cached else None)
        with self._cache_lock:
            latest = self._cache.get(key)
            if latest is None or latest[0] < revision:
                self._cache[key] = (revision, memory, decoded)
        return revision, memory

    def tasks_sources(self, project: int, space: str, tasks: set[int]) -> list[str]:
        """The live sources learned from these tasks."""
        return [k for k, (_, task, payload) in self.snapshot(project, space)[1].items() if payload and task in tasks]


def _stamp(change: Change) -> float:
    return TOMBSTONE if change.payload is None else change.stamp


def _pack(change: Change) -> bytes:
    return struct.pack("<dq", _stamp(change), -1 if change.task is None else int(change.task)) + (change.payload or b"")


def _unpack(value: bytes) -> Record:
    stamp, task = struct.unpack("<dq", value[:16])
    return stamp, None if task < 0 else task, value[16:]


def _wins(change: Change, stored_stamp: float | None) -> bool:
    if stored_stamp is None:
        return True
    if stored_stamp >= TOMBSTONE:
        return False
    if stored_stamp > time.time() + CLOCK_SLACK_S:   # from the future: forged (stamps are clamped on receipt)
        return True
    return _stamp(change) >= stored_stamp


def _replacement(stored: Mapping[str, float], changes: Iterable[Change]) -> tuple[list[str], list[Change]]:
    """What replacing a memory by ``changes`` (a rebuild's listing) deletes and writes: live records the listing
    lacks go, listed records are written where they win. Tombstones stay (Label Studio never reuses an
    annotation id), so an annotation deleted while the listing was being fetched stays forgotten, and a record
    updated meanwhile keeps its newer version."""
    listed = {c.source: c for c in changes if c.payload is not None}
    delete = [source for source, stamp in stored.items() if stamp < TOMBSTONE and source not in listed]
    return delete, [c for c in listed.values() if _wins(c, stored.get(c.source))]


class RedisStore(Store):
    """Keys (``prefix`` default ``clip-ls``): ``{prefix}:mem:{space}:{project}`` a hash source → record,
    ``{prefix}:rev:{space}:{project}`` the revision, ``{prefix}:pred:{project}:{task}`` a prediction record."""

    def __init__(self, url: str, prefix: str = "clip-ls"):
        super().__init__()
        import redis

        self.url = url
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        try:
            self.redis.ping()
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot reach Redis at REDIS_URL={_safe_url(url)}: {error}. Start Redis, fix "
                                   "REDIS_URL, or leave it empty to keep state in MODEL_DIR") from None

    def _keys(self, project: int, space: str) -> tuple[str, str]:
        return f"{self.prefix}:mem:{space}:{project}", f"{self.prefix}:rev:{space}:{project}"

    def revision(self, project: int, space: str) -> int:
        return int(self.redis.get(self._keys(project, space)[1]) or 0)

    def snapshot(self, project: int, space: str) -> tuple[int, dict[str, Record]]:
        mem, rev = self._keys(project, space)
        pipe = self.redis.pipeline(transaction=True)   # MULTI/EXEC: both read at one point in time
        revision, fields = pipe.get(rev).hgetall(mem).execute()
        return int(revision or 0), {k.decode(): _unpack(v) for k, v in fields.items()}

    def apply(self, project: int, space: str, changes: Iterable[Change]) -> int:
        changes = list(changes)
        mem, rev = self._keys(project, space)
        result = {}

        def update(pipe):
            stored = pipe.hmget(mem, [c.source for c in changes]) if changes else []
            winners = [c for c, value in zip(changes, stored)
                       if _wins(c, _unpack(value)[0] if value else None)]
            current = int(pipe.get(rev) or 0)
            pipe.multi()
            if winners:
                pipe.hset(mem, mapping={c.source: _pack(c) for c in winners})
                pipe.incr(rev)
            result["revision"] = current + (1 if winners else 0)

        self.redis.transaction(update, mem, rev)   # WATCH both: a concurrent writer makes it retry
        return result["revision"]

    def replace(self, project: int, space: str, changes: Iterable[Change]) -> int:
        changes = list(changes)
        mem, rev = self._keys(project, space)
        result = {}

        def update(pipe):
            stored = {k.decode(): _unpack(v)[0] for k, v in pipe.hgetall(mem).items()}
            delete, write = _replacement(stored, changes)
            current = int(pipe.get(rev) or 0)
            pipe.multi()
            if delete:
                pipe.hdel(mem, *delete)
            if write:
                pipe.hset(mem, mapping={c.source: _pack(c) for c in write})
            pipe.incr(rev)
            result["revision"] = current + 1

        self.redis.transaction(update, mem, rev)
        return result["revision"]

    def record_predictions(self, project: int, records: Mapping[int, dict]) -> None:
        if not records:
            return
        pipe = self.redis.pipeline(transaction=False)
        for task, record in records.items():
            pipe.set(f"{self.prefix}:pred:{project}:{task}", json.dumps(record, separators=(",", ":")),
                     ex=PREDICTION_TTL_S)
        pipe.execute()

    def prediction(self, project: int, task: int) -> dict | None:
        raw = self.redis.get(f"{self.prefix}:pred:{project}:{task}")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        self.redis.close()


class SqliteStore(Store):
    """One SQLite file (``MODEL_DIR/learning.sqlite3``, WAL mode): transactions give the atomicity, SQLite's
    file locks make it safe for every process on the machine. Not for network file systems (use Redis)."""

    def __init__(self, directory: str | os.PathLike):
        super().__init__()
        self.path = Path(directory) / SQLITE_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                db.executescript("""
                    CREATE TABLE IF NOT EXISTS memory (space TEXT, project INTEGER, source TEXT, stamp REAL,
                        task INTEGER, payload BLOB, PRIMARY KEY (space, project, source));
                    CREATE TABLE IF NOT EXISTS revisions (space TEXT, project INTEGER, revision INTEGER,
                        PRIMARY KEY (space, project));
                    CREATE TABLE IF NOT EXISTS predictions (project INTEGER, task INTEGER, record TEXT,
                        updated REAL, PRIMARY KEY (project, task));
                """)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"cannot keep learned state in {self.path} (MODEL_DIR): {error}. Make MODEL_DIR "
                                   "a writable directory, or set REDIS_URL") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """A connection of its own for one transaction (connecting costs well under a millisecond; nothing is
        shared between threads or over a fork)."""
        with closing(self._connect()) as db:
            db.execute(begin)
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _writing(self):
        """One write transaction, the write lock taken first (read-check-write without a race)."""
        return self._transaction("BEGIN IMMEDIATE")

    def _reading(self):
        """One read transaction: a consistent snapshot in WAL mode."""
        return self._transaction("BEGIN")

    @staticmethod
    def _revision(db: sqlite3.Connection, project: int, space: str) -> int:
        row = db.execute("SELECT revision FROM revisions WHERE space=? AND project=?", (space, project)).fetchone()
        return row[0] if row else 0

    def revision(self, project: int, space: str) -> int:
        with self._reading() as db:
            return self._revision(db, project, space)

    def snapshot(self, project: int, space: str) -> tuple[int, dict[str, Record]]:
        with self._reading() as db:
            revision = self._revision(db, project, space)
            rows = db.execute("SELECT source, stamp, task, payload FROM memory WHERE space=? AND project=?",
                              (space, project)).fetchall()
        return revision, {source: (stamp, task, bytes(payload or b"")) for source, stamp, task, payload in rows}

    def apply(self, project: int, space: str, changes: Iterable[Change]) -> int:
        changes = list(changes)
        with self._writing() as db:
            changed = False
            for change in changes:
                row = db.execute("SELECT stamp FROM memory WHERE space=? AND project=? AND source=?",
                                 (space, project, change.source)).fetchone()
                if _wins(change, row[0] if row else None):
                    self._put(db, project, space, change)
                    changed = True
            return self._bump(db, project, space) if changed else self._revision(db, project, space)

    def replace(self, project: int, space: str, changes: Iterable[Change]) -> int:
        with self._writing() as db:
            stored = dict(db.execute("SELECT source, stamp FROM memory WHERE space=? AND project=?",
                                     (space, project)).fetchall())
            delete, write = _replacement(stored, changes)
            db.executemany("DELETE FROM memory WHERE space=? AND project=? AND source=?",
                           [(space, project, source) for source in delete])
            for change in write:
                self._put(db, project, space, change)
            return self._bump(db, project, space)

    @staticmethod
    def _put(db, project: int, space: str, change: Change) -> None:
        db.execute("INSERT OR REPLACE INTO memory VALUES (?, ?, ?, ?, ?, ?)",
                   (space, project, change.source, _stamp(change), change.task, change.payload or b""))

    def _bump(self, db, project: int, space: str) -> int:
        db.execute("INSERT INTO revisions VALUES (?, ?, 1) ON CONFLICT (space, project) "
                   "DO UPDATE SET revision = revision + 1", (space, project))
        return self._revision(db, project, space)

    def record_predictions(self, project: int, records: Mapping[int, dict]) -> None:
        if not records:
            return
        now = time.time()
        rows = [(project, int(task), json.dumps(record, separators=(",", ":")), now)
                for task, record in records.items()]
        with self._writing() as db:
            db.executemany("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?)", rows)

    def prediction(self, project: int, task: int) -> dict | None:
        with self._reading() as db:
            row = db.execute("SELECT record FROM predictions WHERE project=? AND task=?",
                             (project, int(task))).fetchone()
        return json.loads(row[0]) if row else None


def open_store(redis_url: str, model_dir: str) -> Store:
    """Redis when ``redis_url`` is set (shared by every machine), else SQLite under ``model_dir``."""
    if redis_url:
        return RedisStore(redis_url)
    return SqliteStore(model_dir)


def _safe_url(url: str) -> str:
    """A Redis URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
