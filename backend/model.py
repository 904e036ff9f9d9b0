"""The Label Studio-facing model: ``setup()``, ``predict(tasks, context)``, ``fit(event, data)``.

Same shape as upstream's ``LabelStudioMLBase`` so its users feel at home; it speaks the protocol of
Label Studio 1.23.2 (see docs) rather than depending on the old ``label-studio-ml`` package.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import Settings
from .labeling.decode import ImageDecodeError, decode_image
from .labeling.detections import ImageLabels
from .labeling.pipeline import Labeler
from .labeling.prompts import LabelSet, PromptDefaults
from .studio.images import ImageFetchError, ImageFetcher
from .studio.label_config import ProjectConfig, TaskDataError, parse_label_config
from .studio.results import context_regions, prediction_for_task

log = logging.getLogger(__name__)
CHUNK = 16  # images per pipeline call: CLIP batches across them, memory stays bounded


@lru_cache(maxsize=64)
def project_config(xml: str, defaults: PromptDefaults) -> ProjectConfig:
    return parse_label_config(xml, defaults)


@dataclass(frozen=True)
class TaskImage:
    task_id: int | None
    pixels: torch.Tensor | None
    error: str | None = None


class ClipBackend:
    """One per process: models load in ``__init__``, requests never build models."""

    def __init__(self, settings: Settings, labeler: Labeler):
        self.settings = settings
        self.labeler = labeler
        self.model_fingerprint = settings.model_spec().fingerprint
        self.fetcher = ImageFetcher(
            ls_url=settings["LABEL_STUDIO_URL"] or None, api_key=settings["LABEL_STUDIO_API_KEY"] or None,
            local_files_root=settings["LOCAL_FILES_DOCUMENT_ROOT"] or None,
            max_bytes=settings["IMAGE_MAX_BYTES"], timeout=settings["IMAGE_TIMEOUT"],
            allowed_hosts=_hosts(settings["ALLOWED_HOSTS"]))
        self._inference = threading.Lock()  # one inference at a time: threads would only thrash the cores
        self.seconds_per_image = self._warm_up()

    # ------------------------------------------------------------------ versions
    def model_version(self, config: ProjectConfig, project: str | int | None = None) -> str:
        """Changes exactly when what produces predictions changes: models, the config's label sets."""
        digest = hashlib.sha256(f"{self.model_fingerprint}:{config.fingerprint}".encode()).hexdigest()
        return f"clip-{digest[:10]}"

    def setup(self, label_config: str, project=None, hostname: str | None = None,
              access_token: str | None = None) -> dict:
        config = project_config(label_config, self.settings.prompt_defaults)
        self.fetcher.use_setup_values(hostname, access_token)
        answer = {"model_version": self.model_version(config, project)}
        if config.problems:
            answer["warnings"] = list(config.problems)
            for problem in config.problems:
                log.warning("label config: %s", problem)
        return answer

    # ------------------------------------------------------------------ predict
    def predict(self, tasks: list[dict], label_config: str, project=None, context: dict | None = None) -> list[dict]:
        config = project_config(label_config, self.settings.prompt_defaults)
        version = self.model_version(config, project)
        regions = context_regions(context)
        if regions:
            return [self._interactive(tasks[0], config, regions, version)]
        if len(tasks) > 1 and len(tasks) * self.seconds_per_image > self.settings["PREDICT_BUDGET_SECONDS"]:
            # One result for several tasks makes Label Studio ask again task by task, each with its own timeout.
            log.info("predict: %d tasks would take ~%.0f s (budget %.0f s): answering one so LS asks per task",
                     len(tasks), len(tasks) * self.seconds_per_image, self.settings["PREDICT_BUDGET_SECONDS"])
            tasks = tasks[:1]
        started = time.perf_counter()
        images = self._load_images(tasks, config)
        labelled = self._label([i.pixels for i in images if i.pixels is not None], config)
        results = []
        for image in images:
            if image.pixels is None:
                log.warning("task %s: no prediction: %s", image.task_id, image.error)
                results.append({"result": [], "score": 0.0, "model_version": version})
            else:
                results.append(prediction_for_task(labelled.pop(0), config, version))
        loaded = sum(i.pixels is not None for i in images)
        if loaded:
            self.seconds_per_image = 0.7 * self.seconds_per_image + 0.3 * (time.perf_counter() - started) / loaded
        return results

    def _load_images(self, tasks: list[dict], config: ProjectConfig) -> list[TaskImage]:
        """Download all task images concurrently and decode each once; a failure costs only its task."""
        control = config.controls[0]
        urls, broken = [], {}
        for i, task in enumerate(tasks):
            try:
                urls.append((control.image_url(task.get("data") or {}), task.get("id")))
            except TaskDataError as error:
                broken[i] = str(error)
                urls.append(None)
        fetched = iter(self.fetcher.fetch_many([u for u in urls if u is not None],
                                               max_workers=self.settings["DOWNLOAD_WORKERS"]))
        images = []
        for i, (task, url) in enumerate(zip(tasks, urls)):
            if url is None:
                images.append(TaskImage(task.get("id"), None, broken[i]))
                continue
            data = next(fetched)
            if isinstance(data, ImageFetchError):
                images.append(TaskImage(task.get("id"), None, str(data)))
                continue
            try:
                images.append(TaskImage(task.get("id"), decode_image(data, self.settings["MAX_IMAGE_PIXELS"])))
            except ImageDecodeError as error:
                images.append(TaskImage(task.get("id"), None, f"{url[0]}: {error}"))
        return images

    def _label(self, images: list[torch.Tensor], config: ProjectConfig) -> list[ImageLabels]:
        out = []
        with self._inference:
            for start in range(0, len(images), CHUNK):
                out += self.labeler.label(images[start:start + CHUNK], config.labelsets)
        return out

    def _interactive(self, task: dict, config: ProjectConfig, regions, version: str) -> dict:
        """The annotator drew boxes: name them (and fill the whole-image choices)."""
        [image] = self._load_images([task], config)
        if image.pixels is None:
            log.warning("task %s: interactive prediction failed: %s", image.task_id, image.error)
            return {"result": [], "score": 0.0, "model_version": version}
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
                named[control.name] = self.labeler.label_boxes(image.pixels, boxes, control.labelset)
            choices = self.labeler.label([image.pixels], heads)[0].choices if heads else {}
        return prediction_for_task(ImageLabels(width, height, named, choices), config, version)

    # ------------------------------------------------------------------ fit
    def fit(self, event: str, data: dict) -> dict:
        """Learning from corrections arrives with the few-shot memory; until then events are logged."""
        log.info("webhook %s for project %s accepted", event, _project_id(data.get("project")))
        return {"status": "accepted", "event": event}

    # ------------------------------------------------------------------ internals
    def _warm_up(self) -> float:
        """One inference on a blank image at start: first-call costs are paid before LS is waiting,
        and the time seeds the per-image estimate of the predict budget."""
        started = time.perf_counter()
        blank = torch.full((3, 480, 640), 127, dtype=torch.uint8)
        with self._inference:
            self.labeler.label([blank], {"warm-up": LabelSet.build(["object"])})
        return max(time.perf_counter() - started, 0.05)


def _project_id(project) -> int | None:
    """``"12.1716400000"`` (setup/predict), ``12`` or ``{"id": 12, ...}`` (webhooks) → 12."""
    if isinstance(project, dict):
        project = project.get("id")
    try:
        return int(str(project).split(".")[0])
    except (TypeError, ValueError):
        return None


def _hosts(raw: str) -> tuple[str, ...] | None:
    hosts = tuple(h.strip() for h in raw.split(",") if h.strip())
    return hosts or None
