"""CLIP through transformers: image/crop embeddings in batches, cached text embeddings, zero-shot scores.

Any CLIP-family checkpoint in transformers format loads through ``Clip.load`` (hub id in the local cache, or
a directory). A hub id missing from the cache is downloaded when the models load (never in a request), unless
offline.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from cachetools import LRUCache
from torch import nn
from transformers import AutoProcessor, CLIPModel
from transformers.utils import logging as hf_logging

from .download import fetch_clip
from .errors import ModelUnavailable
from .prompts import LabelSet
from .specs import device_type

TEXT_BATCH = 256              # prompts per text forward pass: a huge label set cannot hold inference in one go
TEXT_CACHE_PROMPTS = 20_000   # text embeddings kept (least recently used go): bounded whatever configs arrive


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU (``specs.device_type`` decides)."""
    return torch.device(device_type(requested) if requested == "auto" else requested)


@dataclass(frozen=True)
class PixelSpec:
    """What the image tower expects: square side and normalisation (read from the checkpoint's processor)."""

    size: int
    mean: torch.Tensor
    std: torch.Tensor


class ImageTower(nn.Module):
    """CLIP's image tower and projection as one module of one tensor input, (N, 3, S, S) pixels → (N, D) features:
    what ``Clip`` runs, and the unit ``factory`` converts (to bf16, int8, OpenVINO). It shares the CLIP model's
    modules, so converting them in place converts the model's too."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.vision_model.embeddings.patch_embedding.weight.dtype)   # bf16 when converted
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)


class Clip:
    """One loaded CLIP: embeds pixels and prompts, and turns embeddings into label probabilities."""

    def __init__(self, model: CLIPModel, processor, device: torch.device, batch_size: int = 32,
                 name: str = "clip"):
        self.model = model.to(device).eval()
        self.image_tower: Callable[[torch.Tensor], torch.Tensor] = ImageTower(self.model)
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        crop = image_processor.crop_size
        side = crop["height"] if hasattr(crop, "__getitem__") else int(crop)  # SizeDict in transformers 5
        self.pixels = PixelSpec(side, torch.tensor(image_processor.image_mean, dtype=torch.float32),
                                torch.tensor(image_processor.image_std, dtype=torch.float32))
        self.device = device
        self.batch_size = batch_size
        self.name = name
        self._text_cache: LRUCache = LRUCache(TEXT_CACHE_PROMPTS, getsizeof=len)   # prompt tuple → (P, D)
        self._text_lock = threading.Lock()

    @classmethod
    def load(cls, name_or_path: str, device: str = "auto", batch_size: int = 32, offline: bool = True) -> Clip:
        """Load a local directory, or a hub id from the hub cache (downloaded there first unless ``offline``)."""
        path = fetch_clip(name_or_path, offline)
        hf_logging.disable_progress_bar()  # a bar per load is noise in a server log
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelUnavailable(
                f"CLIP model {name_or_path} could not be loaded from {path} ({type(error).__name__}: {error}): "
                f"point CLIP_MODEL at a directory with a transformers CLIP checkpoint or a hub id (`python -m "
                f"backend download --clip ID` fetches one). To try the backend without any download, use "
                f"--demo.") from None
        return cls(model, processor, pick_device(device), batch_size, name=name_or_path)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels → (N, D) unit-length embeddings, in batches."""
        if len(pixels) == 0:
            return torch.zeros(0, self.model.config.projection_dim)
        out = []
        for start in range(0, len(pixels), self.batch_size):
            features = self.image_tower(pixels[start:start + self.batch_size].to(self.device))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_prompts(self, prompts: tuple[str, ...]) -> torch.Tensor:
        """(P, D) unit-length text embeddings, computed once per prompt tuple."""
        with self._text_lock:
            cached = self._text_cache.get(prompts)
        if cached is not None:
            return cached
        parts = []
        for start in range(0, len(prompts), TEXT_BATCH):
            tokens = self.tokenizer(list(prompts[start:start + TEXT_BATCH]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            features = self.model.get_text_features(**tokens)
            parts.append(F.normalize(getattr(features, "pooler_output", features).float(), dim=-1).cpu())
        embedded = torch.cat(parts)
        if len(prompts) <= TEXT_CACHE_PROMPTS:
            with self._text_lock:
                self._text_cache[prompts] = embedded
        return embedded

    def class_embeddings(self, labelset: LabelSet) -> torch.Tensor:
        """(L + B, D): one embedding per label (its prompts averaged) then one per background prompt."""
        flat = tuple(p for prompts in labelset.prompts for p in prompts) + labelset.background
        text = self.embed_prompts(flat)
        per_label, start = [], 0
        for prompts in labelset.prompts:
            per_label.append(F.normalize(text[start:start + len(prompts)].mean(0), dim=-1))
            start += len(prompts)
        return torch.cat([torch.stack(per_label), text[start:]])

    def logits(self, embeddings: torch.Tensor, labelset: LabelSet) -> torch.Tensor:
        """(N, L + B) scaled cosine similarities of image embeddings with the label and background texts."""
        return self.logit_scale * embeddings @ self.class_embeddings(labelset).T
