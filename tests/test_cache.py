"""The feature cache: encoding, each tier's bound, hits and misses, invalidation when the models change, and the
backend predicting through it (same image in another task or project is not recomputed; cold == warm)."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from backend import cache as cache_module
from backend import wiring
from backend.cache import (
    FeatureCache,
    MemoryTier,
    RedisTier,
    Tier,
    decode_part,
    encode_part,
    has_parts,
    image_digest,
)
from backend.config import Settings
from backend.labeling.pipeline import ImageFeatures
from backend.labeling.proposals import Proposals


def features(n: int = 3, dim: int = 8, seed: int = 0, whole: bool = True, regions: bool = True) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(n, 4, generator=g) * 100
    return ImageFeatures(
        64 + seed, 48,
        Proposals(boxes, torch.rand(n, generator=g)) if regions else None,
        torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1) if regions else None,
        torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=-1) if whole else None)


def lookup(cache: FeatureCache, digest: str, regions: bool, whole: bool) -> ImageFeatures | None:
    """What a prediction gets: the features only when every asked part is cached."""
    found = cache.lookup_parts(digest, regions, whole)
    return found if has_parts(found, regions, whole) else None


def assert_close(a: ImageFeatures, b: ImageFeatures, atol=2e-3):
    assert (a.width, a.height) == (b.width, b.height)
    if a.region_embeddings is not None:
        assert torch.equal(a.proposals.boxes, b.proposals.boxes)
        assert torch.equal(a.proposals.scores, b.proposals.scores)
        assert torch.allclose(a.region_embeddings, b.region_embeddings, atol=atol)
    if a.image_embedding is not None:
        assert torch.allclose(a.image_embedding, b.image_embedding, atol=atol)


# ---------------------------------------------------------------- encoding
@pytest.mark.parametrize("n", [0, 1, 7])
def test_parts_round_trip_boxes_exactly_and_embeddings_in_half_precision(n):
    f = features(n)
    regions = decode_part(encode_part(f, "regions"), "regions")
    whole = decode_part(encode_part(f, "whole"), "whole")
    assert regions.region_embeddings.shape == (n, 8) and regions.image_embedding is None
    assert whole.image_embedding.shape == (8,) and whole.proposals is None
    assert_close(f, cache_module.merge(regions, whole))
    assert regions.region_embeddings.dtype == torch.float32   # back in the pipeline's dtype


@pytest.mark.parametrize("damage", [lambda b: b[:10], lambda b: b[:-1], lambda b: b + b"x", lambda b: b"XXXX" + b[4:],
                                    lambda b: b""])
def test_damaged_entries_are_refused(damage):
    with pytest.raises(ValueError):
        decode_part(damage(encode_part(features(), "regions")), "regions")


def test_a_part_is_not_read_as_the_other():
    with pytest.raises(ValueError):
        decode_part(encode_part(features(), "whole"), "regions")


def test_the_digest_is_the_content_hash():
    assert image_digest(b"abc") == image_digest(b"abc") != image_digest(b"abd")
    assert len(image_digest(b"")) == 64


# ---------------------------------------------------------------- tiers
def test_memory_tier_is_an_lru_bounded_by_bytes():
    tier = MemoryTier(max_bytes=30)
    for key in "abc":
        tier.put(key, b"x" * 10)
    assert tier.get("a") == b"x" * 10          # a is now the most recently used
    tier.put("d", b"y" * 10)                    # over the cap: b, the least recently used, goes
    assert tier.get("b") is None and tier.get("a") and tier.get("c") and tier.get("d")
    assert tier.bytes <= 30
    tier.put("huge", b"z" * 31)                 # larger than the whole cache: not stored, nothing evicted
    assert tier.get("huge") is None and len(tier) == 3


@pytest.fixture
def redis_tier(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    tier = RedisTier(client, max_bytes=1000, ttl_s=3600, prefix=f"clip-ls-test:{time.monotonic_ns()}")
    yield tier
    tier.clear()


def test_redis_tier_stores_with_a_ttl(redis_tier):
    redis_tier.put("k", b"value")
    assert redis_tier.get("k") == b"value"
    assert 0 < redis_tier.redis.ttl(f"{redis_tier.prefix}:e:k") <= 3600
    assert redis_tier.get("missing") is None
    redis_tier.put("k", b"other value")        # replacing counts the new size only
    assert redis_tier.used_bytes() == len(b"other value")


def test_redis_tier_evicts_the_least_recently_used_beyond_its_cap(redis_tier):
    for i in range(4):
        redis_tier.put(f"k{i}", bytes([i]) * 300)   # 1200 bytes asked, cap 1000: k0 goes
    assert redis_tier.get("k0") is None
    assert redis_tier.get("k1") is not None         # k1 used: now newer than k2
    redis_tier.put("k4", b"4" * 300)
    assert redis_tier.get("k2") is None and redis_tier.get("k1") is not None
    assert redis_tier.used_bytes() <= 1000
    stored = sum(redis_tier.redis.strlen(k) for k in redis_tier.redis.scan_iter(f"{redis_tier.prefix}:e:*"))
    assert stored <= 1000


def test_redis_tier_counts_entries_that_expired_until_the_lru_drops_them(redis_tier):
    redis_tier.ttl_s = 1
    redis_tier.put("old", b"o" * 600)
    time.sleep(2.1)
    assert redis_tier.get("old") is None           # expired by TTL
    redis_tier.ttl_s = 3600
    redis_tier.put("new", b"n" * 600)               # 1200 counted > 1000: the expired entry is popped
    assert redis_tier.get("new") == b"n" * 600
    assert redis_tier.used_bytes() == 600


# ---------------------------------------------------------------- the cache
def test_hits_misses_and_invalidation_when_the_models_change():
    memory = MemoryTier(1 << 20)
    cache = FeatureCache("fingerprint-1", [memory])
    key = image_digest(b"image")
    assert lookup(cache, key, True, True) is None
    stored = cache.store(key, features())
    assert_close(features(), lookup(cache, key, True, True))
    assert_close(stored, lookup(cache, key, True, True), atol=0)   # what store returned is what hits return
    assert (cache.stats.hits, cache.stats.misses) == (1 + 1, 1)
    new_models = FeatureCache("fingerprint-2", [memory])          # another model version: nothing reused
    assert lookup(new_models, key, True, True) is None
    assert lookup(FeatureCache("fingerprint-1", [memory]), image_digest(b"other image"), True, False) is None


def test_parts_are_cached_separately():
    cache = FeatureCache("m", [MemoryTier(1 << 20)])
    key = image_digest(b"image")
    cache.store(key, features(whole=False))
    assert lookup(cache, key, regions=True, whole=False) is not None
    assert lookup(cache, key, regions=True, whole=True) is None       # the whole-image part is still missing
    partial = cache.lookup_parts(key, regions=True, whole=True)
    assert partial.region_embeddings is not None and partial.image_embedding is None
    cache.store(key, features(regions=False))
    assert lookup(cache, key, regions=True, whole=True) is not None


def test_a_hit_in_a_slower_tier_is_copied_into_memory(redis_tier):
    FeatureCache("m", [redis_tier]).store("d", features())
    memory = MemoryTier(1 << 20)
    cache = FeatureCache("m", [memory, redis_tier])
    assert lookup(cache, "d", True, True) is not None
    assert len(memory) == 2   # both parts promoted


class Broken(Tier):
    name = "broken"

    def __init__(self):
        self.calls = 0

    def get(self, key):
        self.calls += 1
        raise ConnectionError("redis is down")

    put = get


def test_a_failing_tier_is_a_miss_and_is_skipped_for_a_while(caplog):
    broken = Broken()
    cache = FeatureCache("m", [broken])
    with caplog.at_level(logging.WARNING):
        assert lookup(cache, "d", True, True) is None
        cache.store("d", features())                 # no exception
        assert lookup(cache, "d", True, True) is None
    assert broken.calls == 1 and cache.stats.errors == 1
    assert "redis is down" in caplog.text


def test_corrupt_entries_are_misses(caplog):
    memory = MemoryTier(1 << 20)
    cache = FeatureCache("m", [memory])
    cache.store("d", features())
    for key in list(memory._items):
        memory.put(key, b"garbage")
    with caplog.at_level(logging.WARNING):
        assert lookup(cache, "d", True, True) is None
    assert "unreadable entry" in caplog.text


def test_the_settings_pick_the_tiers(tmp_path, redis_url):
    def tiers(**env):
        settings = Settings.from_env({"MODEL_DIR": str(tmp_path), **env})
        return [t.name for t in wiring.feature_cache(settings, "m").tiers]

    assert tiers() == ["memory"]
    assert tiers(REDIS_URL=redis_url) == ["memory", "redis"]
    assert tiers(FEATURE_CACHE_MB="0") == []




# ---------------------------------------------------------------- through the backend (tiny models)
@pytest.fixture(scope="module")
def demo_setup(tmp_path_factory):
    from backend.demo.shapes import KNOWN_SHAPES, scenes
    from backend.labeling.factory import build_labeler

    root = tmp_path_factory.mktemp("images")
    for i, scene in enumerate(scenes(4100, 3)):
        scene.image.save(root / f"scene_{i}.png")
    (root / "copy_of_scene_0.png").write_bytes((root / "scene_0.png").read_bytes())
    labels = "".join(f'<Label value="{s}"/>' for s in KNOWN_SHAPES)
    choices = "".join(f'<Choice value="{s}"/>' for s in KNOWN_SHAPES)
    boxes_only = (f'<View><Image name="image" value="$image"/>'
                  f'<RectangleLabels name="label" toName="image">{labels}</RectangleLabels></View>')
    both = boxes_only.replace("</View>", f'<Choices name="scene" toName="image" choice="multiple">{choices}'
                                         f'</Choices></View>')
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(root),
                                  "MODEL_DIR": str(tmp_path_factory.mktemp("state"))}, demo=True)
    return root, settings, build_labeler(settings.model_spec()), boxes_only, both


def make_backend(settings, labeler, **changes):
    from backend.model import ClipBackend

    backend = ClipBackend(settings.replace(**changes), labeler)
    calls = []
    real = labeler.features

    def counting(images, regions=True, whole=True):
        calls.append((len(images), regions, whole))
        return real(images, regions, whole)

    backend.labeler = type("Spy", (), {})()   # the backend's view of the labeler, counting feature calls
    for name in ("name", "label", "label_boxes"):
        setattr(backend.labeler, name, getattr(labeler, name))
    backend.labeler.features = counting
    return backend, calls


def tasks(*names, first_id=1):
    return [{"id": first_id + i, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)]


def test_a_repeated_prediction_is_served_from_the_cache_and_is_identical(demo_setup):
    root, settings, labeler, boxes_only, _ = demo_setup
    backend, calls = make_backend(settings, labeler)
    cold = backend.predict(tasks("scene_0.png", "scene_1.png"), boxes_only, "1.1")
    assert calls == [(2, True, False)]
    warm = backend.predict(tasks("scene_0.png", "scene_1.png"), boxes_only, "1.1")
    assert calls == [(2, True, False)]                        # nothing recomputed
    assert warm == cold                                       # identical, scores included
    assert backend.cache.stats.hits == 2


def test_the_same_image_in_another_task_or_project_is_not_recomputed(demo_setup):
    root, settings, labeler, boxes_only, _ = demo_setup
    backend, calls = make_backend(settings, labeler)
    backend.predict(tasks("scene_2.png"), boxes_only, "1.1")
    other = backend.predict(tasks("copy_of_scene_0.png", first_id=50), boxes_only, "7.1")   # other project, file
    first = backend.predict(tasks("scene_0.png"), boxes_only, "1.1")
    assert len(calls) == 2                                    # scene_2, then scene_0 once for both files
    assert [r["value"] for r in other[0]["result"]] == [r["value"] for r in first[0]["result"]]


def test_a_config_asking_for_more_computes_only_the_missing_part(demo_setup):
    root, settings, labeler, boxes_only, both = demo_setup
    backend, calls = make_backend(settings, labeler)
    backend.predict(tasks("scene_1.png"), boxes_only, "1.1")
    result = backend.predict(tasks("scene_1.png"), both, "2.1")
    assert calls == [(1, True, False), (1, False, True)]      # boxes reused, only the whole-image embedding computed
    assert any(r["type"] == "choices" for r in result[0]["result"]) or result[0]["result"]
    backend.predict(tasks("scene_1.png"), both, "2.1")
    assert len(calls) == 2


def test_other_model_settings_do_not_reuse_the_entries(demo_setup, redis_url):
    root, settings, labeler, boxes_only, _ = demo_setup
    shared = {"redis_url": redis_url}
    first, first_calls = make_backend(settings, labeler, **shared)
    first.cache.clear()
    first.predict(tasks("scene_0.png"), boxes_only, "1.1")
    second, second_calls = make_backend(settings, labeler, **shared, feature_cache_mb=0)   # another process
    second.predict(tasks("scene_0.png"), boxes_only, "1.1")
    assert second_calls == [] and second.cache.stats.hits == 1   # shared through Redis
    changed, changed_calls = make_backend(settings, labeler, **shared, proposal_threshold=0.55)
    assert changed.model_fingerprint != first.model_fingerprint
    changed.predict(tasks("scene_0.png"), boxes_only, "1.1")
    assert changed_calls == [(1, True, False)]                  # new proposal settings: recomputed
    first.cache.clear()


def test_without_a_cache_predictions_still_work(demo_setup):
    root, settings, labeler, boxes_only, _ = demo_setup
    backend, calls = make_backend(settings, labeler, feature_cache_mb=0)
    assert not backend.cache.enabled
    backend.predict(tasks("scene_0.png"), boxes_only, "1.1")
    backend.predict(tasks("scene_0.png"), boxes_only, "1.1")
    assert len(calls) == 2
