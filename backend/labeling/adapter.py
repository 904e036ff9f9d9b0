"""Few-shot memory built from annotators' corrections, combined with CLIP's zero-shot logits.

A project's memory holds CLIP embeddings of what annotators drew (per control and label), of whole images they
classified, and of predicted boxes they deleted (background). Nothing is trained by gradient descent. For each
head and label set the memory is summarised, once per stored state, by Gaussian discriminant analysis (GDA: class
means and one shared, shrunk covariance; Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based
Adaptation", ICLR 2024) over the labels that have examples (background included).

The corrections also say which labels zero-shot already names: a label whose examples zero-shot named right at
least half of the time is *trusted*, the others (a label CLIP never learned, and background) are *learned*.
Zero-shot keeps deciding among trusted labels (measured on the shapes world, it names known shapes better than a
few-shot memory does, so letting the memory vote there costs known labels); the memory decides between each
learned label and the trusted ones together:

    logit(learned c) = max(zero-shot logits of the trusted labels) + log-odds(c : trusted labels) - margin

where the log-odds come from the GDA scores at a temperature. So a crop goes to a learned label when the memory
finds it more likely than all trusted labels together by ``margin`` (in log-odds), whatever zero-shot said of it.

- the temperature and the margin are chosen per project, head and state by cross-validation on the memory itself
  (folds by annotation), scoring each held-out example named right +1 and each one that zero-shot alone named
  right but the memory breaks -``harm`` more; zero-shot alone is kept unless the memory scores better. Breaking
  what worked costs annotators more than a new label named late, and on the shapes world (bench/corrections.py
  --tune) plain accuracy picked settings that cost known shapes 2 points;
- a label without examples keeps its zero-shot logit (a label added to the config works at once);
- background examples (predicted boxes the annotator deleted) are a learned class whose logit goes to the
  background prompts' columns, so crops like them are rejected. Without a background prompt, one background
  column is appended (a crop that wins it is dropped like one won by a background prompt);
- examples of labels the config no longer has are ignored.

>>> import torch.nn.functional as F
>>> g = torch.Generator().manual_seed(0)
>>> centres = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
>>> keys = F.normalize(centres.repeat_interleave(6, 0) + 0.1 * torch.randn(12, 8, generator=g), dim=-1)
>>> memory = Memory.build([Examples(("box",) * 2, ("star", "diamond"), keys[[i, i + 6]]) for i in range(6)])
>>> labelset = LabelSet.build(["star", "diamond"])
>>> zero_shot = lambda e: torch.tensor([[5.0, 0.0, 1.0]]).expand(len(e), -1)   # always "star"
>>> adjusted = adjust_logits(memory, "box", keys[6:7], zero_shot(keys[6:7]), labelset, zero_shot)
>>> labelset.labels[int(adjusted.argmax())]                # a crop like the diamond examples
'diamond'
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .prompts import LabelSet

MAGIC = b"CLX1"
ZeroShot = Callable[[torch.Tensor], torch.Tensor]   # embeddings (N, D) → zero-shot logits (N, L + B)


@dataclass(frozen=True)
class AdapterSettings:
    """``shrinkage``: how far the shared covariance is pulled towards a multiple of the identity (0 = as
    estimated, 1 = plain class means); ``temperatures`` (of the GDA scores) and ``margins`` (log-odds a learned
    label needs over the trusted ones): what cross-validation picks from; ``harm``: the extra cost, in
    cross-validation, of an example zero-shot named right that the memory names wrong; ``folds``:
    cross-validation folds. Chosen on the shapes world's validation scenes (bench/corrections.py --tune): the
    novel-shape accuracy after 16 shots highest among the settings that kept known shapes within a point of
    zero-shot (shrinkage 0.3: -0.5 points, novel 0.503; 0.6: -1.2 for the same novel accuracy; 0.9: -0.5,
    novel 0.398; harm 0: -1.8 to -2.5; harm 2 chose as harm 1; ten margins from 0 to 8: -1.1)."""

    shrinkage: float = 0.3
    temperatures: tuple[float, ...] = (4.0, 16.0, 64.0)
    margins: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
    harm: float = 1.0
    folds: int = 5

    @property
    def method(self) -> str:
        """Names how a memory becomes predictions: part of the model version, so upgrading the learner (or its
        settings) re-predicts tasks that the previous one labelled. Bump the tag when the method changes."""
        return f"zero-shot-first-gda/{self!r}"


@dataclass(frozen=True)
class Examples:
    """Embeddings learned from one source (one annotation): per row its head, its label (None = background)."""

    heads: tuple[str, ...]
    labels: tuple[str | None, ...]
    embeddings: torch.Tensor            # (N, D) unit length; stored as float16
    task: int | None = None
    outcomes: tuple[tuple[float, bool], ...] = ()   # (predicted score, kept by the annotator) per predicted box

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "outcomes", tuple((float(s), bool(k)) for s, k in self.outcomes))
        embeddings = torch.as_tensor(self.embeddings).detach().float().cpu()
        if embeddings.numel() == 0:
            embeddings = torch.zeros(0, embeddings.shape[-1] if embeddings.dim() == 2 else 0)
        elif embeddings.dim() != 2:
            embeddings = embeddings.reshape(len(self.heads), -1)
        object.__setattr__(self, "embeddings", embeddings)
        if not len(self.heads) == len(self.labels) == len(self.embeddings):
            raise ValueError("heads, labels and embeddings must have the same length")

    def __len__(self) -> int:
        return len(self.heads)

    def to_bytes(self) -> bytes:
        """A compact, pickle-free encoding: a JSON header, then float16 rows."""
        header = json.dumps({"task": self.task, "heads": list(self.heads), "labels": list(self.labels),
                             "dim": int(self.embeddings.shape[1]) if len(self) else 0,
                             "outcomes": [list(o) for o in self.outcomes]}).encode()
        rows = self.embeddings.to(torch.float16).numpy().tobytes() if len(self) else b""
        return MAGIC + struct.pack("<I", len(header)) + header + rows

    @classmethod
    def from_bytes(cls, data: bytes) -> Examples:
        if data[:4] != MAGIC:
            raise ValueError("not an encoded Examples record")
        (size,) = struct.unpack("<I", data[4:8])
        header = json.loads(data[8:8 + size])
        dim = header["dim"]
        rows = data[8 + size:]
        embeddings = (torch.frombuffer(bytearray(rows), dtype=torch.float16).float().reshape(-1, dim)
                      if dim else torch.zeros(0, 0))
        outcomes = tuple((float(s), bool(k)) for s, k in header.get("outcomes") or ())
        return cls(tuple(header["heads"]), tuple(header["labels"]), embeddings, header.get("task"), outcomes)


@dataclass(frozen=True)
class HeadIndex:
    """All examples of one head, stacked: embeddings, labels, and which source (annotation) each came from."""

    keys: torch.Tensor                  # (M, D) float32
    labels: tuple[str | None, ...]
    groups: torch.Tensor                # (M,) source number, for cross-validation folds


@dataclass(frozen=True)
class FittedHead:
    """The memory of one head for one label set: GDA over the labels with examples, which of them it decides,
    and the temperature and margin cross-validation chose."""

    columns: torch.Tensor               # (K,) the logit column of each class; n = background
    weights: torch.Tensor               # (K, D)
    bias: torch.Tensor                  # (K,)
    learned: torch.Tensor               # (K,) bool: the memory decides this class (zero-shot does the others)
    temperature: float
    margin: float

    def logits(self, logits: torch.Tensor, embeddings: torch.Tensor, n: int) -> torch.Tensor:
        scores = self.temperature * (embeddings.float() @ self.weights.T + self.bias)
        return _combine(logits, scores, self.columns, self.learned, self.margin, n)


@dataclass(frozen=True)
class Memory:
    """A project's few-shot memory at one stored state. ``token`` identifies the state ("" when empty)."""

    heads: dict[str, HeadIndex] = field(default_factory=dict)
    token: str = ""
    size: int = 0
    outcomes: tuple[tuple[float, bool], ...] = ()   # every annotation's (predicted score, kept): the calibration
    _fitted: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def build(cls, examples: Iterable[Examples]) -> Memory:
        rows: dict[str, tuple[list[torch.Tensor], list[str | None], list[int]]] = {}
        size, outcomes = 0, []
        for group, ex in enumerate(examples):
            outcomes += ex.outcomes
            for i, head in enumerate(ex.heads):
                keys, labels, groups = rows.setdefault(head, ([], [], []))
                keys.append(ex.embeddings[i]), labels.append(ex.labels[i]), groups.append(group)
                size += 1
        heads = {head: HeadIndex(torch.stack(keys).float(), tuple(labels), torch.tensor(groups))
                 for head, (keys, labels, groups) in rows.items()}
        token = _digest(heads) if size else ""
        if outcomes:   # the outcomes shape the scores: a new one is a new state
            token = hashlib.sha256(f"{token}:{outcomes}".encode()).hexdigest()[:16]
        return cls(heads, token, size, tuple(outcomes))

    def __len__(self) -> int:
        return self.size

    def counts(self, head: str) -> dict[str | None, int]:
        """Examples per label of one head (None = background)."""
        index = self.heads.get(head)
        out: dict[str | None, int] = {}
        for label in index.labels if index else ():
            out[label] = out.get(label, 0) + 1
        return out

    def fitted(self, head: str, labelset: LabelSet, zero_shot: ZeroShot,
               settings: AdapterSettings) -> FittedHead | None:
        """The fitted memory for a head and label set, computed once per state (None: nothing to add)."""
        key = (head, labelset, settings)
        with self._lock:
            if key in self._fitted:
                return self._fitted[key]
        index = self.heads.get(head)
        fitted = fit_head(index, labelset, zero_shot, settings) if index is not None else None
        with self._lock:
            self._fitted[key] = fitted
        return fitted


def adjust_logits(memory: Memory, head: str, embeddings: torch.Tensor, logits: torch.Tensor, labelset: LabelSet,
                  zero_shot: ZeroShot, settings: AdapterSettings = AdapterSettings()) -> torch.Tensor:
    """Zero-shot ``logits`` (N, L + B) with the memory deciding the labels it learned; unchanged where it has
    nothing to add."""
    fitted = memory.fitted(head, labelset, zero_shot, settings) if memory else None
    if fitted is None or len(embeddings) == 0:
        return logits
    return fitted.logits(logits, embeddings, len(labelset.labels))


def fit_head(index: HeadIndex, labelset: LabelSet, zero_shot: ZeroShot,
             settings: AdapterSettings = AdapterSettings()) -> FittedHead | None:
    """GDA over the labels of ``labelset`` that have examples (and background), its temperature and margin chosen
    by cross-validation; None when zero-shot alone does as well."""
    n = len(labelset.labels)
    column = {label: i for i, label in enumerate(labelset.labels)}
    targets = torch.tensor([column.get(label, -1) if label is not None else n for label in index.labels])
    usable = targets >= 0
    keys, targets, groups = index.keys[usable], targets[usable], index.groups[usable]
    if len(targets.unique()) < 2:
        return None   # one class: nothing to tell apart
    zs = _with_background_column(zero_shot(keys), n, bool((targets == n).any()))
    right = zs.argmax(1).clamp(max=n) == targets          # what zero-shot alone names right
    folds = _folds(groups, settings.folds)
    stats = _Statistics(keys, targets, zs[:, :n].argmax(1), folds)
    temperatures = torch.tensor(settings.temperatures)[:, None, None, None]   # the grid on leading dimensions
    margins = torch.tensor(settings.margins)[None, :, None, None]
    value, baseline = torch.zeros(len(settings.temperatures), len(settings.margins)), 0.0
    for fold in folds.unique().tolist():
        held = folds == fold
        train = stats.without(fold)
        if int((train.counts > 0).sum()) < 2:
            continue
        baseline += float(right[held].sum())
        classes, weights, bias, learned = train.gda(settings.shrinkage, n)
        scores = temperatures * (keys[held] @ weights.T + bias)
        predicted = _combine(zs[held], scores, classes, learned, margins, n).argmax(-1).clamp(max=n)
        wrong = predicted != targets[held]
        value += (~wrong).sum(-1) - settings.harm * (wrong & right[held]).sum(-1)
    best = int(torch.argmax(value))   # the first best: the lowest temperature and margin among ties
    classes, weights, bias, learned = stats.without(None).gda(settings.shrinkage, n)
    if value.flatten()[best] <= baseline or not learned.any():
        return None
    t, m = divmod(best, len(settings.margins))
    return FittedHead(classes, weights, bias, learned, settings.temperatures[t], settings.margins[m])


class _Statistics:
    """Per fold: the Gram matrix, per-class sums and counts, and how many of each class zero-shot named right.
    Every fold's GDA comes from these sums, so the examples are read once however many folds there are."""

    def __init__(self, keys, targets, named, folds, classes=None, gram=None, sums=None, counts=None, hits=None):
        if gram is None:
            classes = targets.unique()
            onehot = torch.nn.functional.one_hot(torch.searchsorted(classes, targets), len(classes)).float()
            ids = folds.unique().tolist()
            gram = torch.stack([keys[folds == f].T @ keys[folds == f] for f in ids])
            sums = torch.stack([onehot[folds == f].T @ keys[folds == f] for f in ids])
            counts = torch.stack([onehot[folds == f].sum(0) for f in ids])
            hits = torch.stack([onehot[(folds == f) & (named == targets)].sum(0) for f in ids])
            self.fold_ids = ids
        self.classes, self.gram, self.sums, self.counts, self.hits = classes, gram, sums, counts, hits
        self.totals = None

    def without(self, fold: int | None) -> _Statistics:
        """The totals over every fold but ``fold`` (None: over all)."""
        parts = (self.gram, self.sums, self.counts, self.hits)
        totals = [part.sum(0) for part in parts] if self.totals is None else self.totals
        self.totals = totals
        if fold is not None:
            i = self.fold_ids.index(fold)
            totals = [total - part[i] for total, part in zip(totals, parts)]
        return _Statistics(None, None, None, None, self.classes, *totals)

    def gda(self, shrinkage: float, n: int):
        """GDA (class means, one shared covariance shrunk towards its average variance; scores whose scale does
        not depend on the embedding size), and which classes the memory decides: background, and labels whose
        examples zero-shot named right less than half of the time."""
        present = self.counts > 0
        classes, counts = self.classes[present], self.counts[present]
        means = self.sums[present] / counts[:, None]
        covariance = (self.gram - (means.T * counts) @ means) / counts.sum()
        dims = covariance.shape[0]
        average = float(covariance.trace()) / dims + 1e-6
        shrunk = (1 - shrinkage) * covariance + (shrinkage * average + 1e-6) * torch.eye(dims)
        weights = torch.cholesky_solve(means.T, torch.linalg.cholesky(shrunk)).T * average
        bias = -0.5 * (weights * means).sum(1)
        learned = (classes >= n) | (2 * self.hits[present] < counts)
        return classes, weights, bias, learned


def _combine(logits: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, learned: torch.Tensor,
             margin, n: int) -> torch.Tensor:
    """Each learned class's logit becomes the best trusted zero-shot logit plus the memory's log-odds of that
    class against the trusted classes together, minus ``margin``; the background class goes to every background
    column (one is appended when there is none). With no trusted class, the memory's log-probabilities are
    anchored at the best zero-shot label logit. ``scores`` (..., N, K) and ``margin`` may carry leading
    dimensions (cross-validation's grid): the result has them too."""
    background = bool((classes == n).any())
    out = _with_background_column(logits.float(), n, background)
    trusted = ~learned
    reference = scores[..., trusted] if trusted.any() else scores
    anchor = out[:, classes[trusted] if trusted.any() else torch.arange(n)].max(1, keepdim=True).values
    logit = anchor + scores - reference.logsumexp(-1, keepdim=True) - margin
    out = out.expand(*logit.shape[:-1], out.shape[1]).clone()
    labels = learned & (classes < n)
    out[..., classes[labels]] = logit[..., labels]
    if background:
        out[..., n:] = logit[..., classes == n]
    return out


def _with_background_column(logits: torch.Tensor, n: int, needed: bool) -> torch.Tensor:
    """Background examples but no background prompt: a column that only the memory can make win."""
    if not needed or logits.shape[1] > n:
        return logits
    floor = logits[:, :n].min(1, keepdim=True).values - 10.0
    return torch.cat([logits, floor], 1)


def _folds(groups: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold per example: by source (annotation) when there are several, else by example."""
    distinct = groups.unique()
    if len(distinct) >= 2:
        rank = torch.searchsorted(distinct, groups)
        return rank % min(folds, len(distinct))
    return torch.arange(len(groups)) % max(2, min(folds, len(groups)))


def _digest(heads: dict[str, HeadIndex]) -> str:
    h = hashlib.sha256()
    for name in sorted(heads):
        h.update(name.encode() + b"\0")
        h.update(json.dumps(heads[name].labels).encode())
        h.update(heads[name].keys.to(torch.float16).numpy().tobytes())
        h.update(heads[name].groups.numpy().tobytes())
    return h.hexdigest()[:16]
