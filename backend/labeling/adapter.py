"""Few-shot memory built from annotators' corrections, combined with CLIP's zero-shot logits.

A project's memory holds CLIP embeddings of what annotators drew (per control and label), of whole images they
classified, and of predicted boxes they deleted (background). Nothing is trained by gradient descent. For each
head and label set the memory is summarised, once per stored state, by Gaussian discriminant analysis (GDA: class
means and one shared, shrunk covariance; Wang et al., "A Hard-to-Beat Baseline for Training-free CLIP-based
Adaptation", ICLR 2024) over the labels that have examples (background included), and predictions become

    logits = zero_shot_logits + alpha * logit_scale * centred(GDA scores)

- centred over the labels with examples: the memory only says which of THOSE labels a crop resembles, so a label
  without examples keeps its zero-shot logit (a label added to the config works at once), and a crop of a label
  without examples is not pulled towards one with many;
- ``alpha`` is chosen per project, head and state by cross-validation on the memory itself (folds by annotation:
  the zero-shot logits plus the GDA of the other folds must name the held-out examples), from a grid that
  includes 0: a memory that does not help leaves the zero-shot predictions as they were. Measured on the shapes
  world (bench/corrections.py), this never fell below zero-shot while a fixed alpha did at 1 shot per class;
- background examples (predicted boxes the annotator deleted) join as one more class whose score goes to the
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
>>> adjusted = adjust_logits(memory, "box", keys[6:7], zero_shot(keys[6:7]), labelset, zero_shot, logit_scale=10.0)
>>> labelset.labels[int(adjusted.argmax())]                # a crop like the diamond examples
'diamond'
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .prompts import LabelSet

MAGIC = b"CLX1"
ZeroShot = Callable[[torch.Tensor], torch.Tensor]   # embeddings (N, D) → zero-shot logits (N, L + B)


@dataclass(frozen=True)
class AdapterSettings:
    """``shrinkage``: how far the shared covariance is pulled towards a multiple of the identity (0 = as
    estimated, 1 = plain class means); ``alphas``: the weights cross-validation picks from (in units of CLIP's
    logit scale); ``folds``: cross-validation folds. Chosen on the shapes world (bench/corrections.py --tune)."""

    shrinkage: float = 0.6
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    folds: int = 5


@dataclass(frozen=True)
class Examples:
    """Embeddings learned from one source (one annotation): per row its head, its label (None = background)."""

    heads: tuple[str, ...]
    labels: tuple[str | None, ...]
    embeddings: torch.Tensor            # (N, D) unit length; stored as float16
    task: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        object.__setattr__(self, "labels", tuple(self.labels))
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
                             "dim": int(self.embeddings.shape[1]) if len(self) else 0}).encode()
        rows = self.embeddings.to(torch.float16).numpy().tobytes() if len(self) else b""
        return MAGIC + struct.pack("<I", len(header)) + header + rows

    @classmethod
    def from_bytes(cls, data: bytes) -> "Examples":
        if data[:4] != MAGIC:
            raise ValueError("not an encoded Examples record")
        (size,) = struct.unpack("<I", data[4:8])
        header = json.loads(data[8:8 + size])
        dim = header["dim"]
        rows = data[8 + size:]
        embeddings = (torch.frombuffer(bytearray(rows), dtype=torch.float16).float().reshape(-1, dim)
                      if dim else torch.zeros(0, 0))
        return cls(tuple(header["heads"]), tuple(header["labels"]), embeddings, header.get("task"))


@dataclass(frozen=True)
class HeadIndex:
    """All examples of one head, stacked: embeddings, labels, and which source (annotation) each came from."""

    keys: torch.Tensor                  # (M, D) float32
    labels: tuple[str | None, ...]
    groups: torch.Tensor                # (M,) source number, for cross-validation folds


@dataclass(frozen=True)
class FittedHead:
    """The memory of one head for one label set: GDA over the labels with examples, and its weight."""

    columns: torch.Tensor               # (K,) the logit column of each class; n = background
    weights: torch.Tensor               # (K, D)
    bias: torch.Tensor                  # (K,)
    alpha: float

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, K) GDA scores, centred over the classes with examples."""
        scores = embeddings.float() @ self.weights.T + self.bias
        return scores - scores.mean(1, keepdim=True)


@dataclass(frozen=True)
class Memory:
    """A project's few-shot memory at one stored state. ``token`` identifies the state ("" when empty)."""

    heads: dict[str, HeadIndex] = field(default_factory=dict)
    token: str = ""
    size: int = 0
    _fitted: dict = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def build(cls, examples: Iterable[Examples]) -> "Memory":
        rows: dict[str, tuple[list[torch.Tensor], list[str | None], list[int]]] = {}
        size = 0
        for group, ex in enumerate(examples):
            for i, head in enumerate(ex.heads):
                keys, labels, groups = rows.setdefault(head, ([], [], []))
                keys.append(ex.embeddings[i]), labels.append(ex.labels[i]), groups.append(group)
                size += 1
        heads = {head: HeadIndex(torch.stack(keys).float(), tuple(labels), torch.tensor(groups))
                 for head, (keys, labels, groups) in rows.items()}
        return cls(heads, _digest(heads) if size else "", size)

    def __len__(self) -> int:
        return self.size

    def counts(self, head: str) -> dict[str | None, int]:
        """Examples per label of one head (None = background)."""
        index = self.heads.get(head)
        out: dict[str | None, int] = {}
        for label in index.labels if index else ():
            out[label] = out.get(label, 0) + 1
        return out

    def fitted(self, head: str, labelset: LabelSet, zero_shot: ZeroShot, logit_scale: float,
               settings: AdapterSettings) -> FittedHead | None:
        """The fitted memory for a head and label set, computed once per state (None: nothing to add)."""
        key = (head, labelset, logit_scale, settings)
        with self._lock:
            if key in self._fitted:
                return self._fitted[key]
        index = self.heads.get(head)
        fitted = fit_head(index, labelset, zero_shot, logit_scale, settings) if index is not None else None
        with self._lock:
            self._fitted[key] = fitted
        return fitted


def adjust_logits(memory: Memory, head: str, embeddings: torch.Tensor, logits: torch.Tensor, labelset: LabelSet,
                  zero_shot: ZeroShot, logit_scale: float, settings: AdapterSettings = AdapterSettings()) -> torch.Tensor:
    """Zero-shot ``logits`` (N, L + B) plus the memory's term; unchanged where it has nothing to add."""
    fitted = memory.fitted(head, labelset, zero_shot, logit_scale, settings) if memory else None
    if fitted is None or len(embeddings) == 0:
        return logits
    return _combine(logits, fitted.scores(embeddings), fitted.columns, fitted.alpha * logit_scale,
                    len(labelset.labels))


def fit_head(index: HeadIndex, labelset: LabelSet, zero_shot: ZeroShot, logit_scale: float,
             settings: AdapterSettings = AdapterSettings()) -> FittedHead | None:
    """GDA over the labels of ``labelset`` that have examples (and background), weighted by cross-validation."""
    n = len(labelset.labels)
    column = {label: i for i, label in enumerate(labelset.labels)}
    targets = torch.tensor([column.get(label, -1) if label is not None else n for label in index.labels])
    usable = targets >= 0
    keys, targets, groups = index.keys[usable], targets[usable], index.groups[usable]
    if len(targets.unique()) < 2:
        return None   # one class: nothing to tell apart
    zs = _with_background_column(zero_shot(keys), n, bool((targets == n).any()))
    folds = _folds(groups, settings.folds)
    correct = torch.zeros(len(settings.alphas))
    for fold in folds.unique():
        train, held = folds != fold, folds == fold
        if len(targets[train].unique()) < 2:
            continue
        classes, weights, bias = _gda(keys[train], targets[train], settings.shrinkage)
        scores = keys[held] @ weights.T + bias
        scores = scores - scores.mean(1, keepdim=True)
        for i, alpha in enumerate(settings.alphas):
            predicted = _combine(zs[held], scores, classes, alpha * logit_scale, n).argmax(1).clamp(max=n)
            correct[i] += (predicted == targets[held]).sum()
    alpha = settings.alphas[int(torch.argmax(correct))]   # the first best: the smallest weight among ties
    if alpha == 0:
        return None
    classes, weights, bias = _gda(keys, targets, settings.shrinkage)
    return FittedHead(classes, weights, bias, alpha)


def _gda(keys: torch.Tensor, targets: torch.Tensor, shrinkage: float):
    """Class means and one shared covariance shrunk towards its average variance; linear scores whose scale does
    not depend on the embedding size (with shrinkage 1: ``e . mean - |mean|^2 / 2``, plain class means)."""
    classes = targets.unique()
    means = torch.stack([keys[targets == c].mean(0) for c in classes])
    centred = keys - means[torch.searchsorted(classes, targets)]
    covariance = centred.T @ centred / len(keys)
    average = float(covariance.trace()) / covariance.shape[0] + 1e-6
    shrunk = (1 - shrinkage) * covariance + shrinkage * average * torch.eye(covariance.shape[0])
    precision = torch.linalg.inv(shrunk + 1e-6 * torch.eye(covariance.shape[0])) * average
    weights = means @ precision
    return classes, weights, -0.5 * (weights * means).sum(1)


def _combine(logits: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, weight: float, n: int):
    """Add ``weight * scores`` to the columns of ``classes``; the background class goes to every background
    column (one is appended when there is none)."""
    background = bool((classes == n).any())
    out = _with_background_column(logits.float(), n, background).clone()
    if weight == 0:
        return out
    labels = classes < n
    out[:, classes[labels]] += weight * scores[:, labels]
    if background:
        out[:, n:] += weight * scores[:, ~labels]
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
