"""What corrections buy: zero-shot vs the few-shot memory after k corrected examples per class, tiny models.

    python bench/corrections.py [--scenes 300] [--pool 300] [--draws 3] [--tune] [--tiny] [--mirror] [--harm H]
                                [--repeats R]

The shapes world has 6 KNOWN shapes the tiny CLIP was trained on and 2 NOVEL ones (diamond, pentagon) it never
saw: zero-shot labels those as the nearest known shape. The label set has all 8 shapes plus the background
prompt. Corrections are simulated as the backend learns them from Label Studio: an annotator corrects whole
scenes (from a pool, seed 2000, in random order) until every class has at least k examples; each corrected scene
gives its ground-truth boxes and, as background, the zero-shot predictions that match no object (the boxes the
annotator deleted), embedded as the learner embeds them (``Labeler.embed_examples``). Held-out scenes (seed 3000)
are scored; each k is repeated ``--draws`` times with other scenes, averaged.

Columns: accuracy = right label among detected objects (IoU >= 0.5); recall = objects found with the right
label; precision = predictions that are an object with the right label. ``--tune`` prints the temperatures /
shrinkage / harm comparison on validation scenes (seed 4000) instead: how the defaults in
backend/labeling/adapter.py were chosen.
The last lines: novel-shape accuracy after 4 and 16 shots, the worst change of known-shape accuracy against
zero-shot (over k = 1, 4, 16), the expected calibration error of region scores before / after the calibrator
learned from 16 corrected tasks (with the 16-shot memory; the other held-out scenes scored), the AUROC with which
task scores (product of calibrated keep-probabilities) separate tasks needing any correction, and last the gain
in all-class recall after 16 shots, in points.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.demo.scoring import MatchScore, scene_tensor  # noqa: E402
from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES, SHAPES, scenes  # noqa: E402
from backend.labeling.adapter import AdapterSettings, Examples, Memory, adjust_logits  # noqa: E402
from backend.labeling.calibration import Calibrator, expected_calibration_error, task_score  # noqa: E402
from backend.labeling.factory import build_labeler  # noqa: E402
from backend.labeling.matching import Region, match_regions  # noqa: E402
from backend.labeling.prompts import LabelSet  # noqa: E402
from backend.labeling.specs import tiny_spec  # noqa: E402

HEAD = "label"
SHOTS = (1, 4, 16)
CHUNK = 16


class World:
    """Pool scenes with embedded ground truth and background candidates; held-out scenes with features."""

    def __init__(self, labeler, labelset: LabelSet, pool_seed: int, pool_size: int, test_seed: int, test_size: int):
        self.labeler, self.labelset = labeler, labelset
        self.pool = list(scenes(pool_seed, pool_size))
        self.objects: list[tuple[int, str, torch.Tensor]] = []      # scene index, shape, embedding
        self.background: list[tuple[int, torch.Tensor]] = []        # scene index, embedding of a false positive
        for start in range(0, len(self.pool), CHUNK):
            batch = self.pool[start:start + CHUNK]
            images = [scene_tensor(s.image) for s in batch]
            boxes = [torch.tensor([o.box for o in s.objects], dtype=torch.float32).reshape(-1, 4) for s in batch]
            embedded = [labeler.embed_examples(image, b) for image, b in zip(images, boxes)]
            features = labeler.features(images, regions=True, whole=False)
            predicted = labeler.name(features, {HEAD: labelset})
            for i, scene in enumerate(batch):
                index = start + i
                self.objects += [(index, o.shape, e) for o, e in zip(scene.objects, embedded[i])]
                # zero-shot predictions overlapping no object: what an annotator deletes
                kept = predicted[i].regions[HEAD]
                truth = np.asarray([o.box for o in scene.objects]).reshape(-1, 4)
                deleted = [b for b in features[i].proposals.boxes if _hits(b, kept.boxes) and not _hits(b, truth)]
                if deleted:
                    background = labeler.embed_examples(images[i], torch.as_tensor(np.asarray(deleted)))
                    self.background += [(index, e) for e in background]
        self.test = list(scenes(test_seed, test_size))
        self.features = []
        for start in range(0, len(self.test), CHUNK):
            images = [scene_tensor(s.image) for s in self.test[start:start + CHUNK]]
            self.features += labeler.features(images, regions=True, whole=False)

    def memory(self, shots: int, draw: int) -> Memory:
        """Whole scenes, in a random order, until every class has ``shots`` examples; one source per scene."""
        if shots == 0:
            return Memory()
        rng = np.random.default_rng(draw)
        counts, used = dict.fromkeys(SHAPES, 0), []
        for index in rng.permutation(len(self.pool)):
            if min(counts.values()) >= shots:
                break
            used.append(int(index))
            for o in self.pool[index].objects:
                counts[o.shape] += 1
        sources = []
        for index in used:
            rows = [(shape, e) for i, shape, e in self.objects if i == index]
            rows += [(None, e) for i, e in self.background if i == index]
            sources.append(Examples((HEAD,) * len(rows), tuple(r[0] for r in rows), torch.stack([r[1] for r in rows])))
        return Memory.build(sources)

    def score(self, memory: Memory, settings: AdapterSettings | None = None, adjust=None) -> MatchScore:
        """Score the held-out scenes with the memory (this backend's adapter, or another ``adjust`` function)."""
        score = MatchScore()
        for scene, result in zip(self.test, self.predict(memory, settings, adjust)):
            score.add(result.regions[HEAD], [o.box for o in scene.objects], [o.shape for o in scene.objects])
        return score

    def predict(self, memory: Memory, settings: AdapterSettings | None = None, adjust=None):
        """The held-out scenes' results with the memory."""
        clip = self.labeler.clip
        if adjust is None:
            def adjust(head, emb, logits, labelset):
                return adjust_logits(memory, head, emb, logits, labelset, lambda e: clip.logits(e, labelset),
                                     settings or AdapterSettings())
        return self.labeler.name(self.features, {HEAD: self.labelset}, adjust)


def calibration(world: World, memory: Memory, settings: AdapterSettings,
                corrected: int = 16) -> tuple[float, float, float]:
    """ECE of the raw and the calibrated keep-probabilities, and the task ranking AUROC: the calibrator learns
    from the first ``corrected`` held-out scenes as an annotator corrected them (kept = right box and label),
    the rest are scored."""
    rows = []   # scene, label probability, kept
    for i, (scene, result) in enumerate(zip(world.test, world.predict(memory, settings))):
        found = result.regions[HEAD]
        predicted = [Region(tuple(b), label) for b, label in zip(found.boxes.tolist(), found.labels)]
        truth = [Region(tuple(o.box), o.shape) for o in scene.objects]
        for m in match_regions(predicted, truth):
            if m.predicted is not None:
                rows.append((i, float(found.scores[m.predicted]), m.action == "kept" or m.action == "moved"))
    scene, p, kept = (np.asarray(c) for c in zip(*rows))
    train = scene < min(corrected, len(world.test) // 2)
    calibrator = Calibrator.fit(p[train, None], kept[train])
    held = ~train
    calibrated = calibrator.predict(p[held, None])
    before, after = (expected_calibration_error(q, kept[held]) for q in (p[held], calibrated))
    tasks = np.unique(scene[held])
    scores = np.array([task_score(calibrated[scene[held] == t]) for t in tasks])
    clean = np.array([kept[held][scene[held] == t].all() for t in tasks])
    pos, neg = scores[clean], scores[~clean]
    auroc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return before, after, auroc


def tip_adapter(memory: Memory, alpha: float, beta: float, scale: float):
    """Tip-Adapter's cache (Zhang et al., 2022), for comparison: sum over examples of exp(-beta (1 - cos))."""
    def adjust(head, emb, logits, labelset):
        index = memory.heads.get(head)
        if index is None:
            return logits
        n = len(labelset.labels)
        column = {label: i for i, label in enumerate(labelset.labels)}
        targets = torch.tensor([column.get(label, -1) if label is not None else n for label in index.labels])
        keep = targets >= 0
        affinity = torch.exp(-beta * (1 - emb @ torch.nn.functional.normalize(index.keys[keep], dim=-1).T))
        cache = affinity @ torch.nn.functional.one_hot(targets[keep], n + 1).float()
        out = logits.clone()
        out[:, :n] += alpha * scale * cache[:, :n]
        out[:, n:] += alpha * scale * cache[:, n:]
        return out
    return adjust


def _hits(box, boxes, iou: float = 0.5) -> bool:
    if len(boxes) == 0:
        return False
    box = np.asarray(box, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return bool((inter / np.maximum(union, 1e-9) >= iou).any())


def figures(score: MatchScore) -> dict[str, float]:
    """accuracy and recall per group (known, novel, all), precision with the right label."""
    out = {}
    for group, classes in (("known", KNOWN_SHAPES), ("novel", NOVEL_SHAPES), ("all", SHAPES)):
        gt = sum(score.per_class.get(c, [0, 0, 0])[0] for c in classes)
        matched = sum(score.per_class.get(c, [0, 0, 0])[1] for c in classes)
        correct = sum(score.per_class.get(c, [0, 0, 0])[2] for c in classes)
        out[f"{group}_acc"] = correct / max(1, matched)
        out[f"{group}_recall"] = correct / max(1, gt)
    out["precision"] = score.correct_labels / max(1, score.predicted)
    return out


def averaged(world: World, shots: int, draws: int, settings: AdapterSettings | None = None,
             adjust=None) -> dict[str, float]:
    runs = []
    for draw in range(draws if shots else 1):
        memory = world.memory(shots, draw)
        runs.append(figures(world.score(memory, settings, adjust(memory) if adjust else None)))
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def tune(world: World, draws: int) -> None:
    zero = averaged(world, 0, 1)
    print("| temperatures | shrinkage | harm | novel: accuracy k=1 | k=4 | k=16 | worst known-accuracy change "
          "| all: recall k=16 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| zero-shot | | | {zero['novel_acc']:.3f} | | | | {zero['all_recall']:.3f} |")
    for temperatures in (AdapterSettings().temperatures, (64.0, 256.0, 1024.0)):
        for shrinkage in (0.3, 0.6):
            for harm in (0.0, 1.0, 2.0, 3.0):
                settings = replace(AdapterSettings(), temperatures=temperatures, shrinkage=shrinkage, harm=harm)
                rows = [averaged(world, k, draws, settings) for k in SHOTS]
                worst = min(r["known_acc"] for r in rows) - zero["known_acc"]
                print(f"| {'/'.join(f'{t:g}' for t in temperatures)} | {shrinkage:g} | {harm:g} | "
                      + " | ".join(f"{r['novel_acc']:.3f}" for r in rows)
                      + f" | {100 * worst:+.1f} | {rows[-1]['all_recall']:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300, help="held-out scenes scored")
    parser.add_argument("--pool", type=int, default=300, help="scenes the corrected examples come from")
    parser.add_argument("--draws", type=int, default=3, help="random draws of the examples per k, averaged")
    parser.add_argument("--tune", action="store_true", help="print the shrinkage/harm grid on validation scenes")
    parser.add_argument("--tiny", action="store_true", help="a few scenes, one draw: the test suite's smoke run")
    parser.add_argument("--clip", help="CLIP directory (default: the bundled tiny model)")
    parser.add_argument("--detector-weights", help="detector state dict (default: the bundled tiny one)")
    parser.add_argument("--mirror", action="store_true", help="CROP_MIRROR: embed each crop with its mirror image")
    parser.add_argument("--harm", type=float, help="LEARNING_HARM (default: the learner's)")
    parser.add_argument("--repeats", type=int, help="LEARNING_REPEATS (default: the learner's)")
    args = parser.parse_args()
    if args.tiny:
        args.scenes, args.pool, args.draws = 12, 40, 1
    torch.manual_seed(0)
    started = time.time()
    overrides = {k: v for k, v in (("clip_model", args.clip), ("detector_weights", args.detector_weights)) if v}
    labeler = build_labeler(tiny_spec(mirror=args.mirror, **overrides))
    labelset = LabelSet.build(SHAPES)
    world = World(labeler, labelset, 2000, args.pool, 4000 if args.tune else 3000, args.scenes)
    print(f"{len(world.objects)} pool objects, {len(world.background)} background candidates; "
          f"{sum(len(s.objects) for s in world.test)} held-out objects in {len(world.test)} scenes "
          f"({time.time() - started:.0f} s)\n")
    if args.tune:
        tune(world, args.draws)
        return
    chosen = {k: v for k, v in (("harm", args.harm), ("repeats", args.repeats)) if v is not None}
    settings = AdapterSettings(**chosen)
    print(f"few-shot memory: GDA, shrinkage {settings.shrinkage:g}, temperature and margin cross-validated from "
          f"{settings.temperatures} x {settings.margins}, harm {settings.harm:g}, {settings.repeats} fold "
          f"assignment(s); "
          f"mean of {args.draws} draws of corrected scenes\n")
    print("| corrected examples per class | known: accuracy | known: recall | novel: accuracy | novel: recall "
          "| all: recall | precision |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for shots in (0,) + SHOTS:
        f = rows[shots] = averaged(world, shots, args.draws, settings)
        name = "0 (zero-shot)" if shots == 0 else str(shots)
        print(f"| {name} | {f['known_acc']:.3f} | {f['known_recall']:.3f} | {f['novel_acc']:.3f} | "
              f"{f['novel_recall']:.3f} | {f['all_recall']:.3f} | {f['precision']:.3f} |", flush=True)
    print("\nother ways to use the same corrections (all: recall at k = 1 / 4 / 16):\n")
    print("| variant | k = 1 | k = 4 | k = 16 |")
    print("|---|---|---|---|")
    scale = labeler.clip.logit_scale
    variants = {
        "this backend: GDA decides learned labels, cross-validated per project": dict(settings=settings),
        "same, cross-validated on plain accuracy (harm 0)": dict(settings=replace(settings, harm=0.0)),
        "same, one temperature (16) and margin (0)": dict(
            settings=replace(settings, temperatures=(16.0,), margins=(0.0,))),
        "plain class means (shrinkage 1)": dict(settings=replace(settings, shrinkage=1.0)),
        "Tip-Adapter cache, alpha 1, beta 5.5 (its paper's values)": dict(
            adjust=lambda memory: tip_adapter(memory, 1.0, 5.5, scale)),
    }
    for name, options in variants.items():
        recalls = [averaged(world, k, args.draws, **options)["all_recall"] for k in SHOTS]
        print(f"| {name} | " + " | ".join(f"{r:.3f}" for r in recalls) + " |", flush=True)
    print(f"\n({time.time() - started:.0f} s)")
    print(f"novel accuracy after 4 / 16 shots: {rows[4]['novel_acc']:.3f} / {rows[16]['novel_acc']:.3f}")
    worst = min(rows[k]["known_acc"] - rows[0]["known_acc"] for k in SHOTS)
    print(f"worst known-accuracy change vs zero-shot: {100 * worst:+.1f} points")
    before, after, auroc = calibration(world, world.memory(16, 0), settings)
    print(f"calibration error before / after: {before:.3f} / {after:.3f}")
    print(f"task ranking AUROC: {auroc:.2f}")
    print(f"gain after 16 shots: {100 * (rows[16]['all_recall'] - rows[0]['all_recall']):+.1f} points")


if __name__ == "__main__":
    main()
