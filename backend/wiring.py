"""The parts every composition root (server, RQ worker, CLI) builds from the same ``Settings``, built in one place:
components take plain typed values and never read settings themselves."""
from __future__ import annotations

import threading

from .cache import FeatureCache, build_feature_cache
from .config import Settings
from .jobs import InProcessJobs, RQJobs
from .labeling.adapter import AdapterSettings
from .labeling.pipeline import Labeler
from .learning import Learner, Learning, embedding_space
from .store import Store, open_store
from .studio.images import ImageFetcher


def image_fetcher(settings: Settings) -> ImageFetcher:
    return ImageFetcher(ls_url=settings.label_studio_url or None, api_key=settings.label_studio_api_key or None,
                        local_files_root=settings.local_files_document_root or None,
                        max_bytes=settings.image_max_bytes, timeout=settings.image_timeout,
                        allowed_hosts=settings.allowed_host_list, allow_private=settings.allow_private_list)


def store(settings: Settings) -> Store:
    return open_store(settings.redis_url, settings.model_dir)


def feature_cache(settings: Settings, fingerprint: str) -> FeatureCache:
    return build_feature_cache(fingerprint, settings.feature_cache_mb, settings.redis_url,
                               settings.feature_cache_redis_mb, settings.feature_cache_ttl_days)


def learner(settings: Settings, labeler: Labeler, fetcher: ImageFetcher | None = None,
            state: Store | None = None, lock: threading.Lock | None = None) -> Learner:
    """What turns stored annotations into memory: in the server's job thread, or in an RQ worker."""
    return Learner(labeler, state or store(settings), fetcher or image_fetcher(settings),
                   embedding_space(settings.model_spec()), lock, settings.max_image_pixels, settings.project_config)


def learning(settings: Settings, labeler: Labeler, fetcher: ImageFetcher,
             lock: threading.Lock | None = None) -> Learning:
    """The server's side: Redis store + RQ jobs when REDIS_URL is set, else SQLite under MODEL_DIR + a job thread."""
    state = store(settings)
    if settings.redis_url:
        jobs = RQJobs(settings.redis_url)
    else:
        jobs = InProcessJobs(learner(settings, labeler, fetcher, state, lock).run)
    return Learning(state, jobs, embedding_space(settings.model_spec()), labeler.clip, fetcher, settings.demo,
                    adapter_settings(settings))


def adapter_settings(settings: Settings) -> AdapterSettings:
    return AdapterSettings(harm=settings.learning_harm, repeats=settings.learning_repeats)
