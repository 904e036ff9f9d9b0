"""Runtime x precision on this CPU, part by part: CLIP's image tower, its text tower, the detector's backbone.

    python bench/runtimes.py [--rounds 3]
    python bench/runtimes.py --tiny      # the bundled tiny models, 1 round (smoke test)

Torch eager at fp32, bf16 with weights converted once (what ``PRECISION=bf16`` runs), bf16 under
``torch.autocast`` and dynamic int8 Linear layers, interleaved in one run on the same inputs and weights (ViT-B/32
and R50-FPN v2 with random weights when the real ones are absent: speed does not depend on weight values).
Agreement: mean cosine with fp32's outputs, centred on fp32's mean (random weights map every input near one
direction, which would make the plain cosine ~1 whatever the variant does). Then onnxruntime (fp32 and dynamic
int8, from a TorchScript ONNX export, where installed: ``requirements-test.txt`` installs it) and OpenVINO at fp32
and bf16, converted and compiled as ``RUNTIME=openvino`` does (inputs of any batch and image size). A conversion
that fails prints its reason as the row.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import load_models  # noqa: E402

from backend.labeling.openvino_runtime import compile_part  # noqa: E402
from backend.labeling.runtime import LowPrecision, int8_linear  # noqa: E402


class Autocast(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


class OnnxRuntime:
    """``part`` exported to ONNX (TorchScript exporter) and run by onnxruntime on the CPU; ``int8``: its weights
    dynamically quantised by onnxruntime's own tool."""

    def __init__(self, part: nn.Module, example: torch.Tensor, workdir: Path, int8: bool = False):
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = workdir / f"part{id(self)}.onnx"
        torch.onnx.export(part, (example,), str(path), dynamo=False, opset_version=17)
        if int8:
            quantize_dynamic(str(path), str(path.with_suffix(".int8.onnx")), weight_type=QuantType.QInt8)
            path = path.with_suffix(".int8.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        feed = {self.session.get_inputs()[0].name: x.numpy()}
        return [torch.from_numpy(out) for out in self.session.run(None, feed)]


def variants(part: nn.Module, channels_last: bool, example: torch.Tensor, shape: list[int],
             workdir: Path) -> dict[str, object]:
    out = {"torch fp32": part,
           "torch bf16 (weights converted)": LowPrecision(copy.deepcopy(part), torch.bfloat16, channels_last),
           "torch bf16 autocast": Autocast(part)}
    if any(isinstance(m, nn.Linear) for m in part.modules()):
        out["torch int8 dynamic"] = int8_linear(copy.deepcopy(part))
    others = {"onnxruntime fp32": lambda: OnnxRuntime(part, example, workdir),
              "onnxruntime int8 dynamic": lambda: OnnxRuntime(part, example, workdir, int8=True),
              "openvino fp32": lambda: compile_part("part", part, example, shape, "fp32", None),
              "openvino bf16": lambda: compile_part("part", part, example, shape, "bf16", None)}
    for key, make in others.items():
        try:
            out[key] = make()
        except ImportError:
            pass            # not installed: no row
        except Exception as error:  # noqa: BLE001 - a conversion that fails is a result: its row says why
            out[key] = f"conversion failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
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


class TextTower(nn.Module):
    """CLIP's text tower and projection as one module of one tensor input (token ids), as ``clip.ImageTower``."""

    def __init__(self, model):
        super().__init__()
        self.text_model, self.text_projection = model.text_model, model.text_projection

    def forward(self, tokens):
        return self.text_projection(self.text_model(input_ids=tokens).pooler_output)


def measure(name: str, part: nn.Module, example: torch.Tensor, shape: list[int], rounds: int, channels_last: bool,
            workdir: Path) -> None:
    """``shape``: the input's, -1 where a dimension varies (what OpenVINO compiles for)."""
    runs = variants(part, channels_last, example, shape, workdir)
    failed = {k: v for k, v in runs.items() if isinstance(v, str)}
    runs = {k: v for k, v in runs.items() if k not in failed}
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
    for key, reason in failed.items():
        print(f"| {name} | {key} | {reason} | | |", flush=True)


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
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as tmp:
        workdir = Path(tmp)
        measure(f"CLIP image tower, {len(crops)} crops", clip.image_tower, crops, [-1, 3, side, side], args.rounds,
                False, workdir)
        measure(f"CLIP text tower, {len(tokens)} prompts", TextTower(clip.model), tokens, [-1, -1], args.rounds,
                False, workdir)
        measure(f"detector backbone, {pixels.shape[-1]}x{pixels.shape[-2]}", detector.backbone, pixels,
                [-1, 3, -1, -1], args.rounds, True, workdir)
    onnx = " / onnxruntime" if importlib.util.find_spec("onnxruntime") else ""
    print(f"runtimes compared: torch eager fp32 / bf16 / bf16 autocast / int8{onnx} / openvino")


if __name__ == "__main__":
    main()
