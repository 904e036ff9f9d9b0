"""Every setting in one place, read from the environment. ``python -m backend settings`` prints the table.

``Settings`` is a frozen dataclass: each field is one environment variable (its name in upper case), declared once
with its type, default and help; the README's table is generated from the same fields. Composition roots (server,
worker, CLI) read the fields they need and hand components plain typed values, so no component knows an
environment variable's name.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .labeling.prompts import DEFAULT_BACKGROUND, DEFAULT_TEMPLATE, PromptDefaults
from .labeling.specs import RUNTIMES, CropSettings, ModelSpec, ProposalSettings, resolve_precision, tiny_spec
from .studio.label_config import ProjectConfig, parse_label_config

PARSERS = {"str": str, "int": int, "float": float}
TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def setting(default: Any, help_: str) -> Any:
    """A field read from the environment variable of its name in upper case."""
    return field(default=default, metadata={"help": help_})


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    # Defaults reproduce the method's recipe; `--demo` (``demo``) swaps in the tiny models.
    clip_model: str = setting("openai/clip-vit-base-patch32", "CLIP checkpoint: a hub id (`owner/name`, optionally `@revision`; downloaded into HF_HOME's cache on first use) or a directory")
    detector: str = setting("fasterrcnn_resnet50_fpn_v2", "proposal detector: fasterrcnn_resnet50_fpn_v2, fasterrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_mobilenet_v3_large_320_fpn, ssdlite320_mobilenet_v3_large, tiny_shapes")
    detector_weights: str = setting("", "detector state-dict file; empty = torchvision's COCO file in the torch hub cache (TORCH_HOME; downloaded on first use)")
    detector_weights_url: str = setting("", "where to download torchvision's COCO file from (a mirror); empty = torchvision's URL; the file's hash is checked")
    offline: bool = setting(False, "never touch the network: models must be in the caches already (`HF_HUB_OFFLINE=1` does the same)")
    profile: str = setting("default", "`default` (R50-FPN v2) or `cpu` (SSDlite320 MobileNetV3 detector, less recall: 3.0-3.2 images/s end to end on a 2-core Zen 5 with bf16, 1.6 on a Zen 4; see README, Speed)")
    device: str = setting("auto", "`auto` (CUDA when present), `cpu`, `cuda`, `cuda:1`")
    precision: str = setting("auto", "`auto` (fp16 on CUDA, bf16 on a CPU with AVX512-BF16/AMX, else fp32; the detector's backbone and heads and CLIP's image tower), `fp32`, `bf16`, `int8` (CLIP's image tower's Linear layers but its first block, CPU; agrees less), `fp16` (CUDA); see README, Speed")
    runtime: str = setting("auto", "`auto` (= `torch`: OpenVINO measured under 1.3x of torch bf16 with the product's input shapes), `torch`, `openvino` (CPU, fp32 or bf16; the image tower and detector backbone, converted on first start and cached under MODEL_DIR/openvino); see README, Speed")
    torch_threads: int = setting(0, "torch CPU threads; 0 = torch's default (all cores)")
    proposal_mode: str = setting("detector", "`detector` (final boxes of any class) or `rpn` (objectness proposals: finds objects the detector has no class for)")
    proposal_threshold: float = setting(0.7, "minimum detector score (detector mode) or objectness (rpn mode) of a proposal")
    proposal_nms_iou: float = setting(0.5, "class-agnostic NMS IoU between proposals")
    proposal_min_size: float = setting(2.0, "drop proposals narrower or lower than this many pixels")
    max_proposals: int = setting(100, "most proposals per image")
    detector_input_size: int = setting(0, "detector input short side in pixels; 0 = the model's own (800); smaller = faster")
    crop_context: float = setting(1.0, "scale crops around the box centre (1.25 shows 25 % context)")
    crop_square: bool = setting(False, "crop a square around the whole box (else CLIP's centre square of the short side)")
    crop_min_size: float = setting(0.0, "grow smaller boxes to this many pixels before cropping (context for tiny objects)")
    crop_mirror: bool = setting(False, "embed each crop and its mirror image and keep their mean: twice the CLIP work per box (+21 % end to end with the default models, torch bf16); on the tiny world known labels 0.3 points more accurate zero-shot and new labels right 0.661 / 0.883 of the time after 4 / 16 corrections against 0.660 / 0.865 (with the previous tiny CLIP, which knew six shapes: 2.6 points, and 0.54 / 0.65 with LEARNING_HARM=0 LEARNING_REPEATS=4; see README, Learning); also applies with --demo")
    prompt_template: str = setting(DEFAULT_TEMPLATE, "default prompt template(s) for labels without prompts; `;` separates several (averaged)")
    background_prompts: str = setting(";".join(DEFAULT_BACKGROUND), "default background prompt(s), `;`-separated; regions won by one are dropped")
    clip_batch_size: int = setting(32, "crops per CLIP forward pass")
    learning_harm: float = setting(2.0, "how much the learner protects labels zero-shot already names right: the extra cost, when it picks its weights per project, of a correction it would turn wrong. 2 kept known labels within 0.7 points of zero-shot on the tiny world (new labels right 0.660 / 0.865 of the time after 4 / 16 corrections each); 0 gave the same all-label recall there (with the previous tiny CLIP it learned new labels faster for 1.3 points on known ones on the validation scenes); see README, Learning")
    learning_repeats: int = setting(1, "how many ways the learner deals a project's annotations into cross-validation folds when it picks its weights, averaged (while that costs no more than one plain pass at 512 dimensions, so large projects keep one): steadier choices for small projects; with CROP_MIRROR=true LEARNING_HARM=0 and the previous tiny CLIP, 4 named new labels right 0.543 / 0.649 of the time after 4 / 16 corrections (1: 0.501 / 0.614) for 0.7 points on known ones; with the current one it changes nothing there; see README, Learning")
    max_labels: int = setting(1000, "most labels in one control; a config with more is refused (400 naming the limit)")
    label_studio_url: str = setting("", "Label Studio base URL for image downloads and its API; empty = /setup's hostname (only without LABEL_STUDIO_API_KEY)")
    label_studio_api_key: str = setting("", "legacy token or personal access token, sent only to LABEL_STUDIO_URL (required with it); empty = /setup's access_token")
    local_files_document_root: str = setting("", "read /data/local-files/ images from this directory when shared with LS")
    allowed_hosts: str = setting("", "comma-separated hosts images may be fetched from; empty = any")
    allow_private_hosts: str = setting("", "comma-separated host names and CIDR networks (e.g. `minio,10.0.0.0/8`) images may come from although private/loopback/link-local; Label Studio's own origin always may")
    image_max_bytes: int = setting(50_000_000, "largest image download")
    image_timeout: float = setting(20.0, "seconds to connect to and read an image")
    max_image_pixels: int = setting(40_000_000, "largest decoded image (decompression-bomb guard)")
    image_memory_mb: int = setting(1024, "decoded images in flight per process, all requests together, MB (uint8 pixels; a chunk reserves its images' size before decoding, and waits while others hold it)")
    download_workers: int = setting(8, "concurrent image downloads per predict call")
    predict_budget_seconds: float = setting(60.0, "a bulk /predict expected to take longer answers one result, so LS asks task by task (LS waits 100 s)")
    model_dir: str = setting("./model-state", "where learned state lives without Redis")
    redis_url: str = setting("", "Redis for shared state and the RQ queue; empty = embedded")
    feature_cache_mb: int = setting(256, "in-process LRU of image features (proposals + CLIP embeddings by image content hash + model fingerprint), MB; 0 = off")
    feature_cache_redis_mb: int = setting(2048, "with REDIS_URL: feature cache shared through Redis, capped at this many MB by its own LRU; 0 = off")
    feature_cache_ttl_days: float = setting(30.0, "feature cache entries unused this long expire (Redis, disk)")
    preannotate_chunk: int = setting(16, "tasks per bulk job of `python -m backend preannotate`, run by `rq worker --url $REDIS_URL --worker-class rq.worker.SimpleWorker --serializer rq.serializers.JSONSerializer clip-ls` on any machines")
    preannotate_job_timeout: int = setting(900, "seconds one bulk chunk may run; RQ re-queues the chunk of a dead worker this + 60 s after it started")
    url_secret: str = setting("", "secret path prefix: give Label Studio the model URL `http://HOST:9090/<URL_SECRET>`; only requests under it (or with Basic Auth) are served, /health aside. Label Studio's webhooks carry it, so it authenticates them")
    basic_auth_user: str = setting("", "require HTTP Basic Auth on every route but /health (and URL_SECRET's, and /webhook when Label Studio's API is configured: webhooks carry no Basic Auth)")
    basic_auth_pass: str = setting("", "its password")
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR")
    demo: bool = field(default=False, metadata={"env": False})   # the bundled tiny models (`--demo`, DEMO=true)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, demo: bool = False) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in env_fields():
            raw = environ.get(f.name.upper(), "")
            if raw.strip():
                try:
                    values[f.name] = _parse(f.type, raw)
                except ValueError:
                    raise SettingsError(f"setting {f.name.upper()}={raw!r} is not a valid {f.type}") from None
        if environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:   # the hub's own switch means the same here
            values["offline"] = True
        if values.get("profile") == "cpu" and "detector" not in values:
            values.update(CPU_PROFILE)
        return cls(**values, demo=demo)

    def __post_init__(self):
        for f in env_fields():   # typed: a value set in code (``replace``) is checked as one read from the environment
            value = getattr(self, f.name)
            if not isinstance(value, TYPES[f.type]) or (f.type != "bool" and isinstance(value, bool)):
                raise SettingsError(f"setting {f.name.upper()}={value!r} is not a valid {f.type}")
        if self.profile not in ("default", "cpu"):
            raise SettingsError(f"PROFILE={self.profile!r}: use `default` or `cpu`")
        try:   # `auto` always resolves (and resolving it would load torch to look for a GPU)
            if self.precision != "auto":
                resolve_precision(self.precision, self.device)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        if self.learning_harm < 0:
            raise SettingsError(f"LEARNING_HARM={self.learning_harm}: use 0 or more")
        if not 1 <= self.learning_repeats <= 16:
            raise SettingsError(f"LEARNING_REPEATS={self.learning_repeats}: use 1 to 16")
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"RUNTIME={self.runtime!r}: use one of {', '.join(RUNTIMES)}")
        if self.label_studio_api_key and not self.label_studio_url:
            from .studio.images import KEY_NEEDS_URL
            raise SettingsError(KEY_NEEDS_URL)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def model_spec(self) -> ModelSpec:
        proposals = ProposalSettings(mode=self.proposal_mode, score_threshold=self.proposal_threshold,
                                     nms_iou=self.proposal_nms_iou, min_box_size=self.proposal_min_size,
                                     max_proposals=self.max_proposals, input_size=self.detector_input_size or None)
        common = dict(device=self.device, clip_batch_size=self.clip_batch_size, proposals=proposals,
                      offline=self.offline, precision=self.precision, runtime=self.runtime, cache_dir=self.model_dir)
        if self.demo:   # the crop recipe the tiny CLIP was trained for; mirroring is the user's
            return tiny_spec(mirror=self.crop_mirror, **common)
        return ModelSpec(clip_model=self.clip_model, detector=self.detector,
                         detector_weights=self.detector_weights or None, detector_url=self.detector_weights_url or None,
                         crops=CropSettings(self.crop_context, self.crop_square, self.crop_min_size, self.crop_mirror),
                         **common)

    def project_config(self, xml: str) -> ProjectConfig:
        """A project's label config as every entry point reads it (server, worker, learner, ``label --config``):
        with these prompt defaults and label limit."""
        return _project_config(xml, self.prompt_defaults, self.max_labels)

    @property
    def prompt_defaults(self) -> PromptDefaults:
        return PromptDefaults(self.templates, self.background)

    @property
    def templates(self) -> tuple[str, ...]:
        return split_list(self.prompt_template, ";")

    @property
    def background(self) -> tuple[str, ...]:
        return split_list(self.background_prompts, ";")

    @property
    def allowed_host_list(self) -> tuple[str, ...] | None:
        """ALLOWED_HOSTS as names; None = any host."""
        return split_list(self.allowed_hosts) or None

    @property
    def allow_private_list(self) -> tuple[str, ...]:
        return split_list(self.allow_private_hosts)


CPU_PROFILE = {"detector": "ssdlite320_mobilenet_v3_large"}


@lru_cache(maxsize=64)   # every request names its project's config: parse each distinct one once (it is immutable)
def _project_config(xml: str, defaults: PromptDefaults, max_labels: int) -> ProjectConfig:
    return parse_label_config(xml, defaults, max_labels)


def env_fields() -> tuple[dataclasses.Field, ...]:
    """The fields that are environment variables, in the README table's order."""
    return tuple(f for f in dataclasses.fields(Settings) if f.metadata.get("env", True))


def demo_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``DEMO=true`` (a WSGI server importing backend.wsgi, RQ workers): the bundled tiny models."""
    raw = (os.environ if environ is None else environ).get("DEMO", "")
    try:
        return _parse("bool", raw)
    except ValueError:
        raise SettingsError(f"DEMO={raw!r} is not a valid bool (true/false)") from None


def _parse(kind: str, raw: str) -> Any:
    if kind == "bool":
        word = raw.strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(raw)
        return word in TRUE
    return PARSERS[kind](raw)


def split_list(raw: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(sep) if part.strip())


def settings_table() -> str:
    """The Markdown table of every setting, as in the README."""
    rows = ["| setting | default | what it does |", "|---|---|---|"]
    rows += [f"| `{f.name.upper()}` | `{f.default}` | {f.metadata['help']} |" for f in env_fields()]
    return "\n".join(rows)
