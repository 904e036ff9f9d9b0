"""The one Label Studio API client: JSON calls to Label Studio's own origin through the guarded HTTP request
(``studio.http``), with its key (a legacy token, or a personal access token exchanged by ``LabelStudioAuth``;
an access token Label Studio refuses is renewed once), and the few calls the backend makes.

The learner reads annotations, tasks and configs by id and lists a project's tasks; the bulk coordinator and
its workers list tasks, read and write predictions.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from . import http
from .images import ImageFetcher, ImageFetchError, LabelStudioAuth

PAGE_SIZE = 100
MAX_ANSWER_BYTES = 256 * 2**20   # a page of tasks with all fields can be large; not unbounded


class LabelStudioAPIError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LabelStudioAPI:
    """Label Studio at ``url`` (its base URL, from the environment) with ``key`` (None: anonymous calls)."""

    def __init__(self, url: str, key: str | None, timeout: float = 60.0, allow_private: tuple[str, ...] = (),
                 auth: LabelStudioAuth | None = None):
        self.url = url.rstrip("/")
        self.key = key or None
        self.timeout = timeout
        self.origin = http.Origin.of(self.url)
        self._guard = http.Guard(allow_private, [self.origin])
        self._auth = auth or LabelStudioAuth(timeout, allow_private)

    @classmethod
    def of(cls, fetcher: ImageFetcher) -> LabelStudioAPI:
        """The API of the Label Studio an image fetcher uses, with its key and its token cache."""
        url, key = fetcher.label_studio_and_key
        if url is None:
            raise LabelStudioAPIError("Label Studio's address is unknown: set LABEL_STUDIO_URL")
        return cls(url, key, fetcher.timeout, fetcher.allow_private, fetcher.auth)

    def request(self, method: str, path: str, params: dict | None = None, json_body: Any = None) -> Any:
        url = self.url + path + ("?" + urlencode(params) if params else "")
        authorization = self._authorization()
        answer = self._send(method, url, authorization, json_body)
        if answer.status == 401 and authorization and authorization.startswith("Bearer "):
            answer = self._send(method, url, self._authorization(stale=authorization), json_body)
        if answer.status >= 300:
            hint = (": set LABEL_STUDIO_API_KEY to a personal access token or legacy token of a user of this "
                    "project" if answer.status in (401, 403) else "")
            text = answer.body[:300].decode("utf-8", "replace")
            raise LabelStudioAPIError(f"{method} {path} → HTTP {answer.status}{hint}: {text}", answer.status)
        try:
            return json.loads(answer.body) if answer.body else None
        except ValueError:   # a proxy's HTML page, say
            raise LabelStudioAPIError(f"{method} {path}: the answer is not JSON: {answer.body[:200]!r}") from None

    def _send(self, method: str, url: str, authorization: str | None, json_body: Any) -> http.Answer:
        headers = {"Content-Type": "application/json"} if json_body is not None else {}
        credentials = (self.origin, {"Authorization": authorization}) if authorization else None
        try:
            return http.request(url, self._guard, method=method, headers=headers, credentials=credentials,
                                body=None if json_body is None else json.dumps(json_body).encode(),
                                timeout=self.timeout, max_bytes=MAX_ANSWER_BYTES)
        except http.RequestError as error:
            raise LabelStudioAPIError(f"cannot reach Label Studio at {self.url}: {error}") from None

    def _authorization(self, stale: str | None = None) -> str | None:
        if not self.key:
            return None
        try:
            return self._auth.header(self.url, self.key, stale)
        except ImageFetchError as error:
            raise LabelStudioAPIError(str(error)) from None

    # ------------------------------------------------------------------ the calls
    def project(self, project: int) -> dict:
        return self.request("GET", f"/api/projects/{project}/")

    def task(self, task: int) -> dict:
        return self.request("GET", f"/api/tasks/{task}/")

    def annotation(self, annotation: int) -> dict:
        return self.request("GET", f"/api/annotations/{annotation}/")

    def pages(self, project: int, page_size: int = PAGE_SIZE) -> Iterator[list[dict]]:
        """Every task of the project with its annotations and predictions, a page at a time (listing never
        triggers predictions)."""
        page, seen = 1, 0
        while True:
            try:
                body = self.request("GET", "/api/tasks", params={"project": project, "page": page,
                                                                  "page_size": page_size, "fields": "all"})
            except LabelStudioAPIError as error:
                if error.status == 404 and page > 1:   # past the last page
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body or []
            yield [t for t in tasks if isinstance(t, dict)]
            seen += len(tasks)
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or len(tasks) < page_size or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def prediction_versions(self, task: int) -> set[str]:
        return {p.get("model_version") for p in self.request("GET", "/api/predictions", params={"task": task}) or []
                if isinstance(p, dict)}

    def post_prediction(self, task: int, prediction: dict, version: str) -> dict:
        return self.request("POST", "/api/predictions", json_body={
            "task": task, "result": prediction.get("result") or [], "score": prediction.get("score", 0.0),
            "model_version": version})

