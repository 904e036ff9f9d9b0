"""Learning from corrections, for real: the bundled tiny models, the Flask app, a real Redis and a real `rq worker`.

Webhook → background job → stored few-shot memory → a new model version → better predictions on held-out scenes;
with the embedded store (SQLite under MODEL_DIR + the in-process job thread) and with Redis + RQ. A new backend
process reports the same version and predicts the same. Deleting annotations forgets them; START_TRAINING
rebuilds from a (fake) Label Studio API, page by page, with its token.

Images are served from disk through Label Studio's local-files path (LOCAL_FILES_DOCUMENT_ROOT), as in
test_app.py. Thresholds are measured values minus a stated margin (see each assert).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.app import create_app
from backend.config import Settings
from backend.demo.scoring import MatchScore
from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES, SHAPES, scenes
from backend.jobs import WORKER_OPTIONS, rq_queue
from backend.labeling.detections import Detections
from backend.labeling.factory import build_labeler
from backend.model import ClipBackend
from backend.studio.label_config import parse_label_config
from backend.studio.results import regions_from_results

REPO = Path(__file__).resolve().parent.parent
TRAIN = list(scenes(7100, 24))    # the scenes annotators correct
HELD = list(scenes(7200, 40))     # held-out scenes: what the next predictions are scored on


def config_for(labels, choices=()) -> str:
    boxes = "".join(f'<Label value="{s}"/>' for s in labels)
    extra = ('<Choices name="shapes" toName="image" choice="multiple">'
             + "".join(f'<Choice value="{s}"/>' for s in choices) + "</Choices>") if choices else ""
    return (f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{boxes}'
            f'</RectangleLabels>{extra}</View>')


CONFIG = config_for(SHAPES)
KNOWN_CONFIG = config_for(KNOWN_SHAPES)
TRAIN_TASKS = [{"id": 1 + i, "data": {"image": f"/data/local-files/?d=train_{i}.png"}} for i in range(len(TRAIN))]
HELD_TASKS = [{"id": 101 + i, "data": {"image": f"/data/local-files/?d=held_{i}.png"}} for i in range(len(HELD))]
_projects = count(int(time.time()) % 100_000 * 100)   # unique per test, also across runs sharing a Redis


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning-images")
    for name, rendered in (("train", TRAIN), ("held", HELD)):
        for i, scene in enumerate(rendered):
            scene.image.save(root / f"{name}_{i}.png")
    return root


SECRET = "s3cret-path"   # URL_SECRET: webhooks under it are believed without Label Studio's API


def make_backend(image_dir, model_dir, **env) -> ClipBackend:
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(image_dir), "MODEL_DIR": str(model_dir),
                                  "URL_SECRET": SECRET, **env}, demo=True)
    return ClipBackend(settings, build_labeler(settings.model_spec()))


def client_for(backend):
    return create_app(backend.settings, backend).test_client()


# ---------------------------------------------------------------- Label Studio payloads
def rectangles(scene, keep=lambda o: True) -> list[dict]:
    return [{"id": f"r{i}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
             "original_width": 160, "original_height": 160, "image_rotation": 0,
             "value": {"x": o.box[0] / 1.6, "y": o.box[1] / 1.6, "width": (o.box[2] - o.box[0]) / 1.6,
                       "height": (o.box[3] - o.box[1]) / 1.6, "rotation": 0, "rectanglelabels": [o.shape]}}
            for i, o in enumerate(scene.objects) if keep(o)]


def annotation(annotation_id, task, result, updated="2026-01-01T00:00:00Z", cancelled=False) -> dict:
    return {"id": annotation_id, "task": task["id"], "result": result, "was_cancelled": cancelled,
            "ground_truth": False, "updated_at": updated, "created_at": updated, "prediction": {},
            "completed_by": 1}


def event(action, project, config=CONFIG, **fields) -> dict:
    return {"action": action, "project": {"id": project, "title": "shapes", "label_config": config}, **fields}


def post_webhook(client, body) -> dict:
    started = time.perf_counter()
    response = client.post(f"/{SECRET}/webhook", json=body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 201, response.get_json()
    assert elapsed < 1.0, f"webhook {body['action']} answered in {elapsed:.2f} s (Label Studio waits 1 s)"
    return response.get_json()


def teach(client, project, config=CONFIG, keep=lambda o: True, first_id=1):
    """The annotators correct every training scene: one ANNOTATION_CREATED each."""
    for i, (task, scene) in enumerate(zip(TRAIN_TASKS, TRAIN)):
        body = event("ANNOTATION_CREATED", project, config,
                     annotation=annotation(first_id + i, task, rectangles(scene, keep)), task=task)
        assert post_webhook(client, body)["status"] == "queued"


def setup_version(client, project, config=CONFIG) -> str:
    response = client.post(f"/{SECRET}/setup", json={"project": f"{project}.1716400000", "schema": config,
                                           "hostname": "http://localhost:8080", "access_token": "x"})
    assert response.status_code == 200
    return response.get_json()["model_version"]


def predict(client, project, tasks, config=CONFIG) -> list[dict]:
    response = client.post(f"/{SECRET}/predict", json={"tasks": tasks, "project": f"{project}.1716400000",
                                             "label_config": config, "params": {"context": None}})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def score(results, rendered=HELD, config=CONFIG) -> dict[str, float]:
    """Objects found with the right label (recall) per group, and predictions landing on a novel object."""
    control = parse_label_config(config).controls[0]
    match, on_novel = MatchScore(), 0
    for result, scene in zip(results, rendered):
        regions = regions_from_results(result["result"], control)
        detections = Detections([r.box for r in regions], [1.0] * len(regions), [r.label for r in regions])
        match.add(detections, [o.box for o in scene.objects], [o.shape for o in scene.objects])
        novel = [o.box for o in scene.objects if o.shape in NOVEL_SHAPES]
        on_novel += sum(_iou_max(r.box, novel) >= 0.5 for r in regions)
    out = {"predictions_on_novel": on_novel, "precision": match.correct_labels / max(1, match.predicted)}
    for group, classes in (("known", KNOWN_SHAPES), ("novel", NOVEL_SHAPES), ("all", SHAPES)):
        stats = [match.per_class.get(c, [0, 0, 0]) for c in classes]
        out[group] = sum(s[2] for s in stats) / max(1, sum(s[0] for s in stats))
    return out


def _iou_max(box, boxes) -> float:
    best = 0.0
    for other in boxes:
        x0, y0 = max(box[0], other[0]), max(box[1], other[1])
        x1, y1 = min(box[2], other[2]), min(box[3], other[3])
        inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
        best = max(best, inter / union if union > 0 else 0.0)
    return best


def run_rq_worker(redis_url: str, image_dir: Path) -> str:
    """The documented worker command, in burst mode (it exits when the queue is empty)."""
    rq = Path(sys.executable).parent / "rq"
    command = [str(rq), "worker", "--burst", "--url", redis_url, *WORKER_OPTIONS, "clip-ls"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "REDIS_URL": redis_url,
           "LOCAL_FILES_DOCUMENT_ROOT": str(image_dir), "TORCH_THREADS": "1"}
    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


RESTART = """
import json, sys
from backend.app import create_app
from backend.config import Settings
from backend.jobs import WORKER_OPTIONS, rq_queue
from backend.labeling.factory import build_labeler
from backend.model import ClipBackend
settings = Settings.from_env(demo=True)
backend = ClipBackend(settings, build_labeler(settings.model_spec()))
client = create_app(settings, backend).test_client()
project, config, tasks = json.loads(sys.stdin.read())
version = client.post("/setup", json={"project": project, "schema": config}).get_json()["model_version"]
results = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": config}).get_json()
print(json.dumps({"version": version, "results": results["results"]}))
"""


def restarted_backend_predicts(env: dict, project: int, tasks: list[dict]) -> dict:
    """A new backend process with the same settings: its /setup version and its predictions."""
    out = subprocess.run([sys.executable, "-c", RESTART], cwd=REPO, input=json.dumps(
        [f"{project}.1716400000", CONFIG, tasks]), capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "LOG_LEVEL": "WARNING", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_predictions(a: list[dict], b: list[dict]) -> bool:
    def shape(results):
        return [[(i["value"].get("rectanglelabels"), [round(i["value"][k], 3) for k in ("x", "y", "width", "height")])
                 for i in r["result"]] for r in results]
    scores = [abs(x["score"] - y["score"]) for r, s in zip(a, b) for x, y in zip(r["result"], s["result"])]
    return shape(a) == shape(b) and max(scores, default=0.0) < 1e-3


# ---------------------------------------------------------------- the whole loop
@pytest.mark.parametrize("where", ["embedded", "redis"])
def test_corrections_improve_the_next_predictions_and_survive_a_restart(where, image_dir, tmp_path, request):
    # no time budget: a slow (loaded) machine must not turn the 40-task predict into a one-task answer
    env = {"MODEL_DIR": str(tmp_path / "state"), "LOCAL_FILES_DOCUMENT_ROOT": str(image_dir),
           "PREDICT_BUDGET_SECONDS": "1e9"}
    if where == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    settings = Settings.from_env({**env, "URL_SECRET": SECRET}, demo=True)
    backend = ClipBackend(settings, build_labeler(settings.model_spec()))
    client, project = client_for(backend), next(_projects)
    v0 = setup_version(client, project)
    before = score(predict(client, project, HELD_TASKS))
    predict(client, project, TRAIN_TASKS)    # what the annotators start from (recorded per task)

    teach(client, project)
    if where == "redis":
        queue = rq_queue(backend.learning.jobs.connection)
        assert queue.count == len(TRAIN), "the webhooks queue their work on RQ, the backend does not do it"
        assert setup_version(client, project) == v0, "no new version before the new state is stored"
        log = run_rq_worker(env["REDIS_URL"], image_dir)
        assert "Job OK" in log or "Successfully completed" in log, log[-2000:]
    else:
        assert backend.learning.jobs.wait(300)

    v1 = setup_version(client, project)
    assert v1 != v0 and v1.startswith(v0)
    results = predict(client, project, HELD_TASKS)
    assert {r["model_version"] for r in results} == {v1}
    after = score(results)
    print(f"\n[{where}] zero-shot {before}\n[{where}] after 24 corrected scenes {after}")
    # measured (24 corrected scenes, 40 held-out, 105 objects): novel 0.00 → 0.67, all 0.68 → 0.87, known 0.95 → 0.95
    # (previous tiny CLIP: novel 0.00 → 0.53, all 0.65 → 0.78, known 0.91 → 0.88)
    assert after["novel"] >= before["novel"] + 0.20
    assert after["all"] >= before["all"] + 0.04
    assert after["known"] >= before["known"] - 0.05

    del backend, client
    restarted = restarted_backend_predicts(env, project, HELD_TASKS)
    assert restarted["version"] == v1
    assert same_predictions(restarted["results"], results)


# ---------------------------------------------------------------- events
@pytest.fixture
def embedded(image_dir, tmp_path):
    backend = make_backend(image_dir, tmp_path / "state")
    return backend, client_for(backend)


def test_deleting_annotations_forgets_them(embedded):
    backend, client = embedded
    project = next(_projects)
    v0 = setup_version(client, project)
    zero_shot = predict(client, project, HELD_TASKS[:10])
    teach(client, project)
    backend.learning.jobs.wait(300)
    v1 = setup_version(client, project)
    size = len(backend.learning.memory(project))
    assert v1 != v0 and size > 0

    answer = post_webhook(client, event("ANNOTATIONS_DELETED", project, annotations=[{"id": 1}, {"id": 2}]))
    assert answer["forgotten"] == 2
    assert len(backend.learning.memory(project)) == size - len(TRAIN[0].objects) - len(TRAIN[1].objects)
    v2 = setup_version(client, project)
    assert v2 not in (v0, v1)

    rest = [{"id": 3 + i} for i in range(len(TRAIN) - 2)]
    post_webhook(client, event("ANNOTATIONS_DELETED", project, annotations=rest))
    assert len(backend.learning.memory(project)) == 0
    assert setup_version(client, project) == v0     # nothing learned any more: the zero-shot version again
    assert same_predictions(predict(client, project, HELD_TASKS[:10]), zero_shot)

    # a job for a deleted annotation that runs late does not bring it back
    late = annotation(1, TRAIN_TASKS[0], rectangles(TRAIN[0]), updated="2030-01-01T00:00:00Z")
    post_webhook(client, event("ANNOTATION_UPDATED", project, annotation=late, task=TRAIN_TASKS[0]))
    backend.learning.jobs.wait(60)
    assert setup_version(client, project) == v0


def test_deleting_tasks_forgets_their_annotations(embedded):
    backend, client = embedded
    project = next(_projects)
    teach(client, project)
    backend.learning.jobs.wait(300)
    size = len(backend.learning.memory(project))
    answer = post_webhook(client, {"action": "TASKS_DELETED", "project": {"id": project}, "tasks": [{"id": 1}]})
    assert answer["forgotten"] == 1
    assert len(backend.learning.memory(project)) == size - len(TRAIN[0].objects)


def test_updates_replace_older_ones_and_cancelled_annotations_teach_nothing(embedded):
    backend, client = embedded
    project = next(_projects)
    v0 = setup_version(client, project)
    task, scene = TRAIN_TASKS[0], TRAIN[0]
    assert len(scene.objects) >= 2
    post_webhook(client, event("ANNOTATION_CREATED", project, annotation=annotation(
        7, task, rectangles(scene), updated="2026-01-01T00:00:00Z"), task=task))
    backend.learning.jobs.wait(60)
    assert len(backend.learning.memory(project)) == len(scene.objects)

    one = rectangles(scene)[:1]
    post_webhook(client, event("ANNOTATION_UPDATED", project, annotation=annotation(
        7, task, one, updated="2026-01-02T00:00:00Z"), task=task))
    backend.learning.jobs.wait(60)
    assert len(backend.learning.memory(project)) == 1           # replaced, not added

    post_webhook(client, event("ANNOTATION_UPDATED", project, annotation=annotation(   # an older event, late
        7, task, rectangles(scene), updated="2025-12-31T00:00:00Z"), task=task))
    backend.learning.jobs.wait(60)
    assert len(backend.learning.memory(project)) == 1

    cancelled = annotation(8, TRAIN_TASKS[1], rectangles(TRAIN[1]), cancelled=True)
    answer = post_webhook(client, event("ANNOTATION_CREATED", project, annotation=cancelled, task=TRAIN_TASKS[1]))
    assert answer["status"] == "ignored"
    assert len(backend.learning.memory(project)) == 1

    skipped = annotation(7, task, one, updated="2026-01-03T00:00:00Z", cancelled=True)   # skipped after all
    post_webhook(client, event("ANNOTATION_UPDATED", project, annotation=skipped, task=task))
    assert len(backend.learning.memory(project)) == 0 and setup_version(client, project) == v0


def test_bulk_annotations_created(embedded):
    backend, client = embedded
    project = next(_projects)
    annotations = [annotation(500 + i, t, rectangles(s)) for i, (t, s) in enumerate(zip(TRAIN_TASKS[:5], TRAIN))]
    answer = post_webhook(client, event("ANNOTATIONS_CREATED", project, annotation=annotations,
                                        task=TRAIN_TASKS[:5]))
    assert answer["annotations"] == 5
    backend.learning.jobs.wait(120)
    assert len(backend.learning.memory(project)) == sum(len(s.objects) for s in TRAIN[:5])


def test_deleted_predictions_become_background(embedded):
    """A project that labels only the KNOWN shapes: its annotators delete the boxes predicted on diamonds and
    pentagons. Learned as background, such objects stop being predicted, while known shapes stay found."""
    backend, client = embedded
    project = next(_projects)
    before = score(predict(client, project, HELD_TASKS, KNOWN_CONFIG), config=KNOWN_CONFIG)
    predict(client, project, TRAIN_TASKS, KNOWN_CONFIG)   # recorded: what the annotators see and correct
    teach(client, project, KNOWN_CONFIG, keep=lambda o: o.shape in KNOWN_SHAPES)
    backend.learning.jobs.wait(300)
    counts = backend.learning.memory(project).counts("label")
    assert counts.get(None, 0) >= 5, counts         # the deleted predictions, as background
    after = score(predict(client, project, HELD_TASKS, KNOWN_CONFIG), config=KNOWN_CONFIG)
    print(f"\nknown-only project: zero-shot {before}\nafter corrections {after}")
    # measured: predictions on novel objects 30 → 9, precision 0.69 → 0.86, known recall 0.95 → 0.95 (previous tiny
    # CLIP: 30 → 11, 0.66 → 0.82, 0.91 → 0.89, the price of hexagons and circles that looked like the deleted
    # pentagons; 0.85 when the memory also voted on known labels)
    assert after["predictions_on_novel"] <= before["predictions_on_novel"] - 10
    assert after["precision"] >= before["precision"] + 0.05
    assert after["known"] >= before["known"] - 0.10


def test_choices_learn_from_whole_images_and_unknown_labels_are_ignored(embedded):
    backend, client = embedded
    project = next(_projects)
    config = config_for(SHAPES, choices=SHAPES)
    for i, (task, scene) in enumerate(zip(TRAIN_TASKS[:6], TRAIN)):
        chosen = sorted({o.shape for o in scene.objects}) + ["a_label_the_config_lacks"]
        result = rectangles(scene) + [{"from_name": "shapes", "to_name": "image", "type": "choices",
                                       "value": {"choices": chosen}}]
        post_webhook(client, event("ANNOTATION_CREATED", project, config,
                                   annotation=annotation(900 + i, task, result), task=task))
    backend.learning.jobs.wait(120)
    counts = backend.learning.memory(project).counts("shapes")
    assert sum(counts.values()) == sum(len({o.shape for o in s.objects}) for s in TRAIN[:6])
    assert "a_label_the_config_lacks" not in counts
    # a config that dropped some labels and added a new one: still valid predictions, the new label zero-shot
    changed = config_for([s for s in SHAPES if s != "diamond"] + ["heart"], choices=SHAPES)
    from label_studio_sdk.label_interface import LabelInterface
    interface = LabelInterface(changed)
    for result in predict(client, project, HELD_TASKS[:8], changed):
        assert interface.validate_prediction({"result": result["result"]}), result
        assert "diamond" not in json.dumps([r["value"].get("rectanglelabels") for r in result["result"]])
    assert setup_version(client, project, changed) != setup_version(client, project, config)


# ---------------------------------------------------------------- START_TRAINING against a Label Studio API
class FakeLabelStudio(ThreadingHTTPServer):
    """Answers GET /api/tasks like Label Studio 1.23.2 (pages of ``tasks`` with ``total``), one task, one
    annotation, one project (its label config), with a legacy token. ``extra``: annotation id → (annotation,
    task) held besides the tasks' own."""

    token = "0123456789abcdef"

    def __init__(self, tasks, project: int):
        self.tasks, self.pages_served, self.project, self.extra = tasks, [], project, {}
        for task in tasks:
            task["project"] = project
        super().__init__(("127.0.0.1", 0), _LabelStudioHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _LabelStudioHandler(BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if self.headers.get("Authorization") != f"Token {self.server.token}":
            return self._json(401, {"detail": "Authentication credentials were not provided."})
        kind, _, number = parts.path.strip("/").removeprefix("api/").partition("/")
        if kind == "projects" and number == str(self.server.project):
            return self._json(200, {"id": self.server.project, "label_config": CONFIG})
        held = {a["id"]: (a, t) for t in self.server.tasks for a in t["annotations"]} | self.server.extra
        if kind == "annotations" and number.isdigit() and int(number) in held:
            return self._json(200, held[int(number)][0])
        tasks = {t["id"]: t for t in self.server.tasks} | {t["id"]: t for _, t in self.server.extra.values()}
        if kind == "tasks" and number.isdigit() and int(number) in tasks:
            return self._json(200, {**tasks[int(number)], "project": self.server.project})
        if parts.path.rstrip("/") != "/api/tasks" or query.get("fields") != "all":
            return self._json(404, {"detail": "Not found."})
        page, size = int(query.get("page", 1)), int(query.get("page_size", 100))
        chunk = self.server.tasks[(page - 1) * size:page * size]
        if not chunk:
            return self._json(404, {"detail": "Invalid page."})
        self.server.pages_served.append(page)
        self._json(200, {"total_annotations": 0, "total_predictions": 0, "total": len(self.server.tasks),
                         "tasks": chunk})

    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_start_training_rebuilds_the_memory_from_label_studio(image_dir, tmp_path):
    tasks = [{"id": 1000 + i, "data": {"image": "/data/local-files/?d=held_0.png"}, "annotations": []}
             for i in range(130)]
    for i, (task, scene) in enumerate(zip(TRAIN_TASKS[:12], TRAIN)):   # annotated tasks on both pages
        tasks[90 + i] = {**task, "annotations": [annotation(300 + i, task, rectangles(scene))]}
    tasks[95]["annotations"].append(annotation(399, TRAIN_TASKS[5], rectangles(TRAIN[5]), cancelled=True))
    project = next(_projects)
    server = FakeLabelStudio(tasks, project)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = make_backend(image_dir, tmp_path / "state", LABEL_STUDIO_URL=server.url,
                               LABEL_STUDIO_API_KEY=server.token)
        client = client_for(backend)
        stale = annotation(777, TRAIN_TASKS[20], rectangles(TRAIN[20]))   # learned, then deleted in Label Studio
        server.extra[777] = stale, TRAIN_TASKS[20]
        post_webhook(client, event("ANNOTATION_CREATED", project, annotation=stale, task=TRAIN_TASKS[20]))
        backend.learning.jobs.wait(60)
        assert set(backend.learning.store.records(project, backend.learning.space)) == {"annotation:777"}
        server.extra.clear()
        v1 = setup_version(client, project)

        answer = post_webhook(client, event("START_TRAINING", project))
        assert answer["status"] == "queued"
        assert backend.learning.jobs.wait(300)
        assert server.pages_served == [1, 2]
        sources = set(backend.learning.store.records(project, backend.learning.space))
        assert sources == {f"annotation:{300 + i}" for i in range(12)}
        assert len(backend.learning.memory(project)) == sum(len(s.objects) for s in TRAIN[:12])
        assert setup_version(client, project) not in (v1, setup_version(client, next(_projects)))
    finally:
        server.shutdown()
        server.server_close()


def test_start_training_without_label_studio_access_keeps_the_memory(embedded, caplog):
    backend, client = embedded
    project = next(_projects)
    teach(client, project)
    backend.learning.jobs.wait(300)
    v1 = setup_version(client, project)
    post_webhook(client, event("START_TRAINING", project))
    backend.learning.jobs.wait(60)
    assert setup_version(client, project) == v1
    assert "LABEL_STUDIO_URL" in caplog.text
