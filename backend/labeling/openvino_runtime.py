"""``RUNTIME=openvino``: the heavy parts (CLIP's image tower, the detector's backbone) run by OpenVINO on the CPU.

A part is converted from its torch module (the weights the torch path loads, so no separate conversion step for
the user), saved as OpenVINO IR under the cache directory and read from there by later starts. The IR keeps fp32
weights whatever the precision: the precision is a compile-time hint (bf16 where the torch path runs bf16), so one
entry serves both. An entry is named after a hash of the part's weights, its input shape and the OpenVINO and torch
versions; it is written to a temporary directory and renamed into place under a file lock (concurrent first starts
convert once and never see half an entry), and one that cannot be read (truncated, edited) is converted again.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import openvino as ov
import torch
from filelock import FileLock
from torch import nn

log = logging.getLogger(__name__)

HINTS = {"fp32": "f32", "bf16": "bf16"}   # PRECISION → OpenVINO's INFERENCE_PRECISION_HINT


class CompiledPart(nn.Module):
    """A part compiled by OpenVINO, in place of the torch module it came from: a tensor in; out the tensor of a
    one-output part, else the outputs by name (a backbone's feature maps, named by the torch module's keys)."""

    def __init__(self, compiled: ov.CompiledModel):
        super().__init__()
        self.compiled = compiled
        self.names = [min(output.get_names() or {str(i)}) for i, output in enumerate(compiled.outputs)]

    def forward(self, x: torch.Tensor):
        # a request per call: requests are not thread-safe, and a server labels concurrently
        outputs = self.compiled.create_infer_request().infer([x.contiguous().numpy()])
        tensors = [torch.from_numpy(value) for value in outputs.values()]   # copies (share_outputs=False)
        return tensors[0] if len(tensors) == 1 else OrderedDict(zip(self.names, tensors))


def compile_part(name: str, module: nn.Module, example: torch.Tensor, shape: list[int], precision: str,
                 cache_dir: str | Path | None) -> CompiledPart:
    """``module`` compiled for the CPU at ``precision``; ``shape``: its input's, -1 where a dimension varies. Read
    from ``cache_dir`` when converted before (then kept there), else converted now."""
    core = ov.Core()
    model = None
    if cache_dir is not None:
        entry = Path(cache_dir) / f"{name}-{_digest(module, shape)}"
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{entry}.lock"):
                model = _read(core, entry)
                if model is None:
                    _save(_convert(name, module, example, shape), entry)
                    model = core.read_model(entry / "model.xml")
        except OSError as error:   # not writable, or full: run anyway, converting again at the next start
            log.warning("openvino: cannot cache %s in %s (%s)", name, cache_dir, error)
    if model is None:
        model = _convert(name, module, example, shape)
    config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return CompiledPart(core.compile_model(model, "CPU", config))


def _digest(module: nn.Module, shape: list[int]) -> str:
    """What the conversion depends on: the weights' names, shapes and bytes (files can move or be copied; the
    weights are what was converted), the input shape and the versions of the converter and of torch."""
    digest = hashlib.sha256(f"{type(module).__qualname__} {shape} openvino {ov.__version__} torch "
                            f"{torch.__version__}".encode())
    for key, tensor in module.state_dict().items():
        digest.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _convert(name: str, module: nn.Module, example: torch.Tensor, shape: list[int]) -> ov.Model:
    started = time.perf_counter()
    with warnings.catch_warnings():   # tracing's warnings about Python values it fixes: tested across input shapes
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=example, input=[ov.PartialShape(shape)])
    log.info("openvino: converted %s in %.1f s", name, time.perf_counter() - started)
    return model


def _read(core: ov.Core, entry: Path) -> ov.Model | None:
    """The cached model, or None when there is none or it cannot be read (then it is removed)."""
    if not entry.exists():
        return None
    try:
        return core.read_model(entry / "model.xml")
    except RuntimeError as error:
        log.warning("openvino: cached %s unreadable, converting again (%s)", entry, str(error).splitlines()[0])
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _save(model: ov.Model, entry: Path) -> None:
    for stale in entry.parent.glob(f".{entry.name}.*"):   # left by a process killed while saving (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)   # fp32 weights: f32 runs as converted
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone by the rename unless saving failed
    log.info("openvino: cached in %s", entry)
