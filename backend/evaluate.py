"""``python -m backend eval DATASET``: CLIP zero-shot accuracy on the ground-truth boxes of a labelled dataset.

This reproduces the method's evaluation: a stratified sample of up to ``--per-class`` boxes per class (seeded),
each box cropped as the pipeline crops proposals and classified by CLIP over prompts made from the dataset's
class names. On PASCAL VOC with OpenAI's ViT-B/32 (100 per class, 2,000 crops) the method reports 79.3 %.
``--background`` adds the background prompts, as in the pipeline: a crop they win counts as wrong (the
pipeline would drop that object), and "background" becomes a column of the confusion matrix.

Datasets: PASCAL VOC (a root with ``Annotations/*.xml`` and ``JPEGImages/``; objects marked ``difficult`` are
left out, as in VOC's own evaluation) or COCO (a JSON file, or a folder with ``annotations.json`` such as
``demo-data`` writes; ``iscrowd`` boxes are left out).

Writes ``report.json`` and ``confusion_matrix.png`` into ``--out``; prints a per-class table and the accuracy.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from .config import Settings
from .labeling.factory import build_labeler, set_threads
from .labeling.pipeline import Labeler
from .labeling.prompts import LabelSet
from .offline import decoded_chunks

BACKGROUND = "background"  # the prediction when a background prompt wins


class DatasetError(ValueError):
    """The dataset cannot be read; the message says why."""


@dataclass(frozen=True)
class GroundTruth:
    image: Path
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    label: str


@dataclass(frozen=True)
class Dataset:
    classes: tuple[str, ...]           # in the dataset's order: the prompts' and the report's order
    objects: tuple[GroundTruth, ...]


# ---------------------------------------------------------------- command
def eval_command(args) -> int:
    """CLI entry: print the per-class table and the accuracy; write ``report.json`` and ``confusion_matrix.png``."""
    try:
        dataset = load_dataset(args.dataset, args.format, args.split, args.images)
    except (DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = evaluate(dataset, Settings.from_env(demo=args.demo), args.per_class, args.seed, args.background)
    result["dataset"] = str(args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    plot_confusion(np.array(result["confusion"]["counts"]), dataset.classes, result["confusion"]["columns"],
                   out / "confusion_matrix.png", title=f"CLIP zero-shot, accuracy {result['accuracy']:.1%}")
    print(format_table(result))
    print(f"accuracy: {result['accuracy']:.1%} ({result['correct']} / {result['n']} crops, "
          f"{len(dataset.classes)} classes, up to {args.per_class} per class, seed {args.seed}); "
          f"report and confusion matrix in {out}/")
    return 0 if result["n"] else 1


def evaluate(dataset: Dataset, settings: Settings, per_class: int, seed: int, background: bool) -> dict:
    """Sample, classify with prompts from the class names, and report (see ``build_report``) with the setup."""
    sample = stratified_sample(dataset.objects, dataset.classes, per_class, seed)
    set_threads(settings.torch_threads)
    spec = settings.model_spec()
    labelset = LabelSet.build(dataset.classes, templates=settings.templates,
                              background=settings.background if background else ())
    predicted, skipped = classify(build_labeler(spec, with_detector=False), sample, labelset,
                                  settings.max_image_pixels)
    scored = [(obj.label, predicted[i]) for i, obj in enumerate(sample) if i in predicted]
    return build_report(scored, dataset.classes, background) | {
        "clip_model": spec.clip_model, "crops": vars(spec.crops),
        "prompts": dict(zip(labelset.labels, labelset.prompts)), "background_prompts": labelset.background,
        "per_class_limit": per_class, "seed": seed, "skipped_images": sorted(map(str, skipped))}


# ---------------------------------------------------------------- datasets
def load_dataset(path: str, fmt: str | None = None, split: str | None = None,
                 images: str | None = None) -> Dataset:
    """A VOC root or a COCO JSON (or a folder holding ``annotations.json``); ``fmt`` None = guess from the path."""
    root = Path(path)
    if fmt is None:
        fmt = "voc" if (root / "Annotations").is_dir() else "coco"
    if fmt == "voc":
        return read_voc(root, split)
    return read_coco(root / "annotations.json" if root.is_dir() else root, Path(images) if images else None)


def read_voc(root: Path, split: str | None = None) -> Dataset:
    """Objects of ``Annotations/*.xml`` (only the ids in ``ImageSets/Main/<split>.txt`` when ``split`` is
    given), ``difficult`` ones left out; classes sorted by name, VOC's own order."""
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise DatasetError(f"{root} is not a PASCAL VOC root: it has no Annotations/ folder")
    if split:
        ids = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        files = [annotations / f"{image_id}.xml" for image_id in ids]
    else:
        files = sorted(annotations.glob("*.xml"))
    objects = [obj for file in files for obj in _voc_objects(file, root / "JPEGImages")]
    if not objects:
        raise DatasetError(f"no objects in {annotations}")
    return Dataset(tuple(sorted({obj.label for obj in objects})), tuple(objects))


def _voc_objects(file: Path, image_dir: Path) -> list[GroundTruth]:
    tree = ElementTree.parse(file).getroot()
    image = image_dir / (tree.findtext("filename") or f"{file.stem}.jpg")
    objects = []
    for obj in tree.iter("object"):
        if obj.findtext("difficult", "0").strip() == "1":
            continue
        corners = [float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
        # VOC corners are 1-based inclusive pixel indices
        box = (corners[0] - 1, corners[1] - 1, corners[2], corners[3])
        objects.append(GroundTruth(image, box, obj.findtext("name").strip()))
    return objects


def read_coco(json_path: Path, images: Path | None = None) -> Dataset:
    """Boxes of a COCO detection JSON; ``file_name`` is looked up in ``images``, else next to the JSON, else
    in an ``images/`` folder beside it. Classes in category-id order."""
    if not json_path.is_file():
        raise DatasetError(f"{json_path} does not exist: give a COCO JSON file or a folder with annotations.json")
    coco = json.loads(json_path.read_text())
    categories = {c["id"]: c["name"] for c in sorted(coco.get("categories", []), key=lambda c: c["id"])}
    folders = [images] if images else [json_path.parent, json_path.parent / "images"]
    paths = {image["id"]: _find_file(image["file_name"], folders) for image in coco.get("images", [])}
    objects = []
    for ann in coco.get("annotations", []):
        x, y, w, h = ann["bbox"]
        if ann.get("iscrowd") or w <= 0 or h <= 0:
            continue
        objects.append(GroundTruth(paths[ann["image_id"]], (x, y, x + w, y + h), categories[ann["category_id"]]))
    if not objects:
        raise DatasetError(f"no usable boxes in {json_path}")
    return Dataset(tuple(categories.values()), tuple(objects))


def _find_file(name: str, folders: Sequence[Path]) -> Path:
    """The first folder that has ``name``; else the first folder's path, so the error names it later."""
    return next((folder / name for folder in folders if (folder / name).is_file()), folders[0] / name)


def stratified_sample(objects: Sequence[GroundTruth], classes: Sequence[str], per_class: int,
                      seed: int = 0) -> list[GroundTruth]:
    """Up to ``per_class`` objects of each class, drawn without replacement; in dataset order (so objects of
    one image stay together), and the same for the same seed."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for index, obj in enumerate(objects):
        by_class[obj.label].append(index)
    chosen = []
    for label in classes:
        indices = np.asarray(by_class[label], dtype=np.int64)
        chosen += rng.permutation(indices)[:per_class].tolist()
    return [objects[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- classification
def classify(labeler: Labeler, objects: Sequence[GroundTruth], labelset: LabelSet,
             max_pixels: int) -> tuple[dict[int, str], list[Path]]:
    """CLIP's label for each object, by index (``BACKGROUND`` when a background prompt wins), and the images
    that could not be read (their objects get no label). Each image is decoded once; the crops of a chunk of
    images go through CLIP together."""
    by_image: dict[Path, list[int]] = defaultdict(list)
    for index, obj in enumerate(objects):
        by_image[obj.image].append(index)
    names = labelset.labels + (BACKGROUND,) * len(labelset.background)
    predicted, skipped = {}, []
    for decoded, unreadable in decoded_chunks(list(by_image), max_pixels, "classifying"):
        skipped += [path for path, _ in unreadable]
        if decoded:
            boxes = [torch.tensor([objects[i].box for i in by_image[path]]) for path, _ in decoded]
            embeddings = labeler.embed_boxes([image for _, image in decoded], boxes, labeler.crops)
            best = labeler.clip.logits(torch.cat(embeddings), labelset).argmax(-1).tolist()
            indices = [i for path, _ in decoded for i in by_image[path]]
            predicted.update({i: names[b] for i, b in zip(indices, best)})
    return predicted, skipped


# ---------------------------------------------------------------- report
def build_report(scored: Sequence[tuple[str, str]], classes: Sequence[str], background: bool) -> dict:
    """Overall and per-class accuracy, the most frequent confusion per class, and the confusion counts
    (rows: true class; columns: predicted class, then ``background`` when it was a prompt)."""
    columns = list(classes) + ([BACKGROUND] if background else [])
    counts = np.zeros((len(classes), len(columns)), dtype=np.int64)
    row, column = {c: i for i, c in enumerate(classes)}, {c: i for i, c in enumerate(columns)}
    for truth, guess in scored:
        counts[row[truth], column[guess]] += 1
    per_class = []
    for label in classes:
        wrong = Counter(guess for truth, guess in scored if truth == label and guess != label)
        n = sum(1 for truth, _ in scored if truth == label)
        correct = n - sum(wrong.values())
        confused, times = wrong.most_common(1)[0] if wrong else (None, 0)
        per_class.append({"class": label, "n": n, "correct": correct, "accuracy": correct / n if n else None,
                          "most_confused_with": confused, "confused_times": times})
    correct = sum(1 for truth, guess in scored if truth == guess)
    return {"n": len(scored), "correct": correct, "accuracy": correct / len(scored) if scored else 0.0,
            "per_class": per_class, "confusion": {"rows": list(classes), "columns": columns,
                                                  "counts": counts.tolist()}}


def format_table(report: dict) -> str:
    """The per-class table, plain text."""
    width = max([5] + [len(c["class"]) for c in report["per_class"]])
    lines = [f"{'class':<{width}} {'n':>5} {'correct':>7} {'accuracy':>8}  most confused with"]
    for c in report["per_class"]:
        accuracy = f"{c['accuracy']:.1%}" if c["n"] else "-"
        confused = f"{c['most_confused_with']} ({c['confused_times']}/{c['n']})" if c["most_confused_with"] else "-"
        lines.append(f"{c['class']:<{width}} {c['n']:>5} {c['correct']:>7} {accuracy:>8}  {confused}")
    return "\n".join(lines)


def plot_confusion(counts: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path,
                   title: str = "") -> None:
    """The confusion matrix as a PNG, each row normalised to fractions of its class's crops."""
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = 2.5 + 0.45 * len(columns)
    figure = Figure(figsize=(side, side * len(rows) / len(columns) + 0.8), layout="constrained")
    axes = figure.subplots()
    shown = axes.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(columns)), labels=columns, rotation=60, ha="right")
    axes.set_yticks(range(len(rows)), labels=rows)
    axes.set_xlabel("predicted by CLIP")
    axes.set_ylabel("ground truth")
    axes.set_title(title)
    for (r, c), value in np.ndenumerate(fractions):
        if value >= 0.005:
            axes.text(c, r, f"{value * 100:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 0.5 else "black")
    figure.colorbar(shown, ax=axes, shrink=0.8, label="fraction of the row's crops")
    figure.savefig(path, dpi=120)
