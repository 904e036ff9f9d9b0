"""The CPU profile: what a lighter detector or a smaller detector input costs in recall and gains in speed.

    python bench/detectors.py [--images 3] [--scenes 100]

Speed: real architectures on 800x600 images (real weights when present, random otherwise: speed does not
depend on weight values), the default R50-FPN v2 vs the `cpu` profile's MobileNetV3-FPN and vs smaller inputs,
interleaved in one run. Recall: measuring it needs trained weights, so it is measured where we have them —
the bundled tiny detector on held-out shapes-world scenes at smaller input sizes (the same lever).
The last line is the profile's speed-up.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.demo.scoring import MatchScore, scene_tensor  # noqa: E402
from backend.demo.shapes import SHAPES, scenes  # noqa: E402
from backend.labeling.detections import Detections  # noqa: E402
from backend.labeling.detectors import load_detector  # noqa: E402
from backend.labeling.errors import ModelUnavailable  # noqa: E402
from backend.labeling.factory import TINY_DIR  # noqa: E402
from backend.labeling.proposals import ProposalSettings, Proposer  # noqa: E402

VARIANTS = (("fasterrcnn_resnet50_fpn_v2", None), ("fasterrcnn_resnet50_fpn_v2", 512),
            ("fasterrcnn_mobilenet_v3_large_fpn", None), ("fasterrcnn_mobilenet_v3_large_fpn", 512))


def proposer(name: str, input_size: int | None) -> tuple[Proposer, str]:
    try:
        model, kind = load_detector(name), "real"
    except ModelUnavailable:
        model, kind = load_detector(name, random_init=True), "random"
    return Proposer(model, ProposalSettings(score_threshold=0.0, input_size=input_size)), kind


def speed(images: int, rounds: int) -> dict[tuple[str, int | None], float]:
    pictures = [scene_tensor(s.image.resize((800, 600))) for s in scenes(11, images)]
    runners = {v: proposer(*v) for v in VARIANTS}
    seconds = {v: 0.0 for v in VARIANTS}
    for v, (run, _) in runners.items():
        run(pictures[0])  # warm-up
    for _ in range(rounds):  # interleaved: this machine's speed drifts
        for v, (run, _) in runners.items():
            start = time.perf_counter()
            for picture in pictures:
                run(picture)
            seconds[v] += time.perf_counter() - start
    per_image = {v: s / (rounds * images) for v, s in seconds.items()}
    print("| detector | input | weights | s/image | images/s |\n|---|---|---|---|---|")
    for (name, size), s in per_image.items():
        print(f"| {name} | {size or 800} | {runners[(name, size)][1]} | {s:.2f} | {1 / s:.2f} |")
    return per_image


def recall(n: int) -> None:
    model = load_detector("tiny_shapes", TINY_DIR / "detector.pt")
    held_out = list(scenes(1500, n, shapes=SHAPES))
    print("\n| tiny detector input | recall@0.5 | precision | recall, objects ≤ 16 px | ms/image |\n|---|---|---|---|---|")
    for size in (160, 128, 96):
        run = Proposer(model, ProposalSettings(score_threshold=0.7, input_size=size))
        score, small = MatchScore(), MatchScore()
        start = time.perf_counter()
        for scene in held_out:
            found = run(scene_tensor(scene.image))
            detections = Detections(found.boxes.numpy(), found.scores.numpy(), ("object",) * len(found.boxes))
            truth = [o.box for o in scene.objects]
            score.add(detections, truth, ["object"] * len(truth))
            tiny = [b for b in truth if max(b[2] - b[0], b[3] - b[1]) <= 16]
            small.add(detections, tiny, ["object"] * len(tiny))
        ms = (time.perf_counter() - start) / n * 1000
        print(f"| {size} px | {score.recall:.3f} | {score.precision:.3f} | {small.recall:.3f} | {ms:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    per_image = speed(args.images, args.rounds)
    recall(args.scenes)
    default = per_image[("fasterrcnn_resnet50_fpn_v2", None)]
    profile = per_image[("fasterrcnn_mobilenet_v3_large_fpn", None)]
    print(f"\ncpu profile (MobileNetV3-FPN) vs default (R50-FPN v2) detector speed-up: {default / profile:.1f}x")


if __name__ == "__main__":
    main()
