"""Detector builders (Faster R-CNN, SSDlite), as data: a name → how to build the architecture and where its
weights live.

Real detectors are torchvision's, with their COCO weights from a local file (``DETECTOR_WEIGHTS``) or the
torch hub cache, downloaded there once when missing (``download.py``; never with ``offline``);
``tiny_shapes`` is the small class-agnostic detector trained on the shapes world and bundled for tests and
demos. Missing weights raise ``ModelUnavailable`` with one message saying what is missing and how to provide it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from .download import fetch_detector_file
from .errors import ModelUnavailable


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def build_tiny_shapes() -> detection.FasterRCNN:
    """A 1 M-parameter class-agnostic Faster R-CNN for 160-px shape scenes (stride 8, receptive field ~75 px)."""
    backbone = nn.Sequential(*_conv(3, 24, 2), *_conv(24, 32), *_conv(32, 48, 2), *_conv(48, 48),
                             *_conv(48, 64, 2), *_conv(64, 64), *_conv(64, 64, dilation=2))
    backbone.out_channels = 64
    return detection.FasterRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=AnchorGenerator(sizes=((12, 20, 32, 48),), aspect_ratios=((0.75, 1.0, 1.33),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=TwoMLPHead(64 * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, 2),
        min_size=160, max_size=160,
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128,
        box_score_thresh=0.05, box_detections_per_img=30)


@dataclass(frozen=True)
class DetectorSpec:
    build: Callable[[], nn.Module]
    coco_weights: object | None  # a torchvision weights enum member, for the hub-cache file name


DETECTORS: dict[str, DetectorSpec] = {
    "fasterrcnn_resnet50_fpn_v2": DetectorSpec(
        lambda: detection.fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91),
        detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
    "fasterrcnn_resnet50_fpn": DetectorSpec(
        lambda: detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91),
        detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    "fasterrcnn_mobilenet_v3_large_fpn": DetectorSpec(
        lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91),
        detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1),
    "fasterrcnn_mobilenet_v3_large_320_fpn": DetectorSpec(
        lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                                num_classes=91),
        detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1),
    # PROFILE=cpu: a single-shot detector at 320 px. Its score threshold as Faster R-CNN's (0.05), not 0.001:
    # that would feed thousands of boxes to its per-class NMS for proposals we drop below 0.05 anyway
    "ssdlite320_mobilenet_v3_large": DetectorSpec(
        lambda: detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91,
                                                        score_thresh=0.05),
        detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1),
    "tiny_shapes": DetectorSpec(build_tiny_shapes, None),
}


def weights_file(name: str, weights: str | os.PathLike | None, *, offline: bool = True,
                 url: str | None = None) -> Path:
    """Where the state dict for ``name`` is: the given file, else torchvision's hub-cache file (downloaded from
    ``url``, default torchvision's, unless ``offline``)."""
    if name not in DETECTORS:
        raise ModelUnavailable(f"unknown DETECTOR {name!r}; choose one of {', '.join(DETECTORS)}")
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"DETECTOR_WEIGHTS={weights} does not exist: point DETECTOR_WEIGHTS at the "
                                   f"state-dict file of {name}")
        return path
    enum = DETECTORS[name].coco_weights
    if enum is None:
        raise ModelUnavailable(f"DETECTOR {name!r} has no published weights: set DETECTOR_WEIGHTS to its file")
    if url and Path(url.split("?", 1)[0]).name != Path(enum.url).name:
        raise ModelUnavailable(f"DETECTOR_WEIGHTS_URL must name torchvision's file {Path(enum.url).name} (its "
                               f"hash is checked), got {url}")
    return fetch_detector_file(url or enum.url, offline)


def load_detector(name: str, weights: str | os.PathLike | None = None, *, random_init: bool = False,
                  offline: bool = True, url: str | None = None) -> nn.Module:
    """Build ``name`` and load its weights (``random_init`` skips them: for speed benchmarks only)."""
    if name not in DETECTORS:
        raise ModelUnavailable(f"unknown DETECTOR {name!r}; choose one of {', '.join(DETECTORS)}")
    model = DETECTORS[name].build()
    if not random_init:
        state = torch.load(weights_file(name, weights, offline=offline, url=url), map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
    return model.eval()
