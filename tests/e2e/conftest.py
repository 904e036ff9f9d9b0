"""Fixtures for the end-to-end tests against a real Label Studio (see label_studio.py)."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict

import pytest

from .label_studio import LS_VERSION, LabelStudio, LabelStudioError, release_venv

# Timings of every Label Studio started in this session, and of the end-to-end flows
# (backend start, retrieve wall time, tasks/s), printed in the terminal summary.
_TIMINGS: list[str] = []
# Outcomes of test_releases.py per Label Studio release (its test ids end in [<release>]).
_RELEASES: dict[str, Counter] = defaultdict(Counter)


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e is an end-to-end test (select with -m e2e / -m 'not e2e')."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.e2e)


def pytest_runtest_logreport(report):
    match = re.search(r"test_releases\.py::.*\[(\d+\.\d+\.\d+)\]$", report.nodeid)
    if match and (report.when == "call" or report.outcome != "passed"):
        outcome = "not applicable" if report.skipped else report.outcome
        _RELEASES[match[1]][outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if _RELEASES:
        terminalreporter.section("Label Studio releases")
        for version, counts in sorted(_RELEASES.items()):
            terminalreporter.write_line(f"Label Studio {version}: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if _TIMINGS:
        terminalreporter.section("Label Studio end-to-end timings")
        for line in _TIMINGS:
            terminalreporter.write_line(line)


def start_label_studio(tmp_path_factory, version: str = LS_VERSION) -> LabelStudio:
    """A started Label Studio of `version` from its venv (see scripts/setup.sh).

    Without that venv the test is skipped locally, but fails in CI.
    """
    exe = release_venv(version) / "bin" / "label-studio"
    if not exe.is_file():
        message = f"{exe} not found: run `bash scripts/setup.sh` (or set LS_VENV / LS_RELEASES)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ls = LabelStudio(tmp_path_factory.mktemp(f"label-studio-{version}"), version=version)
    try:
        ls.start()
    except LabelStudioError as e:
        pytest.fail(str(e), pytrace=False)
    t = ls.timings
    _TIMINGS.append(
        f"Label Studio {version} {ls.url} pid {ls.pid}: template {t['template_s']:.1f} s,"
        f" copy {t['copy_s']:.2f} s, start {t['start_s']:.1f} s"
    )
    return ls


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudio:
    """One real Label Studio per test session, legacy token auth by default.

    Tests that change organisation-wide settings (token settings) must restore them.
    """
    ls = start_label_studio(tmp_path_factory)
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def e2e_timings():
    """`record(line)`: add a line to the timings printed at the end of the session (and print it)."""

    def record(line: str) -> None:
        _TIMINGS.append(line)
        print(f"[timing] {line}")

    return record
