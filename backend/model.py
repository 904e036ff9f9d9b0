"""The Label Studio-facing model: ``setup()``, ``predict(tasks, context)``, ``fit(event, data)``.

Same shape as upstream's ``LabelStudioMLBase`` so its users feel at home; it speaks the protocol of
Label Studio 1.23.2 (see docs) rather than depending on the old ``label-studio-ml`` package.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from . import wiring
from .budget import ByteBudget
from .cache import has_parts, image_digest, merge
from .config import Settings
from .labeling.decode import ImageDecodeError, decode_image, decoded_bytes
from .labeling.detections import ImageLabels
from .labeling.pipeline import ImageFeatures, Labeler, LogitAdjuster, needed_features
from .labeling.prompts import LabelSet
from .learning import Learned
from .studio.images import ImageFetchError
from .studio.label_config import ProjectConfig, TaskDataError
from .studio.results import context_regions, prediction_for_task
from .versions import base_version

log = logging.getLogger(__name__)
CHUNK = 16  # images per pipeline call: CLIP batches across them, memory stays bounded
LEARNING_OFF = ("learning from corrections is off: anyone could forge the webhooks. Set LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY (annotations are then read from Label Studio), or URL_SECRET and the model "
                "URL http://HOST:9090/<URL_SECRET> in Label Studio (its webhooks then carry the secret)")
LEARNING_OFF_BASIC_AUTH = ("learning from corrections is off: Label Studio's webhooks carry no Basic Auth and get "
                           "401. Set URL_SECRET and the model URL http://HOST:9090/<URL_SECRET> in Label Studio, "
                           "or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (/webhook is then open: only a hint)")


def _rebuild_torch_thread_pool() -> None:
    """gunicorn builds the app (and uses torch) in its master, then forks the worker. In the child, torch's
    intra-op thread pool must be rebuilt; left to the first torch op of each request thread, concurrent threads
    race and one fails with "pool INTERNAL ASSERT FAILED ... Invalid thread pool!" (seen under bench/load.py).
    Rebuilding it once, right after the fork while the child has a single thread, avoids the race."""
    torch.set_num_threads(torch.get_num_threads())


os.register_at_fork(after_in_child=_rebuild_torch_thread_pool)


@dataclass(frozen=True)
class TaskImage:
    task_id: int | None
    pixels: torch.Tensor | None
    error: str | None = None
    digest: str | None = None                # sha256 of the image bytes: the feature cache key
    features: ImageFeatures | None = None    # what the feature cache had (then, when complete, no decode)

    @property
    def usable(self) -> bool:
        return self.pixels is not None or self.features is not None


class ClipBackend:
    """One per process: models load in ``__init__``, requests never build models."""

    def __init__(self, settings: Settings, labeler: Labeler):
        self.settings = settings
        self.labeler = labeler
        self.model_fingerprint = settings.model_spec().fingerprint
        self.cache = wiring.feature_cache(settings, self.model_fingerprint)   # features by image content + models
        self.fetcher = wiring.image_fetcher(settings)
        self.image_memory = ByteBudget(settings.image_memory_mb * 2**20)
        self._inference = threading.Lock()  # one inference at a time: threads would only thrash the cores
        self.learning = wiring.learning(settings, labeler, self.fetcher, self._inference)
        self.seconds_per_image = self._warm_up()

    # ------------------------------------------------------------------ versions
    def model_version(self, config: ProjectConfig, project: str | int | None = None) -> str:
        """Changes exactly when what produces predictions changes: models, the config's label sets, the
        project's stored few-shot memory."""
        return self._versioned(config, project).version

    def _versioned(self, config: ProjectConfig, project) -> Learned:
        """The model version with the adjuster and score calibration of the project's state of that version."""
        return self.learning.versioned(base_version(self.model_fingerprint, config.fingerprint), project)

    def setup(self, label_config: str, project=None, hostname: str | None = None,
              access_token: str | None = None) -> dict:
        config = self.settings.project_config(label_config)
        self.fetcher.use_setup_values(hostname, access_token)
        self.learning.rebuild_if_missing(project)
        answer = {"model_version": self.model_version(config, project)}
        warnings = [f"label config: {problem}" for problem in config.problems]
        if not self.reads_annotations_from_label_studio and not self.settings.url_secret:
            warnings.append(LEARNING_OFF_BASIC_AUTH if self.settings.basic_auth_user else LEARNING_OFF)
        for warning in warnings:
            log.warning("%s", warning)
        if warnings:
            answer["warnings"] = warnings
        return answer

    @property
    def reads_annotations_from_label_studio(self) -> bool:
        """Webhooks are then hints: the learner reads each annotation from Label Studio's API."""
        return self.fetcher.trusts_label_studio

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: list[dict], label_config: str, project=None, context: dict | None = None) -> list[dict]:
        config = self.settings.project_config(label_config)
        learned = self._versioned(config, project)
        regions = context_regions(context)
        if regions:
            return [self._interactive(tasks[0], config, regions, learned)]
        if len(tasks) > 1 and len(tasks) * self.seconds_per_image > self.settings.predict_budget_seconds:
            # One result for several tasks makes Label Studio ask again task by task, each with its own timeout.
            log.info("predict: %d tasks would take ~%.0f s (budget %.0f s): answering one so LS asks per task",
                     len(tasks), len(tasks) * self.seconds_per_image, self.settings.predict_budget_seconds)
            tasks = tasks[:1]
        return [result for result, _ in self._predict_tasks(tasks, config, learned, project)]

    def predict_each(self, tasks: list[dict], label_config: str,
                     project=None) -> tuple[str, list[tuple[dict, str | None]]]:
        """The bulk path (``backend.preannotate``): every task, no time budget. Returns the model version and,
        per task, its prediction and the reason it has none (None when it has one)."""
        config = self.settings.project_config(label_config)
        learned = self._versioned(config, project)
        return learned.version, self._predict_tasks(tasks, config, learned, project)

    def _predict_tasks(self, tasks: list[dict], config: ProjectConfig, learned: Learned,
                       project) -> list[tuple[dict, str | None]]:
        out = []
        for start in range(0, len(tasks), CHUNK):   # CHUNK images in memory at a time, however many tasks
            out += self._predict_chunk(tasks[start:start + CHUNK], config, learned, project)
        return out

    def _predict_chunk(self, tasks: list[dict], config: ProjectConfig, learned: Learned,
                       project) -> list[tuple[dict, str | None]]:
        started = time.perf_counter()
        version = learned.version
        with self.image_memory.reservation() as reserve:   # decoded pixels held until the chunk is labelled
            images = self._load_images(tasks, config, cached=needed_features(config.labelsets), reserve=reserve)
            labelled = self._label_each(images, config, learned.adjust)
        out = []
        for n, image in enumerate(images):
            if n not in labelled:
                log.warning("task %s: no prediction: %s", image.task_id, image.error)
                out.append(({"result": [], "score": 0.0, "model_version": version}, image.error))
            else:
                out.append((prediction_for_task(labelled[n], config, version, learned.keep), None))
        self.learning.record_predictions(project, tasks, [result for result, _ in out])
        decoded = sum(i.pixels is not None for i in images)   # cache hits cost ~nothing: not in the estimate
        if decoded:
            self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * (time.perf_counter() - started) / decoded
        return out

    def _load_images(self, tasks: list[dict], config: ProjectConfig, cached: tuple[bool, bool] | None = None,
                     reserve=None) -> list[TaskImage]:
        """Download all task images concurrently and decode each once; a failure costs only its task.
        ``cached`` = (regions, whole): look the features up first; an image whose features are all cached
        is not decoded. ``reserve(n)``: called once with the decoded size of them all, before decoding."""
        control = config.controls[0]
        urls, broken = [], {}
        for i, task in enumerate(tasks):
            try:
                urls.append((control.image_url(task.get("data") or {}), task.get("id")))
            except TaskDataError as error:
                broken[i] = str(error)
                urls.append(None)
        downloads = self.fetcher.fetch_many([u for u in urls if u is not None],
                                            max_workers=self.settings.download_workers)
        if reserve is not None:
            reserve(sum(decoded_bytes(d, self.settings.max_image_pixels) for d in downloads
                        if isinstance(d, bytes)))
        fetched = iter(downloads)
        images = []
        for i, (task, url) in enumerate(zip(tasks, urls)):
            if url is None:
                images.append(TaskImage(task.get("id"), None, broken[i]))
                continue
            data = next(fetched)
            if isinstance(data, ImageFetchError):
                images.append(TaskImage(task.get("id"), None, str(data)))
                continue
            digest = image_digest(data) if cached and self.cache.enabled else None
            features = self.cache.lookup_parts(digest, *cached) if digest else None
            if digest and has_parts(features, *cached):
                images.append(TaskImage(task.get("id"), None, digest=digest, features=features))
                continue
            try:
                images.append(TaskImage(task.get("id"), decode_image(data, self.settings.max_image_pixels),
                                        digest=digest, features=features))
            except ImageDecodeError as error:
                images.append(TaskImage(task.get("id"), None, f"{url[0]}: {error}"))
        return images

    def _label_each(self, images: list[TaskImage], config: ProjectConfig,
                    adjust: LogitAdjuster | None) -> dict[int, ImageLabels]:
        """Labels by index of the usable images, all together (CLIP batches across them). Should that fail, one
        by one, so that whatever an image triggers costs only its task: it is replaced by its error."""
        usable = [n for n, image in enumerate(images) if image.usable]
        try:
            return dict(zip(usable, self._label([images[n] for n in usable], config, adjust)))
        except Exception:   # noqa: BLE001 - logged with its traceback; the images are then labelled one by one
            log.exception("labeling %d images together failed; labeling them one by one", len(usable))
        labelled = {}
        for n in usable:
            try:
                [labelled[n]] = self._label([images[n]], config, adjust)
            except Exception as error:   # noqa: BLE001
                images[n] = TaskImage(images[n].task_id, None, f"labeling failed: {type(error).__name__}: {error}")
        return labelled

    def _label(self, images: list[TaskImage], config: ProjectConfig, adjust: LogitAdjuster | None
               ) -> list[ImageLabels]:
        regions, whole = needed_features(config.labelsets)
        with self._inference:
            return self.labeler.name(self._features(images, regions, whole), config.labelsets, adjust)

    def _features(self, images: list[TaskImage], regions: bool, whole: bool) -> list[ImageFeatures]:
        """Features from the cache, else computed (under the inference lock, at most CHUNK images) and stored."""
        out = [image.features for image in images]
        todo: dict[tuple[bool, bool], list[int]] = {}
        for n, image in enumerate(images):
            if image.digest and not has_parts(out[n], regions, whole):   # computed while we waited for the lock?
                out[n] = merge(out[n], self.cache.lookup_parts(image.digest, regions, whole, count=False))
            if not has_parts(out[n], regions, whole):
                missing = (regions and not has_parts(out[n], True, False), whole and not has_parts(out[n], False, True))
                todo.setdefault(missing, []).append(n)
        for (want_regions, want_whole), indices in todo.items():
            computed = self.labeler.features([images[n].pixels for n in indices], want_regions, want_whole)
            for n, features in zip(indices, computed):
                if images[n].digest:
                    features = self.cache.store(images[n].digest, features)   # as a later hit will see them
                out[n] = merge(out[n], features)
        return out

    def _interactive(self, task: dict, config: ProjectConfig, regions, learned: Learned) -> dict:
        """The annotator drew boxes: name them (and fill the whole-image choices)."""
        [image] = self._load_images([task], config)
        if image.pixels is None:
            log.warning("task %s: interactive prediction failed: %s", image.task_id, image.error)
            return {"result": [], "score": 0.0, "model_version": learned.version}
        height, width = image.pixels.shape[1:]
        by_control = {c.name: c for c in config.controls if c.type == "rectanglelabels"}
        fallback = next(iter(by_control.values()), None)
        heads = {c.name: c.labelset for c in config.controls if c.type == "choices"}
        with self._inference:
            named = {}
            for control in {by_control.get(r.from_name, fallback) for r in regions} - {None}:
                boxes = [r.pixel_box(width, height) for r in regions
                         if by_control.get(r.from_name, fallback) is control]
                boxes = torch.tensor([b for b in boxes if b is not None], dtype=torch.float32).reshape(-1, 4)
                named[control.name] = self.labeler.label_boxes(image.pixels, boxes, control.labelset, control.name,
                                                               learned.adjust)
            choices = self.labeler.label([image.pixels], heads, learned.adjust)[0].choices if heads else {}
        return prediction_for_task(ImageLabels(width, height, named, choices), config, learned.version, learned.keep)

    # ------------------------------------------------------------------ fit
    def fit(self, event: str, data: dict, authenticated: bool = False) -> dict:
        """Training events queue a background update of the project's few-shot memory; answers at once.
        ``authenticated``: the webhook came under URL_SECRET or with Basic Auth (else only Label Studio's API
        is believed)."""
        return self.learning.handle(event, data, authenticated)

    # ------------------------------------------------------------------ internals
    def _warm_up(self) -> float:
        """One inference on a blank image at start: first-call costs are paid before LS is waiting,
        and the time seeds the per-image estimate of the predict budget."""
        started = time.perf_counter()
        blank = torch.full((3, 480, 640), 127, dtype=torch.uint8)
        with self._inference:
            self.labeler.label([blank], {"warm-up": LabelSet.build(["object"])})
        return max(time.perf_counter() - started, 0.05)


