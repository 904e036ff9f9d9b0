"""Model creation in one place: a ``ModelSpec`` (configuration as data) → a ready ``Labeler``."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .clip import Clip, pick_device
from .crops import CropSettings
from .detectors import load_detector
from .pipeline import Labeler
from .proposals import ProposalSettings, Proposer
from .runtime import apply_to_clip, apply_to_detector, resolve_precision

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"


@dataclass(frozen=True)
class ModelSpec:
    clip_model: str = "openai/clip-vit-base-patch32"
    detector: str = "fasterrcnn_resnet50_fpn_v2"
    detector_weights: str | None = None
    device: str = "auto"
    clip_batch_size: int = 32
    proposals: ProposalSettings = field(default_factory=ProposalSettings)
    crops: CropSettings = field(default_factory=CropSettings)
    offline: bool = False                  # never download missing weights
    detector_url: str | None = None        # where to download the detector's weights (default torchvision's)
    precision: str = "auto"                # runtime.PRECISIONS; `auto` = the fastest that keeps the labels

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, pick_device(self.device))

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes predictions changes (weights files by size and mtime)."""
        state = asdict(self)
        for how_not_what in ("device", "clip_batch_size", "offline", "detector_url"):
            state.pop(how_not_what)
        state["precision"] = self.resolved_precision   # what runs, not what was asked: `auto` differs per machine
        for path in (self.clip_model, self.detector_weights):
            if path and Path(path).exists():
                p = Path(path)
                files = sorted(p.rglob("*")) if p.is_dir() else [p]
                state[str(path)] = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tiny_spec(**overrides) -> ModelSpec:
    """The bundled tiny models trained on the shapes world, with the crop settings they were trained for."""
    base = dict(clip_model=str(TINY_DIR / "clip"), detector="tiny_shapes",
                detector_weights=str(TINY_DIR / "detector.pt"),
                crops=CropSettings(context=1.25, square=True, min_size=16), precision="fp32")
    if overrides.get("precision") == "auto":
        # fast at fp32 already; in bf16 their learning from corrections gained less (precision +0.03, not +0.10)
        overrides["precision"] = "fp32"
    return ModelSpec(**{**base, **overrides})


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
