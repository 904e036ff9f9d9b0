"""Numeric precision of the models in torch: which one a device gets (``PRECISION``) and how it is applied
(``openvino_runtime`` does the same for ``RUNTIME=openvino``).

``auto`` picks, per device, the fastest variant that keeps the labels (see README, "Speed"): fp16 on CUDA, bf16
on a CPU with native bf16 instructions (AVX512-BF16 or AMX; emulated bf16 is slower than fp32), fp32 elsewhere.
The heavy parts get their weights converted once (``torch.autocast`` re-casts them on every call, which costs
most of the gain on a CPU): the detector's backbone (channels-last) and CLIP's image tower. The RPN, the box
heads and the text tower stay fp32: they are light, and rounding there moves boxes or the cached text
embeddings. ``int8`` (dynamic int8 Linear layers in CLIP's image tower, CPU only; the detector stays fp32) is
offered but never picked by ``auto``: its embeddings agree less with fp32's (see README).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LowPrecision(nn.Module):
    """``inner`` with its weights in ``dtype`` (channels-last for convolutions): inputs are cast in, tensor
    outputs cast back to float32, so the rest of the model is unchanged."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, channels_last: bool = False):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.inner.to(memory_format=self.memory_format)
        if hasattr(inner, "out_channels"):   # torchvision's detectors read it from their backbone
            self.out_channels = inner.out_channels

    def forward(self, x: torch.Tensor):
        if x.is_floating_point():   # token ids stay integers
            x = x.to(self.dtype).contiguous(memory_format=self.memory_format)
        out = self.inner(x)
        if isinstance(out, dict):   # a backbone's feature maps by level
            return OrderedDict((key, value.float()) for key, value in out.items())
        return out.float()


def apply_to_detector(model: nn.Module, precision: str) -> nn.Module:
    """A torchvision detector (Faster R-CNN or SSD) with its backbone in ``precision``."""
    if precision in DTYPES:
        model.backbone = LowPrecision(model.backbone, DTYPES[precision], channels_last=True)
    return model


def apply_to_image_tower(tower: nn.Module, precision: str) -> None:
    """CLIP's image tower (``clip.ImageTower``) in ``precision``, in place (the tower casts pixels to its dtype);
    the text tower stays fp32."""
    if precision in DTYPES:
        tower.to(DTYPES[precision])
    elif precision == "int8":   # the transformer's Linear layers; the projection stays fp32
        int8_linear(tower.vision_model)


def int8_linear(part: nn.Module) -> nn.Module:
    """``part`` with dynamic int8 Linear layers, in place, one weight scale per output channel: a scale per tensor
    moved 0.54 points of label accuracy on held-out scenes (AMD EPYC), per channel 0.32 (tests/test_precision.py)."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    return torch.ao.quantization.quantize_dynamic(part, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
