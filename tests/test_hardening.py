"""Whatever reaches the backend, it answers and keeps serving: property-based tests of the request parsing and
of the labeling-config parser, every kind of bad image and URL through /predict on the real (tiny) models, Basic
Auth on every route, and paths that try to leave the local-files root.

Image hosts are HTTP servers in threads on 127.0.0.1 / 127.0.0.2 (loopback only).
"""
from __future__ import annotations

import base64
import io
import logging
import struct
import threading
import time
import zlib
from http.server import ThreadingHTTPServer

import pytest
from e2e.local_http import QuietHandler
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from backend.app import create_app
from backend.config import Settings
from backend.studio.label_config import LabelConfigError, ProjectConfig, parse_label_config

CONFIG = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="circle"/><Label value="square"/></RectangleLabels>
  <Choices name="scene" toName="image"><Choice value="circle"/><Choice value="square"/></Choices></View>"""
POST_ROUTES = ("/setup", "/predict", "/webhook")
NEVER = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies
json_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
                | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=15)
image_values = st.one_of(json_values, st.sampled_from([
    "", " ", "/data/upload/1/x.png", "upload/../../etc/passwd", "/data/local-files/?d=../../etc/passwd",
    "file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/", "javascript:alert(1)",
    "data:image/png;base64,AAAA", "s3://bucket/key.png", "http://", "http://[::1", "//127.0.0.1/x", "\x00",
    "http://127.0.0.1:1/x.png"]))
tasks = st.lists(st.fixed_dictionaries({}, optional={
    "id": json_values, "data": json_values | st.fixed_dictionaries({}, optional={"image": image_values}),
    "project": json_values | st.fixed_dictionaries({"label_config": st.just(CONFIG) | json_values}),
    "annotations": json_values, "predictions": json_values}), max_size=4)
label_configs = st.one_of(json_values, st.just(CONFIG), st.text(max_size=200),
                          st.just("<View><Text name='t' value='$text'/></View>"), st.just("<View>"))
contexts = st.one_of(json_values, st.fixed_dictionaries({"result": st.lists(st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["rectangle", "rectanglelabels", "keypointlabels"]) | json_values,
    "from_name": st.just("label") | json_values, "to_name": st.just("image") | json_values,
    "original_width": json_values, "original_height": json_values,
    "value": st.fixed_dictionaries({}, optional={k: json_values | st.floats(-1e9, 1e9)
                                                 for k in ("x", "y", "width", "height", "rotation")})}), max_size=3)}))
bodies = {
    "/predict": st.fixed_dictionaries({}, optional={
        "tasks": tasks | json_values, "label_config": label_configs, "project": json_values,
        "params": json_values | st.fixed_dictionaries({}, optional={"context": contexts, "login": json_values})}),
    "/setup": st.fixed_dictionaries({}, optional={
        "schema": label_configs, "project": json_values, "hostname": json_values | st.sampled_from(
            ["http://127.0.0.1:8080", "ftp://x", "not a url", "http://", ""]),
        "access_token": json_values, "extra_params": json_values}),
    "/webhook": st.fixed_dictionaries({}, optional={
        "action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_DELETED", "START_TRAINING", "X"]) | json_values,
        "project": json_values | st.fixed_dictionaries({"id": json_values, "label_config": label_configs}),
        "annotation": json_values, "task": json_values, "annotations": json_values})}


class ParsingOnlyBackend:
    """Stands in for the models where only the HTTP layer is under test: parses the config as the real one does."""

    def setup(self, label_config, project=None, hostname=None, access_token=None):
        parse_label_config(label_config)
        return {"model_version": "v"}

    def predict(self, tasks, label_config, project=None, context=None):
        parse_label_config(label_config)
        return [{"result": [], "score": 0.0, "model_version": "v"} for _ in tasks]

    def fit(self, event, data, authenticated=False):
        return {"status": "accepted", "event": event}


@pytest.fixture(scope="module")
def parsing_client():
    return create_app(Settings.from_env({}), ParsingOnlyBackend()).test_client()


def assert_answered(response, allowed=(200, 201, 400, 413, 415)):
    assert response.status_code in allowed, (response.status_code, response.get_data()[:300])
    body = response.get_json()
    assert isinstance(body, dict)
    if response.status_code >= 400:
        assert isinstance(body.get("error"), str) and body["error"]
    return body


# ---------------------------------------------------------------- webhooks on the real learning side
ids = json_values | st.integers(0, 2**70) | st.sampled_from(["12", "12.1716400000", " 7 ", "-1"])
annotations = st.fixed_dictionaries({}, optional={
    "id": ids, "task": ids | st.fixed_dictionaries({"id": ids}), "result": json_values,
    "was_cancelled": json_values, "updated_at": json_values, "created_at": json_values, "prediction": json_values})
webhook_tasks = st.fixed_dictionaries({}, optional={"id": ids, "data": json_values})
webhooks = st.fixed_dictionaries({
    "action": st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED",
                               "ANNOTATIONS_DELETED", "TASKS_DELETED", "START_TRAINING", "PROJECT_UPDATED"]),
    "project": ids | st.fixed_dictionaries({"id": ids}, optional={"label_config": st.just(CONFIG) | json_values}),
}, optional={"annotation": annotations | json_values, "annotations": st.lists(annotations, max_size=3) | json_values,
             "task": webhook_tasks | json_values, "tasks": st.lists(webhook_tasks, max_size=3) | json_values})


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    """The real webhook handling and store; the jobs it queues are only collected (test_learning runs them)."""
    from backend.jobs import InProcessJobs
    from backend.learning import Learning
    from backend.store import SqliteStore

    return Learning(SqliteStore(tmp_path_factory.mktemp("state")), InProcessJobs(lambda kind, payload: None),
                    "space", clip=None)


@NEVER
@given(body=webhooks)
@example(body={"action": "TASKS_DELETED", "project": 1, "tasks": [{"id": [1]}]})
@example(body={"action": "ANNOTATIONS_DELETED", "project": 2**70, "annotations": [{"id": 1}]})
@example(body={"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
               "annotation": {"id": 1, "task": [1], "was_cancelled": True}, "task": {"id": 1}})
def test_any_webhook_payload_is_handled_not_failed(learning, body):
    answer = learning.handle(body["action"], body, authenticated=True)
    assert answer["status"] in ("ignored", "queued", "done"), answer


# ---------------------------------------------------------------- the HTTP layer, property-based
@NEVER
@given(route=st.sampled_from(POST_ROUTES), data=st.data())
def test_any_json_body_gets_a_json_answer_never_a_500(parsing_client, route, data):
    body = data.draw(bodies[route] | json_values)
    response = parsing_client.post(route, json=body)
    answer = assert_answered(response)
    if route == "/predict" and response.status_code == 200:
        assert len(answer["results"]) == len(body["tasks"])


@NEVER
@given(route=st.sampled_from(POST_ROUTES), raw=st.binary(max_size=300),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "multipart/form-data; boundary=x", "application/json; charset=latin-1", ""]))
def test_any_bytes_with_any_content_type_get_a_json_answer(parsing_client, route, raw, content_type):
    assert_answered(parsing_client.post(route, data=raw, content_type=content_type))


@pytest.mark.parametrize("raw", [b"\xff\xfe{", b'{"tasks": [' * 5000,
                                 b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 b'{"tasks": NaN}', b'{"tasks": [{"id": 1e999}]}', b'\x00' * 1000])
def test_pathological_json_is_a_400(parsing_client, raw):
    for route in POST_ROUTES:
        assert_answered(parsing_client.post(route, data=raw, content_type="application/json"), allowed=(200, 201, 400))


def test_enormous_bodies_are_refused_before_parsing(parsing_client):
    response = parsing_client.post("/predict", data=b"[" * (51 * 1024 * 1024), content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()


def test_wrong_methods_and_unknown_routes_are_json(parsing_client):
    for method, route, status in [("get", "/predict", 405), ("put", "/setup", 405), ("delete", "/webhook", 405),
                                  ("get", "/../../etc/passwd", 404), ("get", "/train", 404), ("post", "/health", 405)]:
        response = getattr(parsing_client, method)(route)
        assert response.status_code == status and "error" in response.get_json()


# ---------------------------------------------------------------- the labeling config parser, property-based
TAGS = ["View", "Image", "RectangleLabels", "Choices", "Label", "Choice", "Text", "TextArea", "PolygonLabels",
        "Header", "KeyPointLabels", "Labels", "Rectangle", "Style"]
ATTRS = ["name", "toName", "value", "choice", "model_score_threshold", "model_background", "model_prompt",
         "model_prompt_template", "predicted_values", "model_skip", "alias", "valueType"]
attr_values = st.one_of(st.sampled_from(["image", "$image", "label", "$img", "multiple", "single", "0.5", "-1",
                                         "nan", "1e309", "true", "a photo of a {}.", "{}", "{0}{1}", ";;", ""]),
                        st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12))


@st.composite
def elements(draw, depth=0):
    tag = draw(st.sampled_from(TAGS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), attr_values, max_size=4))
    from xml.sax.saxutils import quoteattr

    attributes = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    children = draw(st.lists(elements(depth + 1), max_size=3)) if depth < 3 else []
    return f"<{tag}{attributes}>{''.join(children)}</{tag}>"


def check_config(xml: str):
    try:
        config = parse_label_config(xml)
    except LabelConfigError as error:
        assert str(error)
        return None
    assert isinstance(config, ProjectConfig) and config.controls
    assert isinstance(config.fingerprint, str) and config.fingerprint == parse_label_config(xml).fingerprint
    for control in config.controls:
        assert control.labelset.labels and control.type in ("rectanglelabels", "choices")
        assert control.to_name and control.value_key
    return config


@NEVER
@given(st.lists(elements(), min_size=1, max_size=4))
def test_any_tree_of_tags_parses_or_is_a_clear_config_error(children):
    check_config(f"<View>{''.join(children)}</View>")


@NEVER
@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_clear_config_error(text):
    check_config(text)


@NEVER
@given(st.text(max_size=200).map(lambda s: CONFIG[:len(CONFIG) // 2] + s))
def test_truncated_and_garbled_configs_are_clear_errors(xml):
    check_config(xml)


def test_configs_without_an_image_or_a_usable_control_are_a_400_with_the_reason(parsing_client):
    for schema, words in [("<View><Text name='t' value='$text'/></View>", "Image"),
                          ("<View><Image name='image' value='$image'/><TextArea name='n' toName='image'/></View>", ""),
                          ("<View/>", ""), ("", ""),
                          ("<?xml version='1.0'?><!DOCTYPE v [<!ENTITY x 'y'>]><View/>", "")]:
        response = parsing_client.post("/setup", json={"schema": schema})
        assert response.status_code == 400 and words in response.get_json()["error"]
        predict = parsing_client.post("/predict", json={"tasks": [{"id": 1, "data": {}}], "label_config": schema})
        assert predict.status_code == 400


def test_enormous_configs_are_refused_before_parsing(parsing_client):
    huge = CONFIG.replace("</View>", "<!--" + "x" * 3_000_000 + "--></View>")
    assert parsing_client.post("/setup", json={"schema": huge}).status_code == 400
    response = parsing_client.post("/predict", json={"tasks": [{"id": 1}], "label_config": huge})
    assert response.status_code == 400 and "limit" in response.get_json()["error"]


def test_xml_entity_bombs_are_refused_at_once():
    bomb = ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY a{i} "{("&a;" if i == 1 else f"&a{i - 1};") * 10}">' for i in range(1, 10))
        + ']><View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="&a9;"/>'
        '</Choices></View>')
    started = time.perf_counter()
    with pytest.raises(LabelConfigError):
        parse_label_config(bomb)
    assert time.perf_counter() - started < 1


# ---------------------------------------------------------------- image decoding, property-based
def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()


SAMPLES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")}


@st.composite
def damaged_images(draw):
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(1, 6))):
        kind, at = draw(st.sampled_from(["flip", "cut", "insert"])), draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            data = data[:max(at, 1)]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


@settings(deadline=None, max_examples=300)
@given(damaged_images() | st.binary(max_size=200))
def test_any_damaged_image_decodes_or_is_a_clear_decode_error(data):
    import warnings

    from backend.labeling.decode import ImageDecodeError, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Pillow warns about what it repairs
        try:
            pixels = decode_image(data, max_pixels=4_000_000)
        except ImageDecodeError as error:
            assert str(error)
            return
    assert pixels.dtype.is_floating_point is False and pixels.ndim == 3 and pixels.shape[0] == 3


# ---------------------------------------------------------------- bad images through the real tiny models
def png(width=96, height=96, colour=(200, 30, 30)) -> bytes:
    image = Image.new("RGB", (width, height), (20, 90, 20))
    image.paste(Image.new("RGB", (width // 3, height // 3), colour), (width // 4, height // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's signature), with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))


def scene_png(seed: int = 3000) -> bytes:
    from backend.demo.shapes import scenes

    buffer = io.BytesIO()
    next(scenes(seed, 1)).image.save(buffer, "PNG")
    return buffer.getvalue()


GOOD = scene_png()   # a demo scene: the tiny models find objects in it
FILES = {
    "/ok.png": GOOD,
    "/corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "/truncated.png": GOOD[: len(GOOD) // 2],
    "/empty.png": b"",
    "/bomb.png": png_header_only(60_000, 60_000),
    "/text.png": b"<html>not an image</html>",
    "/huge.png": b"\x89PNG" + b"\x00" * 300_000,
}


class Handler(QuietHandler):
    def do_GET(self):  # noqa: N802
        try:
            path = self.path.split("?")[0]
            if path == "/slow.png":          # drips bytes far slower than IMAGE_TIMEOUT allows
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD)))
                self.end_headers()
                for i in range(0, len(GOOD), 64):
                    self.wfile.write(GOOD[i:i + 64])
                    self.wfile.flush()
                    time.sleep(0.5)
                return
            if path == "/hang.png":          # accepts, then never answers within the timeout
                time.sleep(6)
            if path == "/to-file":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
                return
            if path == "/server-error.png":
                self.send_response(500)
                self.end_headers()
                return
        except (BrokenPipeError, ConnectionResetError):
            return
        self.send_body(FILES.get(path))


@pytest.fixture(scope="module")
def image_hosts():
    servers = []
    for address in ("127.0.0.1", "127.0.0.2"):
        server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128})((address, 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
    yield [f"http://{s.server_address[0]}:{s.server_address[1]}" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("hardening")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(GOOD)
    (base / "secret.png").write_bytes(png(colour=(30, 30, 200)))   # outside the root: must never be read
    (root / "escape.png").symlink_to(base / "secret.png")
    return root


@pytest.fixture(scope="module")
def real_backend(local_root, tmp_path_factory):
    from backend.labeling.factory import build_labeler
    from backend.model import ClipBackend

    settings = Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(local_root), "IMAGE_TIMEOUT": "2.5",
                                  "IMAGE_MAX_BYTES": "200000", "MAX_IMAGE_PIXELS": "4000000",
                                  "ALLOWED_HOSTS": "127.0.0.1", "ALLOW_PRIVATE_HOSTS": "127.0.0.0/8",
                                  "FEATURE_CACHE_MB": "0",
                                  "MODEL_DIR": str(tmp_path_factory.mktemp("state"))}, demo=True)
    return ClipBackend(settings, build_labeler(settings.model_spec()))


@pytest.fixture
def real_client(real_backend):
    return create_app(real_backend.settings, real_backend).test_client()


def predict(client, tasks, **extra):
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "1.1", **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def test_every_bad_image_gets_an_empty_result_with_a_logged_reason(real_client, image_hosts, caplog):
    main, other = image_hosts
    bad = [  # (the image, words its log line must contain)
        (f"{main}/corrupt.png", "cannot decode"), (f"{main}/truncated.png", "truncated"),
        (f"{main}/empty.png", "0 bytes"), (f"{main}/bomb.png", "pixels"),
        (f"{main}/text.png", "cannot decode"), (f"{main}/huge.png", "larger than the limit"),
        (f"{main}/slow.png", "timed out"), (f"{main}/hang.png", "timed out"), (f"{main}/missing.png", "not found"),
        (f"{main}/server-error.png", "HTTP 500"), (f"{main}/to-file", "only http(s) URLs"),
        (f"{other}/ok.png", "not an allowed image host"), ("file:///etc/passwd", "refused"),
        ("ftp://127.0.0.1/x.png", "refused"), ("gopher://127.0.0.1:70/", "refused"),
        ("http://127.0.0.1:1/x.png", "connection refused"), ("http://[::1/x.png", "malformed"),
        ("/data/local-files/?d=ok.png%00.txt", "malformed"),
    ]
    tasks = [{"id": 1, "data": {"image": f"{main}/ok.png"}}]
    tasks += [{"id": 100 + i, "data": {"image": url}} for i, (url, _) in enumerate(bad)]
    caplog.set_level(logging.WARNING)
    started = time.perf_counter()
    results = predict(real_client, tasks)
    assert time.perf_counter() - started < 30          # slow hosts cost their timeout, concurrently
    assert len(results) == len(tasks)
    assert results[0]["result"], "the good image still gets its prediction"
    for i, (url, words) in enumerate(bad):
        assert results[i + 1]["result"] == [] and results[i + 1]["model_version"] == results[0]["model_version"]
        lines = [m for m in caplog.messages if f"task {100 + i}:" in m]
        assert lines and words.strip().lower() in lines[0].lower(), (url, lines)
    assert real_client.get("/health").status_code == 200
    assert predict(real_client, tasks[:1])[0]["result"]       # and keeps serving


def test_extreme_image_shapes_are_labelled_like_any_other(real_client, image_hosts, caplog):
    """1 x 1 px and slivers (1 x 3000 px: the detector's resize would make them 0 px) get a prediction."""
    caplog.set_level(logging.WARNING)
    tasks = []
    for i, (width, height) in enumerate([(1, 1), (3000, 1), (1, 3000), (2, 2000), (3000, 40)]):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
        FILES[f"/shape-{width}x{height}.png"] = buffer.getvalue()
        tasks.append({"id": 200 + i, "data": {"image": f"{image_hosts[0]}/shape-{width}x{height}.png"}})
    results = predict(real_client, tasks + [{"id": 2, "data": {"image": f"{image_hosts[0]}/ok.png"}}])
    assert all(isinstance(r["result"], list) for r in results) and results[-1]["result"]
    assert not [m for m in caplog.messages if "no prediction" in m], caplog.messages


def test_an_image_the_models_fail_on_costs_only_its_task(real_client, real_backend, image_hosts, caplog,
                                                         monkeypatch):
    """Fault injection: the models raise on one image size. Its task gets an empty result with the reason; the
    other images of the request, labelled in the same batch at first, still get theirs."""
    features = real_backend.labeler.features

    def failing(pixels, *args, **kwargs):
        if any(tuple(p.shape[1:]) == (7, 9) for p in pixels if p is not None):
            raise RuntimeError("injected failure")
        return features(pixels, *args, **kwargs)

    monkeypatch.setattr(real_backend.labeler, "features", failing)
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7)).save(buffer, "PNG")
    FILES["/seven-by-nine.png"] = buffer.getvalue()
    caplog.set_level(logging.WARNING)
    good = {"id": 2, "data": {"image": f"{image_hosts[0]}/ok.png"}}
    results = predict(real_client, [{"id": 300, "data": {"image": f"{image_hosts[0]}/seven-by-nine.png"}}, good])
    assert results[0]["result"] == [] and results[1]["result"]
    assert [m for m in caplog.messages if "task 300:" in m and "injected failure" in m]


@pytest.mark.parametrize("task", [
    {"id": 1}, {"id": 1, "data": None}, {"id": 1, "data": "image.png"}, {"id": 1, "data": ["a"]},
    {"id": 1, "data": {"image": None}}, {"id": 1, "data": {"image": 42}}, {"id": 1, "data": {"image": ["x"]}},
    {"id": 1, "data": {"image": {"url": "x"}}}, {"id": 1, "data": {"image": "   "}}, {"id": 1, "data": {"img": "x"}},
    {"id": "one", "data": {"image": "file:///etc/passwd"}}, {"id": None, "data": {"image": "x" * 100_000}},
    {"id": [1], "data": {"image": "s3://bucket/key.png"}}, {"data": {"image": "/data/upload/1/x.png"}},
])
def test_wrong_types_in_tasks_cost_only_their_task(real_client, image_hosts, task):
    good = {"id": 2, "data": {"image": f"{image_hosts[0]}/ok.png"}}
    results = predict(real_client, [task, good])
    assert results[0]["result"] == [] and results[1]["result"]


@pytest.mark.parametrize("d", ["../secret.png", "sub/../../secret.png", "escape.png", "/etc/passwd",
                               "%2e%2e/secret.png", "..%2Fsecret.png", "sub/%2e%2e/%2e%2e/secret.png",
                               "....//secret.png",
                               "ok.png\x00.txt"])
def test_local_file_paths_cannot_leave_the_root(real_client, d, caplog):
    caplog.set_level(logging.WARNING)
    from urllib.parse import quote

    for value in (f"/data/local-files/?d={d}", f"/data/local-files/?d={quote(d)}"):
        [result] = predict(real_client, [{"id": 7, "data": {"image": value}}])
        assert result["result"] == []     # nothing from outside the root (no LS to fall back to, either)
    [inside] = predict(real_client, [{"id": 8, "data": {"image": "/data/local-files/?d=ok.png"}}])
    assert inside["result"]


class CountingFetcher:
    """A fetcher that answers every URL with an error, so any task shape can be tried without a network."""

    def fetch_many(self, items, max_workers=8):
        from backend.studio.images import ImageFetchError

        return [GOOD if url == "good" else ImageFetchError(f"no such image {url!r}") for url, _ in items]

    def use_setup_values(self, hostname, access_token):
        pass


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=bodies["/predict"])
def test_any_predict_body_on_the_real_backend_never_fails_the_request(real_backend, body):
    real_fetcher, real_backend.fetcher = real_backend.fetcher, CountingFetcher()
    try:
        client = create_app(real_backend.settings, real_backend).test_client()
        response = client.post("/predict", json=body)
        answer = assert_answered(response, allowed=(200, 400))
        if response.status_code == 200:
            assert isinstance(answer["results"], list)
            assert len(answer["results"]) <= len(body["tasks"])   # one for all, or one when over the budget
            for result in answer["results"]:
                assert isinstance(result["result"], list) and "model_version" in result
    finally:
        real_backend.fetcher = real_fetcher


# ---------------------------------------------------------------- Basic Auth
def auth(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def guarded():
    settings = Settings.from_env({"BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "pä ss:word"})
    return create_app(settings, ParsingOnlyBackend()).test_client()


@pytest.mark.parametrize("method, route", [("get", "/"), ("post", "/setup"), ("post", "/predict"),
                                           ("post", "/webhook"), ("get", "/train"),
                                           ("get", "/nonexistent")])
def test_basic_auth_guards_every_route_but_health(guarded, method, route):
    body = {"schema": CONFIG, "tasks": [{"id": 1, "data": {}}], "label_config": CONFIG, "action": "X"}
    for headers in ({}, auth("ls", "wrong"), auth("LS", "pä ss:word"), auth("ls", "pä ss:word2"), auth("", ""),
                    {"Authorization": "Bearer pä ss:word"}, {"Authorization": "Basic !!!notbase64"},
                    {"Authorization": "Basic " + base64.b64encode(b"ls").decode()}):
        response = getattr(guarded, method)(route, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.status_code)
        assert response.headers["WWW-Authenticate"].startswith("Basic") and "error" in response.get_json()
    allowed = getattr(guarded, method)(route, json=body, headers=auth("ls", "pä ss:word"))
    assert allowed.status_code != 401
    assert guarded.get("/health").status_code == 200      # Label Studio's health check carries no credentials


# ---------------------------------------------------------------- torch after gunicorn's fork
def test_request_threads_of_a_forked_worker_never_race_on_torchs_thread_pool():
    """gunicorn --preload forks the worker after torch ran in the master; without the at-fork rebuild in
    backend.model, concurrent first torch ops in request threads fail ("Invalid thread pool!") ~1 fork in 3."""
    import os

    import numpy as np
    import torch

    import backend.model  # noqa: F401 - registers the at-fork rebuild

    pixels = np.zeros((480, 640, 3), np.uint8)
    torch.from_numpy(pixels).permute(2, 0, 1).contiguous()      # the master uses torch's pool before forking
    failures = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:   # the child: 8 threads start torch work at the same moment, as a request burst would
            errors = []
            barrier = threading.Barrier(8)

            def work(barrier=barrier, errors=errors):
                barrier.wait()
                try:
                    for _ in range(3):
                        torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
                except RuntimeError as error:
                    errors.append(error)

            threads = [threading.Thread(target=work) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            os._exit(1 if errors else 0)
        _, status = os.waitpid(pid, 0)
        failures += os.waitstatus_to_exitcode(status) != 0
    assert failures == 0
