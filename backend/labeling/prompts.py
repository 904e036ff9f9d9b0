"""Label sets: the names to predict, the text prompts CLIP compares crops with, and the background prompts.

>>> s = LabelSet.build(["Bee", "traffic_light"], templates=("a photo of a {}.", "a close-up of a {}."))
>>> s.prompts
(('a photo of a Bee.', 'a close-up of a Bee.'), ('a photo of a traffic light.', 'a close-up of a traffic light.'))
>>> s.background
('mostly background',)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

DEFAULT_TEMPLATE = "a photo of a {}."
DEFAULT_BACKGROUND = ("mostly background",)


@dataclass(frozen=True)
class PromptDefaults:
    """What a label set uses where its source (a labeling config, a --labels list) says nothing."""

    templates: tuple[str, ...] = (DEFAULT_TEMPLATE,)
    background: tuple[str, ...] = DEFAULT_BACKGROUND


@dataclass(frozen=True)
class LabelSet:
    """What one head predicts.

    ``kind="regions"``: name detector proposals; a proposal whose best class is a background prompt is dropped.
    ``kind="choices"``: classify the whole image. ``multi_label`` scores each label against the background
    prompts on its own (several may apply); otherwise one softmax over all labels picks one.
    ``threshold``: the minimum label probability kept; ``thresholds``: per label, replacing it (empty: every label
    uses ``threshold``). Several prompts per label are averaged (an ensemble).
    """

    labels: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    background: tuple[str, ...] = DEFAULT_BACKGROUND
    threshold: float = 0.0
    thresholds: tuple[float, ...] = ()
    kind: Literal["regions", "choices"] = "regions"
    multi_label: bool = False

    def __post_init__(self):
        if not self.labels:
            raise ValueError("a label set needs at least one label")
        if len(self.prompts) != len(self.labels) or not all(self.prompts):
            raise ValueError("every label needs at least one prompt")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"duplicate labels in {self.labels}")
        if self.thresholds and len(self.thresholds) != len(self.labels):
            raise ValueError("thresholds needs one value per label")

    def minimums(self) -> tuple[float, ...]:
        """The minimum probability kept, per label."""
        return self.thresholds or (self.threshold,) * len(self.labels)

    @classmethod
    def build(cls, labels: Sequence[str], templates: Sequence[str] | str = DEFAULT_TEMPLATE,
              background: Sequence[str] | str | None = DEFAULT_BACKGROUND, **options) -> LabelSet:
        """Prompts per label: every template filled with the label's name."""
        templates = (templates,) if isinstance(templates, str) else tuple(templates)
        background = (background,) if isinstance(background, str) else tuple(background or ())
        per_label = tuple(tuple(t.format(label_text(label)) for t in templates) for label in labels)
        return cls(tuple(labels), per_label, background, **options)

    @property
    def fingerprint(self) -> str:
        """Changes exactly when anything that shapes predictions changes."""
        state = asdict(self)
        if not self.thresholds:
            del state["thresholds"]   # as before per-label thresholds existed: existing versions stay valid
        return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:12]


def label_text(label: str) -> str:
    """A label name as words for a prompt: ``traffic_light`` → ``traffic light``."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())
