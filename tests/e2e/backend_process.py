"""Our ML backend as a REAL process for end-to-end tests: start it, wait for /health, read its log, stop it.

    with BackendProcess(tmp_dir, env={"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": token}) as backend:
        mark = backend.log_mark()
        ...                                   # make Label Studio talk to backend.url
        backend.wait_for_log(r"webhook ANNOTATION_CREATED", since=mark)

It runs ``python -m backend serve --demo --host 127.0.0.1 --port <free>`` (waitress, one process, the bundled
tiny models; ``demo=False`` for the models the environment names) from the repository root with the
interpreter running the tests (the project venv), or ``python -m waitress backend.wsgi:app`` with
``DEMO=true`` when ``wsgi=True``. stdout and stderr (the app's log) go to ``workdir/backend.log``. Learned
state goes to ``workdir/model-state``
(``MODEL_DIR``), so runs never share it. ``stop()`` signals only the process it started (by PID, then
its own process group as a last resort).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from .local_http import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# Settings that must not leak from the developer's shell into the backend under test.
_SCRUB = ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT", "REDIS_URL", "BASIC_AUTH_USER",
          "BASIC_AUTH_PASS", "MODEL_DIR", "DEMO", "ALLOWED_HOSTS", "ALLOW_PRIVATE_HOSTS", "PROFILE", "DETECTOR",
          "CLIP_MODEL")


class BackendError(RuntimeError):
    """The backend did not start, died, or its log never showed an expected line."""


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class BackendProcess:
    """One backend process on 127.0.0.1. ``timings["start_s"]``: spawn until /health answered."""

    def __init__(
        self,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wsgi: bool = False,
        demo: bool = True,
        threads: int = 4,
        torch_threads: int = 2,
        python: str | None = None,
        start_timeout: float = 240.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_env = dict(env or {})
        self.wsgi = wsgi
        self.demo = demo
        self.threads = threads
        self.torch_threads = torch_threads
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "backend.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # ---------------------------------------------------------------- lifecycle

    def command(self) -> list[str]:
        if self.wsgi:
            return [self.python, "-m", "waitress", f"--listen=127.0.0.1:{self.port}", f"--threads={self.threads}",
                    "backend.wsgi:app"]  # fmt: skip
        return [self.python, "-m", "backend", "serve", *(["--demo"] if self.demo else []), "--host", "127.0.0.1",
                "--port", str(self.port), "--threads", str(self.threads)]  # fmt: skip

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(
            MODEL_DIR=str(self.workdir / "model-state"),
            TORCH_THREADS=str(self.torch_threads),  # a shared 2-core machine: no thread thrash
            LOG_LEVEL="INFO",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        )
        if self.wsgi and self.demo:
            env["DEMO"] = "true"
        env.update(self.extra_env)
        return env

    def start(self) -> BackendProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), env=self.environ(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BackendError(f"the backend exited with {self.proc.returncode} before /health answered;"
                                   f" log {self.log_path}:\n{_tail(self.log_path)}")  # fmt: skip
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise BackendError(f"no /health from {self.url} after {self.start_timeout:.0f} s;"
                                   f" log {self.log_path}:\n{_tail(self.log_path)}")  # fmt: skip
            time.sleep(0.25)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to our PID (gunicorn's arbiter stops its worker), SIGKILL to our own group if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        try:  # a worker left behind by a killed arbiter: the group is ours (start_new_session)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> BackendProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---------------------------------------------------------------- log

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset `since` (a `log_mark()`)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_mark(self) -> int:
        """The log's current size: pass it as `since` to look only at what is logged afterwards."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def log_lines(self, pattern: str, since: int = 0) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.log_text(since).splitlines() if regex.search(line)]

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 15.0, count: int = 1) -> list[str]:
        """Lines matching `pattern` logged after `since`; waits until there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines(pattern, since)
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline or not self.alive():
                raise BackendError(f"{count} log line(s) matching {pattern!r} expected, found {len(lines)}"
                                   f" within {timeout:.0f} s; log tail:\n{self.log_tail()}")  # fmt: skip
            time.sleep(0.1)
