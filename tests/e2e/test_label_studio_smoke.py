"""Smoke test of the real Label Studio harness: start, project, uploads, and every kind of auth."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from .label_studio import LEGACY_TOKEN

pytestmark = pytest.mark.e2e

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Bee"/>
    <Label value="Flower"/>
  </RectangleLabels>
  <Choices name="scene" toName="image">
    <Choice value="Indoor"/>
    <Choice value="Outdoor"/>
  </Choices>
</View>
"""


def test_label_studio_smoke(label_studio, tmp_path):
    ls = label_studio
    timings = dict(ls.timings)

    paths = []
    for name, colour in [("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200))]:
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
        paths.append(tmp_path / name)

    t0 = time.monotonic()
    project = ls.create_project("smoke", LABEL_CONFIG)
    imported = ls.import_files(project["id"], paths)
    tasks = ls.tasks(project["id"])
    timings["project+import_s"] = time.monotonic() - t0
    assert imported["task_count"] == 2
    assert len(tasks) == 2
    uploads = sorted(task["data"]["image"] for task in tasks)
    for upload in uploads:
        assert upload.startswith(f"/data/upload/{project['id']}/"), upload
    assert sorted(u.rsplit("-", 1)[-1] for u in uploads) == ["blue.png", "red.png"]

    upload = next(t["data"]["image"] for t in tasks if t["data"]["image"].endswith("-red.png"))
    assert ls.download(upload, auth=None).status_code == 401
    r = ls.download(upload)
    assert r.status_code == 200
    assert r.content == paths[0].read_bytes()

    t0 = time.monotonic()
    pat = ls.personal_access_token()
    access = ls.access_token(pat)
    timings["pat+access_s"] = time.monotonic() - t0
    assert ls.download(upload, auth=f"Bearer {access}").status_code == 200
    assert ls.download(upload, auth=f"Bearer {pat}").status_code == 401  # a PAT is no access token

    # Legacy tokens off: the legacy token is refused, JWTs still work. Restored for later tests.
    bearer = f"Bearer {access}"
    try:
        ls.set_token_settings(legacy=False, auth=bearer)
        assert ls.download(upload, auth=f"Token {LEGACY_TOKEN}").status_code == 401
        assert ls.request("GET", f"/api/projects/{project['id']}").status_code == 401
        assert ls.download(upload, auth=bearer).status_code == 200
    finally:
        ls.set_token_settings(legacy=True, auth=bearer)
    assert ls.jwt_settings()["legacy_api_tokens_enabled"] is True

    print("timings (s):", {k: round(v, 2) for k, v in timings.items()})
