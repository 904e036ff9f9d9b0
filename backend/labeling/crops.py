"""Boxes → CLIP-ready tensors, cut straight from the decoded image tensor.

No PIL crops, temp files or JPEG re-encoding: one ``roi_align`` per image resamples every crop to the CLIP
input size (adaptive sampling averages when shrinking, bilinear when growing a tiny crop), then the whole
stack is normalised at once.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from .specs import CropSettings


def crop_regions(boxes: torch.Tensor, settings: CropSettings) -> torch.Tensor:
    """(N, 4) xyxy boxes → (N, 4) square xyxy regions to resample; they may extend past the image."""
    boxes = boxes.float().reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    sides = sides.clamp(min=settings.min_size)
    side = sides.max(1).values if settings.square else sides.min(1).values
    half = (side * settings.context / 2)[:, None]
    return torch.cat([centre - half, centre + half], 1)


# How an annotated box is seen when it is learned from: the box itself, scaled, and shifted by a tenth of its
# size each way (its mirror image is added by flipping the box's crop). Proposals a detector draws around the
# same object land about this far off, so the mean of these views is what a proposal of it looks like to CLIP.
VIEWS = ((1.0, 0.0, 0.0), (0.85, 0.0, 0.0), (1.15, 0.0, 0.0), (1.0, -0.1, 0.0), (1.0, 0.1, 0.0), (1.0, 0.0, -0.1),
         (1.0, 0.0, 0.1))


def view_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy boxes → (V * N, 4): each of ``VIEWS`` (scale, x shift, y shift) of every box, view-major."""
    boxes = boxes.float().reshape(-1, 4)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = boxes[:, 2:] - boxes[:, :2]
    views = torch.tensor(VIEWS)
    centres = centre[None] + views[:, None, 1:] * sides[None]
    halves = views[:, None, :1] * sides[None] / 2
    return torch.cat([centres - halves, centres + halves], -1).reshape(-1, 4)


def cut_crops(image: torch.Tensor, regions: torch.Tensor, size: int,
              mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Resample ``regions`` of a (3, H, W) uint8 or [0, 1] float image to normalised (N, 3, size, size).

    Parts of a region outside the image are black, as a PIL crop past the border would be.
    """
    if len(regions) == 0:
        return torch.empty(0, 3, size, size)
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    crops = roi_align(pixels[None], [regions.float()], output_size=size, spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
    return (crops - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
