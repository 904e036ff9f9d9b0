"""The keep-probability calibrator on synthetic corrections (no models): the prior until there is enough to learn,
calibrated after, a second feature used when it tells something, and task scores that rank tasks needing work
first. Figures measured with these seeds; margins stated."""
import numpy as np

from backend.labeling.calibration import Calibrator, expected_calibration_error, task_score


def corrections(n: int, seed: int):
    """Over-confident label probabilities; an agreement feature that also predicts being kept."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.3, 1.0, n)
    agreement = rng.uniform(-1, 1, n)
    kept = rng.uniform(size=n) < 1 / (1 + np.exp(-(4 * (p - 0.7) + 2 * agreement)))
    return np.stack([p, agreement], 1), kept


def auroc(scores, positives) -> float:
    scores, positives = np.asarray(scores), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_prior_until_enough_corrections_or_both_outcomes():
    features, kept = corrections(20, 0)
    assert Calibrator.fit(features, kept) == Calibrator()
    features, _ = corrections(100, 1)
    assert Calibrator.fit(features, np.ones(100, bool)) == Calibrator()
    np.testing.assert_allclose(Calibrator().predict(features), features[:, 0])


def test_calibrated_on_held_out_corrections_and_uses_agreement():
    features, kept = corrections(400, 2)
    held, held_kept = corrections(2000, 3)
    calibrator = Calibrator.fit(features, kept)
    before = expected_calibration_error(Calibrator().predict(held), held_kept)
    after = expected_calibration_error(calibrator.predict(held), held_kept)
    print(f"\nECE before / after: {before:.3f} / {after:.3f}, weights {calibrator.weights}")
    assert before > 0.12 and after < 0.05          # measured 0.180 → 0.036
    assert calibrator.weights[1] > 1.0             # agreement counts (true weight 2)
    assert Calibrator.from_bytes(calibrator.to_bytes()) == calibrator


def test_a_few_corrections_that_agree_with_the_scores_leave_them_calibrated():
    """Scores calibrated already (as the learner's are on the shapes world): 45 corrections, sampling noise
    included, must not pull them off. Regularised towards zero weights, the fit did (held-out ECE 0.068 on average
    over these 20 draws, at most 0.126)."""
    rng = np.random.default_rng(7)
    held = rng.uniform(0.3, 1.0, 4000)
    held_kept = rng.uniform(size=4000) < held
    errors = []
    for seed in range(20):
        draw = np.random.default_rng(100 + seed)
        p = draw.uniform(0.3, 1.0, 45)
        calibrator = Calibrator.fit(p[:, None], draw.uniform(size=45) < p)
        errors.append(expected_calibration_error(calibrator.predict(held[:, None]), held_kept))
    assert np.mean(errors) < 0.045                  # measured 0.032 (raw scores 0.016)


def test_task_scores_rank_tasks_that_need_work_first():
    calibrator = Calibrator.fit(*corrections(400, 4))
    rng = np.random.default_rng(5)
    features, kept = corrections(3000, 6)
    tasks = np.split(rng.permutation(3000), 600)   # 5 regions per task
    scores = [task_score(calibrator.predict(features[t])) for t in tasks]
    clean = [bool(kept[t].all()) for t in tasks]
    ranking = auroc(scores, clean)
    print(f"\ntask ranking AUROC: {ranking:.3f}")
    assert ranking >= 0.80                          # measured 0.845
    assert task_score([]) == 1.0


def test_probabilities_near_one_do_not_make_the_fit_diverge():
    """Softmax scores of 0.999999… are logits near 14: an undamped Newton step overshot to weights of -4000."""
    rng = np.random.default_rng(0)
    p = np.clip(rng.beta(8, 1, 60), 0, 1 - 1e-7)
    kept = rng.uniform(size=60) < 0.7
    calibrator = Calibrator.fit(p[:, None], kept)
    assert abs(calibrator.weights[0]) < 5 and abs(calibrator.bias) < 5           # measured 0.53, -0.55
    assert expected_calibration_error(calibrator.predict(p[:, None]), kept) < 0.12  # measured 0.070 (raw 0.238)


def test_the_learner_records_what_annotators_kept_and_the_server_calibrates_with_it(tmp_path):
    """End to end inside the backend: outcomes of corrected predictions are stored with the annotation's record,
    and the next predictions of that project score boxes with the calibrator learned from them."""
    from backend.labeling.adapter import AdapterSettings, Examples
    from backend.learning import Learning, _outcomes
    from backend.store import Change, SqliteStore

    def box(x, label, id_, score=None):
        item = {"id": id_, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                "value": {"x": x, "y": 10, "width": 10, "height": 10, "rectanglelabels": [label]}}
        return item | ({"score": score} if score is not None else {})

    predicted = [box(10, "star", "a", 0.9), box(40, "star", "b", 0.9), box(70, "circle", "c", 0.6)]
    annotated = [box(10, "star", "a"), box(41, "circle", "b")]          # kept, relabelled, deleted
    assert _outcomes(predicted, annotated, "label") == [(0.9, True), (0.9, False), (0.6, False)]

    store = SqliteStore(tmp_path)
    rng = np.random.default_rng(0)
    changes = []
    for n in range(20):   # 60 outcomes: a 0.9 is kept half of the time, a 0.3 never
        outcomes = [(0.9, bool(rng.random() < 0.5)), (0.9, bool(rng.random() < 0.5)), (0.3, False)]
        changes.append(Change(f"annotation:{n}", 1.0 + n, Examples((), (), np.zeros((0, 0)), n, outcomes).to_bytes(),
                              n))
    store.apply(7, "space", changes)
    learning = Learning(store, jobs=None, space="space", clip=None)
    learned = learning.versioned("clip-base", 7)
    assert learned.version != "clip-base" and learned.adjust is None and learned.keep is not None
    calibrated = learned.keep(np.array([0.9, 0.3]))
    assert abs(calibrated[0] - 0.5) < 0.15 and calibrated[1] < 0.15    # what the corrections say, not 0.9 / 0.3
    assert learning.versioned("clip-base", 8).keep is None              # another project: raw probabilities
    other_method = Learning(store, jobs=None, space="space", clip=None, adapter=AdapterSettings(harm=0.0))
    assert other_method.versioned("clip-base", 7).version != learned.version   # an upgraded learner re-predicts
