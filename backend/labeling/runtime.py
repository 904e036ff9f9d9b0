"""Numeric precision of the models in torch: which one a device gets (``PRECISION``) and how it is applied
(``openvino_runtime`` does the same for ``RUNTIME=openvino``).

``auto`` picks, per device, the fastest variant that keeps the labels (see README, "Speed"): fp16 on CUDA, bf16
on a CPU with native bf16 instructions (AVX512-BF16 or AMX; emulated bf16 is slower than fp32), fp32 elsewhere.
The heavy parts get their weights converted once (``torch.autocast`` re-casts them on every call, which costs
most of the gain on a CPU): the detector's backbone, its RPN head's convolutions and its box head
(channels-last), and CLIP's image tower. The RPN's objectness and box-delta layers, box decoding, NMS and the text
tower stay fp32: rounding there would reorder proposals, move boxes or the cached text embeddings. ``int8``
(dynamic int8 Linear layers in CLIP's image tower but its first block, CPU only; the detector stays fp32) is
offered but never picked by ``auto``: its embeddings agree less with fp32's (see README).
"""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LowPrecision(nn.Module):
    """``inner`` with its weights in ``dtype`` (channels-last for convolutions): floating-point inputs are cast in,
    outputs cast back to float32 (tensors, or lists, tuples and dicts of them, as detection heads take and give),
    so the rest of the model is unchanged."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, channels_last: bool = False):
        super().__init__()
        self.inner = inner.to(dtype)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.inner.to(memory_format=self.memory_format)
        if hasattr(inner, "out_channels"):   # torchvision's detectors read it from their backbone
            self.out_channels = inner.out_channels

    def forward(self, *inputs):
        return _cast(self.inner(*_cast(inputs, self.dtype, self.memory_format)), torch.float32,
                     torch.contiguous_format)


def _cast(value, dtype: torch.dtype, memory_format: torch.memory_format):
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():   # token ids, indices stay integers
            return value
        return value.to(dtype).contiguous(memory_format=memory_format if value.dim() == 4 else torch.contiguous_format)
    if isinstance(value, dict):
        return type(value)((key, _cast(item, dtype, memory_format)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(item, dtype, memory_format) for item in value)
    return value


def apply_to_detector(model: nn.Module, precision: str, backbone: bool = True) -> nn.Module:
    """A torchvision detector (Faster R-CNN or SSD) with its heavy parts in ``precision``: the backbone (unless
    ``backbone`` is False: another runtime runs it) and the heads that run convolutions or large layers on every
    location or proposal (the RPN head's convolutions and the box head; SSD's head). The RPN's objectness and
    box-delta layers, box decoding, NMS and the final box layers stay fp32."""
    if precision not in DTYPES:
        return model
    dtype = DTYPES[precision]
    if backbone:
        model.backbone = LowPrecision(model.backbone, dtype, channels_last=True)
    if hasattr(model, "rpn"):   # its last 1x1 layers stay fp32: objectness in bf16 reordered proposals (see README)
        model.rpn.head.conv = LowPrecision(model.rpn.head.conv, dtype, channels_last=True)
        model.roi_heads.box_head = LowPrecision(model.roi_heads.box_head, dtype, channels_last=True)
    else:
        model.head = LowPrecision(model.head, dtype, channels_last=True)
    return model


def apply_to_image_tower(tower: nn.Module, precision: str) -> None:
    """CLIP's image tower (``clip.ImageTower``) in ``precision``, in place (the tower casts pixels to its dtype);
    the text tower stays fp32."""
    if precision in DTYPES:
        tower.to(DTYPES[precision])
    elif precision == "int8":   # the transformer's Linear layers; the projection stays fp32
        int8_linear(tower.vision_model)


def int8_linear(part: nn.Module) -> nn.Module:
    """``part`` with dynamic int8 Linear layers, in place, one weight scale per output channel, except the first
    transformer block's, which stay fp32. On held-out scenes (tests/test_precision.py) a scale per tensor moved
    label accuracy 0.43-0.54 points, per channel 0.32 on an AVX2 CPU and 0.54 on an AVX512-VNNI one (over the
    0.5 bar), per channel with the first block kept 0.00 there; on ViT-B/32 that keeps 2.3x fp32's speed (2.8x
    all int8; bf16 2.0x) and agrees better (centred cosine 0.984 vs 0.983) (README, "Speed")."""
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    layers = {name: qconfig for name, module in part.named_modules()
              if isinstance(module, nn.Linear) and ".layers.0." not in f".{name}"}
    return torch.ao.quantization.quantize_dynamic(part, layers, dtype=torch.qint8, inplace=True)
