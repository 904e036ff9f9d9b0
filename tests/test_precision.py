"""PRECISION and RUNTIME variants keep the labels: on held-out shapes-world scenes with the bundled tiny models, each
variant's box recall, precision and label accuracy against torch fp32's, and how many of its boxes keep their label.

Measured (seed 3000, 300 known-shape scenes, 959 objects), with the current tiny CLIP on a Zen 4 AVX512-BF16 EPYC:
fp32 recall .9739 precision .9979 labels .9615; bf16 (backbone, the RPN head's convolutions, box head, image tower)
+0.11 / -0.11 / -0.11 points, 99.9 % of boxes with fp32's label; int8 (one weight scale per output channel, the
first transformer block fp32) 0.00 / 0.00 / -0.11, 99.7 %; OpenVINO fp32 identical, 100.0 %; OpenVINO bf16 (its
backbone and image tower, the heads torch bf16) +0.11 / 0.00 / -0.11, 99.9 %. With the previous tiny CLIP (six
shapes; fp32 labels .9358) bf16 was 99.2 % (the backbone and image tower alone 99.7 %; with the RPN's objectness
layer bf16 too, labels -0.42 points), int8 99.6 % (every block int8 -0.32 on an AVX2 EPYC, -0.54 on an AVX512-VNNI
one; one scale per tensor -0.43 / -0.54).
The issue's bar, 0.5 points, is asserted as it is: the tiny CLIP flips borderline crops when a box moves by a
pixel (on 80 scenes one box was 0.4 points), so a variant that moves boxes at all sits a few tenths from fp32."""
import pytest
import torch
from torchvision.ops import box_iou

from backend.demo.scoring import scene_tensor, score_scenes
from backend.demo.shapes import KNOWN_SHAPES, scenes
from backend.labeling.factory import build_labeler
from backend.labeling.prompts import LabelSet
from backend.labeling.specs import cpu_has_bf16, resolve_precision, tiny_spec

KNOWN = LabelSet.build(KNOWN_SHAPES)
MARGIN = 0.005         # recall, precision and label accuracy within 0.5 points of fp32 (measured: within 0.11)
SAME_LABEL = 0.98      # share of fp32's boxes found with the same label (measured: >= 0.997; the issue's bar)


@pytest.fixture(scope="module")
def held_out():
    return list(scenes(3000, 300, shapes=KNOWN_SHAPES))


@pytest.fixture(scope="module")
def fp32(held_out):
    labeler = build_labeler(tiny_spec(precision="fp32", device="cpu"))
    return score_scenes(labeler, held_out, KNOWN), label_all(labeler, held_out)


def label_all(labeler, held_out):
    return [r.regions["label"] for start in range(0, len(held_out), 16)
            for r in labeler.label([scene_tensor(s.image) for s in held_out[start:start + 16]], {"label": KNOWN})]


def same_label_share(reference, variant) -> float:
    kept = total = 0
    for ref, var in zip(reference, variant):
        total += len(ref.boxes)
        if not len(ref.boxes) or not len(var.boxes):
            continue
        iou = box_iou(torch.as_tensor(ref.boxes), torch.as_tensor(var.boxes))
        best, index = iou.max(1)
        kept += sum(bool(b >= 0.5) and ref.labels[i] == var.labels[int(j)]
                    for i, (b, j) in enumerate(zip(best, index)))
    return kept / max(1, total)


BF16 = ["bf16"] if cpu_has_bf16() else []
VARIANTS = [(p, "cpu", "torch") for p in ["int8", *BF16]] + [(p, "cpu", "openvino") for p in ["fp32", *BF16]] + (
    [("fp16", "cuda", "torch")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("precision, device, runtime", VARIANTS)
def test_variant_keeps_the_labels(precision, device, runtime, held_out, fp32):
    reference, reference_labels = fp32
    labeler = build_labeler(tiny_spec(precision=precision, device=device, runtime=runtime))
    score = score_scenes(labeler, held_out, KNOWN)
    share = same_label_share(reference_labels, label_all(labeler, held_out))
    print(f"{runtime} {precision}: recall {score.recall:.4f} precision {score.precision:.4f} labels "
          f"{score.label_accuracy:.4f} (fp32 {reference.recall:.4f} {reference.precision:.4f} "
          f"{reference.label_accuracy:.4f}); same label {share:.4f}")
    assert abs(score.recall - reference.recall) <= MARGIN
    assert abs(score.precision - reference.precision) <= MARGIN
    assert abs(score.label_accuracy - reference.label_accuracy) <= MARGIN
    assert share >= SAME_LABEL


def test_precision_resolves_per_device_and_enters_the_fingerprint():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    for wrong, device in (("fp16", cpu), ("int8", cuda), ("fp8", cpu)):
        with pytest.raises(ValueError, match="PRECISION"):
            resolve_precision(wrong, device)
    prints = {tiny_spec(precision=p, device="cpu").fingerprint for p in ("fp32", "bf16", "int8")}
    assert len(prints) == 3


def test_learned_memory_survives_a_precision_change():
    from backend.learning import embedding_space
    assert embedding_space(tiny_spec(precision="fp32")) == embedding_space(tiny_spec(precision="int8"))


def test_settings_refuse_a_precision_the_device_cannot_run():
    from backend.config import Settings, SettingsError
    with pytest.raises(SettingsError, match="fp16 needs DEVICE=cuda"):
        Settings.from_env({"PRECISION": "fp16", "DEVICE": "cpu"})
    assert Settings.from_env({"PRECISION": "int8", "DEVICE": "cpu"}, demo=True).model_spec().precision == "int8"
