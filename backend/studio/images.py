"""Fetch task images from wherever Label Studio keeps them, with its credentials, within size and time limits.

    task value                        fetched from
    /data/upload/...,  upload/...     Label Studio, with the API key
    /data/local-files/?d=dir/a.jpg    the disk under ``local_files_root`` when set and the file is there,
                                      else Label Studio with the API key
    s3://  gs://  azure-blob://       Label Studio's presign endpoint for the task, which redirects to the cloud
    http(s)://...                     directly; the API key goes only to Label Studio's own scheme://host:port
    file://, ftp://, ...              refused

Every request goes through ``studio.http``: URLs parsed as the client connects, ambiguous ones refused, private
addresses refused (server-side request forgery) except Label Studio's and ``allow_private``, one deadline.

Label Studio's address is ``ls_url`` (LABEL_STUDIO_URL), else the ``hostname`` that /setup sent; the key is
``api_key`` (LABEL_STUDIO_API_KEY), else /setup's ``access_token``. A key from the environment is never paired
with a host from /setup: it needs LABEL_STUDIO_URL, and /setup then changes neither. A key is a legacy token, sent as
``Token <key>``, or a personal access token (PAT: a JWT of type "refresh"), exchanged at /api/token/refresh/
for a short-lived access token sent as ``Bearer <access>``.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import http

log = logging.getLogger(__name__)
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
WEB_SCHEMES = ("http", "https")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
RENEW_BEFORE_EXPIRY_S = 30      # renew access tokens this long before they expire: clocks and requests drift
ACCESS_LIFETIME_S = 300         # Label Studio's access token lifetime, assumed when a token carries no "exp"
KEY_NEEDS_URL = ("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is empty: set LABEL_STUDIO_URL to Label "
                 "Studio's address (the key is sent only there, never to a host that /setup names)")
USE_A_PAT = ("set LABEL_STUDIO_API_KEY to a personal access token (Label Studio: Account & Settings → "
             "Personal Access Token)")


class ImageFetchError(Exception):
    """An image could not be fetched; the message names the cause and, where known, the fix."""


class ImageFetcher:
    """Fetches task images; safe to share between threads.

    ``max_bytes``: larger images are refused (checked while streaming). ``timeout``: seconds for a whole
    download, connecting included. ``allowed_hosts``: host names that images may come from besides Label
    Studio itself, redirects included (None: any host). ``allow_private``: host names and CIDR networks that
    may be private addresses (Label Studio's own origin always may).
    """

    def __init__(self, ls_url: str | None = None, api_key: str | None = None, local_files_root: str | None = None,
                 max_bytes: int = 50 * 2**20, timeout: float = 30.0, allowed_hosts: tuple[str, ...] | None = None,
                 allow_private: tuple[str, ...] = ()):
        self.ls_url = _base_url(ls_url, "LABEL_STUDIO_URL")
        self.api_key = api_key or None
        if self.api_key and not self.ls_url:
            raise ValueError(KEY_NEEDS_URL)
        self.local_files_root = Path(local_files_root).resolve() if local_files_root else None
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allowed_hosts = None if allowed_hosts is None else {host.lower() for host in allowed_hosts}
        self.allow_private = tuple(allow_private)
        self._setup_hostname: str | None = None
        self._setup_access_token: str | None = None
        self.auth = LabelStudioAuth(timeout, self.allow_private)   # shared with this Label Studio's API client

    def use_setup_values(self, hostname: str | None, access_token: str | None) -> None:
        """Remember what /setup sent, as a pair (its token goes only to its host, or to LABEL_STUDIO_URL when
        set). Ignored when LABEL_STUDIO_API_KEY is set: anyone can call /setup, and the key must not follow."""
        if self.api_key:
            return
        self._setup_hostname = _base_url(hostname, "/setup's hostname")
        self._setup_access_token = access_token or None

    def fetch(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of one task image. Raises ImageFetchError."""
        try:
            return self._fetch(url, task_id)
        except http.Refused as error:   # the URL itself (its own message names it)
            raise ImageFetchError(str(error)) from None
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
    def trusts_label_studio(self) -> bool:
        """Whether Label Studio's API can be believed: its address from the environment (never from /setup,
        which anyone can call) and a key to read it with."""
        return self.ls_url is not None and self._key is not None

    @property
    def label_studio_and_key(self) -> tuple[str | None, str | None]:
        """Label Studio's base URL and the key to send there (for its API client)."""
        return self._label_studio, self._key[0] if self._key else None

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
        answer = self._get(url, task_url)
        self._check_status(answer, task_url)
        return answer.body

    def _get(self, url: str, task_url: str) -> http.Answer:
        """GET through the guard, redirects checked hop by hop; the key goes only to Label Studio (first hop)."""
        target = http.Target.parse(url)
        if self.allowed_hosts is not None:
            self._check_allowed(target.origin, task_url)
        label_studio = self._origin_of_label_studio()
        authorization = self._authorization() if target.origin == label_studio else None
        answer = self._request(url, authorization, task_url)
        if answer.status == 401 and authorization and authorization.startswith("Bearer ") and answer.authorized:
            # the access token died early (revoked, clock skew): renew it once
            answer = self._request(url, self._authorization(stale=authorization), task_url)
        return answer

    def _request(self, url: str, authorization: str | None, task_url: str) -> http.Answer:
        label_studio = self._origin_of_label_studio()
        credentials = (label_studio, {"Authorization": authorization}) if authorization else None
        guard = http.Guard(self.allow_private, [label_studio] if label_studio else [])
        if self.allowed_hosts is not None:
            guard = _AllowListGuard(guard, self, task_url)
        try:
            return http.request(url, guard, timeout=self.timeout, max_bytes=self.max_bytes, credentials=credentials)
        except http.TooLarge:
            raise self._too_large(task_url) from None
        except http.TimedOut as error:
            raise ImageFetchError(f"{error} fetching {task_url!r}") from None
        except http.Unreachable as error:
            host = urlsplit(url).hostname
            hint = (f"; inside Docker, {host} is the container itself: set LABEL_STUDIO_URL to "
                    "http://host.docker.internal:PORT or the compose service name (http://label-studio:8080)"
                    if host in LOOPBACK_HOSTS else "")
            raise ImageFetchError(f"{error} to fetch {task_url!r}{hint}") from None
        except http.Refused as error:
            raise ImageFetchError(f"refused {task_url!r}: {error}") from None

    def _check_allowed(self, origin: http.Origin, task_url: str) -> None:
        if origin.host not in self.allowed_hosts and origin != self._origin_of_label_studio():
            raise ImageFetchError(f"refused {task_url!r}: {origin.host!r} is not an allowed image host "
                                  f"(allowed: {sorted(self.allowed_hosts)})")

    def _authorization(self, stale: str | None = None) -> str | None:
        """The Authorization header for Label Studio; ``stale`` is one it just refused."""
        if self._key is None:
            return None
        return self.auth.header(self._label_studio, self._key[0], stale)

    def _check_status(self, answer: http.Answer, task_url: str) -> None:
        status = answer.status
        if status < 300:
            return
        if status in (401, 403) and answer.origin == self._origin_of_label_studio():
            raise ImageFetchError(self._refused_by_label_studio(status, task_url))
        if status in (401, 403):
            raise ImageFetchError(f"{answer.origin.host} refused {task_url!r} ({status}); Label Studio "
                                  "credentials are sent only to Label Studio's own host")
        if status == 404:
            raise ImageFetchError(f"not found (404): {task_url!r}")
        raise ImageFetchError(f"HTTP {status} from {answer.origin.host} fetching {task_url!r}")

    def _refused_by_label_studio(self, status: int, task_url: str) -> str:
        refused = f"Label Studio refused {task_url!r} ({status})"
        if self._key is None:
            return f"{refused}: no API key; {USE_A_PAT}"
        key, source = self._key
        if is_personal_access_token(key):
            return f"{refused} to the personal access token in {source}: its user may lack access to this project"
        return (f"{refused} with the legacy token from {source}: legacy tokens are off by default since Label "
                f"Studio 1.17; {USE_A_PAT}, or enable legacy tokens in Label Studio")

    def _too_large(self, task_url: str) -> ImageFetchError:
        return ImageFetchError(f"refused {task_url!r}: larger than the limit of {self.max_bytes} bytes")

    def _origin_of_label_studio(self) -> http.Origin | None:
        return http.Origin.of(self._label_studio) if self._label_studio else None


class _AllowListGuard:
    """ALLOWED_HOSTS on top of the address guard: checked on every hop, redirects included."""

    def __init__(self, guard: http.Guard, fetcher: ImageFetcher, task_url: str):
        self.guard, self.fetcher, self.task_url = guard, fetcher, task_url

    def address(self, origin: http.Origin) -> str:
        self.fetcher._check_allowed(origin, self.task_url)
        return self.guard.address(origin)


class LabelStudioAuth:
    """The Authorization header for a Label Studio API key: ``Token <key>`` for a legacy token; for a personal
    access token ``Bearer <access token>``, exchanged at /api/token/refresh/ and cached until shortly before it
    expires."""

    def __init__(self, timeout: float, allow_private: tuple[str, ...] = ()):
        self._timeout = timeout
        self._allow_private = allow_private
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
        origin = http.Origin.of(label_studio)
        try:   # to Label Studio's origin only, no redirect followed: the PAT is in the body
            answer = http.request(url, http.Guard(self._allow_private, [origin]), method="POST",
                                  body=json.dumps({"refresh": pat}).encode(),
                                  headers={"Content-Type": "application/json"}, timeout=self._timeout,
                                  max_bytes=2**20, max_redirects=0)
        except http.RequestError as error:
            raise ImageFetchError(f"{error} (exchanging the personal access token at {url})") from None
        if answer.status in (401, 403):
            raise ImageFetchError(f"Label Studio rejected the personal access token ({answer.status} "
                                  f"from {url}): it was revoked, or belongs to another Label Studio")
        if answer.status == 404:
            raise ImageFetchError(f"{url} does not exist: this Label Studio has no personal access tokens "
                                  "(an old version?); use a legacy token")
        try:
            access = json.loads(answer.body)["access"] if answer.status == 200 else None
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str):
            raise ImageFetchError(f"no access token from {url} (HTTP {answer.status})")
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
