"""The command line as a user runs it: real subprocesses, the bundled tiny models, a fresh demo-data folder.

Thresholds come from measurements with the bundled models (numbers and margins beside each assertion).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from label_studio_sdk.label_interface import LabelInterface
from pycocotools.coco import COCO
from torchvision.ops import box_iou

from backend.demo.shapes import KNOWN_SHAPES, NOVEL_SHAPES
from backend.evaluate import read_coco, read_voc

ROOT = Path(__file__).resolve().parent.parent
SCENES = 24


def backend(*args: str) -> subprocess.CompletedProcess:
    """``python -m backend ARGS`` from the repository root; fails the test with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo-data folder plus one file that only looks like an image."""
    out = tmp_path_factory.mktemp("demo")
    done = backend("demo-data", str(out), "--n", str(SCENES), "--seed", "11")
    assert f"wrote {SCENES} scenes" in done.stdout
    (out / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return out


@pytest.fixture(scope="module")
def labelled(demo, tmp_path_factory):
    """``label --demo --format coco`` over the demo folder, with its labeling config."""
    out = tmp_path_factory.mktemp("labelled") / "predictions.json"
    done = backend("label", str(demo / "images"), "--config", str(demo / "label_config.xml"),
                   "--format", "coco", "--out", str(out), "--demo")
    return done, json.loads(out.read_text()), out


def test_demo_data_is_coco_ground_truth_with_a_matching_label_config(demo):
    truth = COCO(str(demo / "annotations.json"))
    assert len(truth.imgs) == SCENES and len(truth.anns) > SCENES
    assert [c["name"] for c in truth.loadCats(truth.getCatIds())] == list(KNOWN_SHAPES + NOVEL_SHAPES)
    assert all((demo / image["file_name"]).is_file() for image in truth.imgs.values())
    tasks = json.loads((demo / "tasks.json").read_text())
    assert tasks[0] == {"data": {"image": "images/scene_0000.png"}}
    config = LabelInterface((demo / "label_config.xml").read_text())
    assert set(config.get_control("label").labels) == set(KNOWN_SHAPES + NOVEL_SHAPES)


def test_label_finds_the_ground_truth_boxes(demo, labelled):
    _, predictions, out = labelled
    truth = COCO(str(demo / "annotations.json"))
    assert predictions["categories"] == [{"id": c["id"], "name": c["name"]} for c in truth.dataset["categories"]]
    recall, accuracy = _match(truth, demo, predictions, out.parent)
    print(f"\nbox recall {recall:.3f}, label accuracy of matched known shapes {accuracy:.3f}")
    # Measured with the bundled models on this data (seed 11, 24 scenes, 61 boxes): recall 0.984, label
    # accuracy 1.000 (previous tiny CLIP 0.978; other seeds (1, 2, 3) then: recall 0.954-0.985, accuracy
    # 0.886-0.978). Margins ~13 and ~20 pt.
    assert recall >= 0.85, f"box recall at IoU 0.5 {recall:.3f}"
    assert accuracy >= 0.80, f"label accuracy of matched known shapes {accuracy:.3f}"


def test_label_skips_an_unreadable_image_and_labels_the_rest(labelled):
    done, predictions, _ = labelled
    assert "broken.png" in done.stderr and "skipped" in done.stderr
    assert len(predictions["images"]) == SCENES
    assert f"labelled {SCENES} images (1 skipped)" in done.stderr


def test_label_with_a_label_list_writes_label_studio_tasks(demo):
    done = backend("label", str(demo / "images" / "scene_0000.png"), "--labels", "circle, star",
                   "--format", "ls", "--demo")
    [task] = json.loads(done.stdout)
    [prediction] = task["predictions"]
    assert prediction["model_version"].startswith("clip-")
    assert all(item["from_name"] == "label" and item["to_name"] == "image" for item in prediction["result"])
    assert {label for item in prediction["result"] for label in item["value"]["rectanglelabels"]} <= {"circle", "star"}


def test_eval_prints_accuracy_and_writes_the_confusion_matrix(demo, tmp_path):
    done = backend("eval", str(demo), "--demo", "--per-class", "20", "--out", str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert f"accuracy: {report['accuracy']:.1%}" in done.stdout
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    known = [c for c in report["per_class"] if c["class"] in KNOWN_SHAPES]
    known_accuracy = sum(c["correct"] for c in known) / sum(c["n"] for c in known)
    per_class = [(c["class"], c["correct"], c["n"]) for c in report["per_class"]]
    print(f"\naccuracy on known-shape crops {known_accuracy:.3f}; per class (correct, n): {per_class}")
    # Measured with the bundled models on this data: 1.000 (46 / 46 known-shape crops; previous tiny CLIP 0.935,
    # seeds 1, 2, 3 then 0.87-0.935). Novel shapes are not asserted on: zero-shot cannot name words the tiny CLIP
    # never saw (measured 1 / 15).
    assert known_accuracy >= 0.75, f"accuracy on known-shape crops {known_accuracy:.3f}"


def test_eval_reads_a_voc_copy_of_the_demo_data_like_its_coco_json(demo, tmp_path):
    """VOC corners are 1-based and inclusive; objects marked difficult are left out."""
    coco = json.loads((demo / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (tmp_path / "Annotations").mkdir()
    for image in coco["images"]:
        objects = ""
        for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = a["bbox"]
            objects += (f"<object><name>{names[a['category_id']]}</name><difficult>0</difficult><bndbox>"
                        f"<xmin>{x + 1:g}</xmin><ymin>{y + 1:g}</ymin><xmax>{x + w:g}</xmax><ymax>{y + h:g}</ymax>"
                        f"</bndbox></object>")
        objects += "<object><name>circle</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>" \
                   "<xmax>9</xmax><ymax>9</ymax></bndbox></object>"
        stem = Path(image["file_name"]).stem
        (tmp_path / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename>{objects}</annotation>")
    shutil.copytree(demo / "images", tmp_path / "JPEGImages")

    voc, from_coco = read_voc(tmp_path), read_coco(demo / "annotations.json")
    assert voc.classes == tuple(sorted(from_coco.classes))
    def as_tuples(dataset):
        return sorted((o.image.name, o.box, o.label) for o in dataset.objects)
    assert as_tuples(voc) == as_tuples(from_coco)


def _match(truth: COCO, truth_dir: Path, predictions: dict, predictions_dir: Path) -> tuple[float, float]:
    """Box recall at IoU 0.5 (any label, novel shapes included), and the label accuracy of the matched
    known-shape boxes (novel shapes cannot be named by zero-shot CLIP)."""
    by_file = {(predictions_dir / image["file_name"]).resolve(): [] for image in predictions["images"]}
    files = {image["id"]: (predictions_dir / image["file_name"]).resolve() for image in predictions["images"]}
    for a in predictions["annotations"]:
        by_file[files[a["image_id"]]].append(a)
    found = known = correct = 0
    for image in truth.imgs.values():
        anns = truth.imgToAnns[image["id"]]
        predicted = by_file[(truth_dir / image["file_name"]).resolve()]
        if not predicted:
            continue
        iou = box_iou(_xyxy([a["bbox"] for a in anns]), _xyxy([p["bbox"] for p in predicted]))
        for gt, row in zip(anns, iou):
            if row.max() < 0.5:
                continue
            found += 1
            if truth.cats[gt["category_id"]]["name"] in KNOWN_SHAPES:
                known += 1
                correct += predicted[int(row.argmax())]["category_id"] == gt["category_id"]
    return found / len(truth.anns), correct / max(known, 1)


def _xyxy(boxes) -> torch.Tensor:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)


@pytest.mark.parametrize("source", ["config", "labels"])
def test_label_applies_the_prompt_settings_like_the_server(source, tmp_path):
    """PROMPT_TEMPLATE / BACKGROUND_PROMPTS shape `label --config` exactly as they shape the server's configs."""
    from argparse import Namespace

    from backend.config import Settings
    from backend.offline import project_config

    config_file = tmp_path / "config.xml"
    config_file.write_text('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                           '<Label value="star"/></RectangleLabels></View>')
    settings = Settings.from_env({"PROMPT_TEMPLATE": "a drawing of a {}.", "BACKGROUND_PROMPTS": "empty paper"})
    args = Namespace(config=str(config_file) if source == "config" else None, labels="star")
    (control,) = project_config(args, settings).controls
    assert control.labelset.prompts == (("a drawing of a star.",),)
    assert control.labelset.background == ("empty paper",)
