"""Pipeline output → Label Studio predictions (checked with label-studio-sdk's validator), and boxes back."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.label_interface import LabelInterface

from backend.labeling.detections import Choice, Detections, ImageLabels
from backend.studio.label_config import parse_label_config
from backend.studio.results import DrawnBox, LabeledBox, context_regions, prediction_for_task, regions_from_results

CONFIG = """
<View>
  <Image name="photo" value="$image"/>
  <Image name="detail" value="$closeup"/>
  <RectangleLabels name="insects" toName="photo"><Label value="Bee"/><Label value="Wasp"/></RectangleLabels>
  <RectangleLabels name="parts" toName="detail"><Label value="Wing" alias="W"/></RectangleLabels>
  <Choices name="scene" toName="photo"><Choice value="Indoor"/><Choice value="Outdoor"/></Choices>
  <Choices name="tags" toName="photo" choice="multiple">
    <Choice value="Flowers"/><Choice value="Sky"/><Choice value="Grass"/>
  </Choices>
</View>"""
PROJECT = parse_label_config(CONFIG)
INSECTS, PARTS, SCENE, TAGS = PROJECT.controls
WIDTH, HEIGHT = 640, 480
VALIDATOR = LabelInterface(CONFIG)      # checks predictions the way Label Studio's SDK does


def detections(*rows: tuple[float, float, float, float, float, str]) -> Detections:
    """Detections from (x0, y0, x1, y1, score, label) rows."""
    if not rows:
        return Detections.empty()
    return Detections(np.array([row[:4] for row in rows]), np.array([row[4] for row in rows]), [r[5] for r in rows])


def predict(regions=None, choices=None, width=WIDTH, height=HEIGHT, keep=None) -> dict:
    prediction = prediction_for_task(ImageLabels(width, height, regions or {}, choices or {}), PROJECT, "clip-v1",
                                     keep)
    assert VALIDATOR.validate_prediction(prediction, return_errors=True) == []
    json.dumps(prediction)                  # plain JSON types only, no numpy scalars
    return prediction


def only_value(prediction: dict) -> dict:
    (item,) = prediction["result"]
    return item["value"]


def test_a_box_becomes_a_rectangle_in_percent_of_the_image():
    prediction = predict({"insects": detections((64, 48, 320, 240, 0.9, "Bee"))})
    (item,) = prediction["result"]
    assert item == {"id": item["id"], "from_name": "insects", "to_name": "photo", "type": "rectanglelabels",
                    "original_width": 640, "original_height": 480, "image_rotation": 0,
                    "value": {"x": 10.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 0,
                              "rectanglelabels": ["Bee"]},
                    "score": pytest.approx(0.9)}
    assert prediction["model_version"] == "clip-v1" and prediction["score"] == pytest.approx(0.9)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 640, 480), (0, 0, 100, 100)),                     # the whole image
    ((-50, -10, 700, 500), (0, 0, 100, 100)),                 # beyond every edge: clipped first
    ((600, 400, 700, 600), (93.75, 83.3333, 6.25, 16.6667)),  # over the bottom-right corner
    ((-20, 240, 32, 480), (0, 50, 5, 50)),                    # over the left edge
])
def test_boxes_are_clipped_to_the_image_before_conversion(box, expected):
    value = only_value(predict({"insects": detections((*box, 0.5, "Wasp"))}))
    assert [value[key] for key in ("x", "y", "width", "height")] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("box", [(700, 10, 800, 20), (10, -30, 20, -1), (100, 100, 100, 200), (50, 60, 40, 70),
                                 (640, 0, 700, 10)])
def test_boxes_empty_after_clipping_are_dropped(box):
    assert predict({"insects": detections((*box, 0.5, "Bee"))}) == {"result": [], "score": 0.0,
                                                                    "model_version": "clip-v1"}


def test_labels_the_config_does_not_declare_are_dropped(caplog):
    prediction = predict({"insects": detections((0, 0, 10, 10, 0.9, "Hornet"), (0, 0, 20, 20, 0.4, "Bee"))})
    assert [item["value"]["rectanglelabels"] for item in prediction["result"]] == [["Bee"]]
    assert "'Hornet'" in caplog.text


def test_several_controls_and_images_in_one_prediction():
    prediction = predict(
        {"insects": detections((0, 0, 64, 48, 0.8, "Bee"), (64, 48, 128, 96, 0.6, "Wasp")),
         "parts": detections((10, 10, 20, 20, 0.5, "W"))},
        {"scene": (Choice("Outdoor", 0.7), Choice("Indoor", 0.2)), "tags": (Choice("Sky", 0.9),)})
    assert [(item["from_name"], item["to_name"]) for item in prediction["result"]] == [
        ("insects", "photo"), ("insects", "photo"), ("parts", "detail"), ("scene", "photo"), ("tags", "photo")]
    assert len({item["id"] for item in prediction["result"]}) == 5
    assert prediction["score"] == pytest.approx(0.8 * 0.6 * 0.5)   # the chance no box needs a correction


def test_a_calibration_becomes_the_box_scores_and_the_task_score():
    def keep(probabilities):   # a calibration that halves every probability
        return probabilities / 2

    found = {"insects": detections((0, 0, 64, 48, 0.8, "Bee"), (64, 48, 128, 96, 0.6, "Wasp"))}
    prediction = predict(found, keep=keep)
    assert [item["score"] for item in prediction["result"]] == pytest.approx([0.4, 0.3])
    assert prediction["score"] == pytest.approx(0.4 * 0.3)
    choices_only = predict(choices={"scene": (Choice("Outdoor", 0.7),)}, keep=keep)
    assert choices_only["score"] == pytest.approx(0.7)   # choices are not boxes: their own probability


def test_a_single_choice_keeps_the_best_one():
    prediction = predict(choices={"scene": (Choice("Outdoor", 0.7), Choice("Indoor", 0.2))})
    (item,) = prediction["result"]
    assert (item["type"], item["value"], item["score"]) == ("choices", {"choices": ["Outdoor"]}, pytest.approx(0.7))


def test_multiple_choices_share_one_item_scored_by_their_mean():
    prediction = predict(choices={"tags": (Choice("Sky", 0.9), Choice("Grass", 0.6), Choice("Sea", 0.99))})
    (item,) = prediction["result"]
    assert item["value"] == {"choices": ["Sky", "Grass"]} and item["score"] == pytest.approx(0.75)


def test_nothing_found_is_an_empty_prediction_with_score_zero():
    assert predict(choices={"scene": ()}) == {"result": [], "score": 0.0, "model_version": "clip-v1"}


@settings(deadline=None)    # the machine may be busy; correctness, not speed, is tested here
@given(st.lists(st.tuples(*[st.floats(-200, 900, allow_nan=False)] * 4, st.floats(0, 1),
                          st.sampled_from(["Bee", "Wasp"])), max_size=8),
       st.integers(1, 2000), st.integers(1, 2000))
def test_any_boxes_give_valid_rectangles_inside_the_image(rows, width, height):
    found = detections(*rows)
    prediction = predict({"insects": found}, width=width, height=height)
    for item in prediction["result"]:
        value = item["value"]
        assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100
        assert 0 < value["width"] and value["x"] + value["width"] <= 100 + 1e-9
        assert 0 < value["height"] and value["y"] + value["height"] <= 100 + 1e-9
    clipped = np.clip(found.boxes, 0, [width, height, width, height])
    expected = [(label, tuple(box)) for box, label in zip(clipped.tolist(), found.labels)
                if box[2] > box[0] and box[3] > box[1]]
    back = regions_from_results(prediction["result"], INSECTS)
    assert [label for label, _ in back] == [label for label, _ in expected]
    for (_, box), (_, expected_box) in zip(back, expected):
        assert box == pytest.approx(expected_box, abs=1e-3)


def annotation(value: dict, **fields) -> dict:
    return {"from_name": "insects", "to_name": "photo", "type": "rectanglelabels", "original_width": 200,
            "original_height": 100, "value": {"rotation": 0, **value}, **fields}


BEE = {"x": 10, "y": 20, "width": 50, "height": 30, "rectanglelabels": ["Bee"]}


def test_annotated_boxes_come_back_in_pixels():
    assert regions_from_results([annotation(BEE)], INSECTS) == [LabeledBox("Bee", (20.0, 20.0, 120.0, 50.0))]


def test_a_rotated_box_comes_back_as_the_box_around_it():
    # top-left at (100, 10) px, 50 x 20 px, turned 90° clockwise around that corner: it hangs down, left of x
    turned = {"x": 50, "y": 10, "width": 25, "height": 20, "rotation": 90, "rectanglelabels": ["Bee"]}
    (region,) = regions_from_results([annotation(turned)], INSECTS)
    assert region.box == pytest.approx((80, 10, 100, 60))


@pytest.mark.parametrize("item", [
    annotation(BEE, from_name="parts"),                     # another control
    annotation(BEE, type="choices"),
    annotation({**BEE, "rectanglelabels": ["Hornet"]}),      # a label no longer in the config
    annotation({**BEE, "rectanglelabels": "Bee"}),
    annotation({**BEE, "x": "10"}),
    annotation({**BEE, "width": float("nan")}),
    annotation({**BEE, "x": 120}),                           # entirely outside
    annotation(BEE, original_width=0),
    annotation(BEE, original_width=None),
    annotation(BEE, image_rotation=90),
    {**annotation(BEE), "value": None},
    {"type": "rectanglelabels", "from_name": "insects"},
    "not a region",
])
def test_unusable_result_items_are_skipped(item):
    assert regions_from_results([item, annotation(BEE)], INSECTS) == [LabeledBox("Bee", (20.0, 20.0, 120.0, 50.0))]


def test_a_box_with_several_labels_gives_one_region_each():
    both = {**BEE, "rectanglelabels": ["Bee", "Wasp"]}
    assert [label for label, _ in regions_from_results([annotation(both)], INSECTS)] == ["Bee", "Wasp"]


def test_no_result_gives_no_regions():
    assert regions_from_results([], INSECTS) == [] and regions_from_results(None, INSECTS) == []


def test_context_rectangles_are_read_with_or_without_labels():
    drawn = {"type": "rectangle", "from_name": "box", "to_name": "photo",
             "value": {"x": 50, "y": 50, "width": 10, "height": 20}}
    labelled = annotation(BEE)
    assert context_regions({"result": [drawn, labelled, {"type": "keypointlabels", "value": {"x": 1, "y": 1}}]}) == [
        DrawnBox("box", "photo", (), (50.0, 50.0, 10.0, 20.0), 0.0, None),
        DrawnBox("insects", "photo", ("Bee",), (10.0, 20.0, 50.0, 30.0), 0.0, (200.0, 100.0))]


def test_a_drawn_box_converts_to_pixels_of_any_image_size():
    (drawn,) = context_regions({"result": [annotation({**BEE, "x": 90})]})    # reaches past the right edge
    assert drawn.pixel_box(400, 300) == pytest.approx((360, 60, 400, 150))
    assert drawn.pixel_box(*drawn.original_size) == pytest.approx((180, 20, 200, 50))


@pytest.mark.parametrize("context", [None, {}, [], "text", {"result": None}, {"result": "x"},
                                     {"result": [None, 1, {"type": "rectangle"}, {"type": "rectangle", "value": []},
                                                 annotation({**BEE, "width": 0}), annotation({**BEE, "height": -1}),
                                                 annotation({**BEE, "rotation": "90"})]}])
def test_odd_contexts_give_no_boxes(context):
    assert context_regions(context) == []


def test_the_original_size_is_absent_when_not_sent():
    (box,) = context_regions({"result": [annotation(BEE, original_width=None)]})
    assert box.original_size is None and box.percent == (10, 20, 50, 30)
