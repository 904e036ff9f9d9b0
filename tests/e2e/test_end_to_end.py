"""The whole integration, for real: Label Studio 1.23.2 and our backend as two processes talking HTTP on 127.0.0.1.

A project with the demo config (boxes over the 8 shapes + a multiple choice of the shapes present) gets 8 shape
scenes as multipart uploads (served by Label Studio only with auth) and one plain-URL task (served by a small
http.server here). The backend (``python -m backend serve --demo``, the bundled tiny models) gets
LABEL_STUDIO_URL and a legacy token, then, in the last test, a personal access token with legacy tokens off.

The tests share one project and run in file order (later ones build on the predictions of the first); each
one also works alone, since the fixtures do the setup. Timings (Label Studio and backend start, retrieve wall
time, tasks/s) are printed and added to the terminal summary. Run just these with:

    bash scripts/test.sh tests/e2e/test_end_to_end.py -s
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface

from backend.demo.demo_data import write_demo_data
from backend.demo.scoring import MatchScore
from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES
from backend.labeling.detections import Detections

from .backend_process import REPO_ROOT, BackendProcess
from .label_studio import LEGACY_TOKEN

pytestmark = pytest.mark.e2e

SEED = 6000  # scenes the tiny models never saw (training uses seed 0, the unit tests 2000-3001)
N_UPLOADED = 8  # uploaded scenes; one more scene is the plain-URL task
# Measured on the bundled tiny models (training.json: 2800 CLIP steps, 900 detector steps) over the 9 scenes
# of SEED, 31 objects (19 of known shapes), with `pytest tests/e2e/test_end_to_end.py -s -k retrieve`:
# box recall at IoU 0.5 1.00 (31/31), box precision 1.00, labelled recall on the known shapes 1.00 (19/19),
# on the novel ones 0.00 (0/12: zero-shot cannot name them). Asserted with a margin of ~4 objects each.
MIN_BOX_RECALL = 0.85
MIN_BOX_PRECISION = 0.85
MIN_KNOWN_LABEL_RECALL = 0.80
LEARNING_MODULE = REPO_ROOT / "backend" / "learning.py"
LEARNING_SCENES = 36  # the learning test annotates a third of them and scores the other two thirds


# ---------------------------------------------------------------- data and helpers


@dataclass
class Flow:
    """The shared project: ids, tasks, ground truth per task, and what the first retrieve did."""

    project_id: int
    ml: dict
    config: str
    tasks: list[dict]
    truth: dict[int, list[tuple[str, tuple[float, float, float, float]]]]  # task id → [(shape, box px)]
    retrieve: dict = field(default_factory=dict)
    retrieve_s: float = 0.0
    predict_calls: int = 0
    annotated: list[int] = field(default_factory=list)  # tasks the tests annotated


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-data")
    write_demo_data(out, N_UPLOADED + 1, SEED)
    return out


def ground_truth(demo_dir: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """File name → [(shape, (x0, y0, x1, y1))] from the COCO file demo-data wrote."""
    coco = json.loads((demo_dir / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: Path(im["file_name"]).name for im in coco["images"]}
    truth: dict[str, list] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        truth[files[a["image_id"]]].append((names[a["category_id"]], (x, y, x + w, y + h)))
    return truth


@pytest.fixture(scope="module")
def image_server(demo_data):
    """A plain http.server on 127.0.0.1 serving the demo images (for the plain-URL task)."""
    handler = functools.partial(_QuietHandler, directory=str(demo_data / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def start_backend(tmp_path_factory, name: str, ls, api_key: str, e2e_timings, wsgi: bool = False) -> BackendProcess:
    """`python -m backend serve --demo`, or with `wsgi` `python -m waitress backend.wsgi:app` with DEMO=true."""
    backend = BackendProcess(
        tmp_path_factory.mktemp(name), wsgi=wsgi,
        # the tasks' external images are served on 127.0.0.1 too: private, so listed
        env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": api_key, "ALLOW_PRIVATE_HOSTS": "127.0.0.1"}
    )
    backend.start()
    e2e_timings(f"backend {name} ({'waitress backend.wsgi:app' if wsgi else 'python -m backend serve'})"
                f" {backend.url} pid {backend.pid}: start (models loaded, /health) "
                f"{backend.timings['start_s']:.1f} s")  # fmt: skip
    return backend


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory, e2e_timings):
    """Our backend with LABEL_STUDIO_URL and the legacy token (the first, classic setup)."""
    process = start_backend(tmp_path_factory, "legacy-token", label_studio, LEGACY_TOKEN, e2e_timings)
    yield process
    process.stop()


def upload_name(task: dict) -> str:
    """`/data/upload/3/1a2b3c4d-scene_0001.png` → `scene_0001.png`; a URL → its last part."""
    name = task["data"]["image"].rsplit("/", 1)[-1]
    return name.split("-", 1)[1] if task["data"]["image"].startswith("/data/upload/") else name


def setup_project(ls, backend, demo_dir: Path, title: str, files: list[Path], urls: list[str]) -> Flow:
    config = (demo_dir / "label_config.xml").read_text()
    project = ls.create_project(title, config)
    pid = project["id"]
    imported = ls.import_files(pid, files)
    assert imported["task_count"] == len(files)
    if urls:
        assert ls.import_tasks(pid, [{"image": url} for url in urls])["task_count"] == len(urls)
    tasks = sorted(ls.tasks(pid), key=lambda t: t["id"])
    assert len(tasks) == len(files) + len(urls)
    by_name = ground_truth(demo_dir)
    truth = {t["id"]: by_name[upload_name(t)] for t in tasks}
    ml = ls.connect_ml_backend(pid, backend.url, title="clip")
    return Flow(pid, ml, config, tasks, truth)


@pytest.fixture(scope="module")
def flow(label_studio, backend, demo_data, image_server, e2e_timings) -> Flow:
    """Project + 8 uploads + 1 URL task, backend connected, then one bulk "Retrieve predictions" (timed)."""
    ls = label_studio
    images = sorted((demo_data / "images").glob("*.png"))
    assert len(images) == N_UPLOADED + 1
    t0 = time.monotonic()
    state = setup_project(ls, backend, demo_data, "e2e shapes", images[:N_UPLOADED],
                          [f"{image_server}/{images[N_UPLOADED].name}"])  # fmt: skip
    e2e_timings(f"project + {N_UPLOADED} uploads + 1 URL task + connect: {time.monotonic() - t0:.2f} s")
    mark = backend.log_mark()
    t0 = time.monotonic()
    state.retrieve = ls.retrieve_predictions(state.project_id)
    state.retrieve_s = time.monotonic() - t0
    state.predict_calls = len(backend.log_lines(r"POST /predict", since=mark))
    n = len(state.tasks)
    e2e_timings(f"retrieve predictions, {n} tasks, legacy token: {state.retrieve_s:.2f} s wall,"
                f" {n / state.retrieve_s:.1f} tasks/s, {state.predict_calls} /predict call(s)")  # fmt: skip
    return state


def predictions_by_task(ls, tasks: list[dict]) -> dict[int, list[dict]]:
    return {t["id"]: ls.predictions(t["id"]) for t in tasks}


def rectangles(result: list[dict]) -> list[dict]:
    return [r for r in result if r["type"] == "rectanglelabels"]


def pixel_box(region: dict) -> tuple[float, float, float, float]:
    v, w, h = region["value"], region["original_width"], region["original_height"]
    return (v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100)


def score_predictions(preds: dict[int, dict], truth: dict, ignore: tuple[str, ...] = ()) -> MatchScore:
    """Greedy one-to-one matching at IoU 0.5 of each task's predicted boxes with its ground truth."""
    score = MatchScore()
    for task_id, prediction in preds.items():
        regions = rectangles(prediction["result"])
        detections = Detections([pixel_box(r) for r in regions], [r.get("score", 1.0) for r in regions],
                                [r["value"]["rectanglelabels"][0] for r in regions])  # fmt: skip
        shapes = [shape for shape, _ in truth[task_id]]
        score.add(detections, [box for _, box in truth[task_id]], shapes, iou=0.5, ignore_labels=ignore)
    return score


def labelled_recall(score: MatchScore) -> float:
    return score.correct_labels / max(1, score.ground_truth)


def report(score: MatchScore) -> str:
    return (f"recall {score.recall:.2f} ({score.matched}/{score.ground_truth}), precision {score.precision:.2f},"
            f" labelled recall {labelled_recall(score):.2f}")  # fmt: skip


# ---------------------------------------------------------------- the tests, in workflow order


def test_backend_connects(label_studio, backend, flow):
    """POST /api/ml called /health and /setup: the backend is CONNECTED with /setup's model version."""
    ls = label_studio
    assert flow.ml["state"] == "CO", flow.ml
    ml = ls.ml_backend(flow.ml["id"])
    assert ml["state"] == "CO", ml
    assert ml["url"] == backend.url
    assert ml["model_version"].startswith("clip-"), ml
    assert backend.log_lines(r"POST /setup"), backend.log_tail()


def test_retrieve_predictions(label_studio, backend, flow):
    """Bulk "Retrieve predictions": one valid prediction per task, with /setup's version, boxes near the truth."""
    ls = label_studio
    n = len(flow.tasks)
    assert flow.retrieve["processed_items"] == n, flow.retrieve
    assert flow.predict_calls >= 1
    version = ls.ml_backend(flow.ml["id"])["model_version"]
    # LS keeps what /setup answered; asking /setup ourselves (as LS does) gives the same.
    setup = requests.post(f"{backend.url}/setup", timeout=30, json={
        "project": f"{flow.project_id}.0", "schema": flow.config, "hostname": ls.url, "access_token": LEGACY_TOKEN})
    assert setup.json()["model_version"] == version, setup.text
    interface = LabelInterface(flow.config)
    stored = predictions_by_task(ls, flow.tasks)
    for task_id, preds in stored.items():
        assert len(preds) == 1, (task_id, preds)
        [pred] = preds
        assert pred["model_version"] == version, pred
        assert interface.validate_prediction(pred, return_errors=True) == [], pred
        assert 0.0 <= pred["score"] <= 1.0
    # Both kinds of image were fetched: uploads (auth) and the plain URL. No task went without a prediction.
    assert not backend.log_lines(r"no prediction"), backend.log_tail()
    assert all(rectangles(preds[0]["result"]) for preds in stored.values()), "a task got no boxes at all"
    url_task = flow.tasks[-1]
    assert url_task["data"]["image"].startswith("http://127.0.0.1:")
    assert rectangles(stored[url_task["id"]][0]["result"])

    first = {task_id: preds[0] for task_id, preds in stored.items()}
    every = score_predictions(first, flow.truth)
    known = score_predictions(first, flow.truth, ignore=NOVEL_SHAPES)
    novel = score_predictions(first, flow.truth, ignore=KNOWN_SHAPES)
    print(f"\n[quality] all shapes: {report(every)}\n[quality] known shapes: {report(known)}"
          f"\n[quality] novel shapes: {report(novel)}")  # fmt: skip
    assert every.recall >= MIN_BOX_RECALL, report(every)
    assert every.precision >= MIN_BOX_PRECISION, report(every)
    assert labelled_recall(known) >= MIN_KNOWN_LABEL_RECALL, report(known)


def test_retrieve_again_and_open_task_add_nothing(label_studio, backend, flow, e2e_timings):
    """Same version from /setup and /predict: a second retrieve and opening a task store no new prediction."""
    ls = label_studio
    before = {task_id: [p["id"] for p in preds] for task_id, preds in predictions_by_task(ls, flow.tasks).items()}
    mark = backend.log_mark()
    t0 = time.monotonic()
    again = ls.retrieve_predictions(flow.project_id)
    e2e_timings(f"retrieve again (all {len(flow.tasks)} tasks already predicted): {time.monotonic() - t0:.2f} s")
    assert again["processed_items"] == len(flow.tasks), again
    task = ls.task(flow.tasks[0]["id"])  # what opening the task in the editor calls
    assert task["id"] == flow.tasks[0]["id"]
    after = {task_id: [p["id"] for p in preds] for task_id, preds in predictions_by_task(ls, flow.tasks).items()}
    assert after == before
    assert backend.log_lines(r"POST /predict", since=mark) == [], "nothing needed predicting, yet /predict ran"


def event_logged(backend, event: str, since: int) -> list[str]:
    """The backend's log lines about a webhook event (the access log never names events), after `since`.

    Waits for one; fails if the backend logged that it ignored the event. Matches the event name only, so
    it holds whatever the learning code logs ("webhook X for project N: ...", "project N: X: ...")."""
    lines = backend.wait_for_log(rf"\b{event}\b", since=since)
    ignored = [line for line in backend.log_lines(rf"\b{event}\b", since) if "ignored" in line or "WARNING" in line]
    assert not ignored, ignored
    return lines


def _true_label(region: dict, truth: list[tuple[str, tuple]]) -> str | None:
    """The shape of the ground-truth object a predicted box matches at IoU >= 0.5, else None."""
    best = max(truth, key=lambda t: _iou(pixel_box(region), t[1]), default=None)
    return best[0] if best and _iou(pixel_box(region), best[1]) >= 0.5 else None


def _mislabelled(prediction: dict, truth: list[tuple[str, tuple]]) -> int:
    return sum(_true_label(b, truth) not in (None, b["value"]["rectanglelabels"][0])
               for b in rectangles(prediction["result"]))  # fmt: skip


def _correction(prediction: dict, truth: list[tuple[str, tuple]]) -> tuple[list[dict], dict, dict]:
    """The prediction as an annotator fixes it: a box with a wrong label gets its true label (the first box
    another label when none is wrong), and one other box is deleted."""
    result = copy.deepcopy(prediction["result"])
    boxes = rectangles(result)
    wrong = [b for b in boxes if _true_label(b, truth) not in (None, b["value"]["rectanglelabels"][0])]
    relabelled = wrong[0] if wrong else boxes[0]
    old = relabelled["value"]["rectanglelabels"][0]
    new = _true_label(relabelled, truth) if wrong else next(s for s in KNOWN_SHAPES + NOVEL_SHAPES if s != old)
    relabelled["value"]["rectanglelabels"] = [new]
    deleted = next(b for b in boxes if b is not relabelled)
    result.remove(deleted)
    for item in result:
        item.pop("score", None)
        item["origin"] = "prediction-changed" if item is relabelled else "prediction"
    return result, relabelled, deleted


def _iou(a: tuple, b: tuple) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def test_annotation_webhooks_reach_the_backend(label_studio, backend, flow):
    """Submitting and updating an annotation sends ANNOTATION_CREATED / ANNOTATION_UPDATED to the backend.

    True with or without learning from corrections; what learning then does is the next test's business."""
    ls = label_studio
    stored = predictions_by_task(ls, flow.tasks[:-1])
    candidates = [(tid, p[0]) for tid, p in stored.items() if len(rectangles(p[0]["result"])) >= 2]
    assert candidates, "no task with two predicted boxes"
    # Prefer a task where a label needs correcting (zero-shot misses the novel shapes).
    task_id, pred = max(candidates, key=lambda c: _mislabelled(c[1], flow.truth[c[0]]) > 0)
    result, relabelled, deleted = _correction(pred, flow.truth[task_id])
    flow.annotated.append(task_id)

    mark = backend.log_mark()
    annotation = ls.create_annotation(task_id, result, parent_prediction=pred["id"], lead_time=3.5)
    event_logged(backend, "ANNOTATION_CREATED", mark)
    [saved] = ls.annotations(task_id)
    assert saved["id"] == annotation["id"]
    labels = {r["id"]: r["value"].get("rectanglelabels") for r in rectangles(saved["result"])}
    assert labels[relabelled["id"]] == relabelled["value"]["rectanglelabels"]
    assert deleted["id"] not in labels

    mark = backend.log_mark()
    result = [r for r in result if r["id"] != relabelled["id"]]  # the annotator deletes the relabelled box too
    ls.update_annotation(annotation["id"], result)
    event_logged(backend, "ANNOTATION_UPDATED", mark)
    [saved] = ls.annotations(task_id)
    assert relabelled["id"] not in {r["id"] for r in saved["result"]}
    # Webhooks are answered 2xx (LS gives them 1 s and logs failures); the access log shows it.
    assert backend.log_lines(r'"POST /webhook HTTP/1\.[01]" 20[01]', since=mark), backend.log_tail()


@pytest.mark.skipif(not LEARNING_MODULE.exists(),
                    reason="backend/learning.py (learning from corrections) not there yet")
def test_predictions_for_remaining_tasks_improve_and_carry_new_version(
    label_studio, backend, demo_data, tmp_path_factory, e2e_timings
):
    """Corrections on some tasks change the model version; the next retrieve re-predicts the remaining
    tasks with that version, and they are better (labelled recall, novel shapes included) than before."""
    ls = label_studio
    out = tmp_path_factory.mktemp("learning-data")
    write_demo_data(out, LEARNING_SCENES, SEED + 1)
    images = sorted((out / "images").glob("*.png"))
    state = setup_project(ls, backend, out, "e2e learning", images, [])
    ls.retrieve_predictions(state.project_id)
    v0 = ls.ml_backend(state.ml["id"])["model_version"]
    # The annotator corrects a third of the tasks, as many novel shapes (what zero-shot cannot name) among
    # them as among the others: every third task in the order of their number of novel shapes.
    by_novelty = sorted(state.tasks, key=lambda t: -sum(s in NOVEL_SHAPES for s, _ in state.truth[t["id"]]))
    taught = by_novelty[0::3]
    remaining = [t for t in by_novelty if t not in taught]
    before = {t["id"]: ls.predictions(t["id"])[0] for t in remaining}
    mark = backend.log_mark()
    for task in taught:  # ... drawing the truth: every object with its label, nothing else
        ls.create_annotation(task["id"], truth_result(state.truth[task["id"]]))
    event_logged(backend, "ANNOTATION_CREATED", mark)
    # each is read back from Label Studio's API and learned in the background: all of them before retrieving,
    # or the remaining tasks' predictions would carry the versions of a memory still growing
    backend.wait_for_log(r"project \d+: learned from 1 annotation", since=mark, count=len(taught), timeout=120)

    t0 = time.monotonic()
    deadline = time.monotonic() + 60
    while True:  # learning may run in the background: each retrieve asks /setup for the current version
        ls.retrieve_predictions(state.project_id, [t["id"] for t in remaining])
        v1 = ls.ml_backend(state.ml["id"])["model_version"]
        if v1 != v0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    e2e_timings(f"learning: new version {time.monotonic() - t0:.1f} s after {len(taught)} annotations")
    assert v1 != v0, f"the model version did not change after {len(taught)} corrected tasks"
    after = {}
    for task in remaining:
        versions = {p["model_version"]: p for p in ls.predictions(task["id"])}
        assert set(versions) == {v0, v1}, (task["id"], list(versions))
        after[task["id"]] = versions[v1]
    taught_novel = sum(s in NOVEL_SHAPES for t in taught for s, _ in state.truth[t["id"]])
    old, new = score_predictions(before, state.truth), score_predictions(after, state.truth)
    old_novel = score_predictions(before, state.truth, ignore=KNOWN_SHAPES)
    new_novel = score_predictions(after, state.truth, ignore=KNOWN_SHAPES)
    print(f"\n[learning] taught {len(taught)} tasks ({taught_novel} novel-shape boxes), scored on {len(remaining)}"
          f"\n[learning] {v0}: {report(old)}; novel shapes: {report(old_novel)}"
          f"\n[learning] {v1}: {report(new)}; novel shapes: {report(new_novel)}")  # fmt: skip
    assert new_novel.correct_labels > old_novel.correct_labels, (report(old_novel), report(new_novel))
    assert labelled_recall(new) > labelled_recall(old), (report(old), report(new))

    # Forged webhooks (no Label Studio involved, results claiming every box a star, stamped far in the future)
    # change nothing: the backend reads annotations from Label Studio's API, which has no such ids.
    config = ls.project(state.project_id)["label_config"]
    mark = backend.log_mark()
    for n, task in enumerate(remaining[:15]):
        forged = {"action": "ANNOTATION_CREATED", "project": {"id": state.project_id, "label_config": config},
                  "task": task, "annotation": {"id": 10**9 + n, "task": task["id"], "updated_at": "9999-01-01",
                                               "result": truth_result([("star", (0, 0, 80, 80))])}}
        assert requests.post(backend.url + "/webhook", json=forged, timeout=10).status_code == 201
    backend.wait_for_log(rf"annotation {10**9 + min(14, len(remaining) - 1)} is not in Label Studio", since=mark,
                         timeout=60)
    setup = requests.post(backend.url + "/setup", json={"project": f"{state.project_id}.1", "schema": config},
                          timeout=30).json()
    assert setup["model_version"] == v1, "forged webhooks changed the model"


def truth_result(truth: list[tuple[str, tuple]], size: int = 160) -> list[dict]:
    """Ground-truth boxes as a Label Studio annotation result (the scenes are size x size pixels)."""
    return [{"id": f"gt{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "original_width": size, "original_height": size, "image_rotation": 0,
             "value": {"x": 100 * x0 / size, "y": 100 * y0 / size, "width": 100 * (x1 - x0) / size,
                       "height": 100 * (y1 - y0) / size, "rotation": 0, "rectanglelabels": [shape]}}
            for i, (shape, (x0, y0, x1, y1)) in enumerate(truth)]  # fmt: skip


def test_start_training_reaches_the_backend(label_studio, backend, flow):
    """The "Start Training" button: LS posts START_TRAINING to /webhook and reports success."""
    ls = label_studio
    mark = backend.log_mark()
    r = ls.request("POST", f"/api/ml/{flow.ml['id']}/train")
    assert r.status_code in (200, 201), r.text
    event_logged(backend, "START_TRAINING", mark)
    ml = ls.ml_backend(flow.ml["id"])
    assert ml["state"] != "ER", ml  # LS sets TRAINING on a 2xx answer, ERROR (with error_message) otherwise


def test_interactive_annotating_names_a_drawn_box(label_studio, backend, flow):
    """With is_interactive on, a rectangle drawn by the annotator comes back named by the backend."""
    ls = label_studio
    ls.update_ml_backend(flow.ml["id"], flow.project_id, backend.url, is_interactive=True)
    assert ls.ml_backend(flow.ml["id"])["is_interactive"] is True
    # The largest object of a known shape in an uploaded scene: the drawn box is its true box.
    task_id, shape, (x0, y0, x1, y1) = max(
        ((tid, s, b) for tid, objs in flow.truth.items() for s, b in objs if s in KNOWN_SHAPES
         and tid != flow.tasks[-1]["id"] and tid not in flow.annotated),
        key=lambda item: (item[2][2] - item[2][0]) * (item[2][3] - item[2][1]),
    )  # fmt: skip
    drawn = {"id": "drawn1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "original_width": 160, "original_height": 160, "image_rotation": 0, "origin": "manual",
             "value": {"x": x0 / 1.6, "y": y0 / 1.6, "width": (x1 - x0) / 1.6, "height": (y1 - y0) / 1.6,
                       "rotation": 0, "rectanglelabels": [NOVEL_SHAPES[0]]}}  # fmt: skip
    count = len(ls.predictions(task_id))
    mark = backend.log_mark()
    answer = ls.interactive_annotating(flow.ml["id"], task_id, {"result": [drawn]})
    assert "errors" not in answer, answer
    assert backend.log_lines(r"POST /predict", since=mark)
    data = answer["data"]
    assert LabelInterface(flow.config).validate_prediction(data, return_errors=True) == [], data
    [named] = rectangles(data["result"])
    got = pixel_box(named)
    assert all(abs(a - b) < 1.0 for a, b in zip(got, (x0, y0, x1, y1))), (got, (x0, y0, x1, y1))
    assert named["value"]["rectanglelabels"] == [shape], (named, shape)
    assert len(ls.predictions(task_id)) == count  # interactive answers are not stored


def test_personal_access_token_with_legacy_tokens_off(label_studio, demo_data, tmp_path_factory, e2e_timings):
    """Legacy tokens off, a second backend with a PAT: uploads still download, every task gets boxes.

    Last in the module: it switches an organisation-wide setting (restored on exit)."""
    ls = label_studio
    with ls.legacy_tokens_off() as pat:
        # The other entry point: backend.wsgi:app under a WSGI server (waitress, DEMO=true).
        backend = start_backend(tmp_path_factory, "personal-access-token", ls, pat, e2e_timings, wsgi=True)
        try:
            images = sorted((demo_data / "images").glob("*.png"))[:4]
            state = setup_project(ls, backend, demo_data, "e2e PAT", images, [])
            upload = state.tasks[0]["data"]["image"]
            assert ls.download(upload, auth=f"Token {LEGACY_TOKEN}").status_code == 401  # legacy really is off
            assert ls.ml_backend(state.ml["id"])["state"] == "CO"
            t0 = time.monotonic()
            retrieved = ls.retrieve_predictions(state.project_id)
            wall = time.monotonic() - t0
            e2e_timings(f"retrieve predictions, {len(images)} tasks, PAT (legacy off): {wall:.2f} s wall,"
                        f" {len(images) / wall:.1f} tasks/s")  # fmt: skip
            assert retrieved["processed_items"] == len(images)
            interface = LabelInterface(state.config)
            version = ls.ml_backend(state.ml["id"])["model_version"]
            preds = {}
            for task in state.tasks:
                [preds[task["id"]]] = ls.predictions(task["id"])
                assert preds[task["id"]]["model_version"] == version
                assert interface.validate_prediction(preds[task["id"]], return_errors=True) == []
            assert not backend.log_lines(r"no prediction|refused"), backend.log_tail()
            score = score_predictions(preds, state.truth)  # the real images were read, not just something
            assert score.recall >= MIN_BOX_RECALL, report(score)
        finally:
            backend.stop()
    assert ls.jwt_settings()["legacy_api_tokens_enabled"] is True


def test_basic_auth_and_url_secret_still_learn(label_studio, demo_data, image_server, tmp_path_factory):
    """Basic Auth on and no Label Studio key in the backend: Label Studio sends Basic Auth with /setup and
    /predict, but its auto-created webhook (<model URL>/webhook) carries none; under URL_SECRET the model URL
    holds the secret, so corrections still reach the learner, and a webhook without it is refused."""
    ls = label_studio
    env = {"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pw", "URL_SECRET": "e2e-secret",
           "ALLOW_PRIVATE_HOSTS": "127.0.0.1"}
    with BackendProcess(tmp_path_factory.mktemp("basic-auth"), env=env) as backend:
        image = sorted((demo_data / "images").glob("*.png"))[0]
        project = ls.create_project("e2e basic auth", (demo_data / "label_config.xml").read_text())
        ls.import_tasks(project["id"], [{"image": f"{image_server}/{image.name}"}])
        [task] = ls.tasks(project["id"])
        ml = ls.connect_ml_backend(project["id"], backend.url + "/e2e-secret", auth_method="BASIC_AUTH",
                                   basic_auth_user="ls", basic_auth_pass="pw")
        assert ls.ml_backend(ml["id"])["state"] == "CO"
        assert not requests.post(backend.url + "/setup", json={}, timeout=10).ok   # no secret, no Basic Auth
        mark = backend.log_mark()
        ls.create_annotation(task["id"], truth_result([("circle", (20, 20, 70, 70))]))
        backend.wait_for_log(r"project \d+: learned from 1 annotation", since=mark, timeout=60)
        assert backend.log_lines(r'"POST /webhook HTTP/1\.[01]" 201', since=mark), backend.log_tail()


def test_backend_stops_cleanly(backend):
    """The helper stops the process it started, by PID."""
    pid = backend.pid
    backend.stop()
    assert not backend.alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{backend.port}/health", timeout=2)
    assert pid is not None
