"""Feature cache: what the models computed for an image, keyed by the image's content and the models.

The expensive, label-independent part of a prediction (proposals + CLIP embeddings, ``ImageFeatures``) is
cached under

    sha256(image bytes) + model fingerprint (weights, detector/proposal/crop settings) + part

where ``part`` is ``regions`` (proposals and their embeddings) or ``whole`` (the whole-image embedding), so the
same image in another task or project is computed once, a project that only asks for boxes and one that also
asks for choices share the boxes, and a new model or new proposal settings never reuse stale entries. Naming
(label prompts, thresholds, learned corrections) is cheap and always recomputed, so label configs and learning
need no invalidation.

Tiers, first hit wins (a hit in a later tier is copied into the memory tier):

- memory: an LRU bounded by bytes in each process (``FEATURE_CACHE_MB``);
- Redis when ``REDIS_URL`` is set (shared by the server and every RQ worker): every entry has a TTL
  (``FEATURE_CACHE_TTL_DAYS``, refreshed on each hit) and the total is capped at ``FEATURE_CACHE_REDIS_MB``
  by our own LRU: a sorted set of keys by last use and a byte counter, kept by two Lua scripts; a store that
  pushes the total over the cap deletes the least recently used entries first. Entries that expired by TTL
  still count until the LRU pops them (they are the oldest), so the count errs high, never low. Redis' own
  ``maxmemory`` is not needed for the cache (RQ's keys must not be evicted: if you set one, use
  ``volatile-lru``, never ``allkeys-lru``).

A cache that fails (Redis down, disk full, a corrupt entry) is a miss with a log line, never an error: the
prediction is then computed as if there were no cache. Embeddings are stored as float16 (half the bytes; the
cosine similarities move by ~1e-3) and boxes as float32; ``FeatureCache.store`` returns the features as a later
hit will return them, so a cold and a warm prediction are identical.

>>> import torch
>>> from backend.labeling.pipeline import ImageFeatures
>>> cache = FeatureCache("model-a", [MemoryTier(1 << 20)])
>>> key = image_digest(b"the bytes of an image")
>>> cache.lookup_parts(key, regions=False, whole=True) is None
True
>>> stored = cache.store(key, ImageFeatures(640, 480, image_embedding=torch.ones(4) / 2))
>>> cache.lookup_parts(key, regions=False, whole=True).image_embedding.tolist()
[0.5, 0.5, 0.5, 0.5]
>>> cache.lookup_parts(key, regions=True, whole=False) is None      # the regions are not cached yet
True
>>> FeatureCache("model-b", cache.tiers).lookup_parts(key, regions=False, whole=True) is None   # another model
True
"""
from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from cachetools import LRUCache

from .labeling.pipeline import ImageFeatures
from .labeling.proposals import Proposals

log = logging.getLogger(__name__)

REDIS_PREFIX = "clip-ls:features"
RETRY_AFTER_FAILURE_S = 30.0   # a failing tier is skipped this long, so requests do not each wait for it
_MAGIC = b"CLF1"
_HEADER = struct.Struct("<4sBIIII")   # magic, part, width, height, rows, dim
_PARTS = {"regions": 1, "whole": 2}


def image_digest(data: bytes) -> str:
    """The content key of an image: sha256 of its bytes (the same file in any task or project)."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- encoding
def encode_part(features: ImageFeatures, part: str) -> bytes:
    """One part of ``features`` as bytes: a fixed header, then float32 boxes and scores, float16 embeddings."""
    if part == "regions":
        boxes = features.proposals.boxes.detach().cpu().float().numpy().reshape(-1, 4)
        scores = features.proposals.scores.detach().cpu().float().numpy().reshape(-1)
        emb = features.region_embeddings.detach().cpu().float().numpy()
        rows, dim = len(boxes), (emb.shape[1] if emb.ndim == 2 else 0)
        if len(scores) != rows or len(emb) != rows:
            raise ValueError("proposals and embeddings differ in count")
        body = [boxes.astype("<f4").tobytes(), scores.astype("<f4").tobytes(), emb.astype("<f2").tobytes()]
    elif part == "whole":
        emb = features.image_embedding.detach().cpu().float().numpy().reshape(-1)
        rows, dim = 1, len(emb)
        body = [emb.astype("<f2").tobytes()]
    else:
        raise ValueError(f"unknown part {part!r}")
    return _HEADER.pack(_MAGIC, _PARTS[part], features.width, features.height, rows, dim) + b"".join(body)


def decode_part(data: bytes, part: str) -> ImageFeatures:
    """The inverse of ``encode_part``; raises ValueError on anything malformed (a corrupt entry is a miss)."""
    if len(data) < _HEADER.size:
        raise ValueError("truncated cache entry")
    magic, code, width, height, rows, dim = _HEADER.unpack_from(data)
    if magic != _MAGIC or code != _PARTS.get(part):
        raise ValueError("not a cache entry of this kind")
    body = memoryview(data)[_HEADER.size:]
    if part == "regions":
        sizes = (rows * 16, rows * 4, rows * dim * 2)
        if len(body) != sum(sizes):
            raise ValueError("cache entry has the wrong length")
        boxes = np.frombuffer(body[:sizes[0]], "<f4").reshape(rows, 4)
        scores = np.frombuffer(body[sizes[0]:sizes[0] + sizes[1]], "<f4")
        emb = np.frombuffer(body[sizes[0] + sizes[1]:], "<f2").reshape(rows, dim)
        return ImageFeatures(width, height, Proposals(torch.tensor(boxes, dtype=torch.float32),
                                                      torch.tensor(scores, dtype=torch.float32)),
                             torch.tensor(emb.astype(np.float32)).reshape(rows, dim))
    if len(body) != dim * 2:
        raise ValueError("cache entry has the wrong length")
    return ImageFeatures(width, height, image_embedding=torch.tensor(np.frombuffer(body, "<f2").astype(np.float32)))


def merge(a: ImageFeatures | None, b: ImageFeatures | None) -> ImageFeatures | None:
    """The parts of both (``b`` wins where both have one)."""
    if a is None or b is None:
        return a or b
    return replace(a, proposals=b.proposals if b.region_embeddings is not None else a.proposals,
                   region_embeddings=b.region_embeddings if b.region_embeddings is not None else a.region_embeddings,
                   image_embedding=b.image_embedding if b.image_embedding is not None else a.image_embedding)


def has_parts(features: ImageFeatures | None, regions: bool, whole: bool) -> bool:
    return features is not None and (not regions or features.region_embeddings is not None) \
        and (not whole or features.image_embedding is not None)


# ---------------------------------------------------------------------------------------------- tiers
class Tier:
    """Bytes by key. ``get``/``put`` may raise; ``FeatureCache`` turns failures into misses."""

    name = "tier"

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def put(self, key: str, value: bytes) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


class MemoryTier(Tier):
    """An in-process LRU bounded by the bytes of its values (``cachetools``; a value larger than the whole
    cache is not stored)."""

    name = "memory"

    def __init__(self, max_bytes: int):
        self._items: LRUCache[str, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return int(self._items.currsize)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            try:
                self._items[key] = value
            except ValueError:   # larger than the whole cache
                pass

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# KEYS: entry, lru zset, byte counter, sizes hash. ARGV: value, ttl s, now, cap bytes. Returns evictions.
_REDIS_PUT = """
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[4], KEYS[1]) or 0)
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[4], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[3], size - old)
local evicted = 0
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then
    redis.call('SET', KEYS[3], 0)
    break
  end
  local gone = tonumber(redis.call('HGET', KEYS[4], oldest[1]) or 0)
  redis.call('DEL', oldest[1])
  redis.call('HDEL', KEYS[4], oldest[1])
  total = redis.call('DECRBY', KEYS[3], gone)
  evicted = evicted + 1
end
return evicted
"""
# KEYS: entry, lru zset. ARGV: ttl s, now. A hit refreshes the TTL and the LRU position.
_REDIS_GET = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], KEYS[1])
end
return value
"""


class RedisTier(Tier):
    """Entries ``clip-ls:features:<key>`` with a TTL; ``clip-ls:features:lru`` (sorted set, last use),
    ``clip-ls:features:bytes`` (counter) and ``clip-ls:features:sizes`` (hash, bytes counted per entry, so an
    entry that expired by TTL is subtracted by the size it was counted with) bound the total."""

    name = "redis"

    def __init__(self, client, max_bytes: int, ttl_s: float, prefix: str = REDIS_PREFIX):
        self.redis = client
        self.max_bytes = max_bytes
        self.ttl_s = max(int(ttl_s), 1)
        self.prefix = prefix
        self._put = client.register_script(_REDIS_PUT)
        self._get = client.register_script(_REDIS_GET)
        self._meta = [f"{prefix}:lru", f"{prefix}:bytes", f"{prefix}:sizes"]

    @classmethod
    def from_url(cls, url: str, max_bytes: int, ttl_s: float) -> RedisTier:
        import redis

        return cls(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5), max_bytes, ttl_s)

    def get(self, key: str) -> bytes | None:
        return self._get(keys=[f"{self.prefix}:e:{key}", self._meta[0]], args=[self.ttl_s, time.time()])

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        self._put(keys=[f"{self.prefix}:e:{key}", *self._meta], args=[value, self.ttl_s, time.time(), self.max_bytes])

    def used_bytes(self) -> int:
        return int(self.redis.get(self._meta[1]) or 0)

    def clear(self) -> None:
        keys = [k for k in self.redis.scan_iter(match=f"{self.prefix}:e:*", count=1000)]
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start:start + 1000])
        self.redis.delete(*self._meta)


# ---------------------------------------------------------------------------------------------- the cache
@dataclass
class CacheStats:
    hits: int = 0       # images whose every asked part came from the cache
    misses: int = 0     # images with at least one part to compute
    stored: int = 0     # parts stored
    errors: int = 0     # tier failures (each a miss)


class FeatureCache:
    """``lookup_parts``/``store`` image features by image digest for one model fingerprint; safe across threads."""

    def __init__(self, fingerprint: str, tiers: Sequence[Tier]):
        self.fingerprint = fingerprint
        self.tiers = list(tiers)
        self.stats = CacheStats()
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.tiers)

    def _key(self, digest: str, part: str) -> str:
        return f"{self.fingerprint}:{part}:{digest}"

    def lookup_parts(self, digest: str, regions: bool, whole: bool, count: bool = True) -> ImageFeatures | None:
        """Whatever of the asked parts is cached (None when nothing is); ``count``: a hit in ``stats`` only
        when all asked parts are there, else a miss."""
        found = None
        for part, wanted in (("regions", regions), ("whole", whole)):
            if wanted and self.tiers:
                found = merge(found, self._get(self._key(digest, part), part))
        if count:
            with self._lock:
                if has_parts(found, regions, whole) and (regions or whole):
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
        return found

    def store(self, digest: str, features: ImageFeatures) -> ImageFeatures:
        """Store every part ``features`` has; returns them as a later lookup will (float16 embeddings)."""
        out = None
        for part, present in (("regions", features.region_embeddings is not None),
                              ("whole", features.image_embedding is not None)):
            if not present:
                continue
            data = encode_part(features, part)
            for tier in self.tiers:
                self._call(tier, "put", self._key(digest, part), data)
            with self._lock:
                self.stats.stored += 1
            out = merge(out, decode_part(data, part))
        return out if out is not None else features

    def _get(self, key: str, part: str) -> ImageFeatures | None:
        for i, tier in enumerate(self.tiers):
            data = self._call(tier, "get", key)
            if data is None:
                continue
            try:
                features = decode_part(bytes(data), part)
            except ValueError as error:
                log.warning("feature cache (%s): unreadable entry ignored: %s", tier.name, error)
                continue
            for upper in self.tiers[:i]:   # promote into the faster tiers
                self._call(upper, "put", key, bytes(data))
            return features
        return None

    def _call(self, tier: Tier, method: str, *args):
        now = time.monotonic()
        if self._down_until.get(tier.name, 0.0) > now:
            return None
        try:
            return getattr(tier, method)(*args)
        except Exception as error:  # noqa: BLE001 - a cache never fails a prediction
            with self._lock:
                self.stats.errors += 1
            self._down_until[tier.name] = now + RETRY_AFTER_FAILURE_S
            log.warning("feature cache (%s) %s failed, skipping it for %.0f s: %s: %s", tier.name, method,
                        RETRY_AFTER_FAILURE_S, type(error).__name__, error)
            return None

    def clear(self) -> None:
        for tier in self.tiers:
            self._call(tier, "clear")


def build_feature_cache(fingerprint: str, memory_mb: float, redis_url: str = "", redis_mb: float = 0,
                        ttl_days: float = 30.0) -> FeatureCache:
    """Memory (``memory_mb`` > 0), then Redis (``redis_url`` and ``redis_mb`` > 0), for models of ``fingerprint``."""
    mb = 1024 * 1024
    tiers: list[Tier] = []
    if memory_mb > 0:
        tiers.append(MemoryTier(int(memory_mb * mb)))
    if redis_url and redis_mb > 0:
        tiers.append(RedisTier.from_url(redis_url, int(redis_mb * mb), ttl_days * 86400))
    log.info("feature cache: %s", " → ".join(t.name for t in tiers) or "off")
    return FeatureCache(fingerprint, tiers)
