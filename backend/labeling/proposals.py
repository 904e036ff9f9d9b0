"""Region proposals from a Faster R-CNN used class-agnostically: keep box and score, ignore its class.

Two modes. ``detector``: the detector's final boxes of any class above ``score_threshold`` (0.7 = the
method's value). ``rpn``: the region proposal network's boxes by objectness, which also finds objects the
detector has no class for (a COCO detector knows no bees). Both end in class-agnostic NMS, a minimum box size
and a cap on the count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_area, nms, remove_small_boxes

from .specs import ProposalSettings


@dataclass(frozen=True)
class Proposals:
    boxes: torch.Tensor    # (N, 4) xyxy pixels of the input image
    scores: torch.Tensor   # (N,) detector confidence (detector mode) or objectness probability (rpn mode)


class Proposer:
    """Runs one torchvision detector (``GeneralizedRCNN`` or ``SSD``) on one image at a time (batching is not
    faster on a CPU)."""

    def __init__(self, model: nn.Module, settings: ProposalSettings = ProposalSettings(),
                 device: torch.device = torch.device("cpu")):
        self.model = model.to(device).eval()
        self.settings = settings
        self.device = device
        if settings.input_size:
            transform = self.model.transform
            ratio = transform.max_size / transform.min_size[0]
            transform.min_size = (settings.input_size,)
            transform.max_size = int(round(settings.input_size * ratio))
        if settings.mode == "rpn" and not hasattr(self.model, "rpn"):
            raise ValueError(f"PROPOSAL_MODE=rpn needs a Faster R-CNN detector; {type(model).__name__} has no RPN")
        if settings.mode == "detector":
            # the detector's own per-class threshold would hide boxes before ours sees them
            heads = getattr(self.model, "roi_heads", self.model)   # SSD keeps it on the model
            heads.score_thresh = min(settings.score_threshold, heads.score_thresh)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> Proposals:
        """(3, H, W) uint8 image → class-agnostic proposals."""
        height, width = image.shape[-2:]
        pixels = _pad_sliver(image.to(self.device).float() / 255.0)
        boxes, scores = self._rpn(pixels) if self.settings.mode == "rpn" else self._detections(pixels)
        boxes = boxes.cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)    # boxes in the padding shrink to nothing and go
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        return self._select(boxes, scores.cpu())

    def _detections(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model([pixels])[0]
        return out["boxes"], out["scores"]

    def _rpn(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RPN's post-NMS proposals with their objectness, mapped back to the input image."""
        model = self.model
        images, _ = model.transform([pixels])
        features = model.backbone(images.tensors)
        features = features if isinstance(features, dict) else {"0": features}
        rpn = model.rpn
        feature_list = list(features.values())
        objectness, deltas = rpn.head(feature_list)
        anchors = rpn.anchor_generator(images, feature_list)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        original = [tuple(pixels.shape[-2:])]
        boxes = model.transform.postprocess([{"boxes": boxes[0]}], images.image_sizes, original)[0]["boxes"]
        return boxes, scores[0]

    def _select(self, boxes: torch.Tensor, scores: torch.Tensor) -> Proposals:
        s = self.settings
        keep = scores >= s.score_threshold
        boxes, scores = boxes[keep], scores[keep]
        keep = remove_small_boxes(boxes, s.min_box_size)
        boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, s.nms_iou)[: s.max_proposals]  # class-agnostic: one box per object
        boxes, scores = boxes[keep], scores[keep]
        keep = box_area(boxes) > 0
        return Proposals(boxes[keep], scores[keep])


MAX_ASPECT = 16


def _pad_sliver(pixels: torch.Tensor) -> torch.Tensor:
    """The detector scales an image by its long side, so a sliver (1 x 3000 px) would shrink to 0 px and fail:
    pad the short side (bottom / right, black) to at least 1/MAX_ASPECT of the long one. Box coordinates keep."""
    height, width = pixels.shape[-2:]
    short = -(-max(height, width) // MAX_ASPECT)
    if min(height, width) >= short:
        return pixels
    return torch.nn.functional.pad(pixels, (0, max(short - width, 0), 0, max(short - height, 0)))
