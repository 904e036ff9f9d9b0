"""The few-shot adapter on its own: synthetic embeddings, no models (the learning path is in test_learning.py)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from backend.labeling.adapter import (
    AdapterSettings,
    Examples,
    Memory,
    _fold_assignments,
    _folds,
    _repeats,
    _Statistics,
    adjust_logits,
)
from backend.labeling.prompts import LabelSet


def _memory(rows: list[tuple[str | None, torch.Tensor]], head="label", per_source=1) -> Memory:
    sources = [rows[i:i + per_source] for i in range(0, len(rows), per_source)]
    return Memory.build([Examples((head,) * len(s), tuple(r[0] for r in s), torch.stack([r[1] for r in s]))
                         for s in sources])


def _cluster(centre, n, seed, spread=0.1):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(centre + spread * torch.randn(n, len(centre), generator=generator), dim=-1)


def test_adapter_leaves_labels_without_examples_and_one_class_memories_alone():
    labelset = LabelSet.build(["star", "diamond", "new_label"])
    centres = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    zero_shot = lambda e: torch.tensor([[4.0, 0.0, 2.0, 1.0]]).expand(len(e), -1)   # noqa: E731
    memory = _memory([("star", e) for e in _cluster(centres[0], 6, 2)]
                     + [("diamond", e) for e in _cluster(centres[1], 6, 3)])
    probe = _cluster(centres[1], 4, 4)
    adjusted = adjust_logits(memory, "label", probe, zero_shot(probe), labelset, zero_shot)
    assert (adjusted.argmax(1) == 1).all()                                  # diamond, learned
    assert torch.equal(adjusted[:, 0], zero_shot(probe)[:, 0])              # star, named right by zero-shot: as it was
    assert torch.equal(adjusted[:, 2], zero_shot(probe)[:, 2])              # the label without examples: as it was
    only_stars = _memory([("star", e) for e in _cluster(centres[0], 6, 2)])
    assert torch.equal(adjust_logits(only_stars, "label", probe, zero_shot(probe), labelset, zero_shot),
                       zero_shot(probe))
    unknown = _memory([("circle", e) for e in _cluster(centres[0], 6, 2)] + [("square", e) for e in probe])
    assert torch.equal(adjust_logits(unknown, "label", probe, zero_shot(probe), labelset, zero_shot),
                       zero_shot(probe))
    assert torch.equal(adjust_logits(memory, "other_head", probe, zero_shot(probe), labelset, zero_shot),
                       zero_shot(probe))


def test_adapter_keeps_zero_shot_when_the_memory_does_not_help():
    """Cross-validation picks the weight, 0 included: when zero-shot already names every corrected example
    right, the memory changes nothing (ties go to the smallest weight)."""
    labelset = LabelSet.build(["a", "b", "c"])
    centres = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    rows = [(label, e) for i, label in enumerate("abc") for e in _cluster(centres[i], 8, 6 + i, spread=0.15)]
    memory = _memory(rows, per_source=2)
    text = torch.cat([centres, -centres.mean(0, keepdim=True)])
    zero_shot = lambda e: 10.0 * e @ text.T   # noqa: E731
    keys = torch.stack([r[1] for r in rows])
    assert (zero_shot(keys).argmax(1) == torch.tensor([i for i in range(3) for _ in range(8)])).all()
    assert memory.fitted("label", labelset, zero_shot, AdapterSettings()) is None


def test_adapter_background_examples_without_a_background_prompt_add_a_column():
    labelset = LabelSet.build(["star", "diamond"], background=())
    centres = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(7)), dim=-1)
    zero_shot = lambda e: torch.tensor([[3.0, 1.0]]).expand(len(e), -1)   # noqa: E731
    memory = _memory([("star", e) for e in _cluster(centres[0], 6, 8)] + [("diamond", e) for e in
                     _cluster(centres[1], 6, 9)] + [(None, e) for e in _cluster(centres[2], 6, 10)])
    blobs = _cluster(centres[2], 3, 11)
    adjusted = adjust_logits(memory, "label", blobs, zero_shot(blobs), labelset, zero_shot)
    assert adjusted.shape == (3, 3) and (adjusted.argmax(1) == 2).all()    # background wins: dropped
    stars = _cluster(centres[0], 3, 12)
    assert (adjust_logits(memory, "label", stars, zero_shot(stars), labelset, zero_shot).argmax(1) == 0).all()


def test_memory_token_changes_exactly_with_the_content():
    rows = [("star", e) for e in _cluster(torch.ones(8), 4, 1)]
    assert _memory(rows).token == _memory(rows).token
    assert _memory(rows).token != _memory(rows[:3]).token
    assert Memory.build([]).token == "" and not Memory.build([])
    np.testing.assert_equal(len(_memory(rows)), 4)


def test_fold_statistics_give_the_gda_of_the_other_folds_exactly():
    """Each cross-validation fold's GDA comes from per-fold sums minus the fold: it must equal a GDA fitted
    directly on the other folds' examples (means, shrunk shared covariance, solved)."""
    g = torch.Generator().manual_seed(3)
    keys = F.normalize(torch.randn(60, 12, generator=g), dim=-1)
    targets = torch.arange(60) % 4
    folds = _folds(torch.arange(60) // 3, 5)
    stats = _Statistics(keys, targets, targets, folds, 0.6)
    classes, weights, bias, learned = stats.gda(3, without=2)
    train, y = keys[folds != 2], targets[folds != 2]
    means = torch.stack([train[y == c].mean(0) for c in range(4)])
    centred = train - means[y]
    covariance = centred.T @ centred / len(train)
    average = float(covariance.trace()) / 12 + 1e-6
    shrunk = 0.4 * covariance + (0.6 * average + 1e-6) * torch.eye(12)
    expected = means @ torch.linalg.inv(shrunk) * average
    assert torch.equal(classes, torch.arange(4)) and learned.tolist() == [False, False, False, True]   # 3: background
    torch.testing.assert_close(weights, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bias, -0.5 * (expected * means).sum(1), rtol=1e-3, atol=1e-4)
    one_class = _Statistics(keys[:10], torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long),
                            torch.arange(10) % 2, 0.6)
    assert one_class.gda(3, without=0) is None   # nothing to tell apart


def test_the_memory_decides_only_labels_zero_shot_named_wrong_and_background():
    """A label whose examples zero-shot named right at least half of the time stays zero-shot's; the label it
    never named, and background, are the memory's."""
    g = torch.Generator().manual_seed(4)
    keys = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    targets = torch.tensor([0] * 10 + [1] * 10 + [3] * 10)        # labels 0, 1 and background (n = 3)
    named = torch.tensor([0] * 10 + [0] * 10 + [0] * 10)          # zero-shot: right on 0, wrong on 1
    stats = _Statistics(keys, targets, named, torch.arange(30) % 5, 0.6)
    classes, _, _, learned = stats.gda(3)
    assert classes.tolist() == [0, 1, 3] and learned.tolist() == [False, True, True]


def test_a_refit_after_one_more_annotation_computes_one_folds_gram_and_fits_as_from_scratch():
    """Storing one annotation rebuilds the memory from the previous state: with many sources, every other source
    keeps its fold wherever the new one lands in the store's order, so only the new source's fold gets a new Gram
    matrix, and the fit is the one a fresh build gives (the same rows in the same order: the same matrices)."""
    g = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    labels = ("a", "b", None)
    sources = []
    for _ in range(101):
        rows = torch.arange(12) % 3
        keys = F.normalize(centres[rows] + 0.3 * torch.randn(12, 16, generator=g), dim=-1)
        sources.append(Examples(("box",) * 12, tuple(labels[r] for r in rows.tolist()), keys))
    labelset = LabelSet.build(["a", "b"])
    text = F.normalize(centres[:2] + 0.5 * torch.randn(2, 16, generator=g), dim=-1)

    def zero_shot(e):
        return 10.0 * e @ torch.cat([text, -text.mean(0, keepdim=True)]).T   # labels a, b and a background prompt

    before = Memory.build(sources[:50] + sources[51:])
    before.fitted("box", labelset, zero_shot, AdapterSettings())
    assert before._grams.computed == 5                     # 100 sources, 1,200 rows: five folds of about 240
    after = Memory.build(sources, previous=before)         # the new source lands in the middle
    fitted = after.fitted("box", labelset, zero_shot, AdapterSettings())
    assert after._grams.computed == 6                      # the new source's fold only
    fresh = Memory.build(sources).fitted("box", labelset, zero_shot, AdapterSettings())
    assert fitted is not None and fresh is not None
    assert torch.equal(fitted.weights, fresh.weights) and torch.equal(fitted.bias, fresh.bias)
    assert (fitted.temperature, fitted.margin) == (fresh.temperature, fresh.margin)
    assert after.token == Memory.build(sources).token != before.token


def test_cross_validation_in_dual_form_scores_each_held_out_fold_as_the_primal_gda():
    """With fewer examples than dimensions, a fold's GDA is solved as an examples x examples system over their
    kernel: the held-out examples' scores, classes and learned labels must be the D x D solution's."""
    g = torch.Generator().manual_seed(6)
    keys = F.normalize(torch.randn(40, 64, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.tensor([0, 1, 1, 3] * 10)
    named = torch.where(torch.arange(40) % 3 == 0, 0, targets)
    folds = _folds(torch.arange(40) // 2, 5)
    primal = _Statistics(keys, targets, named, folds, 0.3)
    dual = _Statistics(keys, targets, named, folds, 0.3, kernel=keys @ keys.T)
    for fold in range(5):
        (classes, scores, learned), (dual_classes, dual_scores, dual_learned) = (
            primal.held_scores(3, fold), dual.held_scores(3, fold))
        assert torch.equal(classes, dual_classes) and torch.equal(learned, dual_learned)
        torch.testing.assert_close(dual_scores, scores, rtol=1e-9, atol=1e-9)
    assert primal.held_scores(3, 0)[0].tolist() == [0, 1, 3]


def test_cross_validation_repeats_over_other_deals_of_the_sources_while_it_is_cheap():
    """Small projects average cross-validation over several fold assignments (each source in one fold of each,
    folds even, the same assignments for the same memory); at 2,000 examples x 512 dimensions one is kept, so a
    refit stays as fast as before."""
    groups = torch.repeat_interleave(torch.arange(1000, 1023) * 7919, 3)     # 23 sources of 3 rows
    first, *others = assignments = _fold_assignments(groups, 5, 4)
    assert len(assignments) == 4 and torch.equal(first, _folds(groups, 5))
    for folds in others:
        by_source = folds.view(23, 3)
        assert (by_source == by_source[:, :1]).all()                         # a source stays whole
        assert sorted(torch.bincount(by_source[:, 0]).tolist()) == [4, 4, 5, 5, 5]
        assert not torch.equal(folds, first)
    assert all(torch.equal(a, b) for a, b in zip(assignments, _fold_assignments(groups, 5, 4)))
    settings = AdapterSettings(repeats=4)
    assert _repeats(torch.zeros(300, 64), settings) == _repeats(torch.zeros(300, 512), settings) == 4
    assert _repeats(torch.zeros(2000, 512), settings) == 1
