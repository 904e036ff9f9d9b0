"""RUNTIME=openvino with the bundled tiny models: what ``auto`` picks, the converted-model cache (a second start
reads it instead of converting; a damaged entry is converted again; concurrent first starts convert once; an
unwritable one only costs the next start a conversion), and that the torch copies of the converted parts are gone.
Its labels against torch fp32: tests/test_precision.py."""
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from backend.labeling.factory import build_labeler
from backend.labeling.openvino_runtime import CompiledPart
from backend.labeling.specs import resolve_runtime, tiny_spec

CONVERTED = "openvino: converted"
PIXELS = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))   # the tiny CLIP's input side


def build(cache: Path, with_detector: bool = True):
    return build_labeler(tiny_spec(runtime="openvino", device="cpu", cache_dir=str(cache)), with_detector=with_detector)


def conversions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(CONVERTED)]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="backend.labeling.openvino_runtime")


def test_auto_is_torch_on_every_device_and_openvino_only_when_asked_for_on_a_cpu():
    assert resolve_runtime("auto", "cpu", "bf16") == "torch"   # 0.9-1.1x torch bf16 end to end
    assert resolve_runtime("auto", "cpu", "fp32") == "torch"   # 1.1-1.3x end to end for 0.7 GiB more: not worth it
    assert resolve_runtime("auto", "cuda", "fp16") == "torch"
    assert resolve_runtime("auto", "cpu", "int8") == "torch"   # torch's dynamic quantisation
    for precision, device, reason in (("int8", "cpu", "fp32 or bf16"), ("fp16", "cuda", "runs on a CPU")):
        with pytest.raises(ValueError, match=reason):
            resolve_runtime("openvino", device, precision)
    with pytest.raises(ValueError, match="RUNTIME='onnx'"):
        resolve_runtime("onnx", "cpu", "fp32")
    assert tiny_spec().runtime == tiny_spec(runtime="auto").runtime == "torch"   # fast already
    assert tiny_spec(runtime="openvino").fingerprint != tiny_spec(runtime="torch").fingerprint


def test_settings_carry_the_runtime_and_model_dir():
    from backend.config import Settings
    from backend.learning import embedding_space
    spec = Settings.from_env({"RUNTIME": "openvino", "MODEL_DIR": "/srv/state"}, demo=True).model_spec()
    assert (spec.runtime, spec.cache_dir) == ("openvino", "/srv/state")
    assert embedding_space(spec) == embedding_space(tiny_spec())   # learned memory carries over


def test_second_start_reads_the_cache_and_the_torch_copies_are_gone(tmp_path, caplog):
    first = build(tmp_path)
    assert len(conversions(caplog)) == 2, caplog.text   # image tower and backbone
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "openvino").iterdir() if p.is_dir()) == ["clip",
                                                                                                      "detector"]
    caplog.clear()
    second = build(tmp_path)
    assert conversions(caplog) == [], caplog.text
    for labeler in (first, second):
        assert isinstance(labeler.clip.image_tower, CompiledPart)
        assert isinstance(labeler.proposer.model.backbone, CompiledPart)
        assert labeler.clip.model.vision_model is None and labeler.clip.model.visual_projection is None
    assert torch.equal(first.clip.embed_pixels(PIXELS), second.clip.embed_pixels(PIXELS))


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A cache holding the tiny CLIP's converted image tower, and its embeddings of PIXELS."""
    cache = tmp_path_factory.mktemp("ov")
    return cache, build(cache, with_detector=False).clip.embed_pixels(PIXELS)


def damage_bin(entry: Path):
    with open(entry / "model.bin", "r+b") as weights:
        weights.truncate(100)


@pytest.mark.parametrize("damage", [damage_bin, lambda entry: (entry / "model.bin").unlink(),
                                    lambda entry: (entry / "model.xml").write_text("<net")],
                         ids=["truncated weights", "weights missing", "garbled graph"])
def test_a_damaged_entry_is_converted_again(damage, cached, tmp_path, caplog):
    source, expected = cached
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    entry, = (p for p in (tmp_path / "openvino").glob("clip-image-tower-*") if p.is_dir())   # not its .lock
    damage(entry)
    labeler = build(tmp_path, with_detector=False)
    assert "unreadable, converting again" in caplog.text and len(conversions(caplog)) == 1
    assert torch.equal(labeler.clip.embed_pixels(PIXELS), expected)
    caplog.clear()
    build(tmp_path, with_detector=False)
    assert conversions(caplog) == []   # the rebuilt entry is whole


def test_concurrent_first_starts_convert_once(tmp_path, caplog):
    labelers, errors = [], []

    def start():
        try:
            labelers.append(build(tmp_path, with_detector=False))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(conversions(caplog)) == 1, (errors, caplog.text)
    assert torch.equal(*(labeler.clip.embed_pixels(PIXELS) for labeler in labelers))
    assert [p.name for p in (tmp_path / "openvino").iterdir() if p.name.startswith(".")] == []   # no temp left


def test_an_unwritable_cache_still_starts(cached, tmp_path, caplog):
    blocked = tmp_path / "model-state"
    blocked.write_text("a file where MODEL_DIR should be a directory")
    labeler = build(blocked, with_detector=False)
    assert "cannot cache clip-image-tower" in caplog.text and len(conversions(caplog)) == 1
    assert torch.equal(labeler.clip.embed_pixels(PIXELS), cached[1])
