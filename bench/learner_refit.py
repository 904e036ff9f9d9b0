"""What one new annotation costs the learner: rebuilding a project's memory and refitting it, synthetic data.

    python bench/learner_refit.py [--examples 2000] [--dims 64 512] [--rounds 5] [--repeats R] [--tiny]

A project holds ``--examples`` embedded examples (8 labels and background, 5 per annotation, unit vectors around
per-label centres); one more annotation arrives and the memory is rebuilt from the previous state and refitted
(GDA with its cross-validated temperature and margin), as the store and the next prediction do. Compared with the
first fit of the same project (median of ``--rounds``); the target is < 50 ms per refit, so refitting can stay
synchronous with storing. ``--repeats``: LEARNING_REPEATS (cross-validation over that many fold assignments
while cheap: small projects).
The last line is the refit time at the largest size.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.labeling.adapter import AdapterSettings, Examples, Memory  # noqa: E402
from backend.labeling.prompts import LabelSet  # noqa: E402

LABELS = [f"label{i}" for i in range(8)]
PER_ANNOTATION = 5


def project(examples: int, dims: int, seed: int = 0) -> tuple[list[Examples], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(LABELS) + 1, dims, generator=g), dim=-1)
    sources = []
    for start in range(0, examples, PER_ANNOTATION):
        rows = torch.randint(0, len(LABELS) + 1, (min(PER_ANNOTATION, examples - start),), generator=g)
        keys = F.normalize(centres[rows] + 0.8 * torch.randn(len(rows), dims, generator=g) / dims ** 0.5, dim=-1)
        labels = tuple(LABELS[r] if r < len(LABELS) else None for r in rows.tolist())
        sources.append(Examples(("box",) * len(rows), labels, keys, task=start))
    text = F.normalize(centres[:len(LABELS)] + 0.5 * torch.randn(len(LABELS), dims, generator=g), dim=-1)
    return sources, text


def fit(sources: list[Examples], text: torch.Tensor, settings: AdapterSettings,
        previous: Memory | None = None) -> tuple[float, Memory]:
    """Milliseconds to build the memory of ``sources`` (from the project's ``previous`` state, as the store does)
    and fit it, and the memory."""
    labelset = LabelSet.build(LABELS)
    started = time.perf_counter()
    memory = Memory.build(sources, previous)
    memory.fitted("box", labelset, lambda e: 10.0 * e @ text.T, settings)
    return 1000 * (time.perf_counter() - started), memory


def refit(sources: list[Examples], text: torch.Tensor, settings: AdapterSettings) -> tuple[float, float]:
    """(first fit, refit after the last source arrives), in ms."""
    first, memory = fit(sources[:-1], text, settings)
    return first, fit(sources, text, settings, memory)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=AdapterSettings().repeats)
    parser.add_argument("--tiny", action="store_true", help="a small project, one round: the smoke run")
    args = parser.parse_args()
    if args.tiny:
        args.examples, args.dims, args.rounds = 100, [16], 1
    torch.set_num_threads(1)   # one annotation is stored by one request/worker thread
    print("| dims | examples | first fit, ms | refit after one more annotation, ms |")
    print("|---|---|---|---|")
    for dims in args.dims:
        sources, text = project(args.examples + PER_ANNOTATION, dims)
        times = [refit(sources, text, AdapterSettings(repeats=args.repeats)) for _ in range(args.rounds)]
        first, again = (statistics.median(t[i] for t in times) for i in (0, 1))
        print(f"| {dims} | {args.examples} | {first:.1f} | {again:.1f} |", flush=True)
    print(f"refit after one annotation, {args.examples} examples, {args.dims[-1]} dims: {again:.1f} ms "
          f"({again / 50:.2f}x the 50 ms target)")


if __name__ == "__main__":
    main()
