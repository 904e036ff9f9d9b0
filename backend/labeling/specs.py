"""What the models are, as data, without torch: the settings and the model version can be read without loading
any machine-learning library (``labeling.factory`` turns a ``ModelSpec`` into models)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class CropSettings:
    """How a detected box becomes the region CLIP sees.

    The defaults reproduce the original recipe (the box itself, through CLIP's processor, which keeps the
    centred square of the short side). ``square`` keeps the whole object instead; ``context`` grows the region
    around its centre to show surroundings; ``min_size`` grows tiny boxes to at least that many pixels first,
    so a 6-px blob is seen at its real scale instead of magnified into a look-alike of a large object.
    ``mirror`` embeds each crop and its mirror image and keeps their mean (two CLIP passes per box).
    """

    context: float = 1.0
    square: bool = False
    min_size: float = 0.0
    mirror: bool = False


@dataclass(frozen=True)
class ProposalSettings:
    mode: Literal["detector", "rpn"] = "detector"
    score_threshold: float = 0.7
    nms_iou: float = 0.5
    min_box_size: float = 2.0       # pixels, both sides
    max_proposals: int = 100
    input_size: int | None = None   # detector input short side; None = the model's own (smaller = faster)


PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (emulated bf16 on older CPUs is slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:   # not Linux: ask torch (AMX implies bf16)
        import torch

        return torch.backends.cpu.get_cpu_capability() == "AMX"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_type(device) -> str:
    """``cuda`` or ``cpu`` for a device name (``auto``: CUDA when torch sees one) or a ``torch.device``."""
    if not isinstance(device, str):
        return device.type
    if device == "auto":
        import torch  # only here: the rest of this module, and the settings, never need it

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def resolve_precision(requested: str, device) -> str:
    """The precision ``requested`` means on ``device``; a ValueError names what this device can do."""
    if requested not in PRECISIONS:
        raise ValueError(f"PRECISION={requested!r}: use one of {', '.join(PRECISIONS)}")
    cuda = device_type(device) == "cuda"
    if requested == "auto":
        return "fp16" if cuda else ("bf16" if cpu_has_bf16() else "fp32")
    if requested == "fp16" and not cuda:
        raise ValueError("PRECISION=fp16 needs DEVICE=cuda (on a CPU use bf16 or int8)")
    if requested == "int8" and cuda:
        raise ValueError("PRECISION=int8 is CPU-only (dynamic quantisation); on CUDA use fp16")
    return requested


RUNTIMES = ("auto", "torch", "openvino")


@lru_cache(maxsize=1)
def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(requested: str, device, precision: str) -> str:
    """What runs the heavy parts (CLIP's image tower, the detector's backbone) at the resolved ``precision`` on
    ``device``. ``auto``: torch everywhere. OpenVINO (``openvino``) ran the two parts 1.1-1.2x faster than torch
    bf16 with the product's dynamic input shapes on a Zen 4 CPU and 1.2x / 1.6x on a Zen 5 (the 1.3x that would
    justify a second runtime met by the backbone alone there), but only 0.9-1.1x end to end on both once the
    detector's heads run bf16 in torch too, and its first start (converting) peaked at 2.7 GiB, over the 2.5 GiB
    budget; at fp32 it gained 1.1-1.3x end to end for 0.7 GiB more (see README, "Speed").
    CUDA and ``int8`` (torch's dynamic quantisation) are torch only."""
    if requested not in RUNTIMES:
        raise ValueError(f"RUNTIME={requested!r}: use one of {', '.join(RUNTIMES)}")
    cuda = device_type(device) == "cuda"
    if requested == "auto":
        return "torch"
    if requested == "openvino":
        if cuda:
            raise ValueError("RUNTIME=openvino runs on a CPU: use DEVICE=cpu, or RUNTIME=torch on CUDA")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"RUNTIME=openvino runs fp32 or bf16, not PRECISION={precision} (use RUNTIME=torch)")
        if not openvino_installed():
            raise ValueError("RUNTIME=openvino needs the openvino package (pip install -r requirements.txt)")
    return requested


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
    precision: str = "auto"                # PRECISIONS; `auto` = the fastest that keeps the labels
    runtime: str = "auto"                  # RUNTIMES; `auto` = torch (OpenVINO only when asked for)
    cache_dir: str | None = None           # converted models are kept under it (in openvino/); None: not kept

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.device)

    @property
    def resolved_runtime(self) -> str:
        return resolve_runtime(self.runtime, self.device, self.resolved_precision)

    @property
    def fingerprint(self) -> str:
        """Changes when anything that shapes predictions changes (weights files by size and mtime)."""
        state = asdict(self)
        for how_not_what in ("device", "clip_batch_size", "offline", "detector_url", "cache_dir"):
            state.pop(how_not_what)
        state["precision"] = self.resolved_precision   # what runs, not what was asked: `auto` differs per machine
        if state["precision"] == "int8":   # a change of quantisation scheme changes the predictions
            state["precision"] = "int8/per-channel/first-block-fp32"
        elif state["precision"] in ("bf16", "fp16"):   # since the detector's heads run at it too
            state["precision"] += "/heads"
        if not self.crops.mirror:   # crop recipes from before ``mirror`` keep their fingerprints (learned memory's key)
            state["crops"].pop("mirror")
        state.pop("runtime")
        if self.resolved_runtime != "torch":   # torch keeps the fingerprints from before RUNTIME (learned memory's key)
            state["runtime"] = self.resolved_runtime
        for path in (self.clip_model, self.detector_weights):
            if path and Path(path).exists():
                p = Path(path)
                files = sorted(p.rglob("*")) if p.is_dir() else [p]
                state[str(path)] = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
        return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tiny_spec(mirror: bool = False, **overrides) -> ModelSpec:
    """The bundled tiny models trained on the shapes world, with the crop settings they were trained for
    (``mirror``: ``CropSettings.mirror``, an inference choice the training does not fix)."""
    base = dict(clip_model=str(TINY_DIR / "clip"), detector="tiny_shapes",
                detector_weights=str(TINY_DIR / "detector.pt"),
                crops=CropSettings(context=1.25, square=True, min_size=16, mirror=mirror), precision="fp32",
                runtime="torch")
    if overrides.get("precision") == "auto":
        # fast at fp32 already; in bf16 their learning from corrections gained less (precision +0.03, not +0.10)
        overrides["precision"] = "fp32"
    if overrides.get("runtime") == "auto":
        overrides["runtime"] = "torch"   # fast already: converting them would cost more than it saves
    return ModelSpec(**{**base, **overrides})
