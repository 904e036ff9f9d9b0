"""Numeric precision of the models: which one a device gets (``PRECISION``) and how it is applied.

``auto`` picks, per device, the fastest variant that keeps the labels (see README, "Speed"): fp16 on CUDA, bf16
on a CPU with native bf16 instructions (AVX512-BF16 or AMX), fp32 elsewhere. ``int8`` (dynamic int8 Linear
layers in CLIP, CPU only; the detector stays fp32) is offered but never picked by ``auto``: its embeddings agree less (cosine ~0.96 with
fp32 on ViT-B/32). The detector's convolutions (backbone, RPN head, box head) run under autocast with
channels_last weights; its box decoding and NMS stay in fp32. CLIP's towers run under autocast too.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (emulated bf16 on older CPUs is slower than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AMX"   # not Linux: ask torch (AMX implies bf16)
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision ``requested`` means on ``device``; a ValueError names what this device can do."""
    if requested not in PRECISIONS:
        raise ValueError(f"PRECISION={requested!r}: use one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if requested == "auto":
        return "fp16" if cuda else ("bf16" if cpu_has_bf16() else "fp32")
    if requested == "fp16" and not cuda:
        raise ValueError("PRECISION=fp16 needs DEVICE=cuda (on a CPU use bf16 or int8)")
    if requested == "int8" and cuda:
        raise ValueError("PRECISION=int8 is CPU-only (dynamic quantisation); on CUDA use fp16")
    return requested


def autocast(device: torch.device, precision: str):
    """Mixed precision for a block, or nothing for fp32 / int8."""
    dtype = DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


class Autocast(nn.Module):
    """Runs ``inner`` in mixed precision and hands fp32 tensors back, so the fp32 code around it is unchanged."""

    def __init__(self, inner: nn.Module, device: torch.device, precision: str):
        super().__init__()
        self.inner = inner
        self.device = device
        self.precision = precision

    def forward(self, *args, **kwargs):
        with autocast(self.device, self.precision):
            return _to_float(self.inner(*args, **kwargs))

    def __getattr__(self, name):   # the detector reads attributes of its parts (backbone.out_channels)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):   # in place: keeps the type (an OrderedDict of features, a transformers output)
        for key in list(out.keys()):
            out[key] = _to_float(out[key])
        return out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


def apply_to_detector(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """A torchvision detector (Faster R-CNN or SSD) with its convolution-heavy parts in ``precision``."""
    if precision not in DTYPES:
        return model
    model.to(memory_format=torch.channels_last)
    model.backbone = Autocast(model.backbone, device, precision)
    if hasattr(model, "rpn"):
        model.rpn.head = Autocast(model.rpn.head, device, precision)
        model.roi_heads.box_head = Autocast(model.roi_heads.box_head, device, precision)
    else:   # SSD: one head for boxes and classes
        model.head = Autocast(model.head, device, precision)
    return model


def apply_to_clip(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """CLIP's two towers in ``precision``: autocast, so layer norms and the projections stay fp32 (casting the
    weights to bf16 instead moved 1 point of label accuracy on the tiny models; autocast moved none)."""
    if precision in DTYPES:
        model.vision_model = Autocast(model.vision_model, device, precision)
        model.text_model = Autocast(model.text_model, device, precision)
        return model
    if precision == "int8":
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
