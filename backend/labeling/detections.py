"""The data passed between stages: what was found in one image. numpy only, so Label Studio code can use it
without importing torch.

>>> d = Detections(np.array([[0, 0, 10, 10], [5, 5, 20, 30]]), np.array([0.9, 0.4]), ("bee", "wasp"))
>>> len(d), d[d.scores > 0.5].labels
(2, ('bee',))
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Regions of one image: boxes in pixels of the upright image (EXIF orientation applied)."""

    boxes: np.ndarray                       # (N, 4) float32 x0, y0, x1, y1
    scores: np.ndarray                      # (N,) float32 confidence in the label (CLIP probability)
    labels: tuple[str, ...]                 # N label names

    def __post_init__(self):
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "labels", tuple(self.labels))
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError("boxes, scores and labels must have the same length")

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), ())

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index) -> Detections:
        """Select by boolean mask, index array or slice."""
        index = np.arange(len(self))[index]
        return Detections(self.boxes[index], self.scores[index], tuple(self.labels[i] for i in index))


@dataclass(frozen=True)
class Choice:
    label: str
    score: float


@dataclass(frozen=True)
class ImageLabels:
    """Everything the pipeline says about one image, per head (the caller's name for each label set)."""

    width: int                                         # of the upright image
    height: int
    regions: dict[str, Detections] = field(default_factory=dict)        # heads of kind "regions"
    choices: dict[str, tuple[Choice, ...]] = field(default_factory=dict)  # heads of kind "choices", best first
