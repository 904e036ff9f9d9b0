"""ImageFetcher against a fake Label Studio and a foreign image host, both local HTTP servers on 127.0.0.1."""
from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from backend.studio.images import (
    RENEW_BEFORE_EXPIRY_S,
    ImageFetcher,
    ImageFetchError,
    is_personal_access_token,
    jwt_payload,
)

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
IMAGE = b"\x89PNG fake image bytes"


def make_jwt(**claims) -> str:
    """A JWT-shaped token (Label Studio signs its own; the fetcher only reads the payload)."""
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


PAT = make_jwt(token_type="refresh", exp=int(time.time()) + 10**8, jti="pat-1", user_id=1)


class Server:
    """An HTTP server in a thread on 127.0.0.1, a random port; ``app(request)`` answers every request."""

    def __init__(self, app):
        handler = type("Handler", (Handler,), {"app": staticmethod(app)})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Handler(BaseHTTPRequestHandler):
    app = None

    def do_GET(self):
        try:
            self.app(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (timeouts, size limits): what those tests want

    do_POST = do_GET

    def log_message(self, *args):
        pass

    def reply(self, status: int, body: bytes = b"", **headers: str):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeLabelStudio:
    """Serves uploads, local files and presign redirects to authorized callers, like Label Studio 1.23.2."""

    def __init__(self):
        self.legacy_tokens_enabled = True
        self.access_lifetime_s = 300
        self.access_tokens: dict[str, float] = {}   # issued access token → expiry
        self.refreshes = 0
        self.log: list[tuple[str, str | None, int]] = []   # path, Authorization, status of non-token requests
        self.url = None                               # set once its server runs
        self.cloud_url = None                         # where presigned URLs point
        self.lock = threading.Lock()

    def __call__(self, request: Handler):
        parts = urlsplit(request.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if parts.path == "/api/token/refresh/":
            return request.reply(*self.refresh(json.loads(request.rfile.read(int(request.headers["Content-Length"])))))
        status, body, headers = self.route(request, parts.path, query)
        with self.lock:
            self.log.append((request.path, request.headers.get("Authorization"), status))
        request.reply(status, body, **headers)

    def route(self, request: Handler, path: str, query: dict) -> tuple[int, bytes, dict]:
        if not self.authorized(request.headers.get("Authorization", "")):
            return 401, b'{"detail": "Authentication credentials were not provided."}', {}
        if path == "/data/upload/1/bee.png":
            return 200, IMAGE, {}
        if path == "/data/local-files/":
            return 200, f"remote:{query['d']}".encode(), {}
        if path.startswith("/tasks/") and path.endswith("/presign/"):
            uri = urlsplit(base64.urlsafe_b64decode(query["fileuri"]).decode())
            return 302, b"", {"Location": f"{self.cloud_url}/{uri.scheme}/{uri.netloc}{uri.path}?signature=s"}
        if path == "/redirect-to-file":
            return 302, b"", {"Location": "file:///etc/passwd"}
        if path == "/redirect-loop":
            return 302, b"", {"Location": "/redirect-loop"}
        return 404, b"", {}

    def authorized(self, authorization: str) -> bool:
        if authorization == f"Token {LEGACY_TOKEN}":
            return self.legacy_tokens_enabled
        with self.lock:
            expiry = self.access_tokens.get(authorization.removeprefix("Bearer "), 0.0)
        return authorization.startswith("Bearer ") and time.time() < expiry

    def refresh(self, body: dict) -> tuple[int, bytes]:
        if body.get("refresh") != PAT:
            return 401, b'{"detail": "Token is invalid or expired"}'
        with self.lock:
            self.refreshes += 1
            expiry = int(time.time()) + self.access_lifetime_s
            token = make_jwt(token_type="access", exp=expiry, jti=f"access-{self.refreshes}", user_id=1)
            self.access_tokens[token] = expiry
        return 200, json.dumps({"access": token}).encode()

    def revoke_access_tokens(self):
        with self.lock:
            self.access_tokens.clear()

    def statuses(self) -> list[int]:
        return [status for _, _, status in self.log]


class ForeignHost:
    """Any other web server: public images, one forbidden path, slow and large answers; records headers."""

    def __init__(self):
        self.url = None                               # set once its server runs
        self.authorizations: list[str | None] = []
        self.barrier = threading.Barrier(4, timeout=5)

    def __call__(self, request: Handler):
        self.authorizations.append(request.headers.get("Authorization"))
        path = urlsplit(request.path).path
        if path == "/forbidden.png":
            request.reply(403)
        elif path == "/slow.png":
            time.sleep(1)
            request.reply(200, IMAGE)
        elif path == "/drip.png":
            self.drip(request)
        elif path == "/chunked.png":
            self.chunked(request, [IMAGE[:5], IMAGE[5:]])
        elif path == "/big-declared.png":
            request.reply(200, b"x" * 2000)
        elif path == "/big-undeclared.png":   # HTTP/1.0 without Content-Length: the body ends with the connection
            request.send_response(200)
            request.end_headers()
            request.wfile.write(b"x" * 2000)
        elif path == "/exactly-1000.png":
            request.reply(200, b"x" * 1000)
        else:
            if path.startswith("/together/"):   # answers only once 4 requests are in flight at the same time
                self.barrier.wait()
            request.reply(200, f"foreign:{path}".encode())

    @staticmethod
    def chunked(request: Handler, parts: list[bytes]):
        request.send_response(200)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        for part in [*parts, b""]:
            request.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))

    @staticmethod
    def drip(request: Handler):
        request.send_response(200)
        request.send_header("Content-Length", "300")
        request.end_headers()
        for _ in range(30):
            request.wfile.write(b"x" * 10)
            request.wfile.flush()
            time.sleep(0.1)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """Requests honours proxy variables; the local servers must be reached directly."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def foreign(ls):
    app = ForeignHost()
    server = Server(app)
    app.url = ls.cloud_url = server.url
    yield app
    server.close()


def fetcher_for(ls, api_key=LEGACY_TOKEN, **options) -> ImageFetcher:
    options.setdefault("allow_private", ("127.0.0.1",))   # the foreign host is on loopback too
    return ImageFetcher(ls.url, api_key, timeout=options.pop("timeout", 5.0), **options)


def fetch_error(fetcher: ImageFetcher, url: str, task_id: int | None = None) -> str:
    with pytest.raises(ImageFetchError) as caught:
        fetcher.fetch(url, task_id)
    return str(caught.value)


# --- where images come from ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/data/upload/1/bee.png", "upload/1/bee.png", "/upload/1/bee.png",
                                 " /data/upload/1/bee.png "])
def test_uploads_come_from_label_studio_with_the_key(ls, url):
    assert fetcher_for(ls).fetch(url) == IMAGE
    assert ls.log == [("/data/upload/1/bee.png", f"Token {LEGACY_TOKEN}", 200)]


def test_absolute_urls_on_the_label_studio_host_get_the_key(ls):
    assert fetcher_for(ls).fetch(ls.url + "/data/upload/1/bee.png") == IMAGE


def test_other_hosts_never_get_the_key(ls, foreign):
    assert fetcher_for(ls).fetch(foreign.url + "/a.png") == b"foreign:/a.png"
    assert foreign.authorizations == [None]


def test_chunked_answers_are_read_whole(ls, foreign):
    assert fetcher_for(ls).fetch(foreign.url + "/chunked.png") == IMAGE


def test_a_refusal_by_another_host_says_no_credentials_went_there(ls, foreign):
    assert "credentials are sent only to Label Studio" in fetch_error(fetcher_for(ls), foreign.url + "/forbidden.png")


@pytest.mark.parametrize("uri", ["s3://bucket/dir/a.png", "gs://bucket/a.png", "azure-blob://container/a.png"])
def test_cloud_uris_are_presigned_by_label_studio_for_the_task(ls, foreign, uri):
    image = fetcher_for(ls).fetch(uri, task_id=7)
    bucket_and_key = uri.replace("://", "/", 1)
    assert image == f"foreign:/{bucket_and_key}".encode()
    fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
    assert ls.log == [(f"/tasks/7/presign/?fileuri={fileuri}", f"Token {LEGACY_TOKEN}", 302)]
    assert foreign.authorizations == [None]     # the redirect to the cloud carries no Label Studio key


def test_cloud_uris_need_a_task_id(ls):
    assert "no task id" in fetch_error(fetcher_for(ls), "s3://bucket/a.png")


def test_local_files_are_read_from_the_shared_root(ls, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a b.png").write_bytes(IMAGE)
    fetcher = fetcher_for(ls, local_files_root=str(tmp_path))
    assert fetcher.fetch("/data/local-files/?d=images/a%20b.png") == IMAGE
    assert ls.log == []


def test_local_files_missing_from_the_root_come_from_label_studio(ls, tmp_path):
    fetcher = fetcher_for(ls, local_files_root=str(tmp_path))
    assert fetcher.fetch("/data/local-files/?d=images/b.png") == b"remote:images/b.png"


def test_local_files_come_from_label_studio_without_a_root(ls):
    assert fetcher_for(ls).fetch("/data/local-files/?d=images/b.png") == b"remote:images/b.png"
    assert ls.log[0][1] == f"Token {LEGACY_TOKEN}"


@pytest.mark.parametrize("d", ["../secret.txt", "images/../../secret.txt", "/etc/passwd", "%2E%2E/secret.txt",
                               "images/link.txt"])
def test_local_paths_cannot_leave_the_root(ls, tmp_path, d):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("secret")
    (root / "images" / "link.txt").symlink_to(tmp_path / "secret.txt")
    message = fetch_error(fetcher_for(ls, local_files_root=str(root)), f"/data/local-files/?d={d}")
    assert "outside the local files root" in message
    assert ls.log == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/a.png", "data:image/png;base64,AAAA",
                                 "//example.org/a.png", "C:\\images\\a.png"])
def test_other_schemes_are_refused(ls, url):
    assert "refused" in fetch_error(fetcher_for(ls), url)
    assert ls.log == []


def test_redirects_to_other_schemes_are_refused(ls):
    assert "'file:///etc/passwd': only http(s) URLs are fetched" in fetch_error(fetcher_for(ls), "/redirect-to-file")


def test_redirect_loops_end(ls):
    assert "redirects" in fetch_error(fetcher_for(ls), "/redirect-loop")


def test_missing_images_say_not_found(ls):
    assert "not found (404)" in fetch_error(fetcher_for(ls), "/data/upload/1/missing.png")


# --- allowed hosts ---------------------------------------------------------------------------------------

def test_hosts_outside_the_allow_list_are_refused_redirects_included(ls, foreign):
    fetcher = fetcher_for(ls, allowed_hosts=("images.example.org",))
    assert "not an allowed image host" in fetch_error(fetcher, foreign.url + "/a.png")
    assert "not an allowed image host" in fetch_error(fetcher, "s3://bucket/a.png", task_id=1)
    assert foreign.authorizations == []
    assert fetcher.fetch("/data/upload/1/bee.png") == IMAGE   # Label Studio itself is always allowed


def test_hosts_on_the_allow_list_are_fetched(ls, foreign):
    assert fetcher_for(ls, allowed_hosts=("127.0.0.1",)).fetch(foreign.url + "/a.png") == b"foreign:/a.png"


# --- credentials -----------------------------------------------------------------------------------------

def test_without_a_key_the_error_says_to_set_one(ls):
    assert "no API key; set LABEL_STUDIO_API_KEY" in fetch_error(fetcher_for(ls, api_key=None), "upload/1/bee.png")


def test_a_refused_legacy_token_suggests_a_personal_access_token(ls):
    ls.legacy_tokens_enabled = False
    message = fetch_error(fetcher_for(ls), "upload/1/bee.png")
    assert "legacy token from LABEL_STUDIO_API_KEY" in message and "personal access token" in message


def test_a_personal_access_token_is_exchanged_once_for_many_fetches(ls):
    fetcher = fetcher_for(ls, api_key=PAT)
    assert [fetcher.fetch("upload/1/bee.png") for _ in range(3)] == [IMAGE] * 3
    assert ls.refreshes == 1
    assert {authorization.split()[0] for _, authorization, _ in ls.log} == {"Bearer"}


def test_concurrent_fetches_share_one_exchange(ls):
    results = fetcher_for(ls, api_key=PAT).fetch_many([("upload/1/bee.png", None)] * 8)
    assert results == [IMAGE] * 8 and ls.refreshes == 1


def test_access_tokens_are_renewed_before_they_expire(ls):
    ls.access_lifetime_s = RENEW_BEFORE_EXPIRY_S + 2      # so the cached token turns stale within 2 s
    fetcher = fetcher_for(ls, api_key=PAT)
    fetcher.fetch("upload/1/bee.png")
    (expiry,) = ls.access_tokens.values()
    time.sleep(max(expiry - RENEW_BEFORE_EXPIRY_S - time.time(), 0) + 0.05)
    fetcher.fetch("upload/1/bee.png")
    assert ls.refreshes == 2 and 401 not in ls.statuses()


def test_a_refused_access_token_is_renewed_once(ls):
    fetcher = fetcher_for(ls, api_key=PAT)
    fetcher.fetch("upload/1/bee.png")
    ls.revoke_access_tokens()
    assert fetcher.fetch("upload/1/bee.png") == IMAGE
    assert ls.refreshes == 2 and ls.statuses() == [200, 401, 200]


def test_an_unknown_personal_access_token_is_reported(ls):
    unknown = make_jwt(token_type="refresh", exp=int(time.time()) + 1000, jti="other")
    assert "rejected the personal access token" in fetch_error(fetcher_for(ls, api_key=unknown), "upload/1/bee.png")


def test_setup_values_are_the_fallback(ls):
    fetcher = ImageFetcher()
    fetcher.use_setup_values(ls.url, LEGACY_TOKEN)
    assert fetcher.fetch("upload/1/bee.png") == IMAGE


def test_own_settings_win_over_setup_values(ls):
    fetcher = fetcher_for(ls)
    fetcher.use_setup_values("http://localhost:8080", "the project creator's legacy token")
    assert fetcher.fetch("upload/1/bee.png") == IMAGE


def test_a_refused_setup_token_is_named(ls):
    ls.legacy_tokens_enabled = False
    fetcher = ImageFetcher()
    fetcher.use_setup_values(ls.url, LEGACY_TOKEN)
    assert "legacy token from the access_token sent by /setup" in fetch_error(fetcher, "upload/1/bee.png")


def test_token_kinds_are_told_apart():
    assert is_personal_access_token(PAT)
    assert not is_personal_access_token(LEGACY_TOKEN)
    assert not is_personal_access_token(make_jwt(token_type="access"))
    assert not is_personal_access_token("a.b.c") and jwt_payload("a.!!.c") is None


# --- reachability and limits -----------------------------------------------------------------------------

def test_relative_paths_need_the_label_studio_address():
    assert "set LABEL_STUDIO_URL" in fetch_error(ImageFetcher(), "/data/upload/1/bee.png")


def test_a_key_without_the_label_studio_address_is_refused_at_once():
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL is empty"):
        ImageFetcher(api_key=LEGACY_TOKEN)


def test_an_unreachable_label_studio_mentions_docker_networking():
    with socket.socket() as probe:          # a port that was free a moment ago and has nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    message = fetch_error(ImageFetcher(f"http://127.0.0.1:{port}", LEGACY_TOKEN, timeout=2), "upload/1/bee.png")
    assert "cannot reach 127.0.0.1" in message and "host.docker.internal" in message


def test_a_bad_label_studio_url_is_refused_at_once():
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL must be a full http"):
        ImageFetcher("localhost:8080")


def test_slow_servers_time_out(ls, foreign):
    assert "timed out after 0.2 s" in fetch_error(fetcher_for(ls, timeout=0.2), foreign.url + "/slow.png")


def test_the_timeout_covers_the_whole_download(ls, foreign):
    started = time.monotonic()
    assert "timed out" in fetch_error(fetcher_for(ls, timeout=0.3), foreign.url + "/drip.png")
    assert time.monotonic() - started < 2   # the server would drip for 3 s


@pytest.mark.parametrize("path", ["/big-declared.png", "/big-undeclared.png"])
def test_images_over_the_size_limit_are_refused(ls, foreign, path):
    assert "larger than the limit of 1000 bytes" in fetch_error(fetcher_for(ls, max_bytes=1000), foreign.url + path)


def test_images_at_the_size_limit_pass(ls, foreign):
    assert len(fetcher_for(ls, max_bytes=1000).fetch(foreign.url + "/exactly-1000.png")) == 1000


def test_local_files_over_the_size_limit_are_refused(ls, tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 1001)
    fetcher = fetcher_for(ls, local_files_root=str(tmp_path), max_bytes=1000)
    assert "larger than the limit" in fetch_error(fetcher, "/data/local-files/?d=big.png")


# --- many at once ----------------------------------------------------------------------------------------

def test_fetch_many_runs_concurrently_and_keeps_the_order(ls, foreign):
    urls = [f"{foreign.url}/together/{i}.png" for i in range(4)]   # each waits until all 4 have arrived
    assert fetcher_for(ls).fetch_many([(url, None) for url in urls], max_workers=4) == [
        f"foreign:/together/{i}.png".encode() for i in range(4)]


def test_fetch_many_returns_failures_in_place(ls, foreign):
    results = fetcher_for(ls).fetch_many([("upload/1/bee.png", 1), ("file:///etc/passwd", 2),
                                          (foreign.url + "/b.png", 3), ("/data/upload/1/missing.png", 4)])
    assert results[0] == IMAGE and results[2] == b"foreign:/b.png"
    assert isinstance(results[1], ImageFetchError) and "refused" in str(results[1])
    assert isinstance(results[3], ImageFetchError) and "404" in str(results[3])
    assert fetcher_for(ls).fetch_many([]) == []
