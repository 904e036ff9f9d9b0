"""The load bench, short: concurrent /predict + /webhook + /health against the real server (waitress) lose nothing.

Speed is not asserted here (bench/load.py prints it, the README has the figures); what is asserted is that every
request gets a 2xx answer, the server still serves afterwards, and memory stays bounded under the load.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Measured growth: +69 MiB over this short run, +132 MiB over the README's 30 s run (allocator warm-up, caches
# filling); a limit of 1 GiB catches runaway growth (e.g. every request's images kept), not small leaks.
MEMORY_GROWTH_LIMIT_MIB = 1024


@pytest.mark.slow
def test_load_bench_loses_no_request_and_memory_stays_bounded(tmp_path):
    figures_file = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "bench/load.py", "--seconds", "8", "--max-requests", "400",
                          "--images", "6", "--size", "320", "--out", str(figures_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1].startswith("load: ")
    figures = json.loads(figures_file.read_text())
    assert figures["server_alive"]
    for route in ("/predict", "/webhook", "/health"):
        assert figures["routes"][route]["lost"] == 0
        assert figures["routes"][route]["answered"] > 0, f"no {route} request was answered"
    assert figures["pss_peak_mib"] - figures["pss_start_mib"] < MEMORY_GROWTH_LIMIT_MIB
