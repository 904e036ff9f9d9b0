"""Between pipeline output and Label Studio result JSON: predictions out, drawn and annotated boxes back in.

Label Studio places a rectangle by its top-left corner and size in percent of the displayed image, which has
its EXIF orientation applied: the same upright image the pipeline saw, so pixels convert by its size.

>>> from backend.studio.label_config import parse_label_config
>>> from backend.labeling.detections import Detections, ImageLabels
>>> config = parse_label_config('<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
...                             '<Label value="Bee"/></RectangleLabels></View>')
>>> found = ImageLabels(200, 100, regions={"box": Detections([[20, 10, 120, 60]], [0.5], ["Bee"])})
>>> prediction = prediction_for_task(found, config, "v1")
>>> prediction["result"][0]["value"]
{'x': 10.0, 'y': 10.0, 'width': 50.0, 'height': 50.0, 'rotation': 0, 'rectanglelabels': ['Bee']}
>>> regions_from_results(prediction["result"], config.controls[0])
[LabeledBox(label='Bee', box=(20.0, 10.0, 120.0, 60.0))]
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from backend.labeling.detections import Choice, Detections, ImageLabels
from backend.labeling.matching import Region

from .label_config import Control, ProjectConfig

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]   # x0, y0, x1, y1 in pixels


class LabeledBox(NamedTuple):
    """A box an annotator drew and labelled."""

    label: str
    box: Box


@dataclass(frozen=True)
class DrawnBox:
    """A rectangle from Label Studio, as it was sent."""

    from_name: str | None
    to_name: str | None
    labels: tuple[str, ...]                       # empty for a plain <Rectangle>
    percent: tuple[float, float, float, float]    # x, y, width, height in percent of the image, before rotation
    rotation: float                               # degrees clockwise around the top-left corner
    original_size: tuple[float, float] | None     # the image's width, height as Label Studio reported them

    def pixel_box(self, width: float, height: float) -> Box | None:
        """The axis-aligned box around it in an image of this size, clipped; None when nothing is left."""
        x, y = self.percent[0] * width / 100, self.percent[1] * height / 100
        w, h = self.percent[2] * width / 100, self.percent[3] * height / 100
        cos, sin = math.cos(math.radians(self.rotation)), math.sin(math.radians(self.rotation))
        xs = (x, x + w * cos, x + w * cos - h * sin, x - h * sin)   # corners, turned around the top-left one
        ys = (y, y + w * sin, y + w * sin + h * cos, y + h * cos)
        return _clipped((min(xs), min(ys), max(xs), max(ys)), width, height)


def prediction_for_task(labels: ImageLabels, config: ProjectConfig, model_version: str,
                        keep: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """One task's prediction in Label Studio's format, with only labels the config declares.

    ``keep``: a box's label probability → the probability that an annotator keeps it (the project's calibration;
    None: the label probability itself), which becomes the box's ``score``. The task's ``score`` is the chance
    that no box needs a correction (the product of its boxes' scores), else the mean of its choices' scores, 0.0
    when nothing was found: Label Studio sorts tasks by it, so those that need work come first.
    """
    items = []
    for control in config.controls:
        if control.type == "rectanglelabels":
            detections = labels.regions.get(control.name, Detections.empty())
            if keep is not None and len(detections):
                detections = replace(detections, scores=keep(detections.scores))
            items += _rectangle_items(control, detections, labels.width, labels.height)
        else:
            items += _choices_items(control, labels.choices.get(control.name, ()))
    boxes = [item["score"] for item in items if item["type"] == "rectanglelabels"]
    if boxes:
        score = math.prod(boxes)
    else:
        score = sum(item["score"] for item in items) / len(items) if items else 0.0
    return {"result": items, "score": score, "model_version": model_version}


def regions_from_results(result: list[dict], control: Control) -> list[LabeledBox]:
    """The labelled boxes of one RectangleLabels control in an annotation's result, in pixels.

    Items of other controls or types, without a usable size, or with labels the config no longer has are
    skipped. A rotated box becomes the axis-aligned box around it.
    """
    known = set(control.labelset.labels)
    regions = []
    for drawn in _drawn_boxes(result, ("rectanglelabels",)):
        box = drawn.pixel_box(*drawn.original_size) if drawn.original_size else None
        if drawn.from_name == control.name and box:
            regions += [LabeledBox(label, box) for label in drawn.labels if label in known]
    return regions


def choices_from_results(result: list, control: Control) -> list[str]:
    """The labels chosen for one Choices control in an annotation's result, those the config still has."""
    known = set(control.labelset.labels)
    chosen = []
    for item in result:
        if isinstance(item, dict) and item.get("from_name") == control.name and item.get("type") == "choices":
            value = item.get("value") if isinstance(item.get("value"), dict) else {}
            chosen += [c for c in value.get("choices") or [] if isinstance(c, str) and c in known]
    return list(dict.fromkeys(chosen))


def regions_of(result: list, control: str) -> list[tuple[Region, float | None]]:
    """The boxes of one RectangleLabels control in a Label Studio result, in percent, with their scores."""
    out = []
    for item in result:
        if not isinstance(item, dict) or item.get("from_name") != control or item.get("type") != "rectanglelabels":
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            continue
        labels = value.get("rectanglelabels") or []
        try:
            x, y, w, h = (float(value[k]) for k in ("x", "y", "width", "height"))
        except (KeyError, TypeError, ValueError):
            continue
        if not labels or not isinstance(labels[0], str) or not all(map(math.isfinite, (x, y, w, h))):
            continue
        score = item.get("score")
        region_id = item.get("id") if isinstance(item.get("id"), str) else None
        out.append((Region((x, y, x + w, y + h), labels[0], region_id),
                    float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None))
    return out


def context_regions(context: dict | None) -> list[DrawnBox]:
    """The rectangles in an interactive request's ``params.context`` (``{"result": [...]}``); odd input → []."""
    result = context.get("result") if isinstance(context, dict) else None
    return _drawn_boxes(result, ("rectanglelabels", "rectangle"))


def _rectangle_items(control: Control, detections: Detections, width: int, height: int) -> list[dict]:
    items = []
    for box, score, label in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels):
        box = _clipped(box, width, height)
        if box is None or not _declared(control, label):
            continue
        x0, y0, x1, y1 = box
        value = {"x": 100 * x0 / width, "y": 100 * y0 / height,
                 "width": 100 * (x1 - x0) / width, "height": 100 * (y1 - y0) / height,
                 "rotation": 0, "rectanglelabels": [label]}
        items.append(_item(control, value, score) | {"original_width": int(width), "original_height": int(height),
                                                      "image_rotation": 0})
    return items


def _choices_items(control: Control, choices: tuple[Choice, ...]) -> list[dict]:
    """At most one item: the best choice, or for choice="multiple" every choice, scored by their mean."""
    picked = [choice for choice in choices if _declared(control, choice.label)]
    picked = picked if control.labelset.multi_label else picked[:1]
    if not picked:
        return []
    score = sum(choice.score for choice in picked) / len(picked)
    return [_item(control, {"choices": [choice.label for choice in picked]}, score)]


def _item(control: Control, value: dict, score: float) -> dict:
    # ids derived from the content: the same image gives the same prediction, byte for byte (cache-friendly)
    content = json.dumps([control.name, value], sort_keys=True, default=float)
    return {"id": hashlib.sha1(content.encode()).hexdigest()[:10], "from_name": control.name,
            "to_name": control.to_name, "type": control.type, "value": value, "score": float(score)}


def _declared(control: Control, label: str) -> bool:
    # Label Studio stores undeclared labels without complaint, and annotators then cannot edit them.
    if label in control.labelset.labels:
        return True
    log.warning("dropped label %r: not in the config of control %r", label, control.name)
    return False


def _drawn_boxes(result: list | None, types: tuple[str, ...]) -> list[DrawnBox]:
    """The readable rectangles of the given result types; anything malformed is skipped."""
    if not isinstance(result, list):
        return []
    boxes = (_drawn_box(item) for item in result if isinstance(item, dict) and item.get("type") in types)
    return [box for box in boxes if box]


def _drawn_box(item: dict) -> DrawnBox | None:
    value = item.get("value")
    if not isinstance(value, dict) or item.get("image_rotation", 0) not in (0, None):
        return None  # with the image turned in the editor, coordinates refer to the turned view: rare, skipped
    percent = tuple(_number(value.get(key)) for key in ("x", "y", "width", "height"))
    rotation = _number(value.get("rotation", 0))
    if None in percent or rotation is None or percent[2] <= 0 or percent[3] <= 0:
        return None
    labels = value.get("rectanglelabels")
    labels = tuple(label for label in labels if isinstance(label, str)) if isinstance(labels, list) else ()
    width, height = _number(item.get("original_width")), _number(item.get("original_height"))
    size_known = width is not None and height is not None and width > 0 and height > 0
    return DrawnBox(item.get("from_name"), item.get("to_name"), labels, percent, rotation,
                    (width, height) if size_known else None)


def _clipped(box: Box, width: float, height: float) -> Box | None:
    """A pixel box cut to the image; None when nothing of it is left."""
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], width), min(box[3], height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _number(value) -> float | None:
    """A finite number from JSON, else None (booleans and strings are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
