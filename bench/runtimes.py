"""Runtime x precision on this CPU, part by part: CLIP's image tower, its text tower, the detector's backbone.

    python bench/runtimes.py [--rounds 3]
    python bench/runtimes.py --tiny      # the bundled tiny models, 1 round (smoke test)

Torch eager at fp32, bf16 with weights converted once (what ``PRECISION=bf16`` runs), bf16 under
``torch.autocast`` and dynamic int8 Linear layers, interleaved in one run on the same inputs and weights (ViT-B/32
and R50-FPN v2 with random weights when the real ones are absent: speed does not depend on weight values).
Agreement: mean cosine with fp32's outputs, centred on fp32's mean (random weights map every input near one
direction, which would make the plain cosine ~1 whatever the variant does). onnxruntime and OpenVINO rows appear
only where they are installed (they are not dependencies; see README, Speed).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import load_models  # noqa: E402

from backend.labeling.runtime import LowPrecision  # noqa: E402


class Autocast(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


def variants(part: nn.Module, channels_last: bool) -> dict[str, nn.Module]:
    out = {"torch fp32": part,
           "torch bf16 (weights converted)": LowPrecision(copy.deepcopy(part), torch.bfloat16, channels_last),
           "torch bf16 autocast": Autocast(part)}
    if any(isinstance(m, nn.Linear) for m in part.modules()):
        out["torch int8 dynamic"] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(part), {nn.Linear},
                                                                           dtype=torch.qint8)
    return out


def flat(output) -> torch.Tensor:
    """One (N, D) float tensor from a part's output (a tensor, a feature dict, a transformers output)."""
    if isinstance(output, dict):
        output = output.get("pooler_output", None) if "pooler_output" in output else list(output.values())
    if isinstance(output, (list, tuple)):
        return torch.cat([flat(o) for o in output], 1)
    return output.float().flatten(1)


def centred_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Centred over the batch; one image's feature maps (a single row) are compared as they are."""
    mean = reference.mean(0) if len(reference) > 1 else torch.zeros_like(reference[0])
    return float(nn.functional.cosine_similarity(reference - mean, other - mean).mean())


class Tower(nn.Module):
    """A CLIP tower and its projection as one module of one tensor input."""

    def __init__(self, model, image: bool):
        super().__init__()
        self.body = model.vision_model if image else model.text_model
        self.projection = model.visual_projection if image else model.text_projection
        self.image = image

    def forward(self, x):
        out = self.body(pixel_values=x) if self.image else self.body(input_ids=x)
        return self.projection(out.pooler_output)


def measure(name: str, part: nn.Module, example: torch.Tensor, rounds: int, channels_last: bool) -> None:
    runs = variants(part, channels_last)
    seconds = {k: [] for k in runs}
    outputs = {}
    with torch.inference_mode():
        for key, run in runs.items():   # warm-up (oneDNN builds its kernels for a new shape)
            outputs[key] = flat(run(example))
        for _ in range(rounds):          # interleaved: this machine's speed drifts
            for key, run in runs.items():
                start = time.perf_counter()
                run(example)
                seconds[key].append(time.perf_counter() - start)
    base = statistics.median(seconds["torch fp32"])
    for key in runs:
        s = statistics.median(seconds[key])
        cosine = centred_cosine(outputs["torch fp32"], outputs[key])
        print(f"| {name} | {key} | {s * 1000:.0f} | {base / s:.2f}x | {cosine:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    clip, detector, described = load_models("fasterrcnn_resnet50_fpn_v2", args.tiny)
    side = clip.pixels.size
    torch.manual_seed(0)
    crops = torch.randn(20, 3, side, side)
    tokens = clip.tokenizer([f"a photo of a {w}." for w in ("cat", "dog", "car", "tree", "cup", "bee", "kite", "bus")
                             * 4], padding=True, return_tensors="pt")["input_ids"]
    pixels = torch.rand(1, 3, 160, 160) if args.tiny else torch.rand(1, 3, 800, 1088)
    print(f"models: {described}; {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print("| part | runtime, precision | ms | vs torch fp32 | centred cosine with fp32 |\n|---|---|---|---|---|")
    measure(f"CLIP image tower, {len(crops)} crops", Tower(clip.model, True), crops, args.rounds, False)
    measure(f"CLIP text tower, {len(tokens)} prompts", Tower(clip.model, False), tokens, args.rounds, False)
    measure(f"detector backbone, {pixels.shape[-1]}x{pixels.shape[-2]}", detector.backbone, pixels, args.rounds, True)
    for runtime in ("onnxruntime", "openvino"):
        try:
            __import__(runtime)
        except ImportError:
            print(f"{runtime}: not installed here, not measured")
    print("runtimes compared: torch eager fp32 / bf16 / bf16 autocast / int8")


if __name__ == "__main__":
    main()
