"""A stand-in for the Hugging Face hub and torchvision's weight URLs on loopback: the endpoints
``huggingface_hub.snapshot_download`` calls (repo info, HEAD/GET of ``resolve`` with the hub's headers, Range
requests), serving real files (the bundled tiny CLIP) under a fake repo id, and plain files for the detector.

It counts the GETs per path and can cut a file off once after N bytes (a broken connection), or hold it after N
bytes until ``release`` is set (``held`` is set meanwhile), so a test can kill the downloading process."""
from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}   # repo id → file name → bytes
        self.files: dict[str, bytes] = {}               # plain path → bytes (detector weights)
        self.gets: Counter = Counter()
        self.cut_once: dict[str, int] = {}              # path → bytes to send before dropping the connection
        self.hold_once: dict[str, int] = {}             # path → bytes to send before waiting for `release`
        self.held, self.release = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_repo(self, repo: str, directory: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        self.repos[repo] = {**files, **(extra or {})}

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- routing
    def _answer(self, handler, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        if body:
            with self.lock:
                self.gets[path] += 1
        if path.startswith("/api/models/") and "/tree/" in path:   # the file listing of a revision
            repo = path[len("/api/models/"):].partition("/tree/")[0]
            files = self.repos.get(repo, {})
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                     "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                    for name, data in sorted(files.items())]
            return self._send(handler, 200, json.dumps(tree).encode(), body, {"Content-Type": "application/json"})
        if path.startswith("/api/models/"):
            repo, _, _revision = path[len("/api/models/"):].partition("/revision/")
            files = self.repos.get(repo)
            if files is None:
                return self._send(handler, 404, b'{"error": "Repository not found"}', body,
                                  {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(files)]}
            return self._send(handler, 200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
        for repo, files in self.repos.items():
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix):].partition("/")[2]
                if name not in files:
                    return self._send(handler, 404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound"})
                data = files[name]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                return self._send_file(handler, path, data, body, headers)
        if path in self.files:
            return self._send_file(handler, path, self.files[path], body, {})
        self._send(handler, 404, b"not found", body, {})

    def _send_file(self, handler, path: str, data: bytes, body: bool, headers: dict) -> None:
        start = 0
        wanted = handler.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted[len("bytes="):-1])
        status = 206 if start else 200
        part = data[start:]
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        with self.lock:
            cut = self.cut_once.pop(path, None) if body else None
            hold = self.hold_once.pop(path, None) if body else None
        if hold is not None:
            cut = hold
        if cut is None:
            return self._send(handler, status, part, body, headers)
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(part))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(part[:cut])
        handler.wfile.flush()
        if hold is not None:
            self.held.set()
            self.release.wait(60)
        handler.close_connection = True
        handler.connection.shutdown(2)   # the rest never comes: a download killed midway

    @staticmethod
    def _send(handler, status: int, data: bytes, body: bool, headers: dict) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
