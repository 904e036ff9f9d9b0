"""The correction report against a real Label Studio: predictions retrieved, one task annotated the way annotators
work (a prediction kept, one moved, one relabelled, one deleted, a missed object drawn, a choice removed and one
added), then the report, as the command and as the served page, counts exactly that. The page is rendered in a
real headless Chromium (its DOM checked, a screenshot saved)."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import requests

from backend.demo.demo_data import write_demo_data

from .backend_process import REPO_ROOT, BackendProcess
from .label_studio import LEGACY_TOKEN

pytestmark = pytest.mark.e2e
SEED = 6100
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "pentagon")


@pytest.fixture(scope="module")
def annotated(label_studio, tmp_path_factory):
    """(backend, project id, the counts the annotation implies), with the backend still running."""
    ls = label_studio
    data = tmp_path_factory.mktemp("report-data")
    write_demo_data(data, 4, SEED)
    backend = BackendProcess(tmp_path_factory.mktemp("report-backend"),
                             env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN}).start()
    try:
        project = ls.create_project("report", (data / "label_config.xml").read_text())["id"]
        ls.import_files(project, sorted((data / "images").glob("*.png")))
        ls.connect_ml_backend(project, backend.url, title="clip")
        ls.retrieve_predictions(project)
        candidates = []
        for task in sorted(ls.tasks(project), key=lambda t: t["id"]):
            (prediction,) = ls.predictions(task["id"])
            boxes = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
            candidates.append((len(boxes), task["id"], prediction))
        count, task_id, prediction = max(candidates, key=lambda c: c[0])
        assert count >= 4, "the busiest demo scene has at least 4 predicted boxes"
        result, expected = annotate(prediction["result"])
        ls.create_annotation(task_id, result, parent_prediction=prediction["id"])
        yield backend, project, expected
    finally:
        backend.stop()


def annotate(predicted: list[dict]) -> tuple[list[dict], dict]:
    """An annotation made from ``predicted``, and the report's region and choice counts it implies."""
    boxes = [copy.deepcopy(r) for r in predicted if r["type"] == "rectanglelabels"]
    regions: dict[str, dict] = {}

    def row(label):
        return regions.setdefault(label, {"predicted": 0, "kept": 0, "moved": 0, "relabelled": {}, "deleted": 0,
                                          "missed": 0})

    result = []
    for n, box in enumerate(boxes):
        label = box["value"]["rectanglelabels"][0]
        row(label)["predicted"] += 1
        if n == 1:                                  # moved: 15 % of its width to the right (IoU ~0.74)
            box["value"]["x"] += 0.15 * box["value"]["width"]
            row(label)["moved"] += 1
        elif n == 2:                                # relabelled
            new = next(s for s in SHAPES if s != label)
            box["value"]["rectanglelabels"] = [new]
            row(label)["relabelled"][new] = 1
        elif n == 3:                                # deleted
            row(label)["deleted"] += 1
            continue
        else:
            row(label)["kept"] += 1
        box.pop("score", None)
        result.append(box)
    drawn = copy.deepcopy(boxes[0])                 # missed: an object drawn by hand in a free corner
    drawn.update(id="drawnbyhand")
    drawn["value"].update(x=0.0, y=0.0, width=2.0, height=2.0, rectanglelabels=["pentagon"])
    row("pentagon")["missed"] += 1
    result.append(drawn)

    choice = next((copy.deepcopy(r) for r in predicted if r["type"] == "choices"), None)
    predicted_choices = set(choice["value"]["choices"]) if choice else set()
    removed = sorted(predicted_choices)[:1]
    added = next(s for s in SHAPES if s not in predicted_choices)
    final = sorted((predicted_choices - set(removed)) | {added})
    result.append({"from_name": "shapes", "to_name": "image", "type": "choices", "value": {"choices": final}})
    choices = {label: {"predicted": int(label in predicted_choices), "kept": int(label in predicted_choices
               and label in final), "removed": int(label in removed), "added": int(label == added)}
               for label in predicted_choices | {added}}
    return result, {"regions": regions, "choices": choices}


def counts(report: dict) -> dict:
    regions = {label: {k: v for k, v in row.items() if k != "suggested_threshold"}
               for label, row in report["regions"].items()}
    return {"regions": regions, "choices": report["choices"]}


def test_the_report_command_counts_what_annotators_did(label_studio, annotated, tmp_path):
    backend, project, expected = annotated
    env = {"PATH": "/usr/bin:/bin", "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
           "MODEL_DIR": str(tmp_path / "state"), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "backend", "report", "--project", str(project), "--format", "json"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["tasks"] == 1 and report["tasks_without_prediction"] == 0
    assert counts(report) == expected
    assert 0 < report["saved_share"] < 1
    text = subprocess.run([sys.executable, "-m", "backend", "report", "--project", str(project)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120).stdout
    assert "estimated work saved:" in text and "1 annotated task(s)" in text


def test_the_served_page_shows_the_same_counts_in_a_real_browser(annotated, tmp_path):
    backend, project, expected = annotated
    served = requests.get(f"{backend.url}/report/{project}", params={"format": "json"}, timeout=60)
    assert served.status_code == 200
    assert counts(served.json()) == expected
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium not found: scripts/test.sh installs it (scripts/setup.sh --with-chromium)")
    page = f"{backend.url}/report/{project}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    for label, _row in expected["regions"].items():
        assert f'data-label="{label}"' in dom
    assert dom.count("<svg") == len(expected["regions"]) and "estimated work saved" in dom
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1100,760", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000, "the screenshot shows the rendered page"
    print(f"screenshot: {shot}")
