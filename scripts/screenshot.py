"""Take docs/screenshot.png: Label Studio's labeling editor showing a scene pre-annotated by this backend.

    source scripts/env.sh && bash scripts/setup.sh --with-chromium   # once: venvs + Debian's chromium
    "$VENV/bin/python" scripts/screenshot.py [--out docs/screenshot.png] [--keep]

What it does: starts a real Label Studio (the e2e harness, tests/e2e/label_studio.py, from its cached
template) and our backend as a real process (`python -m backend serve --demo`, tests/e2e/backend_process.py),
creates a project with the demo config, uploads a few shape scenes, connects the backend and runs
"Retrieve predictions"; then logs in through the login form, hands the session cookie to headless
Chromium and photographs `/projects/ID/data?task=TASK_ID` (the Data Manager with the task open in the
editor, with the editor's "Show region labels" setting on) once the image and the predicted boxes are drawn.
Everything runs on 127.0.0.1 and is stopped
at the end (by PID); `--keep` leaves the work dir (logs) in place.

No extra Python package: Chromium is driven over the DevTools protocol through `--remote-debugging-pipe`
(NUL-separated JSON on file descriptors 3 and 4), so neither Selenium nor a websocket client is needed.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from backend.demo.demo_data import write_demo_data  # noqa: E402
from tests.e2e.backend_process import BackendProcess  # noqa: E402
from tests.e2e.label_studio import LEGACY_TOKEN, LabelStudio  # noqa: E402

WIDTH, HEIGHT = 1400, 900
MAX_BYTES = 480 * 1024  # docs/screenshot.png stays under 500 KB
SEED, SCENES, SHOWN = 6000, 4, 0  # SHOWN: index of the uploaded scene photographed (a busy one)
# The editor's own setting "Show region labels" (kept in localStorage), so each box shows its label.
EDITOR_SETTINGS_JS = "localStorage.setItem('labelStudio:settings', JSON.stringify({showLabels: true}));"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--no-default-browser-check",
    f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe",
]  # fmt: skip
# Ready when the editor's canvas is there, the task image has loaded, and the region list shows the
# predicted regions (Label Studio's editor lists one entry per region in its side panel).
READY_JS = """(() => {
  const imgs = [...document.querySelectorAll('img')];
  const canvases = document.querySelectorAll('canvas').length;
  // the task image, drawn large in the editor (the Data Manager's thumbnails load lazily)
  const loaded = imgs.some(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 300);
  const text = document.body ? document.body.innerText : '';
  return JSON.stringify({canvases, imgs: imgs.length, loaded, text: text.slice(0, 4000)});
})()"""


def find_chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):  # fmt: skip
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("chromium not found: `bash scripts/setup.sh --with-chromium` (Debian's chromium package) or set CHROMIUM")


class DevTools:
    """The DevTools protocol over --remote-debugging-pipe: requests on fd 3, answers and events on fd 4."""

    def __init__(self, chromium: str, user_data_dir: Path, log_path: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The child must see our pipe ends as its fds 3 (reads commands) and 4 (writes answers). Python's
        # own fds are close-on-exec, so with close_fds=False only these two (dup2 clears the flag) pass.
        def child_fds():
            high_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            close_fds=False, preexec_fn=child_fds,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):   # already gone: it is closed either way
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.log.close()


def prepare(ls: LabelStudio, backend: BackendProcess, data: Path) -> tuple[int, int, dict]:
    """Project, uploads, backend connected, predictions retrieved: (project id, task id, its prediction)."""
    config = (data / "label_config.xml").read_text()
    project = ls.create_project("Shapes (pre-annotated by CLIP)", config)
    images = sorted((data / "images").glob("*.png"))
    ls.import_files(project["id"], images)
    ml = ls.connect_ml_backend(project["id"], backend.url, title="CLIP")
    print(f"backend connected: state {ml['state']}, version {ml['model_version']}")
    print("retrieve:", ls.retrieve_predictions(project["id"]))
    # Show the backend's predictions in the editor: the project's model version is the backend's.
    ls.update_project(project["id"], model_version=ls.ml_backend(ml["id"])["model_version"],
                      show_collab_predictions=True)  # fmt: skip
    tasks = sorted(ls.tasks(project["id"]), key=lambda t: t["id"])
    task = tasks[SHOWN]
    [prediction] = ls.predictions(task["id"])
    return project["id"], task["id"], prediction


def photograph(ls: LabelStudio, url: str, out: Path, workdir: Path, expect: list[str], timeout: float = 90) -> None:
    chrome = DevTools(find_chromium(), workdir / "chromium-profile", workdir / "chromium.log")
    try:
        cookies = [{"name": k, "value": v, "domain": "127.0.0.1", "path": "/"} for k, v in ls.session_cookies().items()]
        chrome.send("Storage.setCookies", {"cookies": cookies})
        target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        chrome.send("Emulation.setDeviceMetricsOverride",
                    {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        chrome.send("Page.enable", session=session)
        chrome.send("Page.addScriptToEvaluateOnNewDocument", {"source": EDITOR_SETTINGS_JS}, session)
        chrome.send("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + timeout
        state: dict = {}
        while time.monotonic() < deadline:
            time.sleep(1)
            value = chrome.send("Runtime.evaluate", {"expression": READY_JS, "returnByValue": True}, session)
            state = json.loads(value["result"].get("value") or "{}")
            if state.get("canvases") and state.get("loaded") and all(label in state["text"] for label in expect):
                break
        else:
            print(f"warning: the editor did not look ready after {timeout:.0f} s: {state}", file=sys.stderr)
        time.sleep(2)  # let the canvas finish drawing the regions
        shot = chrome.send("Page.captureScreenshot", {"format": "png"}, session)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        shrink(out)
    finally:
        chrome.close()


def shrink(png: Path, limit: int = MAX_BYTES) -> None:
    """Textured scenes compress badly: above the limit, re-save with a 256-colour palette (~4x smaller)."""
    if png.stat().st_size <= limit:
        return
    from PIL import Image

    with Image.open(png) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(png, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, data)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="clip-ls-screenshot-"))
    data = workdir / "demo-data"
    write_demo_data(data, SCENES, SEED)
    ls = LabelStudio(workdir / "label-studio")
    backend = BackendProcess(workdir / "backend", env={"LABEL_STUDIO_API_KEY": LEGACY_TOKEN})
    try:
        ls.start()
        backend.extra_env["LABEL_STUDIO_URL"] = ls.url
        backend.start()
        print(f"Label Studio {ls.url} (start {ls.timings['start_s']:.1f} s), backend {backend.url}"
              f" (start {backend.timings['start_s']:.1f} s)")  # fmt: skip
        project_id, task_id, prediction = prepare(ls, backend, data)
        labels = sorted({r["value"]["rectanglelabels"][0] for r in prediction["result"]
                         if r["type"] == "rectanglelabels"})  # fmt: skip
        print(f"task {task_id}: {len(prediction['result'])} predicted regions, labels {labels}")
        url = f"{ls.url}/projects/{project_id}/data?task={task_id}"
        out = Path(args.out)
        photograph(ls, url, out, workdir, labels)
        print(f"wrote {out} ({out.stat().st_size // 1024} KB) of {url}")
    finally:
        backend.stop()
        ls.stop()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
