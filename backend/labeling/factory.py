"""Model creation in one place: a ``ModelSpec`` (configuration as data) → a ready ``Labeler``."""
from __future__ import annotations

import torch
from torch import nn

from .clip import Clip, pick_device
from .detectors import load_detector
from .pipeline import Labeler
from .proposals import Proposer
from .runtime import apply_to_detector, apply_to_image_tower
from .specs import ModelSpec


def build_labeler(spec: ModelSpec, *, with_detector: bool = True) -> Labeler:
    """Load the models once per process (downloading missing ones first unless offline); requests never build
    models."""
    device = pick_device(spec.device)
    clip = Clip.load(spec.clip_model, spec.device, spec.clip_batch_size, offline=spec.offline)
    detector = None
    if with_detector:
        detector = load_detector(spec.detector, spec.detector_weights, offline=spec.offline,
                                 url=spec.detector_url).to(device)
    cache = spec.cache_dir and f"{spec.cache_dir}/openvino"
    apply_runtime(clip, detector, spec.resolved_precision, spec.resolved_runtime, cache)
    proposer = Proposer(detector, spec.proposals, device) if detector is not None else None
    return Labeler(clip, proposer, spec.crops)


def apply_runtime(clip: Clip, detector: nn.Module | None, precision: str, runtime: str,
                  cache_dir: str | None = None) -> None:
    """The heavy parts, CLIP's image tower and the detector's backbone, at ``precision`` on ``runtime``, in place;
    the detector's heads at ``precision`` in torch (the rest stays torch fp32). OpenVINO's converted models are
    kept in ``cache_dir`` (None: not kept)."""
    if runtime == "torch":
        apply_to_image_tower(clip.image_tower, precision)
        if detector is not None:
            apply_to_detector(detector, precision)
        return
    from .openvino_runtime import compile_part  # only here: the torch runtime never loads OpenVINO

    side = clip.pixels.size
    clip.image_tower = compile_part("clip-image-tower", clip.image_tower, torch.rand(2, 3, side, side),
                                    [-1, 3, side, side], precision, cache_dir)
    clip.model.vision_model = clip.model.visual_projection = None   # the torch copy goes: its memory is freed
    if detector is not None:
        apply_to_detector(detector, precision, backbone=False)
        # any image size: the detector resizes and pads each image to its own shape
        detector.backbone = compile_part("detector-backbone", detector.backbone, torch.rand(1, 3, 320, 320),
                                         [-1, 3, -1, -1], precision, cache_dir)


def set_threads(threads: int | None) -> None:
    """A fixed thread count: more threads than cores thrash a CPU under concurrent requests."""
    if threads:
        torch.set_num_threads(threads)
