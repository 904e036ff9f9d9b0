"""How well detections match ground truth: greedy one-to-one matching at an IoU threshold.

Used by the tests, the benchmarks and the CLI's evaluation of the shapes world.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou

from ..labeling.detections import Detections


@dataclass
class MatchScore:
    """Counts summed over images; the rates are derived."""

    ground_truth: int = 0
    predicted: int = 0
    matched: int = 0
    correct_labels: int = 0
    per_class: dict[str, list[int]] = field(default_factory=dict)  # label → [ground truth, matched, correct]

    @property
    def recall(self) -> float:
        return self.matched / max(1, self.ground_truth)

    @property
    def precision(self) -> float:
        return self.matched / max(1, self.predicted)

    @property
    def label_accuracy(self) -> float:
        """Share of matched boxes that also carry the right label."""
        return self.correct_labels / max(1, self.matched)

    def add(self, detections: Detections, truth_boxes, truth_labels, iou: float = 0.5,
            ignore_labels: tuple[str, ...] = ()) -> None:
        """Match one image. Ground truth in ``ignore_labels`` counts neither as missed nor as false positive."""
        truth_boxes = torch.as_tensor(np.asarray(truth_boxes, dtype=np.float32).reshape(-1, 4))
        pred_boxes = torch.as_tensor(detections.boxes)
        ious = box_iou(pred_boxes, truth_boxes) if len(pred_boxes) and len(truth_boxes) else torch.zeros(
            len(pred_boxes), len(truth_boxes))
        taken, ignored_hits = set(), 0
        for p in np.argsort(-detections.scores):
            candidates = [(float(ious[p, t]), t) for t in range(len(truth_boxes))
                          if t not in taken and ious[p, t] >= iou]
            if not candidates:
                continue
            _, t = max(candidates)
            taken.add(t)
            if truth_labels[t] in ignore_labels:
                ignored_hits += 1
                continue
            self.matched += 1
            stats = self.per_class.setdefault(truth_labels[t], [0, 0, 0])
            stats[1] += 1
            if detections.labels[p] == truth_labels[t]:
                self.correct_labels += 1
                stats[2] += 1
        for label in truth_labels:
            if label not in ignore_labels:
                self.ground_truth += 1
                self.per_class.setdefault(label, [0, 0, 0])[0] += 1
        self.predicted += len(detections) - ignored_hits


def scene_tensor(image) -> torch.Tensor:
    """A PIL scene image as the (3, H, W) uint8 tensor the pipeline takes."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def score_scenes(labeler, scenes, labelset, ignore_labels: tuple[str, ...] = (), chunk: int = 16) -> MatchScore:
    """Run ``labeler`` on shapes-world scenes with one region head and match against their ground truth."""
    score = MatchScore()
    for start in range(0, len(scenes), chunk):
        batch = scenes[start:start + chunk]
        results = labeler.label([scene_tensor(s.image) for s in batch], {"label": labelset})
        for scene, result in zip(batch, results):
            score.add(result.regions["label"], [o.box for o in scene.objects], [o.shape for o in scene.objects],
                      ignore_labels=ignore_labels)
    return score
