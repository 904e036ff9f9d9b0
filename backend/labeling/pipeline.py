"""Images → named regions and whole-image choices: proposals, crops, CLIP, background rejection.

All crops of all images in a call go through CLIP together, in batches; each head (a ``LabelSet``) then only
costs a matrix product against its cached text embeddings.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .clip import Clip
from .crops import CropSettings, crop_regions, cut_crops, view_boxes
from .detections import Choice, Detections, ImageLabels
from .prompts import LabelSet
from .proposals import Proposals, Proposer

# (head name, embeddings, zero-shot logits, label set) → logits; how learned corrections join in
LogitAdjuster = Callable[[str, torch.Tensor, torch.Tensor, LabelSet], torch.Tensor]
WHOLE_IMAGE = CropSettings()  # CLIP's own preprocessing: the centred square of the short side


@dataclass(frozen=True)
class ImageFeatures:
    """What the models computed for one image, independent of labels and prompts (so it can be cached)."""

    width: int
    height: int
    proposals: Proposals | None = None            # when regions were asked for
    region_embeddings: torch.Tensor | None = None  # (N, D), one per proposal
    image_embedding: torch.Tensor | None = None    # (D,), when whole-image choices were asked for


def needed_features(heads: Mapping[str, LabelSet]) -> tuple[bool, bool]:
    """(regions, whole): the features these heads name from."""
    kinds = {labelset.kind for labelset in heads.values()}
    return "regions" in kinds, "choices" in kinds


class Labeler:
    """The pipeline. ``adjust`` (naming calls): what a project learned, joined to the zero-shot logits; passed
    per call, so one labeler serves any number of projects and threads."""

    def __init__(self, clip: Clip, proposer: Proposer | None, crops: CropSettings = CropSettings()):
        self.clip = clip
        self.proposer = proposer
        self.crops = crops

    def label(self, images: Sequence[torch.Tensor], heads: Mapping[str, LabelSet],
              adjust: LogitAdjuster | None = None) -> list[ImageLabels]:
        """Label (3, H, W) uint8 upright images with every head."""
        return self.name(self.features(images, *needed_features(heads)), heads, adjust)

    def features(self, images: Sequence[torch.Tensor], regions: bool = True, whole: bool = True) -> list[ImageFeatures]:
        """The expensive, label-independent part: proposals and CLIP embeddings (batched across images)."""
        proposals = [self.propose(image) for image in images] if regions else [None] * len(images)
        region_embeddings = (self.embed_boxes(images, [p.boxes for p in proposals], self.crops) if regions
                             else [None] * len(images))
        image_embeddings = list(self.embed_whole(images)) if whole else [None] * len(images)
        return [ImageFeatures(image.shape[2], image.shape[1], p, r, w)
                for image, p, r, w in zip(images, proposals, region_embeddings, image_embeddings)]

    def name(self, features: Sequence[ImageFeatures], heads: Mapping[str, LabelSet],
             adjust: LogitAdjuster | None = None) -> list[ImageLabels]:
        """The cheap part: name regions and choose whole-image labels with each head's prompts."""
        results = []
        for f in features:
            regions = {head: self.name_regions(head, f.proposals, f.region_embeddings, labelset, adjust)
                       for head, labelset in heads.items() if labelset.kind == "regions"}
            choices = {head: self.choose(head, f.image_embedding[None], labelset, adjust)
                       for head, labelset in heads.items() if labelset.kind == "choices"}
            results.append(ImageLabels(f.width, f.height, regions, choices))
        return results

    def label_boxes(self, image: torch.Tensor, boxes: torch.Tensor, labelset: LabelSet, head: str,
                    adjust: LogitAdjuster | None = None) -> Detections:
        """Name boxes a person drew on control ``head``: they are objects, so the best label wins even over
        background."""
        embeddings = self.embed_boxes([image], [boxes.float().reshape(-1, 4)], self.crops)[0]
        probs = self._logits(head, embeddings, labelset, adjust)[:, : len(labelset.labels)].softmax(-1)
        score, best = probs.max(-1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        return Detections(boxes.numpy(), score.numpy(), tuple(labelset.labels[i] for i in best.tolist()))

    def propose(self, image: torch.Tensor) -> Proposals:
        return self.proposer(image)

    def embed_boxes(self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor],
                    settings: CropSettings) -> list[torch.Tensor]:
        """CLIP embeddings of every box of every image, computed in shared batches, split back per image."""
        if not boxes:
            return []
        spec = self.clip.pixels
        crops = torch.cat([cut_crops(image, crop_regions(b, settings), spec.size, spec.mean, spec.std)
                           for image, b in zip(images, boxes)])
        embeddings = (self._mean_of_views(torch.cat([crops, crops.flip(-1)]), len(crops)) if settings.mirror
                      else self.clip.embed_pixels(crops))
        return list(embeddings.split([len(b) for b in boxes]))

    def embed_examples(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """What an annotated box teaches the memory: the mean embedding of its views (``crops.VIEWS`` and the
        mirror image of the box's crop), unit length. On the shapes world it names new labels 5-12 points better
        after 4-16 corrections than the box's own embedding does (bench/corrections.py)."""
        boxes = boxes.float().reshape(-1, 4)
        if len(boxes) == 0:
            return torch.zeros(0, self.clip.model.config.projection_dim)
        spec = self.clip.pixels
        crops = cut_crops(image, crop_regions(view_boxes(boxes), self.crops), spec.size, spec.mean, spec.std)
        return self._mean_of_views(torch.cat([crops, crops[:len(boxes)].flip(-1)]), len(boxes))

    def _mean_of_views(self, crops: torch.Tensor, boxes: int) -> torch.Tensor:
        """(V * N, 3, S, S) crops of N boxes, view-major → (N, D): each box's mean embedding, unit length."""
        embeddings = self.clip.embed_pixels(crops).reshape(-1, boxes, self.clip.model.config.projection_dim)
        return torch.nn.functional.normalize(embeddings.mean(0), dim=-1)

    def embed_whole(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        full = [torch.tensor([[0.0, 0.0, image.shape[2], image.shape[1]]]) for image in images]
        return torch.cat(self.embed_boxes(images, full, WHOLE_IMAGE))

    def name_regions(self, head: str, proposals: Proposals, embeddings: torch.Tensor, labelset: LabelSet,
                     adjust: LogitAdjuster | None = None) -> Detections:
        """Each proposal gets its most likely label; those won by a background prompt are dropped."""
        if len(embeddings) == 0:
            return Detections.empty()
        probs = self._logits(head, embeddings, labelset, adjust).softmax(-1)
        score, best = probs.max(-1)
        n = len(labelset.labels)
        keep = (best < n) & (score >= torch.tensor(labelset.minimums())[best.clamp(max=n - 1)])
        return Detections(proposals.boxes[keep].numpy(), score[keep].numpy(),
                          tuple(labelset.labels[i] for i in best[keep].tolist()))

    def choose(self, head: str, embedding: torch.Tensor, labelset: LabelSet,
               adjust: LogitAdjuster | None = None) -> tuple[Choice, ...]:
        """Whole-image labels above threshold, best first.

        Single-label: one softmax over labels and background prompts; nothing when background wins.
        Multi-label: each label against the background prompts alone, so several can pass.
        """
        logits = self._logits(head, embedding, labelset, adjust)[0]
        n = len(labelset.labels)
        if labelset.multi_label and len(labelset.background):
            background = logits[n:].logsumexp(0)
            probs = torch.sigmoid(logits[:n] - background)
            picked = [(labelset.labels[i], float(p)) for i, (p, minimum) in enumerate(zip(probs, labelset.minimums()))
                      if p >= max(0.5, minimum)]
        else:
            probs = logits.softmax(-1)
            best = int(probs.argmax())
            picked = [(labelset.labels[best], float(probs[best]))] if best < n else []
            picked = [c for c in picked if c[1] >= labelset.minimums()[best]]
        return tuple(Choice(label, score) for label, score in sorted(picked, key=lambda c: -c[1]))

    def _logits(self, head: str, embeddings: torch.Tensor, labelset: LabelSet,
                adjust: LogitAdjuster | None) -> torch.Tensor:
        logits = self.clip.logits(embeddings, labelset)
        return adjust(head, embeddings, logits, labelset) if adjust else logits
