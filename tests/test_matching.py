"""Matching predictions with what annotators submitted: ids first, then IoU; every action counted once."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.labeling.matching import ACTIONS, Region, iou_matrix, match_regions


def test_iou_of_known_boxes():
    iou = iou_matrix([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    assert np.allclose(iou, [[1.0, 50 / 150, 0.0, 0.0]])


def test_a_region_keeps_its_prediction_even_when_dragged_onto_another_object():
    predicted = [Region((0, 0, 10, 10), "star", "p1"), Region((40, 40, 50, 50), "star", "p2")]
    annotated = [Region((40, 40, 50, 50), "star", "p1")]          # p1 dragged where p2 was; p2 deleted
    actions = [(m.action, m.predicted, m.annotated) for m in match_regions(predicted, annotated)]
    assert actions == [("moved", 0, 0), ("deleted", 1, None)]


def test_a_box_below_the_iou_bar_is_a_deletion_and_a_miss():
    actions = [m.action for m in match_regions([Region((0, 0, 10, 10), "star")], [Region((6, 6, 16, 16), "star")])]
    assert actions == ["deleted", "missed"]


def test_relabelled_and_moved_is_relabelled():
    (match,) = match_regions([Region((0, 0, 10, 10), "star")], [Region((1, 0, 11, 10), "circle")])
    assert match.action == "relabelled" and not match.accepted and 0.8 < match.iou < 0.95


boxes = st.tuples(st.floats(0, 90), st.floats(0, 90), st.floats(1, 10), st.floats(1, 10)).map(
    lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))
regions = st.lists(st.builds(Region, boxes, st.sampled_from(["a", "b"])), max_size=8)


@settings(max_examples=200, deadline=None)
@given(regions, regions)
def test_every_region_is_accounted_for_exactly_once(predicted, annotated):
    matches = match_regions(predicted, annotated)
    assert [m.predicted for m in matches if m.predicted is not None] == list(range(len(predicted)))
    paired = sorted(m.annotated for m in matches if m.annotated is not None)
    assert paired == list(range(len(annotated)))
    assert all(m.action in ACTIONS for m in matches)
    assert all((m.annotated is None) == (m.action == "deleted") for m in matches if m.predicted is not None)


def test_suggested_thresholds_maximise_f1():
    from backend.studio.report import RegionCounts

    mixed = RegionCounts(scored=[(0.9, True), (0.8, True), (0.5, False), (0.3, True), (0.2, False)])
    assert mixed.suggested_threshold() == 0.3          # keeps 3 right, 1 wrong: F1 6/7, the best
    wrong = RegionCounts(scored=[(0.4, False), (0.6, False)])
    assert wrong.suggested_threshold() == 0.601        # every one was deleted: above them all
    assert RegionCounts().suggested_threshold() is None
