"""Read a Label Studio labeling config: which controls this backend fills, with which labels and prompts.

Only ``<RectangleLabels>`` (boxes) and ``<Choices>`` (whole-image classes) pointing at an ``<Image>`` are
used. Every other control is listed in ``ProjectConfig.problems`` with the reason, so the user can be told.

Optional attributes (Label Studio accepts them; several values are separated by ``;``):

    on RectangleLabels / Choices
      model_score_threshold  minimum label probability kept, 0-1. Default 0.0: no minimum beyond what
                             the background prompts reject
      model_background       background prompts (default "mostly background"; "" = none)
      model_prompt_template  prompt templates, each with one {} (default "a photo of a {}.")
      model_skip="true"      leave this control to the annotators
    on Label / Choice
      model_score_threshold  this label's minimum probability, 0-1, instead of its control's
      model_prompt           the label's prompts verbatim; templates are not used
      predicted_values       comma-separated words put into the templates instead of the label's value
      alias                  when set, Label Studio writes it into results instead of the value, so do we

>>> config = parse_label_config('''<View><Image name="img" value="$image"/>
...   <RectangleLabels name="box" toName="img"><Label value="Bee" predicted_values="bee,honeybee"/></RectangleLabels>
... </View>''')
>>> control = config.controls[0]
>>> control.name, control.value_key, control.labelset.prompts
('box', 'image', (('a photo of a bee.', 'a photo of a honeybee.'),))
>>> control.image_url({"image": "/data/upload/1/bee.png"})
'/data/upload/1/bee.png'
"""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from backend.labeling.prompts import LabelSet, PromptDefaults, label_text

DEFAULT_MAX_LABELS = 1000   # labels per control
# control tag (lower case) → (the result "type", LabelSet kind, the tag of its labels)
SUPPORTED_CONTROLS = {
    "rectanglelabels": ("rectanglelabels", "regions", "label"),
    "choices": ("choices", "choices", "choice"),
}
# Controls that users pick for boxes by mistake, and what to use instead.
HINTS = {
    "labels": "draw labelled boxes with <RectangleLabels> instead",
    "rectangle": "draw labelled boxes with <RectangleLabels> instead",
}
SEPARATOR = ";"


class LabelConfigError(ValueError):
    """The labeling config cannot be used at all; the message says why."""


class TaskDataError(ValueError):
    """A task lacks the data field that its Image tag reads."""


@dataclass(frozen=True)
class Control:
    """One control tag this backend fills: its result names and what to predict."""

    name: str                                      # the result's from_name
    to_name: str                                   # the Image tag's name
    type: Literal["rectanglelabels", "choices"]    # the result's type
    value_key: str                                 # the task data key the Image reads (``$image`` → ``image``)
    labelset: LabelSet

    def image_url(self, task_data: Mapping) -> str:
        """The image URL or path of a task, as Label Studio stored it."""
        url = task_data.get(self.value_key) if isinstance(task_data, Mapping) else None
        if not isinstance(url, str) or not url.strip():
            fields = sorted(task_data) if isinstance(task_data, Mapping) else []
            raise TaskDataError(f"task data has no image in {self.value_key!r} (the Image {self.to_name!r} reads "
                                f"${self.value_key}); its fields: {fields}")
        return url.strip()


@dataclass(frozen=True)
class ProjectConfig:
    """The controls this backend fills, and why each other control is left out."""

    controls: tuple[Control, ...]
    problems: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """Changes exactly when anything that shapes predictions changes (names, targets, label sets)."""
        shape = [(c.name, c.to_name, c.type, c.value_key, c.labelset.fingerprint) for c in self.controls]
        return hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:12]

    @property
    def labelsets(self) -> dict[str, LabelSet]:
        """Each control's label set by control name, the head names the pipeline reports under."""
        return {control.name: control.labelset for control in self.controls}


def parse_label_config(xml: str, defaults: PromptDefaults = PromptDefaults(),
                       max_labels: int = DEFAULT_MAX_LABELS) -> ProjectConfig:
    """Parse a labeling config. Raises LabelConfigError when it is malformed or has nothing to fill.

    ``defaults`` (the PROMPT_TEMPLATE / BACKGROUND_PROMPTS settings) apply where a control sets nothing.
    ``max_labels``: more labels in one control is an error (MAX_LABELS; every label costs text encoding).
    """
    elements = list(_parse_xml(xml).iter())
    control_elements = [e for e in elements if _is_control(e)]
    objects_by_name: dict[str, list[ElementTree.Element]] = {}
    for element in elements:
        if element.get("name") and not _is_control(element):
            objects_by_name.setdefault(element.get("name"), []).append(element)
    if not any(e.tag.lower() == "image" for e in elements):
        raise LabelConfigError("the labeling config has no <Image> tag; this backend labels images")
    control_name_counts = Counter(e.get("name") for e in control_elements)

    controls, problems = [], []
    for element in control_elements:
        if element.get("model_skip", "").lower() == "true":
            continue
        try:
            if control_name_counts[element.get("name")] > 1:
                raise _Unusable("another control has the same name, so their results cannot be told apart")
            controls.append(_control(element, _target_image(element, objects_by_name), defaults, max_labels))
        except _Unusable as reason:
            problems.append(f"<{element.tag}> {element.get('name')!r}: {reason}")
    if not controls:
        listed = "; ".join(problems) or "the config has no controls"
        raise LabelConfigError(f"no control in the labeling config can be pre-annotated: {listed}")
    return ProjectConfig(tuple(controls), tuple(problems))


class _Unusable(Exception):
    """Why one control cannot be used (becomes an entry of ProjectConfig.problems)."""


def _parse_xml(xml: str) -> ElementTree.Element:
    # Entities are never needed in a labeling config; refusing any DTD rules out entity-expansion bombs.
    if "<!doctype" in xml.lower() or "<!entity" in xml.lower():
        raise LabelConfigError("the labeling config must not contain <!DOCTYPE> or <!ENTITY> declarations")
    try:
        return ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise LabelConfigError(f"the labeling config is not well-formed XML: {error}") from None


def _is_control(element: ElementTree.Element) -> bool:
    """Like Label Studio: a control tag has both a name and a toName."""
    return bool(element.get("name") and element.get("toName"))


def _target_image(control: ElementTree.Element,
                  objects_by_name: dict[str, list[ElementTree.Element]]) -> ElementTree.Element:
    to_name = control.get("toName")
    if "," in to_name:
        raise _Unusable(f"toName={to_name!r} names several objects; one Image is supported")
    targets = objects_by_name.get(to_name, [])
    if not targets:
        raise _Unusable(f"toName={to_name!r} names no tag in the config")
    if len(targets) > 1:
        raise _Unusable(f"toName={to_name!r} names several tags")
    (target,) = targets
    if target.tag.lower() != "image":
        raise _Unusable(f"toName={to_name!r} is a <{target.tag}>, not an <Image>")
    if not target.get("value", "").startswith("$"):
        raise _Unusable(f"the Image {to_name!r} has no task field as its value (expected like value=\"$image\")")
    return target


def _control(element: ElementTree.Element, image: ElementTree.Element, defaults: PromptDefaults,
             max_labels: int) -> Control:
    tag = element.tag.lower()
    if tag not in SUPPORTED_CONTROLS:
        hint = HINTS.get(tag, "this backend fills only <RectangleLabels> and <Choices>")
        raise _Unusable(f"unsupported control type; {hint}")
    result_type, kind, label_tag = SUPPORTED_CONTROLS[tag]
    labels = sum(e.tag.lower() == label_tag for e in element.iter())
    if labels > max_labels:
        raise LabelConfigError(f"<{element.tag}> {element.get('name')!r} has {labels} labels, above the limit of "
                               f"{max_labels} (MAX_LABELS)")
    labelset = _labelset(element, label_tag, defaults, kind=kind, multi_label=element.get("choice") == "multiple")
    return Control(element.get("name"), element.get("toName"), result_type, image.get("value")[1:], labelset)


def _labelset(element: ElementTree.Element, label_tag: str, defaults: PromptDefaults, **options) -> LabelSet:
    templates = _templates(element, defaults)
    names, prompts, thresholds = [], [], []
    default = _threshold(element, 0.0)
    for label in (e for e in element.iter() if e.tag.lower() == label_tag):
        value = label.get("value")
        if not value:
            continue                  # Label Studio ignores such labels too
        names.append(label.get("alias") or value)  # what Label Studio writes into results
        prompts.append(_split(label.get("model_prompt")) or _filled(templates, _words(label, value)))
        thresholds.append(_threshold(label, None))
    if not names:
        raise _Unusable(f"no <{label_tag.capitalize()}> with a value (labels from task data are not supported)")
    if len(set(names)) < len(names):
        raise _Unusable(f"duplicate labels in {names}")
    background = element.get("model_background")
    return LabelSet(tuple(names), tuple(prompts),
                    defaults.background if background is None else _split(background),
                    threshold=default,
                    # per-label only when some label sets one, so other configs keep their fingerprint
                    thresholds=tuple(default if t is None else t for t in thresholds) if any(
                        t is not None for t in thresholds) else (), **options)


def _templates(element: ElementTree.Element, defaults: PromptDefaults) -> tuple[str, ...]:
    templates = _split(element.get("model_prompt_template")) or defaults.templates
    for template in templates:
        if template.count("{}") != 1 or set("{}") & set(template.replace("{}", "")):
            raise _Unusable(f"model_prompt_template {template!r} needs exactly one {{}} where the label goes")
    return templates


def _threshold(element: ElementTree.Element, default: float | None) -> float | None:
    text = element.get("model_score_threshold")
    if text is None:
        return default
    try:
        threshold = float(text)
    except ValueError:
        threshold = None
    if threshold is None or not 0.0 <= threshold <= 1.0:
        raise _Unusable(f"model_score_threshold={text!r} is not a number from 0 to 1")
    return threshold


def _words(label: ElementTree.Element, value: str) -> list[str]:
    """The words to put into the templates: ``predicted_values`` when given, else the label's value."""
    words = [w.strip() for w in label.get("predicted_values", "").split(",") if w.strip()]
    return [label_text(w) for w in words or [value]]


def _filled(templates: tuple[str, ...], words: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(t.format(w) for w in words for t in templates))


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(SEPARATOR) if part.strip())
