"""The CPU profile: what a lighter detector or a smaller detector input costs in recall and gains in speed.

    python bench/detectors.py [--images 3] [--scenes 100]
    python bench/detectors.py --tiny      # smoke test: 1 image, 1 round, 10 scenes

Speed: real architectures on 800x600 images (real weights when present, random otherwise: speed does not
depend on weight values), the default R50-FPN v2 at fp32 and at this machine's default PRECISION vs the
candidates for the `cpu` profile (MobileNetV3 Faster R-CNNs, SSDlite320) and smaller inputs, interleaved in one
run, with torchvision's published COCO box mAP of each. Recall: measuring it needs trained weights, so it is
measured where we have them —
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

from backend.config import CPU_PROFILE  # noqa: E402
from backend.demo.scoring import MatchScore, scene_tensor  # noqa: E402
from backend.demo.shapes import SHAPES, scenes  # noqa: E402
from backend.labeling.detections import Detections  # noqa: E402
from backend.labeling.detectors import DETECTORS, load_detector  # noqa: E402
from backend.labeling.errors import ModelUnavailable  # noqa: E402
from backend.labeling.proposals import ProposalSettings, Proposer  # noqa: E402
from backend.labeling.runtime import apply_to_detector  # noqa: E402
from backend.labeling.specs import (
    TINY_DIR,  # noqa: E402
    resolve_precision,  # noqa: E402
)

DEFAULT = resolve_precision("auto", torch.device("cpu"))
# (detector, input short side, precision)
VARIANTS = (("fasterrcnn_resnet50_fpn_v2", None, "fp32"), ("fasterrcnn_resnet50_fpn_v2", None, DEFAULT),
            ("fasterrcnn_resnet50_fpn_v2", 512, DEFAULT),
            ("fasterrcnn_mobilenet_v3_large_fpn", None, DEFAULT),
            ("fasterrcnn_mobilenet_v3_large_320_fpn", None, DEFAULT),
            ("ssdlite320_mobilenet_v3_large", None, DEFAULT))


def proposer(name: str, input_size: int | None, precision: str) -> tuple[Proposer, str]:
    try:
        model, kind = load_detector(name), "real"
    except ModelUnavailable:
        model, kind = load_detector(name, random_init=True), "random"
    # 0.05: the detectors' own default (random weights would send every SSD anchor through its NMS at 0.0)
    settings = ProposalSettings(score_threshold=0.05, input_size=input_size)
    return Proposer(apply_to_detector(model, precision), settings), kind


def coco_map(name: str) -> str:
    """torchvision's published COCO val2017 box mAP for ``name``'s weights."""
    weights = DETECTORS[name].coco_weights
    return f"{weights.meta['_metrics']['COCO-val2017']['box_map']:.1f}" if weights else "-"


def speed(images: int, rounds: int) -> dict[tuple[str, int | None], float]:
    pictures = [scene_tensor(s.image.resize((800, 600))) for s in scenes(11, images)]
    runners = {v: proposer(*v) for v in VARIANTS}
    seconds = {v: 0.0 for v in VARIANTS}
    for run, _ in runners.values():
        run(pictures[0])  # warm-up
    for _ in range(rounds):  # interleaved: this machine's speed drifts
        for v, (run, _) in runners.items():
            start = time.perf_counter()
            for picture in pictures:
                run(picture)
            seconds[v] += time.perf_counter() - start
    per_image = {v: s / (rounds * images) for v, s in seconds.items()}
    print("| detector | input | precision | weights | COCO box mAP | s/image | images/s |\n"
          "|---|---|---|---|---|---|---|")
    for (name, size, precision), s in per_image.items():
        print(f"| {name} | {size or 'own'} | {precision} | {runners[(name, size, precision)][1]} | {coco_map(name)} "
              f"| {s:.3f} | {1 / s:.2f} |")
    return per_image


def recall(n: int) -> None:
    model = load_detector("tiny_shapes", TINY_DIR / "detector.pt")
    held_out = list(scenes(1500, n, shapes=SHAPES))
    print("\n| tiny detector input | recall@0.5 | precision | recall, objects ≤ 16 px | ms/image |\n"
          "|---|---|---|---|---|")
    for size in (160, 128, 96, 64):   # 64 = 160 x 320/800, the SSDlite320 lever at this scale
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
    parser.add_argument("--tiny", action="store_true", help="1 image, 1 round, 10 scenes (smoke test)")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.rounds, args.scenes = 1, 1, 10
    torch.set_num_threads(args.threads)
    per_image = speed(args.images, args.rounds)
    recall(args.scenes)
    default = per_image[("fasterrcnn_resnet50_fpn_v2", None, DEFAULT)]
    profile = per_image[(CPU_PROFILE["detector"], None, DEFAULT)]
    print(f"\ncpu profile ({CPU_PROFILE['detector']}) vs default (R50-FPN v2) detector speed-up, both {DEFAULT}: "
          f"{default / profile:.1f}x")


if __name__ == "__main__":
    main()
