"""The labeling core on the bundled tiny models, on held-out scenes (seeds never used in training: 0–1).

Thresholds are measured values minus a stated margin; the measurements come from
`python bench/quality.py` and from these tests' own figures (printed with -s).
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.demo.scoring import scene_tensor, score_scenes
from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES, SHAPES, scenes
from backend.labeling.crops import crop_regions, cut_crops, view_boxes
from backend.labeling.factory import build_labeler
from backend.labeling.pipeline import Labeler
from backend.labeling.prompts import LabelSet
from backend.labeling.proposals import ProposalSettings, Proposer
from backend.labeling.specs import tiny_spec

HELD_OUT = 2000
KNOWN = LabelSet.build(KNOWN_SHAPES)


@pytest.fixture(scope="module")
def labeler():
    return build_labeler(tiny_spec())


@pytest.fixture(scope="module")
def known_scenes():
    return list(scenes(HELD_OUT, 60, shapes=KNOWN_SHAPES))


def with_threshold(labeler, threshold):
    """A labeler like the module's, at another proposal threshold (the shared fixture is never changed)."""
    return Labeler(labeler.clip, Proposer(labeler.proposer.model, ProposalSettings(score_threshold=threshold)),
                   labeler.crops)


def test_recall_precision_and_labels_on_held_out_scenes(labeler, known_scenes):
    score = score_scenes(with_threshold(labeler, 0.7), known_scenes, KNOWN)
    print(f"\nR {score.recall:.3f} P {score.precision:.3f} labels {score.label_accuracy:.3f} "
          f"({score.ground_truth} boxes)")
    # measured on these 60 scenes: R 0.978 P 1.000 labels 0.967 (0.928 with the previous tiny CLIP); margins 0.05
    # on R and P, 0.12 on labels (set 0.08 under the previous CLIP's figure)
    assert score.recall >= 0.93
    assert score.precision >= 0.95
    assert score.label_accuracy >= 0.85


def test_background_prompt_removes_false_proposals(labeler, known_scenes):
    """At a low proposal threshold many proposals are distractor blobs and background: CLIP must drop them."""
    labeler = with_threshold(labeler, 0.05)
    on = score_scenes(labeler, known_scenes, KNOWN)
    off = score_scenes(labeler, known_scenes, replace(KNOWN, background=()))
    print(f"\nthr 0.05: bg on P {on.precision:.3f} R {on.recall:.3f}; off P {off.precision:.3f} R {off.recall:.3f}")
    # measured: P 0.984 vs 0.879 (+0.105) at equal recall (previous tiny CLIP: +0.099)
    assert on.precision - off.precision >= 0.05
    assert off.recall - on.recall <= 0.02


def test_novel_classes_are_measurably_worse_zero_shot(labeler):
    mixed = list(scenes(HELD_OUT + 1, 60))
    every = LabelSet.build(SHAPES)
    labeler = with_threshold(labeler, 0.7)
    novel = score_scenes(labeler, mixed, every, ignore_labels=KNOWN_SHAPES)
    known = score_scenes(labeler, mixed, every, ignore_labels=NOVEL_SHAPES)
    print(f"\nlabel accuracy: known {known.label_accuracy:.3f} novel {novel.label_accuracy:.3f}; "
          f"novel recall {novel.recall:.3f}")
    # measured: known 0.986 vs novel 0.048; the detector still finds novel shapes (recall 1.000)
    assert known.label_accuracy - novel.label_accuracy >= 0.5
    assert novel.recall >= 0.85


def test_a_drawn_box_gets_its_shape(labeler):
    """Interactive labelling: the annotator's box is an object, so it is named even if CLIP hesitates."""
    correct = total = 0
    for scene in scenes(HELD_OUT + 2, 30, shapes=KNOWN_SHAPES):
        boxes = torch.tensor([o.box for o in scene.objects])
        named = labeler.label_boxes(scene_tensor(scene.image), boxes, KNOWN, "label")
        correct += sum(a == o.shape for a, o in zip(named.labels, scene.objects))
        total += len(scene.objects)
    print(f"\ndrawn boxes named right: {correct}/{total}")
    assert len(named) == len(scene.objects)
    assert correct / total >= 0.85  # measured 82/85 = 0.965 (previous tiny CLIP 0.929)


def test_an_example_is_the_mean_of_its_views_embeddings(labeler, known_scenes):
    """What the learner stores for an annotated box: the normalised mean embedding of its views and of its
    mirrored crop, computed in one batch, the same as embedding each view on its own."""
    scene = next(s for s in known_scenes if len(s.objects) >= 2)
    image = scene_tensor(scene.image)
    boxes = torch.tensor([o.box for o in scene.objects[:2]], dtype=torch.float32)
    spec = labeler.clip.pixels
    one_by_one = []
    for box in boxes:
        views = labeler.embed_boxes([image], [view_boxes(box[None])], labeler.crops)[0]
        crop = cut_crops(image, crop_regions(box[None], labeler.crops), spec.size, spec.mean, spec.std)
        mirrored = labeler.clip.embed_pixels(crop.flip(-1))
        one_by_one.append(F.normalize(torch.cat([views, mirrored]).mean(0), dim=-1))
    examples = labeler.embed_examples(image, boxes)
    torch.testing.assert_close(examples, torch.stack(one_by_one), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(examples.norm(dim=-1), torch.ones(2))
    assert labeler.embed_examples(image, torch.zeros(0, 4)).shape == (0, examples.shape[1])


def test_mirrored_crops_embed_as_the_mean_of_both_and_name_known_shapes_no_worse(labeler, known_scenes):
    """CROP_MIRROR: each crop and its mirror image go through CLIP, their mean is the embedding. On these 60 scenes
    (185 boxes) it measured label accuracy 0.967 -> 0.972 with the same boxes found (one box; with the previous
    tiny CLIP, which knew six shapes, 0.928 -> 0.967); asserted: no worse, recall and precision within 0.01."""
    mirrored = Labeler(labeler.clip, labeler.proposer, replace(labeler.crops, mirror=True))
    scene = next(s for s in known_scenes if len(s.objects) >= 2)
    image = scene_tensor(scene.image)
    boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
    spec = labeler.clip.pixels
    crops = cut_crops(image, crop_regions(boxes, labeler.crops), spec.size, spec.mean, spec.std)
    expected = F.normalize(labeler.clip.embed_pixels(crops) + labeler.clip.embed_pixels(crops.flip(-1)), dim=-1)
    torch.testing.assert_close(mirrored.embed_boxes([image], [boxes], mirrored.crops)[0], expected,
                               rtol=1e-4, atol=1e-5)
    plain, both = (score_scenes(lab, known_scenes, KNOWN) for lab in (labeler, mirrored))
    print(f"\nlabels {plain.label_accuracy:.3f} -> {both.label_accuracy:.3f} with mirrored crops")
    assert both.label_accuracy >= plain.label_accuracy
    assert abs(both.recall - plain.recall) <= 0.01 and abs(both.precision - plain.precision) <= 0.01


def test_whole_image_choices_name_close_ups(labeler):
    """Whole-image classification, single- and multi-label. The tiny CLIP learned from object close-ups (it
    cannot read a 10-px object in a 160-px scene shrunk to 64 px), so the images here are close-ups."""
    closeups, truth = [], []
    for scene in scenes(HELD_OUT + 3, 40, shapes=KNOWN_SHAPES):
        for obj in scene.objects:
            cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
            half = max(obj.box[2] - obj.box[0], obj.box[3] - obj.box[1], 16) * 0.7
            closeups.append(scene.image.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half))))
            truth.append(obj.shape)
    images = [scene_tensor(c) for c in closeups]
    for multi_label in (False, True):
        heads = {"scene": replace(KNOWN, kind="choices", multi_label=multi_label)}
        results = labeler.label(images, heads)
        right = sum(bool(r.choices["scene"]) and r.choices["scene"][0].label == t for r, t in zip(results, truth))
        print(f"\nwhole-image choice (multi_label={multi_label}) right: {right}/{len(truth)}")
        assert right / len(truth) >= 0.80  # measured 120/131 = 0.92 for both (previous tiny CLIP 0.90)


def test_labelling_images_together_equals_one_by_one(labeler, known_scenes):
    images = [scene_tensor(s.image) for s in known_scenes[:5]]
    together = labeler.label(images, {"label": KNOWN})
    alone = [labeler.label([image], {"label": KNOWN})[0] for image in images]
    for a, b in zip(together, alone):
        assert a.regions["label"].labels == b.regions["label"].labels
        np.testing.assert_allclose(a.regions["label"].scores, b.regions["label"].scores, atol=1e-4)


def test_text_embeddings_are_computed_once_per_prompt_set(labeler):
    first = labeler.clip.embed_prompts(("a photo of a star.", "mostly background"))
    assert labeler.clip.embed_prompts(("a photo of a star.", "mostly background")) is first


def test_rpn_mode_proposes_by_objectness(labeler, known_scenes):
    proposer = Proposer(labeler.proposer.model, ProposalSettings(mode="rpn", score_threshold=0.5))
    found = proposer(scene_tensor(known_scenes[0].image))
    assert len(found.boxes) > 0 and bool((found.scores >= 0.5).all())
    assert bool((found.boxes[:, 2:] <= 160).all()) and bool((found.boxes[:, :2] >= 0).all())


def test_per_label_thresholds_drop_only_their_label(labeler, known_scenes):
    """``model_score_threshold`` on one <Label>: that label's regions below it go, every other label's stay."""
    labeler = with_threshold(labeler, 0.7)
    images = [scene_tensor(s.image) for s in known_scenes[:8]]
    before = [r.regions["label"] for r in labeler.label(images, {"label": KNOWN})]
    named = [label for d in before for label in d.labels]
    strict = max(set(named), key=named.count)
    scores = [float(s) for d in before for s, label in zip(d.scores, d.labels) if label == strict]
    cut = float(np.median(scores))
    per_label = replace(KNOWN, thresholds=tuple(cut if label == strict else 0.0 for label in KNOWN.labels))
    after = [r.regions["label"] for r in labeler.label(images, {"label": per_label})]
    for b, a in zip(before, after):
        expected = [(label, float(s)) for label, s in zip(b.labels, b.scores) if label != strict or s >= cut]
        assert [(label, float(s)) for label, s in zip(a.labels, a.scores)] == expected
    assert sum(len(a) for a in after) < sum(len(b) for b in before)
