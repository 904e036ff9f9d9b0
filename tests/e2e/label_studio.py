"""A real Label Studio for end-to-end tests: start it headless, talk to its API, stop it.

Follows /work/shared/docs/label-studio-protocol.md §1. Label Studio lives in its own venv
(`$LS_VENV`, made by scripts/setup.sh) because its Django/redis/rq pins clash with ours.

Starting on an empty data dir costs ~30 s of migrations, so `label-studio init` runs once per
machine into a cached template (`$CLIP_LS_CACHE/ls-template-<version>`), and every instance
starts from a `cp -a` copy of it in a few seconds.

    with LabelStudio(tmp_dir) as ls:
        project = ls.create_project("bees", LABEL_CONFIG)
        ls.import_files(project["id"], [Path("a.png"), Path("b.png")])
        print(ls.tasks(project["id"]))

Requests authenticate with the fixed legacy token (`Authorization: Token ...`) unless a call
passes `auth=` (a full header value such as `"Bearer <jwt>"`, or None for no header). Inside
`with ls.legacy_tokens_off():` legacy tokens are switched off for the organisation and every
call made without `auth=` sends a fresh `Bearer` access token instead; on exit they are on again.
"""

from __future__ import annotations

import fcntl
import json
import mimetypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from .local_http import free_port

LS_VERSION = "1.23.2"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "Passw0rd!"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"

# Environment every Label Studio process gets (protocol §1): the first two let it reach an
# ML backend on 127.0.0.1; the rest keep it off the network and quiet.
LS_ENV = {
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "LATEST_VERSION_CHECK": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
}
# Same user, password, token and legacy-token switch on `init` (where they take effect:
# the user, its token and the organisation's legacy flag are created there) and on `start`.
USER_ARGS = [
    "--username", ADMIN_EMAIL,
    "--password", ADMIN_PASSWORD,
    "--user-token", LEGACY_TOKEN,
    "--enable-legacy-api-token",
]  # fmt: skip

_DEFAULT = object()  # "use the legacy token" marker for the auth= parameter
PAT_SINCE = (1, 20)  # the oldest release checked to have personal access tokens (1.16.0 has none)


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def has_pats(version: str) -> bool:
    """Personal access tokens, the legacy-token switch and `--enable-legacy-api-token` (absent before)."""
    return release(version) >= PAT_SINCE


def user_args(version: str) -> list[str]:
    return USER_ARGS if has_pats(version) else [a for a in USER_ARGS if a != "--enable-legacy-api-token"]


class LabelStudioError(RuntimeError):
    """Label Studio did not start, or an API call answered something unexpected."""


def cache_dir() -> Path:
    """`$CLIP_LS_CACHE`, default ~/.cache/clip-ls (as in scripts/env.sh)."""
    return Path(os.environ.get("CLIP_LS_CACHE") or Path.home() / ".cache" / "clip-ls")


def default_ls_venv() -> Path:
    """`$LS_VENV`, default `$CLIP_LS_CACHE/ls-<version>` (as in scripts/env.sh)."""
    return Path(os.environ.get("LS_VENV") or cache_dir() / f"ls-{LS_VERSION}")


def release_venv(version: str) -> Path:
    """The venv scripts/setup.sh builds for a release of $LS_RELEASES."""
    return default_ls_venv() if version == LS_VERSION else cache_dir() / f"ls-{version}"



def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (two test runs building the template at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ls_environ(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Settings of ours or of an outer Label Studio must not leak into the one under test.
    for key in ("LABEL_STUDIO_BASE_DATA_DIR", "DATABASE_NAME", "HOST", "LABEL_STUDIO_HOST", "PORT",
                "USERNAME", "PASSWORD", "USER_TOKEN", "DJANGO_SETTINGS_MODULE"):  # fmt: skip
        env.pop(key, None)
    env.update(LS_ENV, HOME=str(home))
    return env


def ensure_template(ls_venv: Path | None = None, cache: Path | None = None, version: str = LS_VERSION) -> Path:
    """The initialised data dir all instances copy from; built once per machine.

    Built into a temporary dir and renamed into place after `init` succeeded, with a stamp
    inside, so an interrupted build is never used. Returns the template path.
    """
    ls_venv = Path(ls_venv or default_ls_venv())
    cache = Path(cache or cache_dir())
    template = cache / f"ls-template-{version}"
    stamp = template / ".clip-ls-complete"
    stamp_text = json.dumps({"version": version, "args": user_args(version)})
    if stamp.is_file() and stamp.read_text() == stamp_text:
        return template
    with _file_lock(cache / f"ls-template-{version}.lock"):
        if stamp.is_file() and stamp.read_text() == stamp_text:
            return template  # another process built it while we waited
        shutil.rmtree(template, ignore_errors=True)
        building = cache / f"ls-template-{version}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        home = building.with_name(building.name + "-home")
        home.mkdir(parents=True)
        log = building.with_name(building.name + ".log")
        t0 = time.monotonic()
        cmd = [str(ls_venv / "bin" / "label-studio"), "init", "--data-dir", str(building),
               "--no-browser", "--quiet", *user_args(version)]  # fmt: skip
        with open(log, "wb") as out:
            rc = subprocess.run(cmd, env=_ls_environ(home), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip
        if rc != 0 or not (building / "label_studio.sqlite3").is_file():
            raise LabelStudioError(f"`label-studio init` failed (exit {rc}):\n{_tail(log)}")
        (building / ".clip-ls-complete").write_text(stamp_text)
        building.rename(template)
        shutil.rmtree(home, ignore_errors=True)
        log.unlink(missing_ok=True)
        print(f"[label-studio] template built in {time.monotonic() - t0:.1f} s: {template}")
    return template


class LabelStudio:
    """One headless Label Studio process on 127.0.0.1 with its own data dir and HOME.

    `workdir` receives `data/`, `home/` and `label-studio.log`. `timings` records seconds
    spent on the template, the copy and the start (until /health answered).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ls_venv: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
        version: str = LS_VERSION,
    ) -> None:
        self.workdir = Path(workdir)
        self.version = version
        self.ls_venv = Path(ls_venv or release_venv(version))
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.data_dir = self.workdir / "data"
        self.home = self.workdir / "home"
        self.log_path = self.workdir / "label-studio.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}
        self.http = requests.Session()
        self._pat: str | None = None
        self._bearer: tuple[str, float] | None = None  # (header value, monotonic time it was made)
        self._use_bearer = False  # inside legacy_tokens_off(): default auth is a Bearer access token

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> LabelStudio:
        exe = self.ls_venv / "bin" / "label-studio"
        if not exe.is_file():
            raise LabelStudioError(f"{exe} not found: run `bash scripts/setup.sh` (or set LS_VENV)")
        t0 = time.monotonic()
        template = ensure_template(self.ls_venv, version=self.version)
        t1 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        subprocess.run(["cp", "-a", str(template), str(self.data_dir)], check=True)
        self.home.mkdir(exist_ok=True)
        t2 = time.monotonic()
        # Never `label-studio --version`: it starts a server on 0.0.0.0:8080.
        cmd = [str(exe), "start", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--internal-host", "127.0.0.1", "--no-browser", *user_args(self.version)]  # fmt: skip
        env = _ls_environ(self.home)
        env.update(self.extra_env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        t3 = time.monotonic()
        self.timings.update(template_s=t1 - t0, copy_s=t2 - t1, start_s=t3 - t2)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise LabelStudioError(
                    f"Label Studio exited with {self.proc.returncode} before it was ready;"
                    f" log {self.log_path}:\n{_tail(self.log_path)}"
                )
            # If our port was taken in between, Label Studio moves to the next free one.
            moved = re.findall(r"Trying to start at (\d+)", _tail(self.log_path, 200))
            if moved:
                self.port = int(moved[-1])
            try:
                if self.http.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise LabelStudioError(
                    f"Label Studio not ready on {self.url} after {self.start_timeout:.0f} s;"
                    f" log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop our own process (by its PID only) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def __enter__(self) -> LabelStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # ---------------------------------------------------------------- HTTP

    def request(self, method: str, path: str, *, auth: Any = _DEFAULT, **kwargs: Any) -> requests.Response:
        """Any request to Label Studio. `path` is relative to the root ("/api/...").

        auth: default the legacy token; a header value ("Bearer <jwt>"); None for no header.
        """
        headers = dict(kwargs.pop("headers", None) or {})
        if auth is _DEFAULT:
            auth = self._cached_bearer() if self._use_bearer else f"Token {LEGACY_TOKEN}"
        if auth is not None:
            headers["Authorization"] = auth
        kwargs.setdefault("timeout", 300)
        url = path if path.startswith("http") else self.url + path
        return self.http.request(method, url, headers=headers, **kwargs)

    def api(self, method: str, path: str, *, expect: Iterable[int] | None = None, **kwargs: Any) -> Any:
        """A request whose status must be in `expect` (default any 2xx); returns the JSON body."""
        r = self.request(method, path, **kwargs)
        ok = r.status_code in set(expect) if expect is not None else r.ok
        if not ok:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    # ---------------------------------------------------------------- projects and tasks

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict:
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config, **fields})

    def project(self, project_id: int) -> dict:
        return self.api("GET", f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict:
        return self.api("PATCH", f"/api/projects/{project_id}", json=fields)

    def import_files(self, project_id: int, files: Iterable[Path | tuple[str, bytes]]) -> dict:
        """Upload image files as one multipart request, one distinct field name per file
        (repeated field names import only one file). Items: paths or (name, bytes)."""
        parts = {}
        for i, item in enumerate(files):
            name, content = (item.name, item.read_bytes()) if isinstance(item, Path) else item
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
            parts[f"file{i}"] = (name, content, mime)
        return self.api("POST", f"/api/projects/{project_id}/import", files=parts)

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """Import JSON tasks, e.g. [{"image": "http://..."}] (URLs are kept verbatim)."""
        return self.api("POST", f"/api/projects/{project_id}/import", json=tasks)

    def tasks(self, project_id: int) -> list[dict]:
        """All tasks of a project (this list call never triggers predictions)."""
        body = self.api("GET", "/api/tasks", params={"project": project_id, "page_size": 100000, "fields": "all"})
        return body["tasks"] if isinstance(body, dict) else body

    def download(self, path: str, *, auth: Any = _DEFAULT) -> requests.Response:
        """GET a file such as a task's `/data/upload/...` path (status not checked)."""
        return self.request("GET", path, auth=auth)

    # ---------------------------------------------------------------- ML backend

    def connect_ml_backend(self, project_id: int, url: str, title: str = "clip", **fields: Any) -> dict:
        """`POST /api/ml`: LS calls the backend's /health and /setup and creates its webhook.
        Extra fields e.g. is_interactive=True, auth_method="BASIC_AUTH", basic_auth_user=..."""
        return self.api("POST", "/api/ml", json={"project": project_id, "url": url, "title": title, **fields})

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.api("GET", "/api/ml", params={"project": project_id})

    def ml_backend(self, ml_id: int) -> dict:
        """`GET /api/ml/N`: `state` is CO (connected), DI, ER (error: see `error_message`), TR, PR."""
        return self.api("GET", f"/api/ml/{ml_id}")

    def update_ml_backend(self, ml_id: int, project_id: int, url: str, **fields: Any) -> dict:
        # PATCH without url and project answers 500 in 1.23.2.
        return self.api("PATCH", f"/api/ml/{ml_id}", json={"project": project_id, "url": url, **fields})

    def retrieve_predictions(self, project_id: int, task_ids: list[int] | None = None) -> dict:
        """The Data Manager's "Retrieve predictions": synchronous, one /predict for all tasks."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": task_ids}
        return self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        )

    def predictions(self, task_id: int) -> list[dict]:
        """Stored predictions of a task, without side effects."""
        return self.api("GET", "/api/predictions", params={"task": task_id})

    def model_versions(self, project_id: int) -> Any:
        return self.api("GET", f"/api/projects/{project_id}/model-versions")

    def delete_model_version(self, project_id: int, model_version: str) -> Any:
        return self.api(
            "DELETE", f"/api/projects/{project_id}/model-versions/", json={"model_version": model_version}
        )

    def train(self, ml_id: int) -> Any:
        """The "Start Training" button: LS posts START_TRAINING to the backend's /webhook."""
        return self.api("POST", f"/api/ml/{ml_id}/train")

    def interactive_annotating(self, ml_id: int, task_id: int, context: dict | None = None) -> Any:
        """Interactive pre-annotation; the answer (`{"data": ...}`) is not stored by LS."""
        return self.api(
            "POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": task_id, "context": context or {}}
        )

    # ---------------------------------------------------------------- annotations

    def create_annotation(self, task_id: int, result: list[dict], **fields: Any) -> dict:
        return self.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result, **fields})

    def update_annotation(self, annotation_id: int, result: list[dict], **fields: Any) -> dict:
        return self.api("PATCH", f"/api/annotations/{annotation_id}", json={"result": result, **fields})

    def annotations(self, task_id: int) -> list[dict]:
        return self.api("GET", f"/api/tasks/{task_id}/annotations")

    def task(self, task_id: int) -> dict:
        """`GET /api/tasks/ID`, what opening a task in the editor calls: it asks the ML backend
        for a prediction when the task has none."""
        return self.api("GET", f"/api/tasks/{task_id}")

    # ---------------------------------------------------------------- browser login

    def session_cookies(self) -> dict[str, str]:
        """Cookies of a fresh browser session logged in as the admin (e.g. for a headless browser)."""
        web = requests.Session()
        self._login(web)
        return {c.name: c.value for c in web.cookies}

    # ---------------------------------------------------------------- tokens

    def personal_access_token(self) -> str:
        """The admin's PAT (a refresh JWT), obtained headless via the login form.

        LS allows one PAT per user (a second POST /api/token/ is 409), so it is cached here.
        """
        if self._pat:
            return self._pat
        web = requests.Session()
        login, csrf = self._login(web)
        r = web.post(
            f"{self.url}/api/token/",
            headers={"X-CSRFToken": web.cookies.get("csrftoken", csrf), "Referer": login},
            timeout=60,
        )
        if r.status_code not in (200, 201):
            raise LabelStudioError(f"POST /api/token/ -> {r.status_code}: {r.text[:500]}")
        self._pat = r.json()["token"]
        return self._pat

    def _login(self, web: requests.Session) -> tuple[str, str]:
        """Log `web` in through the login form; returns the login URL and the CSRF token."""
        login = f"{self.url}/user/login/"
        r = web.get(login, timeout=60)
        r.raise_for_status()
        csrf = web.cookies.get("csrftoken")
        if not csrf:
            raise LabelStudioError("no csrftoken cookie from GET /user/login/")
        r = web.post(
            login,
            data={"csrfmiddlewaretoken": csrf, "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD},
            headers={"Referer": login},
            allow_redirects=False,
            timeout=60,
        )
        if r.status_code not in (301, 302) or "sessionid" not in web.cookies:
            raise LabelStudioError(f"login failed: {r.status_code} {r.text[:500]}")
        return login, csrf

    def access_token(self, pat: str | None = None) -> str:
        """A short-lived (300 s) access JWT for `Authorization: Bearer ...`, from a PAT."""
        body = self.api("POST", "/api/token/refresh/", auth=None, json={"refresh": pat or self.personal_access_token()})
        return body["access"]

    def bearer(self) -> str:
        """`auth=` value with a fresh access token."""
        return f"Bearer {self.access_token()}"

    def _cached_bearer(self) -> str:
        """A Bearer header reused for up to 4 of the access token's 5 minutes."""
        if self._bearer is None or time.monotonic() - self._bearer[1] > 240:
            self._bearer = (f"Bearer {self.access_token()}", time.monotonic())
        return self._bearer[0]

    @contextmanager
    def legacy_tokens_off(self) -> Iterator[str]:
        """Legacy tokens off for the organisation while inside; yields the admin's PAT.

        Calls without `auth=` authenticate with a Bearer access token meanwhile. On exit legacy
        tokens are switched on again (other tests rely on them), even after a failure.
        """
        pat = self.personal_access_token()
        self.set_token_settings(legacy=False, auth=self._cached_bearer())
        self._use_bearer = True
        try:
            yield pat
        finally:
            self._use_bearer = False
            self.set_token_settings(legacy=True, auth=self._cached_bearer())

    def jwt_settings(self, auth: Any = _DEFAULT) -> dict:
        return self.api("GET", "/api/jwt/settings", auth=auth)

    def set_token_settings(self, *, legacy: bool, api_tokens: bool = True, auth: Any = _DEFAULT) -> dict:
        """Switch legacy tokens / PATs on or off for the organisation (`POST /api/jwt/settings`).
        Once legacy tokens are off, pass `auth=ls.bearer()` for this and every other call."""
        return self.api(
            "POST",
            "/api/jwt/settings",
            auth=auth,
            json={"api_tokens_enabled": api_tokens, "legacy_api_tokens_enabled": legacy},
        )
