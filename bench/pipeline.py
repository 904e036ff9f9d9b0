"""Speed: our batched pipeline vs a naive per-crop pipeline, on the same images with the same models, one run.

    python bench/pipeline.py [--images 4] [--crops 20] [--detector fasterrcnn_resnet50_fpn_v2] [--rounds 3]
    python bench/pipeline.py --tiny          # the bundled tiny models, 1 small round: a smoke test (seconds)

Also in the same run: the default (``PRECISION=auto``, ``RUNTIME=auto``) vs fp32 end to end and per stage, with the
CLIP embeddings' agreement, and vs the other runtime (torch or OpenVINO) at the default precision; the
``PROFILE=cpu`` detector end to end; what ``CROP_MIRROR`` adds; interactive box → label latency; and the peak RSS
of a fresh process holding the default models (child processes, so this one's extra copies do not count), on a
first start (converting, when the runtime converts) and on a second (reading the converted models from the cache).

Real architectures: CLIP ViT-B/32 and the chosen Faster R-CNN, with real weights when they are on this
machine and random weights otherwise (speed does not depend on weight values; the output says which).
Both pipelines classify the same boxes: ours cuts all crops from the decoded tensor and runs CLIP in batches
with text embeddings computed once; the naive one does what composed detector+classifier tools do: PIL crop →
JPEG temp file → processor → one CLIP call per crop that also re-encodes the prompts, padded to CLIP's full
77-token context as OpenAI's ``clip.tokenize`` does (autodistill-clip's ``predict`` works this way).
The last line is ``batched/naive speedup: N.Nx`` (classification stage at fp32, median of the per-round ratios).
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor  # noqa: E402

from backend.config import CPU_PROFILE  # noqa: E402
from backend.demo.shapes import SHAPES, scenes  # noqa: E402
from backend.labeling.clip import Clip, ImageTower  # noqa: E402
from backend.labeling.crops import CropSettings, crop_regions, cut_crops  # noqa: E402
from backend.labeling.decode import decode_image  # noqa: E402
from backend.labeling.detectors import load_detector  # noqa: E402
from backend.labeling.errors import ModelUnavailable  # noqa: E402
from backend.labeling.factory import apply_runtime  # noqa: E402
from backend.labeling.pipeline import Labeler  # noqa: E402
from backend.labeling.prompts import LabelSet  # noqa: E402
from backend.labeling.proposals import ProposalSettings, Proposer  # noqa: E402
from backend.labeling.specs import TINY_DIR, openvino_installed, resolve_precision, resolve_runtime  # noqa: E402

WIDTH, HEIGHT = 800, 600
# the detectors' own default score threshold: random weights score every SSD anchor ~1/91, and 0.0 would send
# them all through its per-class NMS, a cost real weights never pay
BENCH_PROPOSALS = ProposalSettings(score_threshold=0.05)
RECIPE_CROPS = CropSettings()  # the box as CLIP's processor would see it, as in the naive path


def load_models(detector_name: str, tiny: bool = False) -> tuple[Clip, torch.nn.Module, str]:
    """fp32 CLIP and detector (the bundled tiny ones with ``tiny``); random weights are the same in every process,
    so converted models are found in a cache by a later process."""
    torch.manual_seed(0)
    if tiny:
        clip = Clip.load(str(TINY_DIR / "clip"), "cpu")
        return clip, load_detector("tiny_shapes", TINY_DIR / "detector.pt"), "tiny CLIP, tiny_shapes (real weights)"
    try:
        clip, clip_kind = Clip.load("openai/clip-vit-base-patch32", "cpu"), "real weights"
    except ModelUnavailable:
        processor = CLIPProcessor(image_processor=CLIPImageProcessor(),
                                  tokenizer=CLIPProcessor.from_pretrained(TINY_DIR / "clip").tokenizer)
        clip, clip_kind = Clip(CLIPModel(CLIPConfig()), processor, torch.device("cpu")), "random weights"
    detector, det_kind = load_any_detector(detector_name)
    return clip, detector, f"CLIP ViT-B/32 ({clip_kind}), {detector_name} ({det_kind})"


def load_any_detector(name: str) -> tuple[torch.nn.Module, str]:
    try:
        return load_detector(name), "real weights"
    except ModelUnavailable:
        return load_detector(name, random_init=True), "random weights"


def at_precision(clip: Clip, detector: torch.nn.Module | None, precision: str, runtime: str = "torch",
                 device: torch.device = torch.device("cpu"),
                 cache_dir: str | None = None) -> tuple[Clip, Proposer | None]:
    """Copies of fp32 models at ``precision`` on ``runtime``, as ``factory.build_labeler`` applies them (same
    weights)."""
    variant = copy.copy(clip)
    variant.model = copy.deepcopy(clip.model).to(device)
    variant.image_tower = ImageTower(variant.model)
    variant.device = device
    variant._text_cache = copy.copy(clip._text_cache)
    detector = copy.deepcopy(detector).to(device) if detector is not None else None
    apply_runtime(variant, detector, precision, runtime, cache_dir)
    return variant, Proposer(detector, BENCH_PROPOSALS, device) if detector is not None else None


def make_images(n: int, crops_per_image: int, seed: int = 7) -> tuple[list[bytes], list[torch.Tensor]]:
    """Shapes scenes enlarged to 800x600 PNGs, and exactly ``crops_per_image`` boxes each (objects first)."""
    rng = np.random.default_rng(seed)
    files, boxes = [], []
    for scene in scenes(seed, n):
        image = scene.image.resize((WIDTH, HEIGHT), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        files.append(buffer.getvalue())
        scale = np.array([WIDTH / 160, HEIGHT / 160] * 2)
        found = [np.array(o.box) * scale for o in scene.objects][:crops_per_image]
        while len(found) < crops_per_image:
            x, y = rng.uniform(0, [WIDTH - 60, HEIGHT - 60])
            w, h = rng.uniform(20, 200, 2)
            found.append(np.array([x, y, min(WIDTH, x + w), min(HEIGHT, y + h)]))
        boxes.append(torch.tensor(np.stack(found), dtype=torch.float32))
    return files, boxes


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ours(clip: Clip, proposer: Proposer, files, boxes, labelset) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Decode and detect; the stage times and the decoded images (classification is ``classify``)."""
    stages = {}
    images, stages["decode"] = timed(lambda: [decode_image(f) for f in files])
    _, stages["detector"] = timed(lambda: [proposer(i) for i in images])
    return stages, images


def classify(clip: Clip, images, boxes, labelset) -> tuple[dict[str, float], torch.Tensor]:
    """Our classification stage: crops cut from the tensors, CLIP in batches, the prompts encoded once."""
    clip._text_cache.clear()   # every round pays the one text encoding a new label set costs
    stages = {}
    spec = clip.pixels
    crops, stages["crops"] = timed(lambda: torch.cat([cut_crops(i, crop_regions(b, RECIPE_CROPS), spec.size,
                                                                spec.mean, spec.std)
                                                      for i, b in zip(images, boxes)]))
    probs, stages["clip"] = timed(lambda: clip.logits(clip.embed_pixels(crops), labelset).softmax(-1))
    return stages, probs


def naive(clip: Clip, files, boxes, labelset) -> tuple[float, torch.Tensor]:
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": clip.pixels.size},
                                                                 crop_size=clip.pixels.size),
                              tokenizer=clip.tokenizer)
    prompts = [p[0] for p in labelset.prompts] + list(labelset.background)
    context = clip.model.config.text_config.max_position_embeddings   # 77: clip.tokenize pads every prompt to it
    out = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for index, (data, image_boxes) in enumerate(zip(files, boxes)):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            for k, box in enumerate(image_boxes.tolist()):
                path = Path(tmp) / f"crop_{index}_{k}.jpg"
                image.crop(tuple(int(round(v)) for v in box)).save(path, "JPEG")
                inputs = processor(text=prompts, images=Image.open(path), return_tensors="pt", padding="max_length",
                                   max_length=context, truncation=True)
                out.append(clip.model(**inputs).logits_per_image.softmax(-1)[0])
    return time.perf_counter() - start, torch.stack(out)


def end_to_end(clip: Clip, proposer: Proposer, files, boxes, labelset) -> dict[str, float]:
    """Stage seconds of decode → detector → crops → CLIP on every image (after one warm-up image)."""
    _, warm = ours(clip, proposer, files[:1], boxes[:1], labelset)
    classify(clip, warm, boxes[:1], labelset)
    stages, images = ours(clip, proposer, files, boxes, labelset)
    classified, _ = classify(clip, images, boxes, labelset)
    return {**stages, **classified}


def centred_cosine(clip_a: Clip, clip_b: Clip, crops: torch.Tensor) -> float:
    """Mean cosine of two CLIPs' embeddings of the same crops, each centred on A's mean: random weights map
    every crop near one direction, which would make the plain cosine ~1 whatever the variant does."""
    a, b = clip_a.embed_pixels(crops), clip_b.embed_pixels(crops)
    mean = a.mean(0)
    return float(torch.nn.functional.cosine_similarity(a - mean, b - mean).mean())


def interactive_seconds(clip: Clip, data: bytes, labelset, rounds: int = 5) -> float:
    """One drawn box on one image → its label (decode included), warm: the median of ``rounds``."""
    labeler = Labeler(clip, None, RECIPE_CROPS)
    box = torch.tensor([[100.0, 80.0, 420.0, 360.0]])
    times = [timed(lambda: labeler.label_boxes(decode_image(data), box, labelset, "label"))[1]
             for _ in range(rounds + 1)]
    return statistics.median(times[1:])


def peak_rss(args, cache_dir: str) -> float:
    """GiB: a fresh process loads the default models (converted models kept in ``cache_dir``) and labels one image
    (``--rss-child``)."""
    command = [sys.executable, __file__, "--rss-child", "--detector", args.detector, "--threads", str(args.threads),
               "--cache-dir", cache_dir]
    run = subprocess.run(command + (["--tiny"] if args.tiny else []), capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def default_variant() -> tuple[str, str]:
    """(precision, runtime) that ``auto`` gives on this CPU."""
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    return precision, resolve_runtime("auto", cpu, precision)


def rss_child(args) -> None:
    clip, detector, _ = load_models(args.detector, args.tiny)
    apply_runtime(clip, detector, *default_variant(), args.cache_dir)   # in place, as factory.build_labeler does
    proposer = Proposer(detector, BENCH_PROPOSALS)
    files, boxes = make_images(1, args.crops)
    end_to_end(clip, proposer, files, boxes, LabelSet.build(SHAPES))
    # this process's own peak (VmHWM): ru_maxrss would include the bench's RSS, which a spawned child inherits
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(int(status["VmHWM"].split()[0]) / 2**20)   # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--crops", type=int, default=20, help="boxes classified per image")
    parser.add_argument("--detector", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="classification rounds, ours and naive back to back")
    parser.add_argument("--tiny", action="store_true", help="tiny models, 1 image, 4 crops, 1 round (smoke test)")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.images, args.crops, args.rounds = 1, 4, 1
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args)
    fp32_clip, fp32_detector, described = load_models(args.detector, args.tiny)
    precision, runtime = default_variant()
    default = f"{runtime} {precision}"
    work = tempfile.mkdtemp(prefix="bench-pipeline-")   # converted models: this run's, then the children's
    cache = os.path.join(work, "main")
    clip, proposer = at_precision(fp32_clip, fp32_detector, precision, runtime, cache_dir=cache)
    files, boxes = make_images(args.images, args.crops)
    labelset = LabelSet.build(SHAPES)
    n_crops = args.images * args.crops
    print(f"models: {described}; {args.images} images {WIDTH}x{HEIGHT}, {n_crops} crops, "
          f"{len(SHAPES) + 1} prompts, {torch.get_num_threads()} threads; default here: {default}")

    # The default (PRECISION=auto, RUNTIME=auto) vs fp32 (torch), and vs torch at the same precision when the
    # runtime is another, back to back on the same images and weights.
    fp32_stages = end_to_end(fp32_clip, Proposer(fp32_detector, BENCH_PROPOSALS), files, boxes,
                             labelset)
    stages = end_to_end(clip, proposer, files, boxes, labelset)
    # The other runtime at the default precision (what `auto` chose against), when it can run it.
    other = "openvino" if runtime == "torch" else "torch"
    other_variant = None   # (CLIP, stages) of the other runtime
    if other == "torch" and precision == "fp32":
        other_variant = fp32_clip, fp32_stages
    elif other == "torch" or (openvino_installed() and precision in ("fp32", "bf16") and not args.tiny):
        other_clip, other_proposer = at_precision(fp32_clip, fp32_detector, precision, other, cache_dir=cache)
        other_variant = other_clip, end_to_end(other_clip, other_proposer, files, boxes, labelset)
        del other_proposer
    images = [decode_image(f) for f in files]
    spec = clip.pixels
    crops = torch.cat([cut_crops(i, crop_regions(b, RECIPE_CROPS), spec.size, spec.mean, spec.std)
                       for i, b in zip(images, boxes)])
    cosine = centred_cosine(fp32_clip, clip, crops)
    # CROP_MIRROR: each crop and its mirror image through CLIP (what embed_boxes does), against the crops alone.
    _, single = timed(lambda: clip.embed_pixels(crops))
    _, mirrored = timed(lambda: clip.embed_pixels(torch.cat([crops, crops.flip(-1)])))

    # The CPU profile's detector with the default CLIP, same images and crops.
    if args.tiny:
        cpu_detector, cpu_name = fp32_detector, "tiny_shapes"
    else:
        cpu_name = CPU_PROFILE["detector"]
        cpu_detector, kind = load_any_detector(cpu_name)
        cpu_name += f" ({kind})"
    _, cpu_proposer = at_precision(fp32_clip, cpu_detector, precision, runtime, cache_dir=cache)
    cpu_stages = end_to_end(clip, cpu_proposer, files, boxes, labelset)
    latency = interactive_seconds(clip, files[0], labelset)

    # Classification rounds at fp32 (the naive path runs the whole CLIP model, one dtype), ours then naive back to
    # back (the machine's speed drifts between minutes): the speedup is the median of the per-round ratios.
    rounds = []
    for _ in range(args.rounds):
        classified, ours_probs = classify(fp32_clip, images, boxes, labelset)
        naive_seconds, naive_probs = naive(fp32_clip, files, boxes, labelset)
        rounds.append((classified["crops"], classified["clip"], naive_seconds))
    naive_seconds = statistics.median(r[2] for r in rounds)
    ours_classify = stages["crops"] + stages["clip"]
    total, fp32_total, cpu_total = (sum(s.values()) for s in (stages, fp32_stages, cpu_stages))
    share = ", ".join(f"{k} {v / total:.0%}" for k, v in stages.items())
    agree = float((ours_probs.argmax(-1) == naive_probs.argmax(-1)).float().mean())
    print(f"fp32 : end to end {args.images / fp32_total:.3f} images/s; detector {fp32_stages['detector']:.2f} s, "
          f"CLIP {fp32_stages['clip']:.2f} s")
    print(f"ours : classification {n_crops / ours_classify:6.1f} crops/s; end to end "
          f"{args.images / total:.3f} images/s; time per stage: {share}")
    fp32_classify = statistics.median(r[0] + r[1] for r in rounds)
    naive_total = fp32_stages["decode"] + fp32_stages["detector"] + naive_seconds
    print(f"naive: classification {n_crops / naive_seconds:6.1f} crops/s; end to end "
          f"{args.images / naive_total:.3f} images/s (fp32, same decode and detector)")
    noisy = " (random weights: near-ties, so this says little)" if "random" in described else ""
    print(f"top-1 agreement between the two crop paths: {agree:.0%}{noisy}")
    print(f"CLIP embeddings {default} vs fp32: mean centred cosine {cosine:.4f} ({len(crops)} crops)")
    print(f"detector stage {default} vs fp32: {fp32_stages['detector'] / stages['detector']:.1f}x; "
          f"CLIP stage: {fp32_stages['clip'] / stages['clip']:.1f}x")
    other_latency = ""
    if other_variant:
        other_clip, other_stages = other_variant
        print(f"default vs {other} {precision} end-to-end speedup: {sum(other_stages.values()) / total:.1f}x; "
              f"detector stage {other_stages['detector'] / stages['detector']:.1f}x, "
              f"CLIP stage {other_stages['clip'] / stages['clip']:.1f}x")
        other_latency = f"; {other} {precision}: {interactive_seconds(other_clip, files[0], labelset) * 1000:.0f} ms"
    print(f"interactive box -> label: {latency * 1000:.0f} ms (one box, decode included, warm, median of 5"
          f"{other_latency})")
    children = os.path.join(work, "rss")   # empty: the first child converts, the second reads its cache
    first = peak_rss(args, children) if runtime == "openvino" else None   # only a converting runtime differs
    print(f"peak RSS, one process with the default models: {peak_rss(args, children):.2f} GiB")
    if first is not None:
        print(f"peak RSS on a first start (converting to OpenVINO): {first:.2f} GiB")
    shutil.rmtree(work, ignore_errors=True)
    print(f"CROP_MIRROR: CLIP stage {mirrored / single:.1f}x the time, end to end "
          f"+{(mirrored - single) / total:.0%} ({default})")
    print(f"cpu profile detector: {cpu_name}, {default}")
    batched_total = naive_total - naive_seconds + fp32_classify
    print(f"end-to-end speedup (fp32, batched vs naive): {naive_total / batched_total:.1f}x")
    print(f"default vs fp32 end-to-end speedup: {fp32_total / total:.1f}x")
    print(f"cpu profile: {args.images / cpu_total:.2f} images/s, {fp32_total / cpu_total:.1f}x the fp32 default")
    ratios = [naive_s / (crops_s + clip_s) for crops_s, clip_s, naive_s in rounds]
    print("per-round classification ratios: " + ", ".join(f"{r:.1f}" for r in ratios))
    print(f"batched/naive speedup: {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
