"""``python -m backend label PATHS...``: pre-annotate image files and folders without Label Studio.

The labels come from ``--labels "bee,wasp"`` (prompts from the PROMPT_TEMPLATE / BACKGROUND_PROMPTS settings)
or from a labeling config (``--config``: every RectangleLabels and Choices control, with its prompts).
Images go through the pipeline in chunks, so CLIP batches crops across images; an image that cannot be read
is reported and skipped. The result is written as Label Studio tasks, COCO or a YOLO dataset (see export.py).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import Settings, split_list
from .export import Labelled, box_categories, coco_detections, label_studio_tasks, write_yolo
from .labeling.decode import ImageDecodeError, decode_image
from .labeling.detections import ImageLabels
from .labeling.factory import build_labeler, set_threads
from .labeling.pipeline import Labeler
from .labeling.prompts import LabelSet
from .studio.label_config import Control, LabelConfigError, ProjectConfig
from .versions import base_version

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = frozenset((".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"))
CHUNK = 16  # images per pipeline call: CLIP batches across them, memory stays bounded


@dataclass
class LabelRun:
    """What a run produced: the labelled images in input order, and the files skipped with the reason."""

    labelled: list[tuple[Path, ImageLabels]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def regions(self) -> int:
        return sum(len(d) for _, labels in self.labelled for d in labels.regions.values())


def label_command(args) -> int:
    """CLI entry: label ``args.paths`` and write ``args.format`` to ``args.out`` (default stdout / ./yolo)."""
    files = find_images(args.paths)
    if not files:
        print(f"error: no images found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    settings = Settings.from_env(demo=args.demo)
    try:
        config = project_config(args, settings)
    except (LabelConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    categories = box_categories(config)
    if args.format != "ls" and not categories:
        print(f"error: the config has no <RectangleLabels>; {args.format} carries boxes only (use --format ls)",
              file=sys.stderr)
        return 2
    set_threads(settings.torch_threads)
    spec = settings.model_spec()
    labeler = build_labeler(spec, with_detector=bool(categories))

    start = time.perf_counter()
    run = label_files(labeler, files, config.labelsets, settings.max_image_pixels)
    seconds = time.perf_counter() - start
    write_output(run.labelled, args.format, args.out, config, base_version(spec.fingerprint, config.fingerprint))
    skipped = f" ({len(run.skipped)} skipped)" if run.skipped else ""
    print(f"labelled {len(run.labelled)} images{skipped}, {run.regions} regions in {seconds:.1f} s "
          f"({len(run.labelled) / max(seconds, 1e-9):.1f} images/s)", file=sys.stderr)
    return 0 if run.labelled else 1


def find_images(paths: Sequence[str]) -> list[Path]:
    """Files named directly (whatever their suffix) and image files under folders (recursively), sorted."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            found.add(path)
        else:
            log.warning("skipped %s: no such file or folder", path)
    return sorted(found)


def project_config(args, settings: Settings) -> ProjectConfig:
    """The controls to fill: those of ``--config``, or one RectangleLabels named ``label`` over ``--labels``."""
    if args.config:
        config = settings.project_config(Path(args.config).read_text(encoding="utf-8"))
        for problem in config.problems:
            log.warning("label config: %s", problem)
        return config
    labels = split_list(args.labels)
    if not labels:
        raise LabelConfigError(f"--labels {args.labels!r} names no label")
    labelset = LabelSet.build(labels, templates=settings.templates, background=settings.background)
    return ProjectConfig((Control("label", "image", "rectanglelabels", "image", labelset),))


def label_files(labeler: Labeler, files: Sequence[Path], heads: dict[str, LabelSet], max_pixels: int) -> LabelRun:
    """Label each file with every head; unreadable files are logged and skipped."""
    run = LabelRun()
    for decoded, skipped in decoded_chunks(files, max_pixels, "labelling"):
        run.skipped += skipped
        if decoded:
            found = labeler.label([image for _, image in decoded], heads)
            run.labelled += [(path, labels) for (path, _), labels in zip(decoded, found)]
    return run


def decoded_chunks(files: Sequence[Path], max_pixels: int, task: str,
                   chunk: int = CHUNK) -> Iterator[tuple[list[tuple[Path, torch.Tensor]], list[tuple[Path, str]]]]:
    """``chunk`` files at a time, each decoded once, under a progress bar: (decoded, skipped with the reason).
    A file that cannot be read or decoded is logged as ``skipped PATH: reason``; it never stops the run."""
    with logging_redirect_tqdm(), tqdm(total=len(files), desc=task, unit="img", file=sys.stderr) as bar:
        for start in range(0, len(files), chunk):
            decoded, skipped = [], []
            for path in files[start:start + chunk]:
                try:
                    decoded.append((path, decode_image(path.read_bytes(), max_pixels)))
                except (OSError, ImageDecodeError) as error:
                    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
                    log.warning("skipped %s: %s", path, reason)
                    skipped.append((path, reason))
            yield decoded, skipped
            bar.update(len(decoded) + len(skipped))


def write_output(labelled: Sequence[tuple[Path, ImageLabels]], fmt: str, out: str | None,
                 config: ProjectConfig, version: str) -> None:
    """Write ``fmt`` to ``out``. Image paths in LS and COCO files are relative to the file's folder, as
    COCO tools and Label Studio's local-file storage resolve them; on stdout they stay as found."""
    if fmt == "yolo":
        write_yolo([(str(path), labels) for path, labels in labelled], box_categories(config), Path(out or "yolo"))
        return
    base = Path(out).resolve().parent if out else None
    items: list[Labelled] = [(os.path.relpath(path.resolve(), base) if base else str(path), labels)
                             for path, labels in labelled]
    document = (label_studio_tasks(items, config, version) if fmt == "ls"
                else coco_detections(items, box_categories(config)))
    text = json.dumps(document, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
    else:
        print(text)
