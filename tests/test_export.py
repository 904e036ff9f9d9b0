"""Exports: COCO that pycocotools evaluates, YOLO lines with exact normalised geometry, Label Studio tasks in
percent that Label Studio's own SDK accepts. No models: the regions are made by hand or from ground truth."""
import json

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.demo.demo_data import label_config, write_demo_data
from backend.demo.shapes import SHAPES
from backend.export import box_categories, coco_detections, label_studio_tasks, write_yolo, yolo_lines
from backend.labeling.detections import Choice, Detections, ImageLabels
from backend.studio.label_config import parse_label_config

CONFIG_XML = label_config(SHAPES)
CONFIG = parse_label_config(CONFIG_XML)


def found(width, height, boxes, labels, scores=None, choices=()):
    detections = Detections(np.array(boxes, dtype=np.float32), scores or [0.9] * len(boxes), labels)
    return ImageLabels(width, height, regions={"label": detections}, choices={"shapes": tuple(choices)})


def test_categories_are_the_box_labels_in_config_order():
    assert box_categories(CONFIG) == list(SHAPES)


def test_yolo_lines_are_class_and_centre_size_as_fractions_of_the_image():
    labels = found(200, 100, [[20, 10, 120, 60], [0, 0, 200, 100]], ["star", "circle"])
    assert yolo_lines(labels, SHAPES) == ["3 0.350000 0.350000 0.500000 0.500000",
                                          "0 0.500000 0.500000 1.000000 1.000000"]


def test_yolo_clips_boxes_to_the_image_and_drops_those_outside():
    labels = found(100, 100, [[-10, 50, 30, 130], [120, 0, 150, 10]], ["square", "square"])
    assert yolo_lines(labels, SHAPES) == ["1 0.150000 0.750000 0.300000 0.500000"]


def test_yolo_dataset_has_images_labels_by_stem_classes_and_data_yaml(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "x.png").write_bytes(b"pixels")
    labels = found(100, 100, [[10, 10, 30, 50]], ["cross"])
    out = tmp_path / "yolo"
    write_yolo([(str(tmp_path / "a" / "x.png"), labels), (str(tmp_path / "b" / "x.png"), labels)], SHAPES, out)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["x.png", "x_1.png"]
    assert (out / "labels" / "x_1.txt").read_text() == "4 0.200000 0.300000 0.200000 0.400000\n"
    assert (out / "classes.txt").read_text().split() == list(SHAPES)
    yaml = (out / "data.yaml").read_text()
    assert "train: images" in yaml and 'nc: 8' in yaml and '  7: "pentagon"' in yaml


def test_label_studio_tasks_are_in_percent_and_valid_for_the_config():
    labels = found(200, 100, [[20, 10, 120, 60]], ["hexagon"], [0.8],
                   choices=[Choice("hexagon", 0.7), Choice("star", 0.5)])
    [task] = label_studio_tasks([("images/a.png", labels)], CONFIG, "clip-v1")
    assert task["data"] == {"image": "images/a.png"}
    [prediction] = task["predictions"]
    assert prediction["model_version"] == "clip-v1"
    box = next(item for item in prediction["result"] if item["type"] == "rectanglelabels")
    assert box["value"] == {"x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0, "rotation": 0,
                            "rectanglelabels": ["hexagon"]}
    assert (box["from_name"], box["to_name"], box["original_width"], box["original_height"]) == \
           ("label", "image", 200, 100)
    choice = next(item for item in prediction["result"] if item["type"] == "choices")
    assert choice["value"] == {"choices": ["hexagon", "star"]}
    assert LabelInterface(CONFIG_XML).validate_prediction(prediction, return_errors=True) == []


@pytest.fixture(scope="module")
def demo_truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out, 8, seed=3)
    return COCO(str(out / "annotations.json"))


def test_coco_export_of_the_ground_truth_scores_ap_1_with_pycocotools(demo_truth):
    items = []
    for image in demo_truth.dataset["images"]:
        anns = demo_truth.imgToAnns[image["id"]]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        names = [demo_truth.cats[a["category_id"]]["name"] for a in anns]
        items.append((image["file_name"], found(image["width"], image["height"], boxes, names)))
    exported = json.loads(json.dumps(coco_detections(items, SHAPES)))  # as a file would hold it
    assert [c["name"] for c in exported["categories"]] == [demo_truth.cats[i]["name"] for i in sorted(demo_truth.cats)]
    assert [(i["id"], i["file_name"]) for i in exported["images"]] == \
           [(i["id"], i["file_name"]) for i in demo_truth.dataset["images"]]

    evaluation = COCOeval(demo_truth, demo_truth.loadRes(exported["annotations"]), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[1] == pytest.approx(1.0)  # AP at IoU 0.5
