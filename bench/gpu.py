"""The CUDA path: fp32 vs fp16 (``PRECISION=auto`` on CUDA) end to end on one GPU, in one run.

    python bench/gpu.py [--images 16] [--crops 20]
    python bench/gpu.py --tiny     # the bundled tiny models, 2 images (smoke test; also runs on a CPU)

Same images, boxes and weights as ``bench/pipeline.py`` (ViT-B/32 and R50-FPN v2, random weights when the real
ones are absent); prints images/s, crops/s, the peak GPU memory and fp16's embedding agreement with fp32.
Needs only torch, torchvision, transformers, numpy, pillow (and cachetools, which ``labeling.clip`` imports).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import HEIGHT, RECIPE_CROPS, WIDTH, at_precision, centred_cosine, end_to_end, load_models, make_images  # noqa: E402

from backend.demo.shapes import SHAPES  # noqa: E402
from backend.labeling.crops import crop_regions, cut_crops  # noqa: E402
from backend.labeling.decode import decode_image  # noqa: E402
from backend.labeling.prompts import LabelSet  # noqa: E402
from backend.labeling.specs import resolve_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--crops", type=int, default=20)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.images, args.crops = 2, 4
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fp32_clip, fp32_detector, described = load_models("fasterrcnn_resnet50_fpn_v2", args.tiny)
    files, boxes = make_images(args.images, args.crops)
    labelset = LabelSet.build(SHAPES)
    n_crops = args.images * args.crops
    name = torch.cuda.get_device_name() if cuda else "CPU (no CUDA)"
    print(f"models: {described}; {args.images} images {WIDTH}x{HEIGHT}, {n_crops} crops; device: {name}")
    low = resolve_precision("auto", device)
    results = {}
    for precision in ("fp32", low) if low != "fp32" else ("fp32",):
        clip, proposer = at_precision(fp32_clip, fp32_detector, precision, device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        stages = end_to_end(clip, proposer, files, boxes, labelset)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        total = sum(stages.values())
        print(f"{precision}: end to end {args.images / total:.2f} images/s; detector "
              f"{args.images / stages['detector']:.2f} images/s; CLIP {n_crops / stages['clip']:.0f} crops/s; "
              f"peak GPU memory {peak:.2f} GiB")
        results[precision] = (clip, total)
        del proposer
    if len(results) == 2:
        images = [decode_image(f) for f in files]
        spec = fp32_clip.pixels
        crops = torch.cat([cut_crops(i, crop_regions(b, RECIPE_CROPS), spec.size, spec.mean, spec.std)
                           for i, b in zip(images, boxes)])
        cosine = centred_cosine(results["fp32"][0], results[low][0], crops)
        print(f"CLIP embeddings {low} vs fp32: mean centred cosine {cosine:.4f} ({len(crops)} crops)")
        print(f"{low} vs fp32 end-to-end speedup on {name}: {results['fp32'][1] / results[low][1]:.1f}x")


if __name__ == "__main__":
    main()
