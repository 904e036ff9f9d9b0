"""Quality of the pipeline on held-out shapes-world scenes with the bundled tiny models, option by option.

    python bench/quality.py [--scenes 100] [--seed 1000]

Prints one Markdown table row per variant (box recall at IoU 0.5, precision after background rejection,
label accuracy on matched boxes): the original recipe, the crop options, background prompt off, prompt
ensembles, proposal thresholds and modes, known vs novel classes. Test thresholds come from these figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.demo.scoring import score_scenes  # noqa: E402
from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES, SHAPES, scenes  # noqa: E402
from backend.labeling.crops import CropSettings  # noqa: E402
from backend.labeling.factory import build_labeler  # noqa: E402
from backend.labeling.prompts import LabelSet  # noqa: E402
from backend.labeling.proposals import ProposalSettings, Proposer  # noqa: E402
from backend.labeling.specs import tiny_spec  # noqa: E402

ENSEMBLE = ("a photo of a {}.", "a {}", "{}", "a photo of a {} on a background")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    started = time.time()
    known = list(scenes(args.seed, args.scenes, shapes=KNOWN_SHAPES))
    mixed = list(scenes(args.seed + 1, args.scenes))
    labeler = build_labeler(tiny_spec())
    detector = labeler.proposer.model
    base = LabelSet.build(KNOWN_SHAPES)
    trained_crops = labeler.crops

    def run(name, scene_list=known, labelset=base, crops=trained_crops, proposals=ProposalSettings(),
            ignore=()):
        labeler.crops = crops
        labeler.proposer = Proposer(detector, proposals)
        s = score_scenes(labeler, scene_list, labelset, ignore_labels=ignore)
        print(f"| {name} | {s.recall:.3f} | {s.precision:.3f} | {s.label_accuracy:.3f} | {s.ground_truth} |",
              flush=True)
        return s

    print(f"{args.scenes} held-out scenes per set (seeds {args.seed}, {args.seed + 1}), tiny models, IoU 0.5\n")
    print("| variant (known-shape scenes unless said) | recall | precision | label acc | GT boxes |")
    print("|---|---|---|---|---|")
    run("original recipe: box as is, CLIP centre crop, thr 0.7, bg prompt", crops=CropSettings())
    default = run("tiny default: square crop, 1.25 context, min 16 px, thr 0.7, bg prompt")
    run("  background prompt off", labelset=replace(base, background=()))
    run("  prompt ensemble (4 templates)", labelset=LabelSet.build(KNOWN_SHAPES, templates=ENSEMBLE))
    for thr in (0.3, 0.05):
        run(f"  proposal threshold {thr}", proposals=ProposalSettings(score_threshold=thr))
        run(f"  proposal threshold {thr}, bg prompt off", labelset=replace(base, background=()),
            proposals=ProposalSettings(score_threshold=thr))
    print("| **known + novel scenes, 8-label set** | | | | |")
    every = LabelSet.build(SHAPES)
    both = run("all shapes (detector mode)", mixed, every)
    run("  novel shapes only (diamond, pentagon)", mixed, every, ignore=KNOWN_SHAPES)
    run("  known shapes only", mixed, every, ignore=NOVEL_SHAPES)
    run("  rpn mode, objectness 0.7", mixed, every, proposals=ProposalSettings(mode="rpn"))
    run("  rpn mode, objectness 0.9", mixed, every, proposals=ProposalSettings(mode="rpn", score_threshold=0.9))
    per_class = ", ".join(f"{c} {v[2] / max(1, v[1]):.2f}" for c, v in sorted(both.per_class.items()))
    print(f"\nlabel accuracy per class (all shapes, detector mode): {per_class}")
    print(f"({time.time() - started:.0f} s)")
    print(f"tiny pipeline (thr 0.7, bg on): recall {default.recall:.3f} precision {default.precision:.3f} "
          f"labels {default.label_accuracy:.3f}")


if __name__ == "__main__":
    main()
