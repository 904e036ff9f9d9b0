"""What annotators did with predicted regions: each prediction kept, moved (or resized), relabelled or deleted,
and each annotated region that no prediction found (missed). numpy only.

Pairs come first from region ids (a region an annotator accepted from a prediction keeps the prediction's id in
Label Studio), then greedily by IoU (highest first, at least ``min_iou``) for the rest. A pair whose boxes differ
by less than ``same_box_iou`` is "the same box": Label Studio stores percentages, so an untouched box comes back
with rounding noise, never bit-identical.

>>> predicted = [Region((0, 0, 10, 10), "star", "a"), Region((20, 20, 30, 30), "circle", "b"),
...              Region((50, 50, 60, 60), "star", "c")]
>>> annotated = [Region((0, 0, 10, 10), "star", "a"), Region((21, 20, 31, 30), "circle"),
...              Region((80, 80, 90, 90), "hexagon")]
>>> [(m.action, m.predicted, m.annotated) for m in match_regions(predicted, annotated)]
[('kept', 0, 0), ('moved', 1, 1), ('deleted', 2, None), ('missed', None, 2)]
>>> match_regions([Region((0, 0, 10, 10), "star")], [Region((0, 0, 10, 10), "diamond")])[0].action
'relabelled'
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_IOU = 0.5          # the usual detection criterion: below it, the annotator drew a different object
SAME_BOX_IOU = 0.95    # above it, the box was not touched (percent rounding in Label Studio moves it a little)
ACTIONS = ("kept", "moved", "relabelled", "deleted", "missed")


@dataclass(frozen=True)
class Region:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in any one unit shared by both sides
    label: str
    id: str | None = None                    # Label Studio's region id, when known


@dataclass(frozen=True)
class Match:
    action: str                 # one of ACTIONS
    predicted: int | None       # index into the predicted regions (None: missed)
    annotated: int | None       # index into the annotated regions (None: deleted)
    iou: float = 0.0

    @property
    def accepted(self) -> bool:
        """The annotator kept this prediction's object and label (the box may have been adjusted)."""
        return self.action in ("kept", "moved")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection over union of x0, y0, x1, y1 boxes."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(-1)


def match_regions(predicted: Sequence[Region], annotated: Sequence[Region], min_iou: float = MIN_IOU,
                  same_box_iou: float = SAME_BOX_IOU) -> list[Match]:
    """One ``Match`` per predicted region (in order), then one per annotated region nothing matched."""
    iou = iou_matrix([r.box for r in predicted], [r.box for r in annotated])
    pairs: dict[int, int] = {}
    by_id = {r.id: j for j, r in enumerate(annotated) if r.id is not None}
    for i, region in enumerate(predicted):
        j = by_id.get(region.id) if region.id is not None else None
        if j is not None and j not in pairs.values():
            pairs[i] = j
    if iou.size:
        for flat in np.argsort(-iou, axis=None, kind="stable"):
            i, j = divmod(int(flat), iou.shape[1])
            if iou[i, j] < min_iou:
                break
            if i not in pairs and j not in pairs.values():
                pairs[i] = j
    out = []
    for i, region in enumerate(predicted):
        if i not in pairs:
            out.append(Match("deleted", i, None))
            continue
        j = pairs[i]
        action = ("relabelled" if annotated[j].label != region.label
                  else "kept" if iou[i, j] >= same_box_iou else "moved")
        out.append(Match(action, i, j, float(iou[i, j])))
    taken = set(pairs.values())
    out += [Match("missed", None, j) for j in range(len(annotated)) if j not in taken]
    return out
