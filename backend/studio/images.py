"""Fetch task images from wherever Label Studio keeps them, with its credentials, within size and time limits.

    task value                        fetched from
    /data/upload/...,  upload/...     Label Studio, with the API key
    /data/local-files/?d=dir/a.jpg    the disk under ``local_files_root`` when set and the file is there,
                                      else Label Studio with the API key
    s3://  gs://  azure-blob://       Label Studio's presign endpoint for the task, which redirects to the cloud
    http(s)://...                     directly; the API key goes only to Label Studio's own host:port
    file://, ftp://, ...              refused

Label Studio's address is ``ls_url`` (LABEL_STUDIO_URL), else the ``hostname`` that /setup sent; the key is
``api_key`` (LABEL_STUDIO_API_KEY), else /setup's ``access_token``. A key is a legacy token, sent as
``Token <key>``, or a personal access token (PAT: a JWT of type "refresh"), exchanged at /api/token/refresh/
for a short-lived access token sent as ``Bearer <access>``.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests
import urllib3

log = logging.getLogger(__name__)
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
WEB_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_REDIRECTS = 5
RENEW_BEFORE_EXPIRY_S = 30      # renew access tokens this long before they expire: clocks and requests drift
ACCESS_LIFETIME_S = 300         # Label Studio's access token lifetime, assumed when a token carries no "exp"
CHUNK_BYTES = 64 * 1024
USE_A_PAT = ("set LABEL_STUDIO_API_KEY to a personal access token (Label Studio: Account & Settings → "
             "Personal Access Token)")


class ImageFetchError(Exception):
    """An image could not be fetched; the message names the cause and, where known, the fix."""


class ImageFetcher:
    """Fetches task images; safe to share between threads.

    ``max_bytes``: larger images are refused (checked while streaming). ``timeout``: seconds for a whole
    download, connecting included. ``allowed_hosts``: host names that images may come from besides Label
    Studio itself, redirects included (None: any host).
    """

    def __init__(self, ls_url: str | None = None, api_key: str | None = None, local_files_root: str | None = None,
                 max_bytes: int = 50 * 2**20, timeout: float = 30.0, allowed_hosts: tuple[str, ...] | None = None):
        self.ls_url = _base_url(ls_url, "LABEL_STUDIO_URL")
        self.api_key = api_key or None
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allowed_hosts = None if allowed_hosts is None else {host.lower() for host in allowed_hosts}
        self._setup_hostname: str | None = None
        self._setup_access_token: str | None = None
        self._session = requests.Session()
        self._auth = LabelStudioAuth(self._session, timeout)

    @classmethod
    def from_settings(cls, settings) -> "ImageFetcher":
        """The fetcher a backend or worker process builds from its settings (``backend.config.Settings``)."""
        hosts = tuple(h.strip() for h in settings["ALLOWED_HOSTS"].split(",") if h.strip())
        return cls(ls_url=settings["LABEL_STUDIO_URL"] or None, api_key=settings["LABEL_STUDIO_API_KEY"] or None,
                   local_files_root=settings["LOCAL_FILES_DOCUMENT_ROOT"] or None,
                   max_bytes=settings["IMAGE_MAX_BYTES"], timeout=settings["IMAGE_TIMEOUT"],
                   allowed_hosts=hosts or None)

    def use_setup_values(self, hostname: str | None, access_token: str | None) -> None:
        """Remember what /setup sent: used where LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY is not set."""
        self._setup_hostname = _base_url(hostname, "/setup's hostname")
        self._setup_access_token = access_token or None

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of one task image. Raises ImageFetchError."""
        try:
            return self._fetch(url, task_id)
        except ValueError as error:   # malformed URLs and paths: an invalid IPv6 host, a NUL byte in a file name
            raise ImageFetchError(f"refused {url!r}: malformed ({error})") from None

    def _fetch(self, url: str, task_id: int | None) -> bytes:
        url = url.strip()
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._download(self._presign_url(url, task_id), url)
        if scheme in WEB_SCHEMES:
            return self._download(url, url)
        if scheme or parts.netloc:
            raise ImageFetchError(f"refused {url!r}: images are fetched over http(s) or from Label Studio only")
        path = "/data/" + url.lstrip("/") if url.lstrip("/").startswith("upload/") else url
        local = self._read_local_file(path, url)
        return local if local is not None else self._download(self._on_label_studio(path, url), url)

    def fetch_many(self, items: list[tuple[str, int | None]], max_workers: int = 8) -> list[bytes | ImageFetchError]:
        """Fetch (url, task_id) pairs concurrently; each answer in the place of its item, failures as errors."""
        def attempt(item: tuple[str, int | None]) -> bytes | ImageFetchError:
            try:
                return self.fetch(*item)
            except ImageFetchError as error:
                return error
            except Exception as error:  # noqa: BLE001 - a bug met by one image must cost only its task
                log.exception("unexpected error fetching %r", item[0])
                return ImageFetchError(f"could not fetch {item[0]!r}: {type(error).__name__}: {error}")

        if not items:
            return []
        with ThreadPoolExecutor(min(max_workers, len(items)), thread_name_prefix="fetch-image") as pool:
            return list(pool.map(attempt, items))

    @property
    def setup_values(self) -> tuple[str | None, str | None]:
        """What /setup sent (hostname, access_token), to hand to another process (an RQ worker)."""
        return self._setup_hostname, self._setup_access_token

    def get_json(self, path: str, params: dict | None = None):
        """GET a Label Studio API path (e.g. ``/api/tasks``) with the API key; the decoded JSON.
        Raises ImageFetchError (with the same hints as image downloads)."""
        url = self._on_label_studio(path + ("?" + urlencode(params) if params else ""), path)
        deadline = time.monotonic() + self.timeout
        with self._get(url, path, deadline) as response:
            self._check_status(response, url, path)
            body = self._read_body(response, path, deadline)
        try:
            return json.loads(body)
        except ValueError:
            raise ImageFetchError(f"Label Studio answered {path!r} with something that is not JSON") from None

    @property
    def _label_studio(self) -> str | None:
        return self.ls_url or self._setup_hostname

    @property
    def _key(self) -> tuple[str, str] | None:
        """The API key and where it came from, for messages."""
        if self.api_key:
            return self.api_key, "LABEL_STUDIO_API_KEY"
        if self._setup_access_token:
            return self._setup_access_token, "the access_token sent by /setup"
        return None

    def _on_label_studio(self, path: str, task_url: str) -> str:
        if not self._label_studio:
            raise ImageFetchError(f"cannot fetch {task_url!r}: it lives in Label Studio, whose address is unknown; "
                                  "set LABEL_STUDIO_URL (e.g. http://label-studio:8080)")
        return self._label_studio + "/" + path.lstrip("/")

    def _presign_url(self, uri: str, task_id: int | None) -> str:
        if task_id is None:
            raise ImageFetchError(f"cannot fetch {uri!r}: Label Studio resolves cloud storage URIs per task, "
                                  "and no task id was given")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        return self._on_label_studio(f"/tasks/{task_id}/presign/?fileuri={fileuri}", uri)

    def _read_local_file(self, path: str, task_url: str) -> bytes | None:
        """A Label Studio local-storage file read from the shared disk; None when it is not there."""
        parts = urlsplit(path)
        if self.local_files_root is None or parts.path.rstrip("/") != "/data/local-files":
            return None
        relative = parse_qs(parts.query).get("d", [""])[0]
        file = (self.local_files_root / relative).resolve()
        if not file.is_relative_to(self.local_files_root):
            raise ImageFetchError(f"refused {task_url!r}: the path leads outside the local files root "
                                  f"{self.local_files_root}")
        if not file.is_file():
            return None
        try:
            with file.open("rb") as stream:
                data = stream.read(self.max_bytes + 1)
        except OSError as error:
            raise ImageFetchError(f"cannot read {file} for {task_url!r}: {error.strerror}") from None
        if len(data) > self.max_bytes:
            raise self._too_large(task_url)
        return data

    def _download(self, url: str, task_url: str) -> bytes:
        """GET with redirects followed by hand, so that each hop is checked and only Label Studio gets the key."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_REDIRECTS + 1):
            self._check_allowed(url, task_url)
            with self._get(url, task_url, deadline) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    continue
                self._check_status(response, url, task_url)
                return self._read_body(response, task_url, deadline)
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects fetching {task_url!r}")

    def _check_allowed(self, url: str, task_url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in WEB_SCHEMES:
            raise ImageFetchError(f"refused {task_url!r}: it redirects to {parts.scheme}://, not http(s)")
        host = (parts.hostname or "").lower()
        if self.allowed_hosts is not None and host not in self.allowed_hosts and not self._is_label_studio(url):
            raise ImageFetchError(f"refused {task_url!r}: {host!r} is not an allowed image host "
                                  f"(allowed: {sorted(self.allowed_hosts)})")

    def _get(self, url: str, task_url: str, deadline: float) -> requests.Response:
        authorization = self._authorization() if self._is_label_studio(url) else None
        response = self._request(url, authorization, task_url, deadline)
        if response.status_code == 401 and authorization and authorization.startswith("Bearer "):
            response.close()  # the access token died early (revoked, clock skew): renew it once
            authorization = self._authorization(stale=authorization)
            response = self._request(url, authorization, task_url, deadline)
        return response

    def _request(self, url: str, authorization: str | None, task_url: str, deadline: float) -> requests.Response:
        headers = {"Authorization": authorization} if authorization else {}
        left = max(deadline - time.monotonic(), 0.001)
        try:
            return self._session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=(left, left))
        except requests.RequestException as error:
            raise _transport_error(error, url, task_url, self.timeout) from None

    def _authorization(self, stale: str | None = None) -> str | None:
        """The Authorization header for Label Studio; ``stale`` is one it just refused."""
        if self._key is None:
            return None
        return self._auth.header(self._label_studio, self._key[0], stale)

    def _check_status(self, response: requests.Response, url: str, task_url: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status in (401, 403) and self._is_label_studio(url):
            raise ImageFetchError(self._refused_by_label_studio(status, task_url))
        if status in (401, 403):
            raise ImageFetchError(f"{urlsplit(url).hostname} refused {task_url!r} ({status}); Label Studio "
                                  "credentials are sent only to Label Studio's own host")
        if status == 404:
            raise ImageFetchError(f"not found (404): {task_url!r}")
        raise ImageFetchError(f"HTTP {status} from {urlsplit(url).hostname} fetching {task_url!r}")

    def _refused_by_label_studio(self, status: int, task_url: str) -> str:
        refused = f"Label Studio refused {task_url!r} ({status})"
        if self._key is None:
            return f"{refused}: no API key; {USE_A_PAT}"
        key, source = self._key
        if is_personal_access_token(key):
            return f"{refused} to the personal access token in {source}: its user may lack access to this project"
        return (f"{refused} with the legacy token from {source}: legacy tokens are off by default since Label "
                f"Studio 1.17; {USE_A_PAT}, or enable legacy tokens in Label Studio")

    def _read_body(self, response: requests.Response, task_url: str, deadline: float) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(task_url)
        body = bytearray()
        try:
            # read1 returns what has arrived, so a server dripping bytes cannot hold us past the deadline
            while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
                body += chunk
                if len(body) > self.max_bytes:
                    raise self._too_large(task_url)
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"timed out after {self.timeout:g} s fetching {task_url!r}")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ImageFetchError(f"the connection broke while reading {task_url!r}: {error}") from None
        return bytes(body)

    def _too_large(self, task_url: str) -> ImageFetchError:
        return ImageFetchError(f"refused {task_url!r}: larger than the limit of {self.max_bytes} bytes")

    def _is_label_studio(self, url: str) -> bool:
        return self._label_studio is not None and _origin(url) == _origin(self._label_studio)


class LabelStudioAuth:
    """The Authorization header for a Label Studio API key: ``Token <key>`` for a legacy token; for a personal
    access token ``Bearer <access token>``, exchanged at /api/token/refresh/ and cached until shortly before it
    expires."""

    def __init__(self, session: requests.Session, timeout: float):
        self._session = session
        self._timeout = timeout
        self._lock = threading.Lock()   # one exchange at a time; the others then find its token
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}   # (LS, PAT) → (access token, renew at)

    def header(self, label_studio: str, key: str, stale: str | None = None) -> str:
        """``stale``: a header Label Studio just refused; its access token is renewed (unless already done)."""
        if not is_personal_access_token(key):
            return f"Token {key}"
        return "Bearer " + self._access_token(label_studio, key, stale.removeprefix("Bearer ") if stale else None)

    def _access_token(self, label_studio: str, pat: str, stale: str | None) -> str:
        with self._lock:
            token, renew_at = self._cache.get((label_studio, pat), (None, 0.0))
            if token is None or token == stale or time.time() >= renew_at:
                token = self._exchange(label_studio, pat)
                expiry = (jwt_payload(token) or {}).get("exp")
                if not isinstance(expiry, (int, float)):
                    expiry = time.time() + ACCESS_LIFETIME_S
                self._cache[(label_studio, pat)] = token, expiry - RENEW_BEFORE_EXPIRY_S
            return token

    def _exchange(self, label_studio: str, pat: str) -> str:
        url = label_studio + "/api/token/refresh/"
        try:
            response = self._session.post(url, json={"refresh": pat}, timeout=self._timeout)
        except requests.RequestException as error:
            raise _transport_error(error, url, url, self._timeout) from None
        with response:
            if response.status_code in (401, 403):
                raise ImageFetchError(f"Label Studio rejected the personal access token ({response.status_code} "
                                      f"from {url}): it was revoked, or belongs to another Label Studio")
            if response.status_code == 404:
                raise ImageFetchError(f"{url} does not exist: this Label Studio has no personal access tokens "
                                      "(an old version?); use a legacy token")
            try:
                access = response.json()["access"] if response.ok else None
            except (ValueError, KeyError, TypeError):
                access = None
            if not isinstance(access, str):
                raise ImageFetchError(f"no access token from {url} (HTTP {response.status_code})")
            return access


def is_personal_access_token(key: str) -> bool:
    """Whether an API key is a personal access token (a JWT of type refresh) rather than a legacy token."""
    return (jwt_payload(key) or {}).get("token_type") == "refresh"


def jwt_payload(token: str) -> dict | None:
    """The claims of a JWT, else None. The signature is not checked: only Label Studio can, and it does."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _base_url(url: str | None, source: str) -> str | None:
    if not url:
        return None
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme.lower() not in WEB_SCHEMES or not parts.hostname:
        raise ValueError(f"{source} must be a full http(s) URL like http://label-studio:8080, got {url!r}")
    return url


def _origin(url: str) -> tuple[str, int | None] | None:
    """host and port, the default port filled in; None for a malformed URL (requests then refuses it)."""
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return None
    return (parts.hostname or "").lower(), port


def _transport_error(error: requests.RequestException, url: str, task_url: str, timeout: float) -> ImageFetchError:
    host = urlsplit(url).hostname
    hint = (f"; inside Docker, {host} is the container itself: set LABEL_STUDIO_URL to "
            "http://host.docker.internal:PORT or the compose service name (http://label-studio:8080)"
            if host in LOOPBACK_HOSTS else "")
    if isinstance(error, requests.ConnectTimeout):
        return ImageFetchError(f"cannot reach {host} within {timeout:g} s to fetch {task_url!r}{hint}")
    if isinstance(error, requests.Timeout):
        return ImageFetchError(f"timed out after {timeout:g} s fetching {task_url!r}")
    if isinstance(error, requests.ConnectionError):
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))   # e.g. "Connection refused"
        reason = f" ({cause.group(1).strip()})" if cause else ""
        return ImageFetchError(f"cannot reach {host} to fetch {task_url!r}{reason}{hint}")
    return ImageFetchError(f"could not fetch {task_url!r}: {error}")
