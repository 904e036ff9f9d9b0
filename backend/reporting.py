"""The correction report's composition root: Label Studio's API and the backend's record of its predictions,
from the settings, for ``python -m backend report`` and the served ``/report/<project>`` page."""
from __future__ import annotations

import sys
from pathlib import Path

from .config import Settings
from .store import open_store
from .studio.api import LabelStudioAPI, LabelStudioAPIError
from .studio.report import Report, project_report, render


class ReportUnavailable(RuntimeError):
    """The report cannot be made with these settings (no Label Studio API configured)."""


def make_report(settings: Settings, project: int, store=None) -> Report:
    """Read ``project`` from Label Studio (paged, read-only) and compare annotations with predictions."""
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise ReportUnavailable("the report reads the project from Label Studio: set LABEL_STUDIO_URL and "
                                "LABEL_STUDIO_API_KEY (a personal access token or legacy token)")
    api = LabelStudioAPI(settings.label_studio_url, settings.label_studio_api_key)
    return project_report(api, project, lambda task: _recorded(store, project, task))


def _recorded(store, project: int, task: int) -> dict | None:
    return store.prediction(project, task) if store is not None else None


def report_command(args) -> int:
    settings = Settings.from_env()
    store = open_store(settings.redis_url, settings.model_dir)
    try:
        text = render(make_report(settings, args.project, store), args.format)
    except (ReportUnavailable, LabelStudioAPIError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0
