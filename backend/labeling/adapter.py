"""Few-shot memory built from annotators' corrections, combined with CLIP's zero-shot logits.

A project's memory holds CLIP embeddings of what annotators drew (per control and label; each the mean embedding
of a few views of the box, ``Labeler.embed_examples``), of whole images they classified, and of predicted boxes
they deleted (background). Nothing is trained by gradient descent. For each
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
  --tune) plain accuracy picked settings that cost known shapes 2 points. Small projects can average
  cross-validation over several ways of dealing their annotations into folds (``repeats``): a steadier choice,
  affordable because a fold with fewer examples than dimensions is solved in dual form, over the examples' kernel;
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
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from cachetools import LRUCache

from .prompts import LabelSet

MAGIC = b"CLX1"
ZeroShot = Callable[[torch.Tensor], torch.Tensor]   # embeddings (N, D) → zero-shot logits (N, L + B)
FoldGrams = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]]   # keys, groups, folds → Grams


@dataclass(frozen=True)
class AdapterSettings:
    """``shrinkage``: how far the shared covariance is pulled towards a multiple of the identity (0 = as
    estimated, 1 = plain class means); ``temperatures`` (of the GDA scores) and ``margins`` (log-odds a learned
    label needs over the trusted ones): what cross-validation picks from; ``harm``: the extra cost, in
    cross-validation, of an example zero-shot named right that the memory names wrong; ``folds``:
    cross-validation folds; ``repeats``: fold assignments cross-validation averages over, while cheap
    (``_repeats``). Chosen on the shapes world's validation scenes with the previous tiny CLIP, which knew six shapes
(bench/corrections.py --tune): the
    novel-shape accuracy after 16 shots highest among the settings that kept known shapes within a point of
    zero-shot (shrinkage 0.3, harm 2: -0.9 points, novel 0.423 / 0.543 after 4 / 16; harm 0 and 1: -1.3;
    shrinkage 0.6: -1.3 to -2.1; temperatures 64/256/1024: novel 0.463 / 0.572 for -1.1, 0.463 / 0.550 for -1.0
    with harm 3, but near-certain scores that rank tasks worse, AUROC 0.80 against 0.83). With repeats 4, harm
    1.5 to 2.5 cost known shapes 1.1-1.2 points there (harm 3: -0.4 but novel 0.454 after 16), so one stays the
    default; with mirrored crops and harm 0, repeats 4 gained 3.2 / 3.5 points at -0.8 (see README, Learning)."""

    shrinkage: float = 0.3
    temperatures: tuple[float, ...] = (4.0, 16.0, 64.0)
    margins: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
    harm: float = 2.0
    folds: int = 5
    repeats: int = 1

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

    @cached_property
    def content_hash(self) -> int:
        """The content as a non-negative int64 (computed once per record): what places this source in a
        cross-validation fold and names its rows in cached Gram matrices."""
        h = hashlib.sha256(repr((self.heads, self.labels)).encode())
        h.update(self.embeddings.to(torch.float16).numpy().tobytes())   # as stored: decoded records hash the same
        return int.from_bytes(h.digest()[:8], "little") >> 1

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
    groups: torch.Tensor                # (M,) its source's content hash (int64), for cross-validation folds


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
    _grams: _GramCache = field(default_factory=lambda: _GramCache(), repr=False, compare=False)

    @classmethod
    def build(cls, examples: Iterable[Examples], previous: Memory | None = None) -> Memory:
        """The memory of these sources (annotations). ``previous``: the same project's memory at an earlier
        state, whose per-fold Gram matrices are reused where a fold kept its sources."""
        rows: dict[str, tuple[list[torch.Tensor], list[str | None], list[int]]] = {}
        size, outcomes, hashes = 0, [], []
        for ex in examples:   # per source and head, not per row: a refit reads 2,000 rows
            group = ex.content_hash
            hashes += [group] if len(ex) else []
            outcomes += ex.outcomes
            size += len(ex)
            for head in dict.fromkeys(ex.heads):
                keys, labels, groups = rows.setdefault(head, ([], [], []))
                if all(h == head for h in ex.heads):
                    keys.append(ex.embeddings), labels.extend(ex.labels)
                else:
                    chosen = [i for i, h in enumerate(ex.heads) if h == head]
                    keys.append(ex.embeddings[chosen]), labels.extend(ex.labels[i] for i in chosen)
                groups.append(group)
        heads = {head: HeadIndex(torch.cat(keys).float(), tuple(labels),
                                 torch.repeat_interleave(torch.tensor(groups), torch.tensor([len(k) for k in keys])))
                 for head, (keys, labels, groups) in rows.items()}
        token = hashlib.sha256(repr(hashes).encode()).hexdigest()[:16] if size else ""
        if outcomes:   # the outcomes shape the scores: a new one is a new state
            token = hashlib.sha256(f"{token}:{outcomes}".encode()).hexdigest()[:16]
        return cls(heads, token, size, tuple(outcomes), _grams=previous._grams if previous else _GramCache())

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
        grams = partial(self._grams.fold_grams, variant=(head, labelset.labels))
        fitted = fit_head(index, labelset, zero_shot, settings, grams) if index is not None else None
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
             settings: AdapterSettings = AdapterSettings(), grams: FoldGrams | None = None) -> FittedHead | None:
    """GDA over the labels of ``labelset`` that have examples (and background), its temperature and margin chosen
    by cross-validation; None when zero-shot alone does as well. ``grams``: where per-fold Gram matrices come
    from (a project's cache; default: computed)."""
    n = len(labelset.labels)
    column = {label: i for i, label in enumerate(labelset.labels)}
    targets = torch.tensor([column.get(label, -1) if label is not None else n for label in index.labels])
    usable = targets >= 0
    keys, groups = index.keys, index.groups
    if not usable.all():   # examples of labels the config no longer has
        keys, targets, groups = keys[usable], targets[usable], groups[usable]
    if len(targets.unique()) < 2:
        return None   # one class: nothing to tell apart
    zs = _with_background_column(zero_shot(keys), n, bool((targets == n).any()))
    right = zs.argmax(1).clamp(max=n) == targets          # what zero-shot alone names right
    named = zs[:, :n].argmax(1)
    dual = len(keys) < keys.shape[1]                      # fewer examples than dimensions: solve N x N systems
    kernel = keys @ keys.T if dual else None
    temperatures = torch.tensor(settings.temperatures)[:, None, None, None]   # the grid on leading dimensions
    margins = torch.tensor(settings.margins)[None, :, None, None]
    value, baseline, stats = torch.zeros(len(settings.temperatures), len(settings.margins)), 0.0, None
    for repeat, folds in enumerate(_fold_assignments(groups, settings.folds, _repeats(keys, settings))):
        fold_grams = grams(keys, groups, folds) if grams is not None and repeat == 0 and not dual else None
        stats = _Statistics(keys, targets, named, folds, settings.shrinkage, fold_grams, kernel)
        for fold in range(len(stats.counts)):
            held = folds == fold
            scored = stats.held_scores(n, fold)
            if scored is None:
                continue
            baseline += float(right[held].sum())
            classes, scores, learned = scored
            predicted = _combine(zs[held], temperatures * scores, classes, learned, margins, n).argmax(-1)
            wrong = predicted.clamp(max=n) != targets[held]
            value += (~wrong).sum(-1) - settings.harm * (wrong & right[held]).sum(-1)
    best = int(torch.argmax(value))   # the first best: the lowest temperature and margin among ties
    classes, weights, bias, learned = stats.gda(n)
    if value.flatten()[best] <= baseline or not learned.any():
        return None
    t, m = divmod(best, len(settings.margins))
    return FittedHead(classes, weights, bias, learned, settings.temperatures[t], settings.margins[m])


class _GramCache:
    """Per-fold Gram matrices (the costly part of a refit: examples x dimensions squared), kept across a project's
    memory states: one new annotation changes one fold, so a refit computes one fold's Gram instead of all. A fold
    is named by its number, size and its sources' content hashes in order, so a hit is the same rows in the same
    order: the same matrix."""

    def __init__(self, size: int = 16, min_rows: int = 128):
        self._cache: LRUCache = LRUCache(size)
        self._lock = threading.Lock()
        self.min_rows = min_rows   # smaller folds are recomputed (under 1.5 ms at 512 dimensions), not kept
        self.computed = 0          # Gram matrices computed, cached or not

    def fold_grams(self, keys: torch.Tensor, groups: torch.Tensor, folds: torch.Tensor,
                   variant=None) -> list[torch.Tensor]:
        """Each fold's (D, D) Gram matrix. ``variant``: what else decides the rows of ``keys`` (the head, and
        the labels whose examples are used)."""
        out = []
        for fold in range(int(folds.max()) + 1):
            rows = folds == fold
            name = (variant, fold, int(rows.sum()), keys.shape[1], tuple(groups[rows].unique_consecutive().tolist()))
            with self._lock:
                gram = self._cache.get(name)
            if gram is None:
                gram = keys[rows].T @ keys[rows]
                with self._lock:
                    self.computed += 1
                    if len(gram) and int(rows.sum()) >= self.min_rows:
                        self._cache[name] = gram
            out.append(gram)
        return out


class _Statistics:
    """Per fold: per-class sums and counts, how many of each class zero-shot named right, and the Gram matrix
    (``grams``) or, with fewer examples than dimensions, the examples' ``kernel`` (their dot products). Every
    fold's GDA comes from these, so the examples are read once however many folds there are."""

    def __init__(self, keys: torch.Tensor, targets: torch.Tensor, named: torch.Tensor, folds: torch.Tensor,
                 shrinkage: float, grams: list[torch.Tensor] | None = None, kernel: torch.Tensor | None = None):
        self.keys, self.folds, self.kernel = keys, folds, kernel
        self.classes, self.shrinkage = targets.unique(), shrinkage
        shape = (int(folds.max()) + 1, len(self.classes))
        self.position = torch.searchsorted(self.classes, targets)              # each example's class
        cell = folds * shape[1] + self.position                                # (fold, class) of each example
        size = shape[0] * shape[1]
        self.sums = keys.new_zeros(size, keys.shape[1]).index_add_(0, cell, keys).view(*shape, -1)
        self.counts = torch.bincount(cell, minlength=size).float().view(shape)
        self.hits = torch.bincount(cell[named == targets], minlength=size).float().view(shape)
        if grams is None and kernel is None:
            grams = [keys[folds == f].T @ keys[folds == f] for f in range(shape[0])]
        self.grams = grams
        self.totals = [part.sum(0) for part in (self.sums, self.counts, self.hits)]

    def gda(self, n: int, without: int | None = None):
        """GDA over the examples outside fold ``without`` (None: all): class means and one shared covariance shrunk
        towards its average variance (scores whose scale does not depend on the embedding size), as (classes,
        weights, bias, learned); None when fewer than two classes are left. The memory decides (``learned``)
        background and labels whose examples zero-shot named right less than half of the time."""
        sums, counts, hits = self._outside(without)
        gram = self._total_gram if without is None else self._total_gram - self.grams[without]
        present = counts > 0
        if int(present.sum()) < 2:
            return None
        classes, counts = self.classes[present], counts[present]
        means = sums[present] / counts[:, None]
        total = float(counts.sum())
        shrunk = torch.addmm(gram, means.T * counts, means, alpha=-1)         # the scatter around the class means
        average = float(shrunk.trace()) / (len(shrunk) * total) + 1e-6         # the covariance's average variance
        shrunk.mul_((1 - self.shrinkage) / total).diagonal().add_(self.shrinkage * average + 1e-6)
        weights = torch.cholesky_solve(means.T, torch.linalg.cholesky(shrunk)).T * average
        bias = -0.5 * (weights * means).sum(1)
        return classes, weights, bias, self._learned(classes, hits[present], counts, n)

    def _outside(self, fold: int | None) -> list[torch.Tensor]:
        """Per-class sums, counts and zero-shot hits over the examples outside ``fold`` (None: all)."""
        if fold is None:
            return self.totals
        return [total - part[fold] for total, part in zip(self.totals, (self.sums, self.counts, self.hits))]

    @cached_property
    def _total_gram(self) -> torch.Tensor:
        return sum(self.grams) if self.grams is not None else self.keys.T @ self.keys

    def held_scores(self, n: int, fold: int):
        """The GDA scores, fitted without fold ``fold``, of that fold's examples, as (classes, scores, learned);
        None when fewer than two classes are left."""
        held = self.folds == fold
        if self.kernel is None:
            fitted = self.gda(n, without=fold)
            if fitted is None:
                return None
            classes, weights, bias, learned = fitted
            return classes, self.keys[held] @ weights.T + bias, learned
        # The same GDA in dual form: with X the training examples, A their class-averaging matrix and P = I - XA's
        # projector onto within-class differences, (bI + aX'PX)^-1 X' = X'(bI + aPXX')^-1, so an N x N system
        # replaces the D x D one and X enters only through the kernel XX'.
        train = ~held
        _, counts, hits = self._outside(fold)
        present = counts > 0
        if int(present.sum()) < 2:
            return None
        classes, counts = self.classes[present], counts[present]
        kernel = self.kernel[train][:, train]
        member = F.one_hot((present.cumsum(0) - 1)[self.position[train]], len(classes)).to(kernel.dtype)
        average_rows = member.T / counts[:, None]                               # A: class means = A X
        means_kernel = average_rows @ kernel                                    # A XX'
        within = kernel - member @ means_kernel                                 # P XX'
        total = len(kernel)
        average = float(within.trace()) / (self.keys.shape[1] * total) + 1e-6
        system = within.mul((1 - self.shrinkage) / total)
        system.diagonal().add_(self.shrinkage * average + 1e-6)
        solution = torch.linalg.solve(system, average_rows.T) * average         # W' = X' solution
        bias = -0.5 * (means_kernel @ solution).diagonal()
        scores = self.kernel[held][:, train] @ solution + bias
        return classes, scores, self._learned(classes, hits[present], counts, n)

    @staticmethod
    def _learned(classes: torch.Tensor, hits: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
        return (classes >= n) | (2 * hits < counts)


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


def _sources(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each example's source number (a source's rows are consecutive) and how many sources there are."""
    changes = torch.ones(len(groups), dtype=torch.long)
    changes[1:] = groups[1:] != groups[:-1]
    return changes.cumsum(0) - 1, int(changes.sum())


def _folds(groups: torch.Tensor, folds: int) -> torch.Tensor:
    """Fold per example, numbered from 0: by source (annotation) when there are several, else by example. With
    many sources, a source's fold comes from its content hash alone, so a new annotation leaves every other
    source in its fold (and the other folds' Gram matrices cached); with fewer (under 20 per fold, where hashing
    leaves folds uneven, which measurably made cross-validation pick worse on the shapes world), round robin in
    source order."""
    source, sources = _sources(groups)
    if sources >= 20 * folds:
        return groups % folds
    if sources >= 2:
        return source % min(folds, sources)
    return torch.arange(len(groups)) % max(2, min(folds, len(groups)))


def _fold_assignments(groups: torch.Tensor, folds: int, repeats: int) -> list[torch.Tensor]:
    """``_folds``, then ``repeats - 1`` other assignments that deal the sources round robin in other orders,
    each from the sources' content hashes (the same memory always gets the same folds)."""
    first = _folds(groups, folds)
    source, sources = _sources(groups)
    if repeats < 2 or sources < 2:
        return [first]
    hashes, count = groups.unique_consecutive().tolist(), int(first.max()) + 1   # one hash per source
    out = [first]
    for repeat in range(1, repeats):
        order = torch.tensor(sorted(range(sources), key=lambda i: hash((hashes[i], repeat))))  # ints: no salt
        dealt = torch.empty(sources, dtype=torch.long)
        dealt[order] = torch.arange(sources) % count
        out.append(dealt[source])
    return out


def _repeats(keys: torch.Tensor, settings: AdapterSettings) -> int:
    """How many fold assignments cross-validation averages over: ``settings.repeats`` while that costs no more
    solving than one plain cross-validation at 512 dimensions (each fold solves a system the size of the smaller
    of examples and dimensions), so small projects get the steadier choice and large ones keep their speed."""
    size = min(keys.shape)
    return max(1, min(settings.repeats, (settings.folds + 1) * 512 ** 3 // (settings.folds * size ** 3)))
