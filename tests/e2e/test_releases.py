"""An end-to-end subset against older Label Studio releases users still run ($LS_RELEASES, default 1.16.0, before
personal access tokens, and 1.20.0, PAT-era): connect, retrieve predictions, retrieve again, an annotation
webhook, Start Training, and (where the release has them) a personal access token with legacy tokens off.

Each release runs from its own venv (scripts/setup.sh builds them) with the fixtures and helpers of
test_end_to_end.py; test ids carry the release, and the terminal summary lists each release's outcome.
Checks a release cannot have are skipped as "not applicable", never passed.

    bash scripts/test.sh tests/e2e/test_releases.py
"""

from __future__ import annotations

import os

import pytest
from label_studio_sdk.label_interface import LabelInterface

from .conftest import start_label_studio
from .label_studio import LEGACY_TOKEN, has_pats
from .test_end_to_end import (
    N_UPLOADED,
    event_logged,
    predictions_by_task,
    rectangles,
    setup_project,
    start_backend,
)

RELEASES = os.environ.get("LS_RELEASES", "1.16.0 1.20.0").split()


@pytest.fixture(scope="module", params=RELEASES)
def old_ls(request, tmp_path_factory):
    ls = start_label_studio(tmp_path_factory, request.param)
    yield ls
    ls.stop()


@pytest.fixture(scope="module")
def old_backend(old_ls, tmp_path_factory, e2e_timings):
    process = start_backend(tmp_path_factory, f"ls-{old_ls.version}-legacy", old_ls, LEGACY_TOKEN, e2e_timings)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def old_flow(old_ls, old_backend, demo_data):
    images = sorted((demo_data / "images").glob("*.png"))[:4]
    state = setup_project(old_ls, old_backend, demo_data, f"e2e {old_ls.version}", images, [])
    state.retrieve = old_ls.retrieve_predictions(state.project_id)
    return state


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from backend.demo.demo_data import write_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    write_demo_data(out, N_UPLOADED + 1, 6000)
    return out


def test_connects(old_ls, old_backend, old_flow):
    ml = old_ls.ml_backend(old_flow.ml["id"])
    assert ml["state"] == "CO", ml
    assert ml["model_version"].startswith("clip-"), ml
    assert old_backend.log_lines(r"POST /setup")


def test_retrieve_predictions(old_ls, old_backend, old_flow):
    assert old_flow.retrieve["processed_items"] == len(old_flow.tasks), old_flow.retrieve
    version = old_ls.ml_backend(old_flow.ml["id"])["model_version"]
    interface = LabelInterface(old_flow.config)
    for task_id, preds in predictions_by_task(old_ls, old_flow.tasks).items():
        assert len(preds) == 1, (task_id, preds)
        assert preds[0]["model_version"] == version
        assert interface.validate_prediction(preds[0], return_errors=True) == [], preds[0]
        assert rectangles(preds[0]["result"]), "uploaded image not read: no boxes"
    assert not old_backend.log_lines(r"no prediction|refused"), old_backend.log_tail()


def test_retrieve_again_adds_nothing(old_ls, old_backend, old_flow):
    before = {t: [p["id"] for p in preds] for t, preds in predictions_by_task(old_ls, old_flow.tasks).items()}
    mark = old_backend.log_mark()
    assert old_ls.retrieve_predictions(old_flow.project_id)["processed_items"] == len(old_flow.tasks)
    after = {t: [p["id"] for p in preds] for t, preds in predictions_by_task(old_ls, old_flow.tasks).items()}
    assert after == before
    assert old_backend.log_lines(r"POST /predict", since=mark) == []


def test_annotation_webhook(old_ls, old_backend, old_flow):
    task = old_flow.tasks[0]
    [pred] = old_ls.predictions(task["id"])
    result = [{**region, "origin": "prediction"} for region in pred["result"]]
    mark = old_backend.log_mark()
    old_ls.create_annotation(task["id"], result, parent_prediction=pred["id"], lead_time=2.0)
    event_logged(old_backend, "ANNOTATION_CREATED", mark)
    assert old_backend.log_lines(r'"POST /webhook HTTP/1\.[01]" 20[01]', since=mark), old_backend.log_tail()
    # the backend believes a webhook only once it read the annotation back through this release's API
    old_backend.wait_for_log(rf"project {old_flow.project_id}: learned from 1 annotation", since=mark, timeout=60)


def test_start_training(old_ls, old_backend, old_flow):
    mark = old_backend.log_mark()
    r = old_ls.request("POST", f"/api/ml/{old_flow.ml['id']}/train")
    assert r.status_code in (200, 201), r.text
    event_logged(old_backend, "START_TRAINING", mark)
    assert old_ls.ml_backend(old_flow.ml["id"])["state"] != "ER"


def test_personal_access_token_with_legacy_tokens_off(old_ls, demo_data, tmp_path_factory, e2e_timings):
    if not has_pats(old_ls.version):
        pytest.skip(f"not applicable: Label Studio {old_ls.version} has no personal access tokens")
    with old_ls.legacy_tokens_off() as pat:
        backend = start_backend(tmp_path_factory, f"ls-{old_ls.version}-pat", old_ls, pat, e2e_timings)
        try:
            images = sorted((demo_data / "images").glob("*.png"))[:2]
            state = setup_project(old_ls, backend, demo_data, f"e2e PAT {old_ls.version}", images, [])
            upload = state.tasks[0]["data"]["image"]
            assert old_ls.download(upload, auth=f"Token {LEGACY_TOKEN}").status_code == 401  # legacy really off
            assert old_ls.retrieve_predictions(state.project_id)["processed_items"] == len(images)
            for task in state.tasks:
                [pred] = old_ls.predictions(task["id"])
                assert rectangles(pred["result"]), "uploaded image not read with the PAT: no boxes"
            assert not backend.log_lines(r"no prediction|refused"), backend.log_tail()
        finally:
            backend.stop()
    assert old_ls.jwt_settings()["legacy_api_tokens_enabled"] is True
