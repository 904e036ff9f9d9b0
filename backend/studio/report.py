"""The correction report: what annotators did with the backend's predictions, per label, and what that saved.

For every task with a submitted annotation, the prediction the annotator started from (the annotation's
``parent_prediction``, else the task's latest prediction of this backend made before the annotation, else the
backend's own record of what it predicted) is matched against the annotation region by region
(``labeling.matching``): each predicted box was kept, moved or resized, relabelled (to what) or deleted; each
annotated box nothing predicted was missed (drawn by hand). For each Choices control, each predicted choice was
kept or removed and each other chosen one added.

The work saved is estimated with stated per-action costs (``COSTS``, seconds): without pre-annotation every
final box is drawn and labelled and every choice is clicked; with it, a kept box is only reviewed, a moved one
adjusted, a relabelled one re-labelled, a deleted one deleted, a missed one drawn and labelled.

Per label, the suggested ``model_score_threshold`` is the score above which keeping predictions maximises F1
on the corrected tasks (a prediction is right when its box and label were kept; missed boxes are false
negatives at any threshold).

Read-only: the report only reads tasks (with their annotations and predictions) from Label Studio.

>>> from backend.studio.label_config import parse_label_config
>>> config = parse_label_config('<View><Image name="img" value="$image"/><RectangleLabels name="box" '
...                             'toName="img"><Label value="star"/><Label value="circle"/></RectangleLabels></View>')
>>> def box(x, label, id=None, score=None):
...     item = {"from_name": "box", "to_name": "img", "type": "rectanglelabels",
...             "value": {"x": x, "y": 10, "width": 10, "height": 10, "rectanglelabels": [label]}}
...     return item | ({"id": id} if id else {}) | ({"score": score} if score else {})
>>> task = {"id": 1, "predictions": [{"id": 7, "model_version": "clip-1", "result": [
...             box(10, "star", "a", 0.9), box(40, "star", "b", 0.6), box(70, "circle", "c", 0.3)]}],
...         "annotations": [{"id": 3, "parent_prediction": 7, "result": [
...             box(10, "star", "a"), box(41, "circle", "b"), box(90, "circle")]}]}
>>> report = build_report(12, config, [task])
>>> report.regions["star"].kept, dict(report.regions["star"].relabelled), report.regions["circle"].deleted
(1, {'circle': 1}, 1)
>>> report.regions["circle"].missed, report.tasks
(1, 1)
"""
from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from backend.labeling.matching import match_regions

from .label_config import ProjectConfig, parse_label_config
from .results import choices_from_results, regions_of

PREDICTED_BY = "clip-"   # model versions of this backend start with it
COSTS = {"draw": 7.0, "label": 2.0, "adjust": 3.0, "delete": 1.5, "review": 1.0}   # seconds per action
Recorded = Callable[[int], "dict | None"]


@dataclass
class RegionCounts:
    """One label's predicted boxes by what happened to them, and the boxes of that label drawn by hand."""

    predicted: int = 0
    kept: int = 0
    moved: int = 0
    relabelled: Counter = field(default_factory=Counter)     # to label → count
    deleted: int = 0
    missed: int = 0
    scored: list = field(default_factory=list)               # (score, accepted) per predicted box with a score

    def suggested_threshold(self) -> float | None:
        """The lowest score threshold that maximises F1 over this label's corrected predictions (None: no
        scores). Above every score means: predict none of this label (all were deleted or relabelled)."""
        if not self.scored:
            return None
        accepted_total = sum(a for _, a in self.scored)
        best = (-1.0, 0.0)
        for threshold in sorted({0.0, *(s for s, _ in self.scored), round(max(s for s, _ in self.scored) + 1e-3, 3)}):
            tp = sum(1 for s, a in self.scored if s >= threshold and a)
            fp = sum(1 for s, a in self.scored if s >= threshold and not a)
            fn = accepted_total - tp + self.missed
            f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
            if f1 > best[0] + 1e-12:
                best = (f1, threshold)
        return round(best[1], 3)


@dataclass
class ChoiceCounts:
    predicted: int = 0
    kept: int = 0
    removed: int = 0
    added: int = 0


@dataclass
class Report:
    project: int
    tasks: int = 0                   # annotated tasks compared with a prediction
    unpredicted: int = 0             # annotated tasks without any prediction of this backend (left out)
    regions: dict[str, RegionCounts] = field(default_factory=dict)
    choices: dict[str, ChoiceCounts] = field(default_factory=dict)

    def seconds(self) -> tuple[float, float]:
        """(without pre-annotation, with it): the estimated annotation time of the compared tasks, by COSTS."""
        c = COSTS
        without = with_ = 0.0
        for counts in self.regions.values():
            final = counts.kept + counts.moved + counts.missed + sum(counts.relabelled.values())
            without += final * (c["draw"] + c["label"])
            with_ += (counts.kept * c["review"] + counts.moved * c["adjust"] + counts.deleted * c["delete"]
                      + sum(counts.relabelled.values()) * c["label"] + counts.missed * (c["draw"] + c["label"]))
        for counts in self.choices.values():
            without += (counts.kept + counts.added) * c["label"]
            with_ += counts.kept * c["review"] + (counts.removed + counts.added) * c["label"]
        return without, with_

    @property
    def saved_share(self) -> float | None:
        without, with_ = self.seconds()
        return 1 - with_ / without if without else None

    def to_dict(self) -> dict:
        without, with_ = self.seconds()
        return {
            "project": self.project, "tasks": self.tasks, "tasks_without_prediction": self.unpredicted,
            "regions": {label: {"predicted": c.predicted, "kept": c.kept, "moved": c.moved,
                                "relabelled": dict(sorted(c.relabelled.items())), "deleted": c.deleted,
                                "missed": c.missed, "suggested_threshold": c.suggested_threshold()}
                        for label, c in sorted(self.regions.items())},
            "choices": {label: vars(c) for label, c in sorted(self.choices.items())},
            "seconds_without": round(without, 1), "seconds_with": round(with_, 1),
            "saved_share": None if self.saved_share is None else round(self.saved_share, 4),
            "costs_seconds": COSTS,
        }


# ---------------------------------------------------------------------------------------------- building
def project_report(api, project: int, recorded: Recorded | None = None) -> Report:
    """The report of a Label Studio project read through ``api`` (``project(id)`` → the project with its
    ``label_config``; ``pages(id)`` → its tasks with annotations and predictions, a page at a time)."""
    config = parse_label_config(api.project(project).get("label_config") or "")
    return build_report(project, config, (task for page in api.pages(project) for task in page), recorded)


def build_report(project: int, config: ProjectConfig, tasks: Iterable[dict], recorded: Recorded | None = None
                 ) -> Report:
    """The report over ``tasks`` (Label Studio task dicts with ``annotations`` and ``predictions``);
    ``recorded(task_id)``: the backend's own record of its prediction, used when Label Studio lists none."""
    report = Report(project)
    for task in tasks:
        annotation = _submitted(task)
        if annotation is None:
            continue
        prediction = _started_from(task, annotation) or (recorded(task["id"]) if recorded else None)
        if prediction is None:
            report.unpredicted += 1
            continue
        report.tasks += 1
        predicted, final = prediction.get("result") or [], annotation.get("result") or []
        for control in config.controls:
            if control.type == "rectanglelabels":
                _count_regions(report, regions_of(predicted, control.name), regions_of(final, control.name))
            else:
                _count_choices(report, set(choices_from_results(predicted, control)),
                               set(choices_from_results(final, control)))
    return report


def _submitted(task: dict) -> dict | None:
    """The task's latest annotation that was not skipped (None: not annotated)."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
                   and isinstance(a.get("result"), list)]
    return max(annotations, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0),
               default=None)


def _started_from(task: dict, annotation: dict) -> dict | None:
    ours = [p for p in task.get("predictions") or [] if isinstance(p, dict)
            and str(p.get("model_version") or "").startswith(PREDICTED_BY) and isinstance(p.get("result"), list)]
    parent = annotation.get("parent_prediction")
    for prediction in ours:
        if parent is not None and prediction.get("id") == parent:
            return prediction
    before = [p for p in ours if str(p.get("created_at") or "") <= str(annotation.get("created_at") or "~")]
    return max(before or ours, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0), default=None)


def _count_regions(report: Report, predicted: list, annotated: list) -> None:
    for match in match_regions([r for r, _ in predicted], [r for r, _ in annotated]):
        if match.predicted is None:
            report.regions.setdefault(annotated[match.annotated][0].label, RegionCounts()).missed += 1
            continue
        region, score = predicted[match.predicted]
        counts = report.regions.setdefault(region.label, RegionCounts())
        counts.predicted += 1
        if match.action == "relabelled":
            counts.relabelled[annotated[match.annotated][0].label] += 1
        else:
            setattr(counts, match.action, getattr(counts, match.action) + 1)
        if score is not None:
            counts.scored.append((score, match.accepted))


def _count_choices(report: Report, predicted: set[str], chosen: set[str]) -> None:
    for label in predicted | chosen:
        counts = report.choices.setdefault(label, ChoiceCounts())
        counts.predicted += label in predicted
        counts.kept += label in predicted and label in chosen
        counts.removed += label in predicted and label not in chosen
        counts.added += label in chosen and label not in predicted


# ---------------------------------------------------------------------------------------------- rendering
def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_dict(), indent=2)
    if fmt == "html":
        return to_html(report)
    if fmt == "text":
        return to_text(report)
    raise ValueError(f"unknown report format {fmt!r} (text, json or html)")


def _saved_line(data: Mapping) -> str:
    share = data["saved_share"]
    costs = ", ".join(f"{k} {v:g} s" for k, v in data["costs_seconds"].items())
    return (f"estimated work saved: {'n/a' if share is None else f'{100 * share:.0f} %'} "
            f"({data['seconds_with']:.0f} s instead of {data['seconds_without']:.0f} s; costs: {costs})")


def to_text(report: Report) -> str:
    data = report.to_dict()
    lines = [f"project {report.project}: {report.tasks} annotated task(s) compared with their predictions"
             + (f" ({report.unpredicted} annotated without a prediction, left out)" if report.unpredicted else "")]
    if data["regions"]:
        lines += ["", f"{'label':<20} {'predicted':>9} {'kept':>5} {'moved':>5} {'relab.':>6} {'deleted':>7} "
                      f"{'missed':>6}  threshold  relabelled to"]
        for label, c in data["regions"].items():
            to = ", ".join(f"{k} {v}" for k, v in c["relabelled"].items())
            threshold = "-" if c["suggested_threshold"] is None else f"{c['suggested_threshold']:.2f}"
            lines.append(f"{label:<20} {c['predicted']:>9} {c['kept']:>5} {c['moved']:>5} "
                         f"{sum(c['relabelled'].values()):>6} {c['deleted']:>7} {c['missed']:>6}  {threshold:>9}  {to}")
    if data["choices"]:
        lines += ["", f"{'choice':<20} {'predicted':>9} {'kept':>5} {'removed':>7} {'added':>5}"]
        lines += [f"{label:<20} {c['predicted']:>9} {c['kept']:>5} {c['removed']:>7} {c['added']:>5}"
                  for label, c in data["choices"].items()]
    lines += ["", _saved_line(data),
              "put a suggested threshold on its label: <Label value=\"...\" model_score_threshold=\"0.NN\"/>"]
    return "\n".join(lines)


_COLOURS = {"kept": "#2e7d32", "moved": "#9ccc65", "relabelled": "#ffb300", "deleted": "#e53935",
            "missed": "#5e35b1"}


def _bar(c: Mapping, width: int = 240) -> str:
    """One label's predictions and misses as a stacked horizontal bar (inline SVG, no script)."""
    parts = [("kept", c["kept"]), ("moved", c["moved"]), ("relabelled", sum(c["relabelled"].values())),
             ("deleted", c["deleted"]), ("missed", c["missed"])]
    total = sum(n for _, n in parts) or 1
    x, rects = 0.0, []
    for action, n in parts:
        if n:
            w = width * n / total
            rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="18" fill="{_COLOURS[action]}">'
                         f'<title>{action}: {n}</title></rect>')
            x += w
    return f'<svg class="bar" width="{width}" height="18" role="img">{"".join(rects)}</svg>'


def to_html(report: Report) -> str:
    data = report.to_dict()
    e = html.escape
    rows = []
    for label, c in data["regions"].items():
        to = ", ".join(f"{e(k)} {v}" for k, v in c["relabelled"].items())
        threshold = "–" if c["suggested_threshold"] is None else f"{c['suggested_threshold']:.2f}"
        rows.append(f'<tr data-label="{e(label)}"><th>{e(label)}</th><td>{c["predicted"]}</td><td>{c["kept"]}</td>'
                    f'<td>{c["moved"]}</td><td>{sum(c["relabelled"].values())}</td><td>{c["deleted"]}</td>'
                    f'<td>{c["missed"]}</td><td>{threshold}</td><td>{to}</td><td>{_bar(c)}</td></tr>')
    choice_rows = [f'<tr data-choice="{e(label)}"><th>{e(label)}</th><td>{c["predicted"]}</td><td>{c["kept"]}</td>'
                   f'<td>{c["removed"]}</td><td>{c["added"]}</td></tr>' for label, c in data["choices"].items()]
    legend = " ".join(f'<span><i style="background:{colour}"></i>{action}</span>'
                      for action, colour in _COLOURS.items())
    choices = ("<h2>Choices</h2><table><tr><th>choice</th><th>predicted</th><th>kept</th><th>removed</th>"
               f"<th>added</th></tr>{''.join(choice_rows)}</table>" if choice_rows else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Corrections report: project {report.project}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 20px; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child {{ text-align: left; }}
.legend span {{ margin-right: 14px; }} .legend i {{ display: inline-block; width: 12px; height: 12px;
  margin-right: 4px; vertical-align: -1px; }}
#saved {{ font-size: 18px; font-weight: 600; }}
</style></head><body>
<h1>What pre-annotation saved: project {report.project}</h1>
<p id="tasks">{report.tasks} annotated task(s) compared with their predictions{
    f"; {report.unpredicted} annotated without a prediction (left out)" if report.unpredicted else ""}.</p>
<p id="saved">{e(_saved_line(data))}</p>
<h2>Boxes per predicted label</h2>
<p class="legend">{legend}</p>
<table><tr><th>label</th><th>predicted</th><th>kept</th><th>moved</th><th>relabelled</th><th>deleted</th>
<th>missed</th><th>suggested threshold</th><th>relabelled to</th><th>chart</th></tr>{''.join(rows)}</table>
{choices}
<p>Suggested thresholds maximise F1 on the corrected tasks; put one on its label in the labeling config:
<code>&lt;Label value="..." model_score_threshold="0.NN"/&gt;</code>.</p>
</body></html>
"""
