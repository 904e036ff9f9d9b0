"""The HTTP face of the backend: Label Studio's ML backend routes, every error as JSON.

``create_app()`` builds a Flask app around one ``ClipBackend`` (models load here, once per process).
Run it with ``python -m backend serve`` (waitress), or ``backend.wsgi:app`` under any WSGI server.
"""
from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from .config import Settings, demo_from_env
from .studio.label_config import LabelConfigError

log = logging.getLogger(__name__)
access = logging.getLogger("backend.access")
MAX_BODY_BYTES = 50 * 1024 * 1024
MAX_CONFIG_CHARS = 2 * 1024 * 1024   # real labeling configs are kilobytes; parsed configs are cached per process
CHANNEL_TIMEOUT_S = 60    # waitress closes a connection idle (or sending nothing) this long
CONNECTION_LIMIT = 1000   # open client connections at most; each costs a socket, not a thread


SECRET_SEEN = "clip_ls.url_secret"
AUTHENTICATED = "clip_ls.authenticated"


class BadRequest(ValueError):
    """The request is not what the protocol says; answered with 400 and the reason."""


def create_app(settings: Settings | None = None, backend=None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if backend is None:
        from .labeling.factory import build_labeler, set_threads
        from .model import ClipBackend
        set_threads(settings.torch_threads)
        started = time.perf_counter()
        backend = ClipBackend(settings, build_labeler(settings.model_spec()))
        log.info("models loaded and warmed up in %.1f s (%s)", time.perf_counter() - started,
                 "demo: tiny shapes models" if settings.demo else settings.clip_model)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.extensions["clip_backend"] = backend
    secret, user, password = settings.url_secret, settings.basic_auth_user, settings.basic_auth_pass
    if secret:
        app.wsgi_app = _SecretPrefix(app.wsgi_app, secret)

    def authenticated() -> bool:
        """Under URL_SECRET's prefix, or with the right Basic Auth."""
        if request.environ.get(SECRET_SEEN):
            return True
        auth = request.authorization
        return bool(user) and (auth is not None and auth.type == "basic"
                               and hmac.compare_digest((auth.username or "").encode(), user.encode())
                               and hmac.compare_digest((auth.password or "").encode(), password.encode()))

    @app.before_request
    def guard():
        request.environ[AUTHENTICATED] = authenticated()
        if not (secret or user) or request.path == "/health" or request.environ[AUTHENTICATED]:
            return None
        if request.path == "/webhook" and getattr(backend, "reads_annotations_from_label_studio", False):
            return None   # a webhook is then only a hint: what is learned is read from Label Studio's API
        log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote_addr,
                    "no or wrong Basic Auth" if user else "not under URL_SECRET's path")
        if not user:
            return jsonify(error="not found"), 404   # the secret path is the credential: nothing to hint at
        response = jsonify(error="authentication required (HTTP Basic Auth)")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="clip-ls"'
        return response

    @app.after_request
    def access_log(response):
        """One line per request (the path without URL_SECRET's prefix: the log never holds a secret)."""
        access.info('%s "%s %s %s" %s', request.remote_addr, request.method, request.path,
                    request.environ.get("SERVER_PROTOCOL", "HTTP/1.1"), response.status_code)
        return response

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class=type(backend).__name__)

    @app.post("/setup")
    def setup():
        body = _json_object()
        schema = _config(_field(body, "schema", str))
        return jsonify(backend.setup(schema, body.get("project"), _optional_str(body, "hostname"),
                                     _optional_str(body, "access_token")))

    @app.post("/predict")
    def predict():
        body = _json_object()
        tasks = _field(body, "tasks", list)
        if not tasks or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("'tasks' must be a non-empty list of task objects")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context") if isinstance(params.get("context"), dict) else None
        label_config = body.get("label_config") or _project_label_config(tasks)
        if not isinstance(label_config, str):
            raise BadRequest("'label_config' (the labeling config XML) is missing")
        _config(label_config)
        started = time.perf_counter()
        results = backend.predict(tasks, label_config, body.get("project"), context)
        log.info("predict: %d task(s) → %d result(s) in %.2f s", len(tasks), len(results),
                 time.perf_counter() - started)
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        body = _json_object()
        event = _field(body, "action", str)
        project = body.get("project")
        if isinstance(project, dict) and isinstance(project.get("label_config"), str):
            _config(project["label_config"])   # the same limit as /setup and /predict
        answer = backend.fit(event, body, authenticated=request.environ[AUTHENTICATED])
        if answer.get("status") == "refused":
            log.warning("refused webhook %s from %s: %s", event, request.remote_addr, answer.get("reason"))
        return jsonify(answer), 403 if answer.get("status") == "refused" else 201

    @app.get("/report/<int:project>")
    def report(project: int):
        """What annotators did with this project's predictions (read from Label Studio; changes nothing)."""
        from .reporting import LabelStudioAPIError, ReportUnavailable, make_report
        from .studio.report import render

        fmt = request.args.get("format", "html")
        if fmt not in ("html", "json", "text"):
            raise BadRequest("'format' must be html, json or text")
        try:
            made = make_report(settings, project, backend.learning.store)
        except ReportUnavailable as error:
            return jsonify(error=str(error)), 409
        except LabelStudioAPIError as error:
            return jsonify(error=f"Label Studio: {error}"), 502
        if fmt == "json":
            return jsonify(made.to_dict())
        return render(made, fmt), 200, {"Content-Type": f"text/{'html' if fmt == 'html' else 'plain'}; charset=utf-8"}

    @app.errorhandler(BadRequest)
    @app.errorhandler(LabelConfigError)
    def bad_request(error):
        return jsonify(error=str(error)), 400

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        return jsonify(error=error.description, status=error.code), error.code

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error: {type(error).__name__}: {error}"), 500

    return app


class _SecretPrefix:
    """WSGI: serves ``/<secret>/any/route`` as ``/any/route``, marked as authenticated. Label Studio appends its
    paths (/setup, /predict, /webhook for the webhook it creates) to the model URL, so the prefix rides along."""

    def __init__(self, app, secret: str):
        self.app, self.secret = app, secret.strip("/").encode()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        first, _, rest = path[1:].partition("/")
        if hmac.compare_digest(first.encode("latin-1", "replace"), self.secret):
            environ["PATH_INFO"] = "/" + rest
            environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/" + first
            environ[SECRET_SEEN] = True
        return self.app(environ, start_response)


def _json_object() -> dict:
    try:
        body = request.get_json(silent=True)
    except RecursionError:   # the JSON decoder recurses per nesting level
        raise BadRequest("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object (Content-Type: application/json)")
    return body


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _config(xml: str) -> str:
    if len(xml) > MAX_CONFIG_CHARS:
        raise BadRequest(f"the labeling config is {len(xml):,} characters, above the limit of {MAX_CONFIG_CHARS:,}")
    return xml


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    return value if isinstance(value, str) and value else None


def _project_label_config(tasks: list[dict]) -> str | None:
    """Older callers send the config only inside each task's project."""
    project = tasks[0].get("project")
    return project.get("label_config") if isinstance(project, dict) else None


def serve(args) -> int:
    """``python -m backend serve``: waitress, one process (models load once), ``--threads`` request threads.

    waitress reads and buffers each request in its I/O loop and hands only complete requests to the threads,
    so slow or half-open client connections cannot take the threads that /health needs (measured by
    ``bench/slowloris.py``; thread-per-connection servers such as gunicorn's sync/gthread workers stall)."""
    import waitress

    settings = Settings.from_env(demo=args.demo or demo_from_env())
    app = create_app(settings)
    log.info("serving on http://%s:%d (%d threads)", args.host, args.port, args.threads)
    waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="clip-ls",
                   channel_timeout=CHANNEL_TIMEOUT_S, connection_limit=CONNECTION_LIMIT,
                   max_request_body_size=MAX_BODY_BYTES)
    return 0
