"""Scores that mean something: the probability that an annotator keeps a predicted region, from its features.

A logistic model over a region's features (the label probability as a logit, and whatever else the caller
measures, e.g. how much the project's memory agrees), fitted on the project's own corrections (kept = matched
right box and label, see matching.py). With fewer than ``minimum`` corrections, or only one outcome, the prior
is used: the label probability itself. A task's score is the product of its regions' keep-probabilities (the
chance that nothing needs fixing), so sorting tasks by it puts those that need work first.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> p = rng.uniform(0.3, 1.0, 400)
>>> kept = rng.uniform(size=400) < p ** 3          # the raw probabilities are over-confident
>>> features = np.stack([p], 1)
>>> calibrator = Calibrator.fit(features, kept)
>>> expected_calibration_error(Calibrator().predict(features), kept) > 0.1
True
>>> expected_calibration_error(calibrator.predict(features), kept) < 0.05
True
>>> Calibrator.from_bytes(calibrator.to_bytes()) == calibrator
True
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

EPS = 1e-6


@dataclass(frozen=True)
class Calibrator:
    """``weights``: per feature after the first (the probability's logit); empty = the prior (identity)."""

    weights: tuple[float, ...] = ()
    bias: float = 0.0

    @classmethod
    def fit(cls, features: np.ndarray, kept: np.ndarray, minimum: int = 30,
            strengths: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0), folds: int = 5) -> Calibrator:
        """Logistic regression regularised towards the prior (the label probability as it is) rather than towards
        zero, its strength chosen by cross-validated log-loss: corrections that agree with the scores only nudge
        them, corrections that contradict them decide. The prior when there is too little to learn."""
        kept = np.asarray(kept, dtype=np.float64)
        if len(kept) < minimum or kept.min() == kept.max():
            return cls()
        x = _design(features)
        fold = np.arange(len(kept)) % folds
        def held_out_loss(l2):
            loss = 0.0
            for f in range(folds):
                w = _newton(x[fold != f], kept[fold != f], l2)
                z = x[fold == f] @ w
                loss += float(np.sum(np.logaddexp(0, z) - kept[fold == f] * z))
            return loss
        w = _newton(x, kept, min(strengths, key=held_out_loss))
        return cls(tuple(float(v) for v in w[:-1]), float(w[-1]))

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Keep-probability per row; column 0 of ``features`` is the label probability."""
        features = _rows(features)
        if not self.weights:
            return np.clip(features[:, 0], 0.0, 1.0)
        return _sigmoid(_design(features)[:, :len(self.weights)] @ np.asarray(self.weights) + self.bias)

    def to_bytes(self) -> bytes:
        return json.dumps({"weights": list(self.weights), "bias": self.bias}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Calibrator:
        state = json.loads(data)
        return cls(tuple(float(v) for v in state["weights"]), float(state["bias"]))


def task_score(keep_probabilities) -> float:
    """The chance that none of a task's predicted regions needs a correction (1.0 for none predicted)."""
    return float(np.prod(np.asarray(keep_probabilities, dtype=np.float64)))


def expected_calibration_error(probabilities, outcomes, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width bins, weighted by their share of the rows."""
    probabilities, outcomes = np.asarray(probabilities, float), np.asarray(outcomes, float)
    which = np.minimum((probabilities * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            error += rows.mean() * abs(probabilities[rows].mean() - outcomes[rows].mean())
    return float(error)


def _newton(x: np.ndarray, kept: np.ndarray, l2: float, steps: int = 25) -> np.ndarray:
    """Weights minimising the logistic loss plus ``l2`` / 2 times the squared distance to the prior's."""
    prior = np.zeros(x.shape[1])
    prior[0] = 1.0
    w = prior.copy()

    def loss(w):
        z = x @ w
        return float(np.sum(np.logaddexp(0, z) - kept * z) + 0.5 * l2 * (w - prior) @ (w - prior))

    for _ in range(steps):
        p = _sigmoid(x @ w)
        gradient = x.T @ (p - kept) + l2 * (w - prior)
        hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        step, current = np.linalg.solve(hessian, gradient), loss(w)
        while loss(w - step) > current and np.abs(step).max() > 1e-9:
            step = step / 2            # damped: a full Newton step can overshoot on near-separable data
        w = w - step
    return w


def _design(features: np.ndarray) -> np.ndarray:
    """The probability as a logit, the other features as they are, and a constant column."""
    features = _rows(features)
    p = np.clip(features[:, :1], EPS, 1 - EPS)
    return np.concatenate([np.log(p / (1 - p)), features[:, 1:], np.ones((len(features), 1))], 1)


def _rows(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features[:, None] if features.ndim == 1 else features


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
