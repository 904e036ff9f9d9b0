"""Learning from corrections: Label Studio events → per-project few-shot memory → better next predictions.

Serving side (``Learning``, one per backend process):
  - ``handle(event, data)`` answers a webhook at once: training events become a background job, deletions are
    applied to the store directly (no model needed);
  - ``versioned(base, project)`` reads the project's stored memory (cached per revision) and returns the model
    version (the base version when the memory is empty, else the base plus a digest of the memory) with the
    logit adjuster that applies that memory, which the caller passes to the ``Labeler``'s naming calls. So the
    version changes exactly when a new state is stored, and predictions always carry the version of the state
    that made them, whatever other threads or projects do meanwhile;
  - ``record_predictions`` keeps what was predicted per task (Label Studio's ``annotation.prediction`` is
    usually empty), so that boxes an annotator deleted can be learned as background.

Working side (``Learner``, in the backend's job thread or in an RQ worker): fetch the task image, embed the
annotated boxes (and whole images for Choices) with the Labeler's crop settings, and store one record per
annotation: ANNOTATION_UPDATED replaces it, ANNOTATIONS_DELETED forgets it, START_TRAINING rebuilds the whole
memory from the annotations that Label Studio's API lists.

Events and what they do:

    ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATIONS_CREATED   learn (cancelled annotations: nothing, or
                                                                  forget what an earlier version taught)
    START_TRAINING                                                rebuild from /api/tasks (needs Label Studio's
                                                                  address and a key)
    ANNOTATIONS_DELETED, TASKS_DELETED                            forget
    anything else                                                 ignored
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from cachetools import LRUCache
from torchvision.ops import box_iou

from .labeling.adapter import AdapterSettings, Examples, Memory, adjust_logits
from .labeling.calibration import Calibrator
from .labeling.decode import ImageDecodeError, decode_image
from .labeling.matching import match_regions
from .labeling.pipeline import Labeler, LogitAdjuster
from .labeling.prompts import LabelSet
from .labeling.proposals import ProposalSettings
from .labeling.specs import ModelSpec
from .store import Change, Store
from .studio.api import LabelStudioAPI, LabelStudioAPIError
from .studio.images import ImageFetcher, ImageFetchError
from .studio.label_config import LabelConfigError, ProjectConfig, TaskDataError, parse_label_config
from .studio.results import choices_from_results, regions_from_results, regions_of
from .studio.webhooks import annotation_ids, annotation_items, deleted_ids, id_of, label_config_of, project_id_of, stamp
from .versions import learned_version

log = logging.getLogger(__name__)

LEARN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
FORGET_EVENTS = ("ANNOTATIONS_DELETED", "TASKS_DELETED")
DELETED_IOU = 0.5        # a predicted box without an annotated box of at least this IoU was deleted: background
UNTRUSTED = ("unauthenticated webhook refused: without LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (to read what "
             "Label Studio really holds), learning needs URL_SECRET or Basic Auth")
EMPTY = Memory()
Keep = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Learned:
    """What a project's stored state gives its next predictions: their model version, the logit adjuster (None:
    zero-shot) and the keep-probability of a predicted box from its label probability (None: the raw one)."""

    version: str
    adjust: LogitAdjuster | None = None
    keep: Keep | None = None


def embedding_space(spec: ModelSpec) -> str:
    """Identifies what produced the embeddings: the CLIP model (its files) and the crop settings; not the
    precision or the runtime (their embeddings agree with torch fp32's, so learned memory carries over), nor
    mirroring (stored examples are the mean of views that include the mirror image either way)."""
    return replace(spec, detector="", detector_weights=None, proposals=ProposalSettings(),
                   precision="fp32", runtime="torch", crops=replace(spec.crops, mirror=False)).fingerprint


def source_key(annotation_id) -> str:
    return f"annotation:{annotation_id}"


class Learning:
    """The serving side; see the module docstring."""

    def __init__(self, store: Store, jobs, space: str, clip, fetcher: ImageFetcher | None = None,
                 demo: bool = False, adapter: AdapterSettings = AdapterSettings()):
        self.store = store
        self.jobs = jobs
        self.space = space
        self.clip = clip
        self.fetcher = fetcher
        self.demo = demo
        self.adapter = adapter
        self._checked: set[int] = set()   # projects whose stored memory /setup has looked for
        self._calibrators: LRUCache = LRUCache(64)   # memory token → its Calibrator
        self._calibrators_lock = threading.Lock()

    # ------------------------------------------------------------------ predictions
    def versioned(self, base_version: str, project) -> Learned:
        """The model version for this project's stored memory, with the adjuster and the score calibration of
        that same state: predictions made with them always carry the version of the state that made them."""
        memory = self.memory(project)
        if not memory.token:
            return Learned(base_version)
        adjust = partial(self._adjust, memory) if memory else None
        return Learned(learned_version(base_version, memory.token, self.adapter.method), adjust, self._keep(memory))

    def _keep(self, memory: Memory) -> Keep | None:
        """Keep-probability from label probability, learned from the annotators' corrections (None: too few)."""
        with self._calibrators_lock:
            calibrator = self._calibrators.get(memory.token)
        if calibrator is None:
            scores = np.array([[score] for score, _ in memory.outcomes], dtype=np.float64).reshape(-1, 1)
            calibrator = Calibrator.fit(scores, np.array([kept for _, kept in memory.outcomes], dtype=np.float64))
            with self._calibrators_lock:
                self._calibrators[memory.token] = calibrator
        if not calibrator.weights:
            return None
        return lambda probabilities: calibrator.predict(np.asarray(probabilities, dtype=np.float64).reshape(-1, 1))

    def memory(self, project) -> Memory:
        project_id = project_id_of(project)
        return self.store.memory(project_id, self.space)[1] if project_id is not None else EMPTY

    def _adjust(self, memory: Memory, head: str, embeddings: torch.Tensor, logits: torch.Tensor,
                labelset: LabelSet) -> torch.Tensor:
        return adjust_logits(memory, head, embeddings, logits, labelset, lambda e: self.clip.logits(e, labelset),
                             self.adapter)

    def record_predictions(self, project, tasks: list[dict], results: list[dict]) -> None:
        """Remember the boxes predicted per task (best effort: a failure is logged, predictions still return)."""
        project_id = project_id_of(project)
        if project_id is None:
            return
        records = {}
        for task, result in zip(tasks, results):
            if isinstance(task, dict) and isinstance(task.get("id"), int) and isinstance(result, dict):
                items = [_compact_item(item) for item in result.get("result") or []
                         if isinstance(item, dict) and item.get("type") == "rectanglelabels"]
                records[task["id"]] = {"model_version": result.get("model_version"), "result": items}
        try:
            self.store.record_predictions(project_id, records)
        except Exception as error:   # noqa: BLE001 - recording must never cost the predictions
            log.warning("project %s: could not record predictions: %s", project_id, error)

    # ------------------------------------------------------------------ webhooks
    def handle(self, event: str, data: dict, authenticated: bool = False) -> dict:
        """Answer a webhook at once: queue the learning, apply deletions; never wait for models.

        Who is believed: with Label Studio's API (``fetcher.trusts_label_studio``) a webhook is only a hint, and
        what is learned or forgotten is read from the API by id; without it, only ``authenticated`` webhooks
        (URL_SECRET, Basic Auth) are believed, and the others are refused."""
        try:
            answer = self._handle(event, data, authenticated)
        except Exception as error:   # noqa: BLE001 - the store or queue is down: say so, Label Studio carries on
            log.exception("webhook %s: not handled", event)
            return {"status": "error", "event": event, "reason": f"{type(error).__name__}: {error}"}
        log.log(logging.WARNING if answer["status"] == "refused" else logging.INFO, "webhook %s for project %s: %s",
                event, project_id_of(data.get("project")),
                ", ".join(f"{k} {v}" for k, v in answer.items() if k != "event"))
        return answer

    def _handle(self, event: str, data: dict, authenticated: bool) -> dict:
        project_id = project_id_of(data.get("project"))
        if event not in LEARN_EVENTS + FORGET_EVENTS + ("START_TRAINING",):
            return {"status": "ignored", "event": event}
        if project_id is None:
            log.warning("webhook %s without a project id: ignored", event)
            return {"status": "ignored", "event": event, "reason": "no project id"}
        verify = self.reads_label_studio
        if not verify and not authenticated:
            return {"status": "refused", "event": event, "reason": UNTRUSTED}
        if event in FORGET_EVENTS:
            forgotten = self.forget(project_id, data, event, verify)
            return {"status": "done", "event": event, "forgotten": forgotten}
        if verify:   # the job reads the project's config and the annotations from Label Studio
            payload = {"project": project_id, "space": self.space, "demo": self.demo}
            if event == "START_TRAINING":
                return {"status": "queued", "event": event, "job": self.jobs.submit("rebuild", payload)}
            ids = annotation_ids(data)
            if not ids:
                return {"status": "ignored", "event": event, "reason": "no annotation id"}
            job = self.jobs.submit("learn", payload | {"items": [{"annotation": i} for i in ids]})
            return {"status": "queued", "event": event, "job": job, "annotations": len(ids)}
        label_config = label_config_of(data.get("project"))
        if label_config is None:
            log.warning("webhook %s for project %s has no label_config: ignored", event, project_id)
            return {"status": "ignored", "event": event, "reason": "no label_config in the project"}
        # no credentials in a job: an RQ worker uses its own LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY
        payload = {"project": project_id, "label_config": label_config, "space": self.space, "demo": self.demo}
        if event == "START_TRAINING":
            return {"status": "queued", "event": event, "job": self.jobs.submit("rebuild", payload)}
        items = annotation_items(data)
        live = [i for i in items if not i["annotation"].get("was_cancelled")]
        cancelled = [i for i in items if i["annotation"].get("was_cancelled")]
        if cancelled:   # nothing to learn; forget what an earlier version of it taught
            self.store.apply(project_id, self.space, [
                Change(source_key(i["annotation"]["id"]), stamp(i["annotation"]),
                       Examples((), (), torch.zeros(0, 0), i["task"].get("id")).to_bytes(), i["task"].get("id"))
                for i in cancelled])
        if not live:
            return {"status": "ignored", "event": event, "reason": "no annotation to learn from (cancelled?)"}
        job = self.jobs.submit("learn", payload | {"items": live})
        return {"status": "queued", "event": event, "job": job, "annotations": len(live)}

    def rebuild_if_missing(self, project) -> bool:
        """Once per project and process, at /setup: when the store holds no memory for the project (a Redis that
        died without persistence, a new machine) but Label Studio's API is at hand, rebuild it from there rather
        than silently predicting zero-shot. Returns whether a rebuild was queued."""
        project_id = project_id_of(project)
        if project_id is None or not self.reads_label_studio or project_id in self._checked:
            return False
        self._checked.add(project_id)
        if self.store.revision(project_id, self.space):
            return False
        log.info("project %s: no learned memory in the store: rebuilding it from Label Studio's annotations",
                 project_id)
        self.jobs.submit("rebuild", {"project": project_id, "space": self.space, "demo": self.demo})
        return True

    @property
    def reads_label_studio(self) -> bool:
        return self.fetcher is not None and self.fetcher.trusts_label_studio

    def forget(self, project_id: int, data: dict, event: str, verify: bool = False) -> int:
        """Tombstones only for records the store holds (a tombstone for an id not yet learned would block it
        forever); with ``verify``, only for those Label Studio no longer has."""
        if event == "ANNOTATIONS_DELETED":
            ids = set(deleted_ids(data, "annotations"))
            known = self.store.records(project_id, self.space)
            sources = [source_key(i) for i in sorted(ids) if source_key(i) in known
                       and (not verify or self._gone("annotation", i))]
        else:
            tasks = set(deleted_ids(data, "tasks"))
            tasks = {t for t in tasks if not verify or self._gone("task", t)}
            sources = self.store.tasks_sources(project_id, self.space, tasks)
        if sources:
            self.store.apply(project_id, self.space, [Change(s, time.time(), None) for s in sources])
        return len(sources)

    def _gone(self, kind: str, object_id: int) -> bool:
        try:
            getattr(LabelStudioAPI.of(self.fetcher), kind)(object_id)
        except LabelStudioAPIError as error:
            if error.status == 404:
                return True
            log.warning("cannot check %s %s with Label Studio, not forgotten: %s", kind, object_id, error)
            return False
        log.warning("a webhook says %s %s was deleted, Label Studio still has it: not forgotten", kind, object_id)
        return False


class Learner:
    """The working side: turns annotations into stored memory records."""

    def __init__(self, labeler: Labeler, store: Store, fetcher: ImageFetcher, space: str, lock=None,
                 max_pixels: int = 40_000_000, read_config: Callable[[str], ProjectConfig] = parse_label_config):
        self.labeler = labeler
        self.store = store
        self.fetcher = fetcher
        self.space = space
        self.lock = lock or threading.Lock()
        self.max_pixels = max_pixels
        self.read_config = read_config   # the settings' prompt defaults and label limit, as the server reads it

    def run(self, kind: str, payload: dict):
        if payload.get("space") not in (None, self.space):
            raise RuntimeError("this worker's CLIP model or crop settings differ from the backend's (embedding "
                               "spaces differ): give the worker the same CLIP_MODEL / CROP_* settings")
        project = payload["project"]
        if self.fetcher.trusts_label_studio:   # believe Label Studio, not the webhook
            try:
                config = self.read_config(LabelStudioAPI.of(self.fetcher).project(project)["label_config"])
            except (LabelStudioAPIError, LabelConfigError, KeyError, TypeError) as error:
                log.warning("project %s: cannot read its labeling config from Label Studio: nothing learned: %s",
                            project, error)
                return None
            if kind == "learn":
                return self.learn(project, config, list(self._from_label_studio(project, payload["items"])))
        else:
            config = self.read_config(payload["label_config"])
        if kind == "learn":
            return self.learn(payload["project"], config, payload["items"])
        if kind == "rebuild":
            return self.rebuild(payload["project"], config)
        raise ValueError(f"unknown job kind {kind!r}")

    def learn(self, project: int, config: ProjectConfig, items: list[dict]) -> int:
        """Learn from annotations (``{"annotation": ..., "task": ...}``); returns the new revision."""
        changes = [c for c in (self._change(project, config, i["annotation"], i["task"]) for i in items) if c]
        before = self.store.revision(project, self.space)
        revision = self.store.apply(project, self.space, changes)
        if changes and revision == before:
            log.info("project %s: %d annotation(s) ignored (older than stored): revision %d", project,
                     len(changes), revision)
        else:
            log.info("project %s: learned from %d annotation(s): revision %d", project, len(changes), revision)
        return revision

    def _from_label_studio(self, project: int, items: list[dict]) -> Iterable[dict]:
        """The annotations (and their tasks) as Label Studio holds them, for the ids the webhook named."""
        api = LabelStudioAPI.of(self.fetcher)
        for item in items:
            annotation_id = id_of(item["annotation"]["id"] if isinstance(item["annotation"], dict)
                                  else item["annotation"])
            if annotation_id is None:
                continue
            try:
                annotation = api.annotation(annotation_id)
                task = api.task(id_of(annotation.get("task")))
            except LabelStudioAPIError as error:
                if error.status != 404:
                    log.warning("project %s: cannot read annotation %s from Label Studio: %s", project,
                                annotation_id, error)
                    continue
                log.warning("project %s: annotation %s is not in Label Studio (deleted since, or a forged "
                            "webhook): ignored", project, annotation_id)
                continue
            except AttributeError as error:   # an answer that is not an object
                log.warning("project %s: cannot read annotation %s from Label Studio: %s", project, annotation_id,
                            error)
                continue
            if not isinstance(task, dict) or id_of(task.get("project")) != project:
                log.warning("project %s: annotation %s belongs to another project in Label Studio: ignored",
                            project, annotation_id)
                continue
            yield {"annotation": annotation, "task": task}

    def rebuild(self, project: int, config: ProjectConfig) -> int | None:
        """Replace the project's memory by what its annotations in Label Studio teach."""
        changes, seen = [], 0
        try:
            for task in (t for page in LabelStudioAPI.of(self.fetcher).pages(project) for t in page):
                for annotation in task.get("annotations") or []:
                    if isinstance(annotation, dict) and not annotation.get("was_cancelled"):
                        seen += 1
                        change = self._change(project, config, annotation, task)
                        if change:
                            changes.append(change)
        except LabelStudioAPIError as error:
            log.warning("project %s: START_TRAINING: cannot list the project's annotations in Label Studio, memory "
                        "left as it was: %s (the backend needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)",
                        project, error)
            return None
        revision = self.store.replace(project, self.space, changes)
        log.info("project %s: rebuilt from %d annotation(s) (%d usable): revision %d", project, seen, len(changes),
                 revision)
        return revision

    def _change(self, project: int, config: ProjectConfig, annotation: dict, task: dict) -> Change | None:
        """One annotation → its memory record; None when it cannot be used (logged)."""
        annotation_id, task_id = annotation.get("id"), task.get("id")
        if annotation_id is None:
            return None
        if annotation.get("was_cancelled"):   # nothing to learn; forget what an earlier version of it taught
            return Change(source_key(annotation_id), stamp(annotation),
                          Examples((), (), torch.zeros(0, 0), task_id).to_bytes(), task_id)
        try:
            examples = self.examples(project, config, annotation, task)
        except (ImageFetchError, ImageDecodeError, TaskDataError) as error:
            log.warning("project %s, task %s, annotation %s: not learned: %s", project, task_id, annotation_id,
                        error)
            return None
        return Change(source_key(annotation_id), stamp(annotation), examples.to_bytes(), task_id)

    def examples(self, project: int, config: ProjectConfig, annotation: dict, task: dict) -> Examples:
        """Embeddings of the annotated boxes (labelled), of predicted boxes the annotator deleted (background)
        and of the whole image for each chosen Choice."""
        result = annotation.get("result") if isinstance(annotation.get("result"), list) else []
        predicted = self._predicted(project, annotation, task)
        heads, labels, boxes = [], [], []
        choice_heads, choice_labels = [], []
        outcomes = []
        for control in config.controls:
            if control.type == "rectanglelabels":
                outcomes += _outcomes(predicted, result, control.name)
                drawn = regions_from_results(result, control)
                gone = _deleted(regions_from_results(predicted, control), drawn)
                for label, box in [(d.label, d.box) for d in drawn] + [(None, p.box) for p in gone]:
                    heads.append(control.name), labels.append(label), boxes.append(box)
            else:
                for label in choices_from_results(result, control):
                    choice_heads.append(control.name), choice_labels.append(label)
        if not boxes and not choice_heads:
            return Examples((), (), torch.zeros(0, 0), task.get("id"), outcomes)
        image = self._image(config, task)
        height, width = image.shape[1:]
        parts = []
        with self.lock, torch.inference_mode():
            if boxes:
                tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
                tensor[:, 0::2] = tensor[:, 0::2].clamp(0, width)
                tensor[:, 1::2] = tensor[:, 1::2].clamp(0, height)
                parts.append(self.labeler.embed_examples(image, tensor))
            if choice_heads:
                parts.append(self.labeler.embed_whole([image]).expand(len(choice_heads), -1))
        return Examples(tuple(heads + choice_heads), tuple(labels + choice_labels), torch.cat(parts), task.get("id"),
                        outcomes)

    def _predicted(self, project: int, annotation: dict, task: dict) -> list:
        """What the annotator started from: LS's snapshot when it has one, else our own record for the task."""
        snapshot = annotation.get("prediction")
        if isinstance(snapshot, dict) and isinstance(snapshot.get("result"), list) and snapshot["result"]:
            return snapshot["result"]
        record = self.store.prediction(project, task["id"]) if isinstance(task.get("id"), int) else None
        return (record or {}).get("result") or []

    def _image(self, config: ProjectConfig, task: dict) -> torch.Tensor:
        url = config.controls[0].image_url(task.get("data") or {})
        return decode_image(self.fetcher.fetch(url, task.get("id")), self.max_pixels)


# ---------------------------------------------------------------------- helpers
def _compact_item(item: dict) -> dict:
    keep = ("id", "from_name", "to_name", "type", "value", "score", "original_width", "original_height",
            "image_rotation")
    return {k: item[k] for k in keep if k in item}


def _outcomes(predicted: list, annotated: list, control: str) -> list[tuple[float, bool]]:
    """(predicted score, kept) for each predicted box with a score: kept = its object and label survived the
    annotator (moved or resized counts as kept), what the calibrator learns from."""
    before, after = regions_of(predicted, control), regions_of(annotated, control)
    matches = match_regions([r for r, _ in before], [r for r, _ in after])
    return [(before[m.predicted][1], m.accepted) for m in matches
            if m.predicted is not None and before[m.predicted][1] is not None]


def _deleted(predicted, drawn) -> list:
    """Predicted boxes that no annotated box of the same control overlaps by DELETED_IOU (any label)."""
    if not predicted:
        return []
    if not drawn:
        return list(predicted)
    ious = box_iou(torch.tensor([p.box for p in predicted]), torch.tensor([d.box for d in drawn]))
    return [p for p, best in zip(predicted, ious.max(1).values.tolist()) if best < DELETED_IOU]


