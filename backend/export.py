"""Labelled images → files other tools read: Label Studio tasks with predictions, COCO detections, YOLO labels.

Every writer takes ``(image path, ImageLabels)`` pairs; the path is written as given, so callers decide whether
it is absolute or relative to the output. COCO and YOLO number the box labels by their order in ``categories``
(COCO ids from 1, YOLO classes from 0) and carry only regions; Label Studio tasks also carry whole-image choices.

>>> from backend.labeling.detections import Detections
>>> found = ImageLabels(200, 100, regions={"label": Detections([[20, 10, 120, 60]], [0.9], ["bee"])})
>>> yolo_lines(found, ["wasp", "bee"])
['1 0.350000 0.350000 0.500000 0.500000']
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from .labeling.detections import ImageLabels
from .studio.label_config import ProjectConfig
from .studio.results import prediction_for_task

Labelled = tuple[str, ImageLabels]  # (image path as it should appear in the export, what was found in it)


def box_categories(config: ProjectConfig) -> list[str]:
    """The box labels of every RectangleLabels control, in config order, each once: the export's categories."""
    labels = (label for control in config.controls if control.type == "rectanglelabels"
              for label in control.labelset.labels)
    return list(dict.fromkeys(labels))


# ---------------------------------------------------------------- Label Studio
def label_studio_tasks(items: Sequence[Labelled], config: ProjectConfig, version: str) -> list[dict]:
    """Tasks to import into a Label Studio project with ``config``: image in the field its Image tag reads."""
    data_key = config.controls[0].value_key
    return [{"data": {data_key: path}, "predictions": [prediction_for_task(labels, config, version)]}
            for path, labels in items]


# ---------------------------------------------------------------- COCO
def coco_detections(items: Sequence[Labelled], categories: Sequence[str]) -> dict:
    """A COCO dataset of the predictions: ``images``, ``annotations`` (bbox x, y, w, h pixels, with ``score``)
    and ``categories``. ``annotations`` also loads as a result file with ``COCO.loadRes``."""
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    images, annotations = [], []
    for image_id, (path, labels) in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": path, "width": labels.width, "height": labels.height})
        for label, score, (x0, y0, x1, y1) in _boxes(labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": score})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": category_id[name], "name": name} for name in categories]}


# ---------------------------------------------------------------- YOLO
def yolo_lines(labels: ImageLabels, categories: Sequence[str]) -> list[str]:
    """One ``class cx cy w h`` line per box, coordinates as fractions of the image size."""
    class_id = {name: i for i, name in enumerate(categories)}
    w, h = labels.width, labels.height
    return [f"{class_id[label]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
            f"{(y1 - y0) / h:.6f}" for label, _, (x0, y0, x1, y1) in _boxes(labels)]


def write_yolo(items: Sequence[Labelled], categories: Sequence[str], out_dir: Path) -> None:
    """A dataset YOLO trainers read as it is: ``images/`` (the files, hard-linked or copied), ``labels/`` (one
    txt per image, same stem), ``classes.txt`` and ``data.yaml`` (Ultralytics) naming the classes."""
    images_dir, labels_dir = out_dir / "images", out_dir / "labels"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    for (path, labels), name in zip(items, _unique_names([path for path, _ in items])):
        _link_or_copy(Path(path), images_dir / name)
        lines = yolo_lines(labels, categories)
        (labels_dir / Path(name).with_suffix(".txt")).write_text("".join(line + "\n" for line in lines))
    (out_dir / "classes.txt").write_text("".join(name + "\n" for name in categories))
    names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in enumerate(categories))  # JSON strings are YAML
    (out_dir / "data.yaml").write_text(
        "# predictions from `python -m backend label --format yolo`: review them before training on them\n"
        f"path: {json.dumps(str(out_dir.resolve()))}\ntrain: images\nval: images\nnc: {len(categories)}\n"
        f"names:\n{names}")


# ---------------------------------------------------------------- shared
def _boxes(labels: ImageLabels) -> Iterator[tuple[str, float, tuple[float, float, float, float]]]:
    """(label, score, box clipped to the image) of every region head; boxes empty after clipping are left out."""
    for detections in labels.regions.values():
        for box, score, label in zip(detections.boxes.tolist(), detections.scores.tolist(), detections.labels):
            x0, x1 = (min(max(v, 0.0), labels.width) for v in box[0::2])
            y0, y1 = (min(max(v, 0.0), labels.height) for v in box[1::2])
            if x1 > x0 and y1 > y0:
                yield label, round(score, 4), (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2))


def _unique_names(paths: Sequence[str]) -> list[str]:
    """File names for one flat folder with distinct stems (label files are named by stem): the original name,
    ``name_1.png`` etc. when stems repeat, compared without case as on macOS and Windows."""
    seen: set[str] = set()
    names = []
    for path in paths:
        stem, suffix = Path(path).stem, Path(path).suffix
        unique, n = stem, 0
        while unique.lower() in seen:
            n += 1
            unique = f"{stem}_{n}"
        seen.add(unique.lower())
        names.append(unique + suffix)
    return names


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)   # no second copy of the pixels when on the same file system
    except OSError:
        shutil.copy2(source, target)
