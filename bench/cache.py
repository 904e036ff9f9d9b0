"""The feature cache: a repeated prediction of N images, cold (computed) vs warm (from the cache), in one run.

    python bench/cache.py [--images 32] [--size 640] [--rounds 3] [--redis redis://127.0.0.1:6379/15]

The bundled tiny models (``--demo``) on shapes-world scenes scaled to ``--size`` pixels, read from disk the way
Label Studio local files are (``/data/local-files/?d=...``), through ``ClipBackend.predict`` in chunks of 8 tasks
(what a "Retrieve predictions" or a bulk chunk asks). Each round clears the cache, predicts every image (cold),
predicts them again (warm: the same images, other task ids, as in another project), and with ``--redis`` predicts
them once more from a second backend whose only tier is Redis (what another process or RQ worker sees). Times are
medians over the rounds; the speedup is the median of the per-round ratios (a cold and a warm pass measured
back to back suffer the same machine noise). The last line is ``feature cache warm/cold speedup: N.Nx (...)``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.config import Settings  # noqa: E402
from backend.demo.shapes import KNOWN_SHAPES, scenes  # noqa: E402
from backend.labeling.factory import build_labeler, set_threads  # noqa: E402
from backend.model import ClipBackend  # noqa: E402

LABELS = "".join(f'<Label value="{s}"/>' for s in KNOWN_SHAPES)
CHOICES = "".join(f'<Choice value="{s}"/>' for s in KNOWN_SHAPES)
CONFIG = (f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{LABELS}'
          f'</RectangleLabels><Choices name="scene" toName="image" choice="multiple">{CHOICES}</Choices></View>')
CHUNK = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=640, help="scene side in pixels (scenes are 160 px, upscaled)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", help="also measure hits through Redis from a second backend (a test database!)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    set_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    for i, scene in enumerate(scenes(9000, args.images)):
        scene.image.resize((args.size, args.size)).save(root / f"scene_{i}.png")
    env = {"LOCAL_FILES_DOCUMENT_ROOT": str(root), "MODEL_DIR": str(root / "state"), "FEATURE_CACHE_MB": "1024"}
    if args.redis:
        env["REDIS_URL"] = args.redis
    settings = Settings.from_env(env, demo=True)
    labeler = build_labeler(settings.model_spec())
    backend = ClipBackend(settings, labeler)
    backend.settings = settings.replace(predict_budget_seconds=1e9)  # no per-task fallback
    other = None
    if args.redis:
        other = ClipBackend(backend.settings.replace(feature_cache_mb=0), labeler)
        other.settings = backend.settings

    def tasks(offset: int) -> list[dict]:
        return [{"id": offset + i, "data": {"image": f"/data/local-files/?d=scene_{i}.png"}}
                for i in range(args.images)]

    def run(model: ClipBackend, batch: list[dict], project: str) -> float:
        started = time.perf_counter()
        for start in range(0, len(batch), CHUNK):
            model.predict(batch[start:start + CHUNK], CONFIG, project)
        return time.perf_counter() - started

    run(backend, tasks(0)[:2], "1.1")   # first-call costs out of the way
    cold, warm, shared = [], [], []
    for round_ in range(args.rounds):
        backend.cache.clear()
        cold.append(run(backend, tasks(0), "1.1"))
        warm.append(run(backend, tasks(100_000), "2.1"))
        if other is not None:
            shared.append(run(other, tasks(200_000), "3.1"))
        print(f"round {round_ + 1}: cold {cold[-1]:.2f} s, warm {warm[-1]:.3f} s"
              + (f", second process via Redis {shared[-1]:.3f} s" if shared else ""), flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    stats = backend.cache.stats
    print(f"{args.images} images of {args.size}x{args.size} px, tiny models, {args.threads} torch threads, "
          f"median of {args.rounds} rounds")
    print(f"| pass | seconds | images/s |\n|---|---|---|\n| cold (computed) | {c:.2f} | {args.images / c:.1f} |\n"
          f"| warm (memory tier) | {w:.3f} | {args.images / w:.1f} |")
    if shared:
        s = statistics.median(shared)
        print(f"| warm, another process (Redis tier) | {s:.3f} | {args.images / s:.1f} |")
    print(f"cache: {stats.hits} hits, {stats.misses} misses, {stats.stored} parts stored, {stats.errors} errors")
    if shared:
        print(f"Redis tier warm/cold speedup: {statistics.median(a / b for a, b in zip(cold, shared)):.1f}x")
        other.cache.clear()
    ratios = sorted(a / b for a, b in zip(cold, warm))
    print(f"per-round warm/cold ratios: {', '.join(f'{r:.1f}' for r in ratios)}")
    print(f"feature cache warm/cold speedup: {statistics.median(ratios):.1f}x ({args.images} images of "
          f"{args.size} px, tiny models, median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
