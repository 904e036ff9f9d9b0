"""Command line: serve | download | label | eval | demo-data | train-tiny | preannotate | report | settings.

`--demo` = the bundled tiny models."""
from __future__ import annotations

import argparse
import logging
import sys

from .labeling.errors import ModelUnavailable


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP, port 9090)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--threads", type=int, default=8, help="request threads (inference is serialised)")
    serve.add_argument("--demo", action="store_true", help="use the bundled tiny shapes models")

    label = sub.add_parser("label", help="pre-annotate image files or folders")
    label.add_argument("paths", nargs="+", help="images or folders (searched recursively)")
    vocab = label.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--labels", help='comma-separated labels, e.g. "bee,wasp"')
    vocab.add_argument("--config", help="a Label Studio labeling config XML file")
    label.add_argument("--format", choices=("ls", "coco", "yolo"), default="ls")
    label.add_argument("--out", help="output file (ls, coco) or directory (yolo); default: stdout / ./yolo")
    label.add_argument("--demo", action="store_true", help="use the bundled tiny shapes models")

    ev = sub.add_parser("eval", help="CLIP accuracy on ground-truth crops of a labelled dataset")
    ev.add_argument("dataset",
                    help="VOC root (Annotations/, JPEGImages/), COCO JSON file, or a folder with annotations.json")
    ev.add_argument("--format", choices=("voc", "coco"), default=None, help="default: guessed from the path")
    ev.add_argument("--per-class", type=int, default=100, help="stratified sample size per class")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="eval-out", help="directory for the confusion matrix PNG and report")
    ev.add_argument("--background", action="store_true",
                    help="add the background prompts (as the pipeline does); crops they win count as wrong")
    ev.add_argument("--split", help="VOC: only the images of ImageSets/Main/SPLIT.txt (e.g. val); default: all")
    ev.add_argument("--images", help="COCO: folder of the images; default: beside the JSON, or its images/")
    ev.add_argument("--demo", action="store_true", help="use the bundled tiny shapes models")

    demo = sub.add_parser("demo-data", help="write synthetic shape scenes, COCO ground truth and a label config")
    demo.add_argument("out_dir")
    demo.add_argument("--n", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train-tiny", help="retrain the bundled tiny models (fixed seeds, ~32 min on 2 cores)")
    train.add_argument("--out", default=None, help="default: backend/assets/tiny")

    pre = sub.add_parser("preannotate",
                         help="pre-annotate a whole Label Studio project over RQ workers (needs REDIS_URL)")
    from .preannotate import add_arguments
    add_arguments(pre)

    report = sub.add_parser("report", help="what annotators did with the predictions of a Label Studio project "
                                           "(reads LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY; changes nothing)")
    report.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("--out", help="output file; default: stdout")

    download = sub.add_parser("download", help="download the models the settings name into the standard caches "
                                               "(HF_HOME, TORCH_HOME), then exit")
    download.add_argument("--clip", help="CLIP hub id (owner/name[@revision]); default: CLIP_MODEL")
    download.add_argument("--detector", help="detector name; default: DETECTOR (or the profile's)")
    download.add_argument("--profile", choices=("default", "cpu"), help="default: PROFILE")

    sub.add_parser("settings", help="print every setting as a Markdown table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from .app import serve
            return serve(args)
        if args.command == "label":
            from .offline import label_command
            return label_command(args)
        if args.command == "eval":
            from .evaluate import eval_command
            return eval_command(args)
        if args.command == "demo-data":
            from .demo.demo_data import demo_data_command
            return demo_data_command(args)
        if args.command == "train-tiny":
            from pathlib import Path

            from .demo.train_tiny import train_all
            from .labeling.specs import TINY_DIR
            train_all(Path(args.out) if args.out else TINY_DIR)
            return 0
        if args.command == "preannotate":
            from .preannotate import preannotate_command
            return preannotate_command(args)
        if args.command == "report":
            from .reporting import report_command
            return report_command(args)
        if args.command == "download":
            return _download(args)
        if args.command == "settings":
            from .config import settings_table
            print(settings_table())
            return 0
    except ModelUnavailable as error:  # one clear message, no traceback wall
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        from .config import SettingsError

        if not isinstance(error, SettingsError):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1


def _download(args) -> int:
    """Fetch what the settings (and the flags over them) name; print where each landed."""
    import os

    from .config import Settings
    from .labeling.detectors import weights_file
    from .labeling.download import fetch_clip

    overrides = {k: v for k, v in (("CLIP_MODEL", args.clip), ("DETECTOR", args.detector),
                                   ("PROFILE", args.profile)) if v}
    spec = Settings.from_env({**os.environ, **overrides}).model_spec()
    print(f"CLIP {spec.clip_model}: {fetch_clip(spec.clip_model, offline=spec.offline)}")
    path = weights_file(spec.detector, spec.detector_weights, offline=spec.offline, url=spec.detector_url)
    print(f"detector {spec.detector}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
