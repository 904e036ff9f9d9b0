"""Every bench runs at a tiny size, so none can rot: it exits 0 and prints its last line. Timing is never asserted
(the benches print ratios; the README has the full-size figures)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout: float = 600) -> list[str]:
    run = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def test_quality_bench_runs():
    last = run_bench("quality.py", "--scenes", "3")[-1]
    assert re.fullmatch(r"tiny pipeline \(thr 0\.7, bg on\): "
                        r"recall [01]\.\d{3} precision [01]\.\d{3} labels [01]\.\d{3}", last), last


@pytest.mark.parametrize("with_redis", [False, True])
def test_cache_bench_runs(with_redis, redis_url):
    args = ["--images", "2", "--rounds", "1", "--size", "160"] + (["--redis", redis_url] if with_redis else [])
    lines = run_bench("cache.py", *args)
    assert re.fullmatch(r"feature cache warm/cold speedup: \d+\.\dx \(2 images of 160 px, tiny models, median of 1 "
                        r"rounds\)", lines[-1]), lines[-1]
    assert any(line.startswith("Redis tier warm/cold speedup") for line in lines) == with_redis


def test_corrections_bench_runs():
    last = run_bench("corrections.py", "--tiny")[-1]
    assert re.fullmatch(r"gain after 16 shots: [+-]\d+\.\d points", last), last


def test_learner_refit_bench_runs():
    last = run_bench("learner_refit.py", "--tiny")[-1]
    assert re.fullmatch(r"refit after one annotation, 100 examples, 16 dims: "
                        r"\d+\.\d ms \(\d+\.\d\dx the 50 ms target\)", last), last
