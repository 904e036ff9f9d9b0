"""Label Studio's webhook payloads (ANNOTATION_CREATED / UPDATED, ANNOTATIONS_CREATED / DELETED, TASKS_DELETED,
START_TRAINING) read defensively: ids, the (annotation, task) pairs learning needs, stamps clamped to receipt.
Nothing here is believed by itself: see ``learning.Learning.handle`` for who is."""
from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

log = logging.getLogger(__name__)


def project_id_of(project) -> int | None:
    """``"12.1716400000"`` (setup/predict), ``12`` or ``{"id": 12, ...}`` (webhooks) → 12."""
    if isinstance(project, dict):
        project = project.get("id")
    return id_of(project.split(".")[0] if isinstance(project, str) else project)


def id_of(value) -> int | None:
    """A Label Studio id (an int, or its digits as a string) within a 64-bit integer, else None."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if type(value) is int and 0 <= value < 2**63 else None


def annotation_items(data: dict) -> list[dict]:
    """The (annotation, task) pairs of an ANNOTATION_CREATED/UPDATED or bulk ANNOTATIONS_CREATED payload, cut
    down to what learning needs (the job payload stays small)."""
    received = time.time()
    annotations = [a for a in _as_list(data.get("annotation") or data.get("annotations")) if isinstance(a, dict)]
    tasks = {id_of(t.get("id")): t for t in _as_list(data.get("task") or data.get("tasks")) if isinstance(t, dict)}
    tasks.pop(None, None)
    items = []
    for annotation in annotations:
        task_ref = annotation.get("task")
        task = tasks.get(id_of(task_ref.get("id") if isinstance(task_ref, dict) else task_ref))
        if task is None and len(tasks) == 1 and len(annotations) == 1:
            task = next(iter(tasks.values()))
        if task is None or id_of(annotation.get("id")) is None:
            log.warning("annotation %r comes without its task or an id: ignored", annotation.get("id"))
            continue
        snapshot = annotation.get("prediction")
        stamped = stamp(annotation, received)
        items.append({
            "annotation": {"id": id_of(annotation.get("id")), "result": _as_list(annotation.get("result")),
                           "was_cancelled": bool(annotation.get("was_cancelled")),
                           # one stamp for every job of this event, at most the time of receipt
                           "updated_at": datetime.fromtimestamp(stamped, UTC).isoformat(),
                           "prediction": {"result": snapshot.get("result")} if isinstance(snapshot, dict) else None},
            "task": {"id": id_of(task.get("id")), "data": _as_dict(task.get("data"))},
        })
    return items


def deleted_ids(data: dict, kind: str) -> list[int]:
    """The ids of an ANNOTATIONS_DELETED (``kind`` "annotations") or TASKS_DELETED ("tasks") payload."""
    return sorted({i for i in (id_of(x.get("id")) for x in _as_list(data.get(kind)) if isinstance(x, dict))
                   if i is not None})


def annotation_ids(data: dict) -> list[int]:
    """The annotation ids a webhook names (all that is believed of it when Label Studio's API is at hand)."""
    ids = [id_of(a.get("id")) for a in _as_list(data.get("annotation") or data.get("annotations"))
           if isinstance(a, dict)]
    return sorted({i for i in ids if i is not None})


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def label_config_of(project) -> str | None:
    config = project.get("label_config") if isinstance(project, dict) else None
    return config if isinstance(config, str) and config.strip() else None


def stamp(annotation: dict, received: float | None = None) -> float:
    """When the annotation was last changed (its ``updated_at``), else now; never later than ``received`` (or
    now): a stamp from the future would beat every real update."""
    now = time.time() if received is None else received
    text = annotation.get("updated_at") or annotation.get("created_at")
    if isinstance(text, str):
        try:
            return min(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp(), now)
        except (ValueError, OverflowError):
            pass
    return now
