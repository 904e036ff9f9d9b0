"""Model creation in one place: a ``ModelSpec`` (configuration as data) → a ready ``Labeler``."""
from __future__ import annotations

import torch

from .clip import Clip, pick_device
from .detectors import load_detector
from .pipeline import Labeler
from .proposals import Proposer
from .runtime import apply_to_clip, apply_to_detector
from .specs import ModelSpec


def build_labeler(spec: ModelSpec, *, with_detector: bool = True) -> Labeler:
    """Load the models once per process (downloading missing ones first unless offline); requests never build
    models."""
    device = pick_device(spec.device)
    precision = spec.resolved_precision
    clip = Clip.load(spec.clip_model, spec.device, spec.clip_batch_size, offline=spec.offline)
    apply_to_clip(clip.model, precision)
    proposer = None
    if with_detector:
        detector = load_detector(spec.detector, spec.detector_weights, offline=spec.offline, url=spec.detector_url)
        proposer = Proposer(apply_to_detector(detector.to(device), precision), spec.proposals, device)
    return Labeler(clip, proposer, spec.crops)


def set_threads(threads: int | None) -> None:
    """A fixed thread count: more threads than cores thrash a CPU under concurrent requests."""
    if threads:
        torch.set_num_threads(threads)
