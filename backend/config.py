"""Every setting in one place, read from the environment. ``python -m backend settings`` prints the table.

Each setting is declared once (name, type, default, help); the README's table is generated from the same list.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .labeling.prompts import DEFAULT_BACKGROUND, DEFAULT_TEMPLATE, PromptDefaults
from .labeling.specs import CropSettings, ModelSpec, ProposalSettings, resolve_precision, tiny_spec

# (name, type, default, help). Defaults reproduce the method's recipe; `--demo` swaps in the tiny models.
SETTINGS: tuple[tuple[str, type, Any, str], ...] = (
    ("CLIP_MODEL", str, "openai/clip-vit-base-patch32", "CLIP checkpoint: a hub id (`owner/name`, optionally `@revision`; downloaded into HF_HOME's cache on first use) or a directory"),
    ("DETECTOR", str, "fasterrcnn_resnet50_fpn_v2", "proposal detector: fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn, ssdlite320_mobilenet_v3_large, tiny_shapes"),
    ("DETECTOR_WEIGHTS", str, "", "detector state-dict file; empty = torchvision's COCO file in the torch hub cache (TORCH_HOME; downloaded on first use)"),
    ("DETECTOR_WEIGHTS_URL", str, "", "where to download torchvision's COCO file from (a mirror); empty = torchvision's URL; the file's hash is checked"),
    ("OFFLINE", bool, False, "never touch the network: models must be in the caches already (`HF_HUB_OFFLINE=1` does the same)"),
    ("PROFILE", str, "default", "`default` (R50-FPN v2) or `cpu` (SSDlite320 MobileNetV3 detector: ≥ 2 images/s end to end on a laptop CPU, less recall; see README)"),
    ("DEVICE", str, "auto", "`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`"),
    ("PRECISION", str, "auto", "`auto` (fp16 on CUDA, bf16 on a CPU with AVX512-BF16/AMX, else fp32), `fp32`, `bf16`, `int8` (CLIP's Linear layers, CPU; agrees less), `fp16` (CUDA); see README, Speed"),
    ("RUNTIME", str, "auto", "`auto` (OpenVINO on a CPU when installed and PRECISION is fp32 or bf16, else torch), `torch`, `openvino` (CPU; the image tower and detector backbone, converted on first start and cached under MODEL_DIR/openvino); see README, Speed"),
    ("TORCH_THREADS", int, 0, "torch CPU threads; 0 = torch's default (all cores)"),
    ("PROPOSAL_MODE", str, "detector", "`detector` (final boxes of any class) or `rpn` (objectness proposals: finds objects the detector has no class for)"),
    ("PROPOSAL_THRESHOLD", float, 0.7, "minimum detector score (detector mode) or objectness (rpn mode) of a proposal"),
    ("PROPOSAL_NMS_IOU", float, 0.5, "class-agnostic NMS IoU between proposals"),
    ("PROPOSAL_MIN_SIZE", float, 2.0, "drop proposals narrower or lower than this many pixels"),
    ("MAX_PROPOSALS", int, 100, "most proposals per image"),
    ("DETECTOR_INPUT_SIZE", int, 0, "detector input short side in pixels; 0 = the model's own (800); smaller = faster"),
    ("CROP_CONTEXT", float, 1.0, "scale crops around the box centre (1.25 shows 25 % context)"),
    ("CROP_SQUARE", bool, False, "crop a square around the whole box (else CLIP's centre square of the short side)"),
    ("CROP_MIN_SIZE", float, 0.0, "grow smaller boxes to this many pixels before cropping (context for tiny objects)"),
    ("PROMPT_TEMPLATE", str, DEFAULT_TEMPLATE, "default prompt template(s) for labels without prompts; `;` separates several (averaged)"),
    ("BACKGROUND_PROMPTS", str, ";".join(DEFAULT_BACKGROUND), "default background prompt(s), `;`-separated; regions won by one are dropped"),
    ("CLIP_BATCH_SIZE", int, 32, "crops per CLIP forward pass"),
    ("MAX_LABELS", int, 1000, "most labels in one control; a config with more is refused (400 naming the limit)"),
    ("LABEL_STUDIO_URL", str, "", "Label Studio base URL for image downloads and its API; empty = /setup's hostname (only without LABEL_STUDIO_API_KEY)"),
    ("LABEL_STUDIO_API_KEY", str, "", "legacy token or personal access token, sent only to LABEL_STUDIO_URL (required with it); empty = /setup's access_token"),
    ("LOCAL_FILES_DOCUMENT_ROOT", str, "", "read /data/local-files/ images from this directory when shared with LS"),
    ("ALLOWED_HOSTS", str, "", "comma-separated hosts images may be fetched from; empty = any"),
    ("ALLOW_PRIVATE_HOSTS", str, "", "comma-separated host names and CIDR networks (e.g. `minio,10.0.0.0/8`) images may come from although private/loopback/link-local; Label Studio's own origin always may"),
    ("IMAGE_MAX_BYTES", int, 50_000_000, "largest image download"),
    ("IMAGE_TIMEOUT", float, 20.0, "seconds to connect to and read an image"),
    ("MAX_IMAGE_PIXELS", int, 40_000_000, "largest decoded image (decompression-bomb guard)"),
    ("IMAGE_MEMORY_MB", int, 1024, "decoded images in flight per process, all requests together, MB (uint8 pixels; a chunk reserves its images' size before decoding, and waits while others hold it)"),
    ("DOWNLOAD_WORKERS", int, 8, "concurrent image downloads per predict call"),
    ("PREDICT_BUDGET_SECONDS", float, 60.0, "a bulk /predict expected to take longer answers one result, so LS asks task by task (LS waits 100 s)"),
    ("MODEL_DIR", str, "./model-state", "where learned state lives without Redis"),
    ("REDIS_URL", str, "", "Redis for shared state and the RQ queue; empty = embedded"),
    ("FEATURE_CACHE_MB", int, 256, "in-process LRU of image features (proposals + CLIP embeddings by image content hash + model fingerprint), MB; 0 = off"),
    ("FEATURE_CACHE_REDIS_MB", int, 2048, "with REDIS_URL: feature cache shared through Redis, capped at this many MB by its own LRU; 0 = off"),
    ("FEATURE_CACHE_TTL_DAYS", float, 30.0, "feature cache entries unused this long expire (Redis, disk)"),
    ("PREANNOTATE_CHUNK", int, 16, "tasks per bulk job of `python -m backend preannotate`, run by `rq worker --url $REDIS_URL --worker-class rq.worker.SimpleWorker --serializer rq.serializers.JSONSerializer clip-ls` on any machines"),
    ("PREANNOTATE_JOB_TIMEOUT", int, 900, "seconds one bulk chunk may run; RQ re-queues the chunk of a dead worker this + 60 s after it started"),
    ("URL_SECRET", str, "", "secret path prefix: give Label Studio the model URL `http://HOST:9090/<URL_SECRET>`; only requests under it (or with Basic Auth) are served, /health aside. Label Studio's webhooks carry it, so it authenticates them"),
    ("BASIC_AUTH_USER", str, "", "require HTTP Basic Auth on every route but /health (and URL_SECRET's, and /webhook when Label Studio's API is configured: webhooks carry no Basic Auth)"),
    ("BASIC_AUTH_PASS", str, "", "its password"),
    ("LOG_LEVEL", str, "INFO", "DEBUG, INFO, WARNING, ERROR"),
)
CPU_PROFILE = {"DETECTOR": "ssdlite320_mobilenet_v3_large"}


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


def demo_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``DEMO=true`` (a WSGI server importing backend.wsgi, RQ workers): the bundled tiny models."""
    return _parse(bool, (os.environ if environ is None else environ).get("DEMO", ""))


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Any]
    demo: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, demo: bool = False) -> Settings:
        environ = os.environ if environ is None else environ
        values = {}
        for name, kind, default, _ in SETTINGS:
            raw = environ.get(name, "")
            try:
                values[name] = _parse(kind, raw) if raw.strip() else default
            except ValueError:
                raise SettingsError(f"setting {name}={raw!r} is not a valid {kind.__name__}") from None
        if _parse(bool, environ.get("HF_HUB_OFFLINE", "")):   # the hub's own switch means the same here
            values["OFFLINE"] = True
        if values["PROFILE"] == "cpu" and not environ.get("DETECTOR"):
            values.update(CPU_PROFILE)
        elif values["PROFILE"] not in ("default", "cpu"):
            raise SettingsError(f"PROFILE={values['PROFILE']!r}: use `default` or `cpu`")
        try:   # `auto` always resolves (and resolving it would load torch to look for a GPU)
            if values["PRECISION"] != "auto":
                resolve_precision(values["PRECISION"], values["DEVICE"])
        except ValueError as error:
            raise SettingsError(str(error)) from None
        if values["LABEL_STUDIO_API_KEY"] and not values["LABEL_STUDIO_URL"]:
            from .studio.images import KEY_NEEDS_URL
            raise SettingsError(KEY_NEEDS_URL)
        return cls(values, demo)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def model_spec(self) -> ModelSpec:
        v = self.values
        proposals = ProposalSettings(mode=v["PROPOSAL_MODE"], score_threshold=v["PROPOSAL_THRESHOLD"],
                                     nms_iou=v["PROPOSAL_NMS_IOU"], min_box_size=v["PROPOSAL_MIN_SIZE"],
                                     max_proposals=v["MAX_PROPOSALS"], input_size=v["DETECTOR_INPUT_SIZE"] or None)
        common = dict(device=v["DEVICE"], clip_batch_size=v["CLIP_BATCH_SIZE"], proposals=proposals,
                      offline=v["OFFLINE"], precision=v["PRECISION"], runtime=v["RUNTIME"],
                      cache_dir=v["MODEL_DIR"])
        if self.demo:
            return tiny_spec(**common)
        return ModelSpec(clip_model=v["CLIP_MODEL"], detector=v["DETECTOR"],
                         detector_weights=v["DETECTOR_WEIGHTS"] or None, detector_url=v["DETECTOR_WEIGHTS_URL"] or None,
                         crops=CropSettings(v["CROP_CONTEXT"], v["CROP_SQUARE"], v["CROP_MIN_SIZE"]), **common)

    @property
    def prompt_defaults(self) -> PromptDefaults:
        return PromptDefaults(self.templates, self.background)

    @property
    def templates(self) -> tuple[str, ...]:
        return split_list(self["PROMPT_TEMPLATE"], ";")

    @property
    def background(self) -> tuple[str, ...]:
        return split_list(self["BACKGROUND_PROMPTS"], ";")


def split_list(raw: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(sep) if part.strip())


def settings_table() -> str:
    """The Markdown table of every setting, as in the README."""
    rows = ["| setting | default | what it does |", "|---|---|---|"]
    rows += [f"| `{name}` | `{default}` | {help_} |" for name, _, default, help_ in SETTINGS]
    return "\n".join(rows)

