"""Getting the models onto this machine, once: CLIP from the Hugging Face hub, the detector from torchvision's URL.

Both land in the standard caches (``HF_HOME``, ``TORCH_HOME``), so transformers and torchvision users share them,
and are used from there afterwards without touching the network (a restart never waits for a hub). Only what
loading needs is fetched: the config, tokenizer and processor files and one weights format (safetensors, else
``pytorch_model.bin``), not every format a hub repo holds. ``HF_ENDPOINT`` and the usual proxy variables are
honoured. The detector file is checked against the hash prefix in torchvision's file name before it is moved
into place, so a download that is killed or corrupt never leaves a file that loads; a file lock makes a second
process (the worker beside the server) wait for the first instead of downloading again.

``offline`` (``OFFLINE=1`` or ``HF_HUB_OFFLINE=1``): the network is never touched; what is missing is reported
with what to run on a machine that has internet.

>>> split_revision("openai/clip-vit-base-patch32@3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268")
('openai/clip-vit-base-patch32', '3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268')
>>> split_revision("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
('laion/CLIP-ViT-B-32-laion2B-s34B-b79K', None)
>>> weight_files(["pytorch_model.bin", "model.safetensors", "open_clip_model.safetensors", "tf_model.h5"])
['model.safetensors']
>>> weight_files(["pytorch_model.bin", "open_clip_pytorch_model.bin"])
['pytorch_model.bin']
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path

from .errors import ModelUnavailable

log = logging.getLogger(__name__)

CLIP_FILES = ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
CONNECT_TIMEOUT_S = 5.0     # a machine without network fails in seconds, not after minutes of retries
READ_TIMEOUT_S = 60.0
LOCK_TIMEOUT_S = 3600.0     # another process downloading the same file: wait for it (large files, slow links)
DOWNLOAD_HINT = "run `python -m backend download` on a machine with internet (it fills the same caches)"


def split_revision(name: str) -> tuple[str, str | None]:
    """``owner/name@revision`` → (repo id, revision); no ``@``: the default branch."""
    repo, _, revision = name.partition("@")
    return repo, revision or None


def weight_files(names: list[str]) -> list[str]:
    """The weights to fetch: the safetensors files, else the PyTorch pickle (read with ``weights_only``)."""
    safetensors = sorted(n for n in names if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", n))
    index = [n for n in names if n == "model.safetensors.index.json"]
    return safetensors + index if safetensors else [n for n in names if n == "pytorch_model.bin"]


# ---------------------------------------------------------------------------------------------- CLIP
def fetch_clip(name: str, offline: bool = False) -> str:
    """A local directory holding the CLIP checkpoint ``name`` (a directory, or a hub id with ``@revision``)."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    repo, revision = split_revision(name)
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str) and _complete(Path(cached).parent):
        return str(Path(cached).parent)
    if offline:
        raise ModelUnavailable(f"CLIP model '{name}' is not (completely) in the Hugging Face cache "
                               f"({_cache_dir()}) and OFFLINE is set: {DOWNLOAD_HINT}, then copy the cache (or "
                               f"set HF_HOME); or set CLIP_MODEL to a local directory. To try the backend without "
                               f"any download, use --demo.")
    started = time.monotonic()
    log.info("downloading CLIP model %s into %s ...", name, _cache_dir())
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo, revision=revision, timeout=CONNECT_TIMEOUT_S)
        names = [s.rfilename for s in info.siblings or []]
        weights = weight_files(names)
        if not weights:
            raise ModelUnavailable(f"'{name}' has no transformers weights (model.safetensors or pytorch_model.bin):"
                                   f" it is not a transformers CLIP checkpoint (an open_clip-only repo?)")
        path = snapshot_download(repo, revision=revision, allow_patterns=[*CLIP_FILES, *weights],
                                 etag_timeout=CONNECT_TIMEOUT_S)
    except ModelUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - network, HTTP and hub errors all end in the same advice
        raise ModelUnavailable(f"cannot download CLIP model '{name}': {type(error).__name__}: {error}. "
                               f"Check the network (HF_ENDPOINT, HTTPS_PROXY), or {DOWNLOAD_HINT}, or set "
                               f"CLIP_MODEL to a local directory.") from None
    log.info("downloaded %s in %.1f s", name, time.monotonic() - started)
    if not _complete(Path(path)):
        raise ModelUnavailable(f"the download of CLIP model '{name}' into {path} is incomplete: run it again")
    return path


def _complete(snapshot: Path) -> bool:
    """A snapshot with everything loading needs: config, weights (every shard its index names), tokenizer and
    processor files. A download killed midway leaves files out in any order; such a snapshot counts as absent,
    so the next run (not offline) fetches what is missing instead of failing to load."""
    files = {p.name for p in snapshot.iterdir() if p.exists()}   # exists(): a dangling link is no file
    if "model.safetensors.index.json" in files:
        try:
            shards = set(json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not shards <= files:
            return False
    return ("config.json" in files and bool(weight_files(sorted(files)))
            and ("tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files)
            and bool(files & {"preprocessor_config.json", "processor_config.json"}))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# ---------------------------------------------------------------------------------------------- the detector
def fetch_detector_file(url: str, offline: bool = False) -> Path:
    """torchvision's weights file from ``url`` in the torch hub cache (``TORCH_HOME``), hash-checked."""
    import torch
    from filelock import FileLock

    name = Path(url.split("?", 1)[0]).name
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    if target.is_file():
        return target
    if offline:
        raise ModelUnavailable(f"detector weights {name} not found at {target} and OFFLINE is set: "
                               f"{DOWNLOAD_HINT} (or copy the file there, set TORCH_HOME, or set "
                               f"DETECTOR_WEIGHTS=/path/to/{name}). To try the backend without any download, "
                               f"use --demo.")
    prefix = re.search(r"-([0-9a-f]{8,})\.pth$", name)
    if prefix is None:
        raise ModelUnavailable(f"{url}: torchvision's file names end in -<sha256 prefix>.pth; this one does not, "
                               f"so it cannot be checked: download it yourself and set DETECTOR_WEIGHTS")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=LOCK_TIMEOUT_S):
        if target.is_file():   # another process finished it while we waited
            return target
        started = time.monotonic()
        log.info("downloading detector weights %s into %s ...", url, target.parent)
        _download_checked(url, target, prefix.group(1))
        log.info("downloaded %s in %.1f s", name, time.monotonic() - started)
    return target


def _download_checked(url: str, target: Path, sha256_prefix: str) -> None:
    """``url`` → ``target`` through a temporary file in the same folder, moved into place only when its
    sha256 starts with ``sha256_prefix`` (torch.hub's own helper has no timeouts: a stalled link would hang)."""
    import requests
    from tqdm import tqdm

    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
            response.raise_for_status()
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=target.name,
                                                  disable=None) as bar:
                for chunk in response.iter_content(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if not digest.hexdigest().startswith(sha256_prefix):
            raise ModelUnavailable(f"{url}: the downloaded file's sha256 {digest.hexdigest()[:12]}... does not "
                                   f"start with {sha256_prefix} (from its name): corrupt or not the published "
                                   f"file; nothing was kept")
        os.replace(partial, target)
    except requests.RequestException as error:
        raise ModelUnavailable(f"cannot download {url}: {type(error).__name__}: {error}. Check the network "
                               f"(HTTPS_PROXY) or {DOWNLOAD_HINT}") from None
    finally:
        partial.unlink(missing_ok=True)
