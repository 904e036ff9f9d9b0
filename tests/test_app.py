"""Every route and request shape of the protocol, through the Flask test client, on the bundled tiny models.

Images come from disk through Label Studio's local-files path (LOCAL_FILES_DOCUMENT_ROOT), so no server is
needed here; downloads over HTTP with Label Studio auth are covered in test_images.py and the e2e tests.
"""
import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image

from backend.app import create_app
from backend.config import Settings
from backend.demo.shapes import KNOWN_SHAPES, scenes
from backend.labeling.factory import build_labeler
from backend.model import ClipBackend

LABELS = "".join(f'<Label value="{s}"/>' for s in KNOWN_SHAPES)
CHOICES = "".join(f'<Choice value="{s}"/>' for s in KNOWN_SHAPES)
CONFIG = f"""<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">{LABELS}</RectangleLabels>
  <Choices name="scene" toName="image" choice="multiple">{CHOICES}</Choices></View>"""


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    for i, scene in enumerate(scenes(3000, 4)):
        scene.image.save(root / f"scene_{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rotated = np.asarray(next(scenes(3001, 1)).image.resize((320, 160)))
    image = Image.fromarray(rotated)
    exif = image.getexif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    image.save(root / "rotated.jpg", exif=exif, quality=95)
    return root


@pytest.fixture(scope="module")
def backend(image_dir):
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(image_dir)}, demo=True)
    return ClipBackend(settings, build_labeler(settings.model_spec()))


def make_client(backend, **env):
    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": backend.settings.local_files_document_root, **env},
                                 demo=True)
    backend.settings = settings
    return create_app(settings, backend).test_client()


@pytest.fixture
def client(backend):
    yield make_client(backend)
    make_client(backend)  # restore the default settings for the next test


def task(i, name):
    return {"id": i, "data": {"image": f"/data/local-files/?d={name}"}, "annotations": [], "predictions": [],
            "project": 1}


def predict(client, tasks, config=CONFIG, **extra):
    body = {"tasks": tasks, "project": "1.1716400000", "label_config": config,
            "params": {"login": None, "password": None, "context": None}, **extra}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def test_health_and_root_answer_at_once(client):
    for path in ("/", "/health"):
        start = time.perf_counter()
        response = client.get(path)
        assert response.status_code == 200 and response.get_json()["status"] == "UP"
        assert time.perf_counter() - start < 0.5


def test_unknown_routes_and_methods_are_json_errors(client):
    missing = client.get("/train")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and "error" in wrong.get_json()


@pytest.mark.parametrize("extra_params", [None, "", "some string", {"key": "value"}])
def test_setup_accepts_every_shape_label_studio_sends(client, extra_params):
    body = {"project": "1.1716400000", "schema": CONFIG, "hostname": "http://localhost:8080",
            "access_token": "abc", "extra_params": extra_params, "some_future_key": 1}
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    assert response.get_json()["model_version"].startswith("clip-")
    no_project = client.post("/setup", json={"schema": CONFIG})
    assert no_project.get_json()["model_version"] == response.get_json()["model_version"]


def test_version_is_stable_and_changes_exactly_with_what_shapes_predictions(client):
    def version(config):
        return client.post("/setup", json={"project": "1.1", "schema": config}).get_json()["model_version"]

    first = version(CONFIG)
    assert version(CONFIG) == first
    assert version(CONFIG.replace("<View>", "<View>\n  ")) == first  # formatting is not a change
    same_prompt = 'value="star" model_prompt="a photo of a star."'  # what the default template makes anyway
    assert version(CONFIG.replace('value="star"', same_prompt, 1)) == first
    assert version(CONFIG.replace('value="star"', 'value="star" model_prompt="a shiny star"', 1)) != first
    assert version(CONFIG.replace('name="label" toName', 'name="label" model_score_threshold="0.5" toName')) != first
    assert version(CONFIG.replace('<Label value="star"/>', "")) != first


def test_prompt_settings_are_the_defaults_for_labels_without_prompts(backend):
    def version(**env):
        client = make_client(backend, **env)
        return client.post("/setup", json={"schema": CONFIG}).get_json()["model_version"]

    try:
        default = version()
        assert version(PROMPT_TEMPLATE="a {}") != default
        assert version(BACKGROUND_PROMPTS="background;nothing") != default
        assert version(PROMPT_TEMPLATE="a photo of a {}.") == default
    finally:
        make_client(backend)


def test_predictions_are_valid_for_the_config_and_carry_the_setup_version(client):
    setup_version = client.post("/setup", json={"project": "1.1", "schema": CONFIG}).get_json()["model_version"]
    results = predict(client, [task(1, "scene_0.png"), task(2, "scene_1.png"), task(3, "scene_2.png")])
    assert len(results) == 3
    interface = LabelInterface(CONFIG)
    for result in results:
        assert result["model_version"] == setup_version
        assert interface.validate_prediction(result, return_errors=True) == []
        boxes = [r for r in result["result"] if r["type"] == "rectanglelabels"]
        assert boxes, "every demo scene has objects"
        for region in boxes:
            v = region["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["x"] + v["width"] <= 100.0001
            assert (region["original_width"], region["original_height"]) == (160, 160)
            assert 0 < region["score"] <= 1 and v["rectanglelabels"][0] in KNOWN_SHAPES
        assert 0 <= result["score"] <= 1
    [again] = predict(client, [task(1, "scene_0.png")])  # repeatable (alone vs in a batch: float noise only)
    assert [r["value"]["rectanglelabels"] for r in again["result"] if "rectanglelabels" in r["value"]] == \
        [r["value"]["rectanglelabels"] for r in results[0]["result"] if "rectanglelabels" in r["value"]]
    assert again["score"] == pytest.approx(results[0]["score"], abs=1e-4)


def test_boxes_are_in_percent_of_the_exif_upright_image(client):
    [result] = predict(client, [task(9, "rotated.jpg")])
    regions = [r for r in result["result"] if r["type"] == "rectanglelabels"]
    assert regions and all((r["original_width"], r["original_height"]) == (160, 320) for r in regions)


def test_a_failing_task_gets_an_empty_result_in_its_slot_and_a_log_line(client, caplog):
    caplog.set_level(logging.WARNING)
    tasks = [task(1, "scene_0.png"), task(2, "broken.png"), task(3, "missing.png"),
             {"id": 4, "data": {"img": "wrong key"}}, task(5, "scene_1.png")]
    results = predict(client, tasks)
    assert len(results) == 5
    assert [bool(r["result"]) for r in results] == [True, False, False, False, True]
    for task_id in (2, 3, 4):
        assert any(f"task {task_id}" in line for line in caplog.messages)
    assert client.get("/health").status_code == 200


def test_a_call_over_the_time_budget_answers_one_result_so_label_studio_asks_per_task(backend):
    client = make_client(backend, PREDICT_BUDGET_SECONDS="0.001")
    try:
        results = predict(client, [task(1, "scene_0.png"), task(2, "scene_1.png")])
        assert len(results) == 1 and results[0]["result"]
        assert len(predict(client, [task(2, "scene_1.png")])) == 1
    finally:
        make_client(backend)


def test_interactive_box_is_named_and_returned(client, image_dir):
    scene = next(scenes(3000, 1))
    obj = scene.objects[0]
    x0, y0, x1, y1 = obj.box
    drawn = {"from_name": "label", "to_name": "image", "type": "rectangle", "original_width": 160,
             "original_height": 160, "value": {"x": x0 / 1.6, "y": y0 / 1.6, "width": (x1 - x0) / 1.6,
                                               "height": (y1 - y0) / 1.6, "rotation": 0}}
    results = predict(client, [task(1, "scene_0.png")], params={"context": {"result": [drawn]}})
    regions = [r for r in results[0]["result"] if r["type"] == "rectanglelabels"]
    assert len(regions) == 1
    assert regions[0]["value"]["rectanglelabels"][0] in KNOWN_SHAPES
    assert regions[0]["value"]["x"] == pytest.approx(x0 / 1.6, abs=0.01)
    assert LabelInterface(CONFIG).validate_prediction(results[0], return_errors=True) == []


@pytest.mark.parametrize("body, status", [
    (b"not json", 400), (b"[]", 400), (b'{"tasks": "x"}', 400), (b'{"tasks": []}', 400),
    (b'{"tasks": [1, 2]}', 400), (b'{"tasks": [{"id": 1, "data": {}}]}', 400),
])
def test_malformed_predict_requests_get_a_json_4xx(client, body, status):
    response = client.post("/predict", data=body, content_type="application/json")
    assert response.status_code == status and "error" in response.get_json()


def test_predict_accepts_null_params_unknown_keys_and_config_only_in_the_project(client):
    tasks = [{**task(1, "scene_0.png"), "project": {"id": 1, "label_config": CONFIG}}]
    response = client.post("/predict", json={"tasks": tasks, "params": None, "future": True})
    assert response.status_code == 200 and len(response.get_json()["results"]) == 1


def test_config_without_image_is_a_clear_400_and_partial_configs_warn(client):
    bad = client.post("/setup", json={"schema": "<View><Text name='t' value='$text'/></View>"})
    assert bad.status_code == 400 and "Image" in bad.get_json()["error"]
    partial = CONFIG.replace("</View>", '<TextArea name="notes" toName="image"/></View>')
    answer = client.post("/setup", json={"schema": partial}).get_json()
    assert answer["model_version"] and any("notes" in w for w in answer["warnings"])


@pytest.mark.parametrize("event", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                                   "ANNOTATIONS_DELETED", "START_TRAINING", "PROJECT_UPDATED", "SOMETHING_NEW"])
def test_webhook_acknowledges_every_event_within_a_second(client, event):
    start = time.perf_counter()
    response = client.post("/webhook", json={"action": event, "project": {"id": 1, "label_config": CONFIG}})
    learns = event not in ("PROJECT_UPDATED", "SOMETHING_NEW")
    # nothing to check it against (no Label Studio API, no URL_SECRET or Basic Auth): refused, and said so
    assert response.status_code == (403 if learns else 201)
    assert response.get_json()["status"] == ("refused" if learns else "ignored")
    assert time.perf_counter() - start < 1.0
    assert client.post("/webhook", data=b"{", content_type="application/json").status_code == 400


def test_oversized_body_is_refused_with_json(client):
    response = client.post("/predict", data=b"{" + b" " * (51 * 1024 * 1024) + b"}",
                           content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_tasks_without_readable_files_never_take_the_server_down(client, image_dir):
    (Path(image_dir) / "zero.png").write_bytes(b"")
    (Path(image_dir) / "tiny.png").write_bytes(_png_bytes())
    results = predict(client, [task(1, "zero.png"), task(2, "tiny.png"), task(3, "../etc/passwd")])
    assert len(results) == 3 and results[0]["result"] == [] and results[2]["result"] == []
    assert client.get("/health").status_code == 200
