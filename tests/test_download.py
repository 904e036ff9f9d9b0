"""Downloading the models on first use, against a fake hub on loopback (never the real network): only the files
needed, into the standard caches, loaded afterwards offline; a download cut midway recovers; a wrong hash keeps
nothing; offline or without network the command fails fast with one message; two processes download once."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fake_hub import COMMIT, FakeHub

from backend.demo.shapes import scenes
from backend.labeling.specs import TINY_DIR

ROOT = Path(__file__).resolve().parent.parent
REPO = "fake-org/tiny-clip"
DETECTOR_BYTES = (TINY_DIR / "detector.pt").read_bytes()
DETECTOR_NAME = f"tiny-{hashlib.sha256(DETECTOR_BYTES).hexdigest()[:8]}.pth"


@pytest.fixture
def hub():
    hub = FakeHub()
    hub.add_repo(REPO, TINY_DIR / "clip", extra={"flax_model.msgpack": b"x" * 1000, "tf_model.h5": b"y" * 1000})
    hub.files[f"/models/{DETECTOR_NAME}"] = DETECTOR_BYTES
    hub.files["/models/wrong-deadbeef.pth"] = DETECTOR_BYTES
    yield hub
    hub.close()


def env_for(tmp_path: Path, hub: FakeHub | None, **extra) -> dict:
    scrub = ("HF_HUB_OFFLINE", "OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTP_PROXY", "HTTPS_PROXY")
    env = {k: v for k, v in os.environ.items() if k not in scrub}
    env.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(ROOT),
               HF_HUB_DISABLE_XET="1", **extra)
    if hub is not None:
        env["HF_ENDPOINT"] = hub.url
    return env


def run(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


LOAD = ("import sys; from backend.labeling.clip import Clip; clip = Clip.load(sys.argv[1], offline=True); "
        "print(tuple(clip.embed_prompts(('a photo of a star.',)).shape))")


def test_download_fetches_only_what_loading_needs_then_loads_offline(hub, tmp_path):
    env = env_for(tmp_path, hub, DETECTOR="tiny_shapes", DETECTOR_WEIGHTS=str(TINY_DIR / "detector.pt"))
    done = run(["-m", "backend", "download", "--clip", REPO], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CLIP fake-org/tiny-clip:" in done.stdout
    snapshot = next((tmp_path / "hf" / "hub").glob("models--fake-org--tiny-clip/snapshots/*"))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in (TINY_DIR / "clip").iterdir())
    assert not any("msgpack" in path or "h5" in path for path in hub.gets)   # other formats never fetched
    loaded = run(["-c", LOAD, REPO], {**env, "OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://0.0.0.0:9"})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "(1, 64)", loaded.stderr[-2000:]


def test_a_download_cut_midway_recovers_on_the_next_run(hub, tmp_path):
    hub.cut_once[f"/{REPO}/resolve/{COMMIT}/model.safetensors"] = 20_000
    env = env_for(tmp_path, hub)
    fetch = "from backend.labeling.download import fetch_clip; print(fetch_clip('fake-org/tiny-clip'))"
    first = run(["-c", fetch], env)
    print(f"first run after the cut: exit {first.returncode}")
    if first.returncode != 0:   # huggingface_hub may resume within the same run; if not, the next run must
        assert "cannot download CLIP model" in first.stderr
        loaded = run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"})
        assert loaded.returncode != 0, "a cut download must not load as a model"
    again = run(["-c", "from backend.labeling.download import fetch_clip; print(fetch_clip('fake-org/tiny-clip'))"],
                env)
    assert again.returncode == 0, again.stderr[-2000:]
    loaded = run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "(1, 64)", loaded.stderr[-2000:]


FETCH_DETECTOR = ("import sys; from backend.labeling.download import fetch_detector_file; "
                  "print(fetch_detector_file(sys.argv[1]))")


def test_the_detector_file_is_hash_checked_and_a_wrong_one_leaves_nothing(hub, tmp_path):
    env = env_for(tmp_path, hub)
    wrong = run(["-c", FETCH_DETECTOR, f"{hub.url}/models/wrong-deadbeef.pth"], env)
    assert wrong.returncode != 0 and "does not start with deadbeef" in wrong.stderr
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if not p.name.endswith(".lock")]   # no file, no .partial
    hub.cut_once[f"/models/{DETECTOR_NAME}"] = 50_000
    cut = run(["-c", FETCH_DETECTOR, f"{hub.url}/models/{DETECTOR_NAME}"], env)
    assert cut.returncode != 0 and not (checkpoints / DETECTOR_NAME).exists()
    right = run(["-c", FETCH_DETECTOR, f"{hub.url}/models/{DETECTOR_NAME}"], env)
    assert right.returncode == 0, right.stderr[-2000:]
    assert (checkpoints / DETECTOR_NAME).read_bytes() == DETECTOR_BYTES


def test_two_processes_starting_together_download_once(hub, tmp_path):
    env = env_for(tmp_path, hub)
    code = "from backend.labeling.download import fetch_clip; print(fetch_clip('fake-org/tiny-clip'))"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run(["-c", code], env), range(2)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-1000:] for r in results]
    assert hub.gets[f"/{REPO}/resolve/{COMMIT}/model.safetensors"] == 1
    hub.files[f"/models/{DETECTOR_NAME}"] = DETECTOR_BYTES
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run(["-c", FETCH_DETECTOR, f"{hub.url}/models/{DETECTOR_NAME}"], env),
                                range(2)))
    assert all(r.returncode == 0 for r in results), [r.stderr[-1000:] for r in results]
    assert hub.gets[f"/models/{DETECTOR_NAME}"] == 1


@pytest.mark.parametrize("how", ["OFFLINE=1", "no network"])
def test_without_the_models_the_command_fails_fast_with_one_message(how, hub, tmp_path):
    image = tmp_path / "x.png"
    next(scenes(0, 1)).image.save(image)
    env = env_for(tmp_path, hub, **({"OFFLINE": "1"} if how == "OFFLINE=1" else
                                    {"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}))
    started = time.monotonic()
    out = run(["-m", "backend", "label", str(image), "--labels", "bee"], env)
    elapsed = time.monotonic() - started
    print(f"{how}: failed in {elapsed:.1f} s")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.count("error:") == 1 and "python -m backend download" in out.stderr
    if how == "OFFLINE=1":
        assert not hub.gets, "offline, yet it asked the hub"
    else:   # refused connections: no retry loop with back-off (importing torch alone takes seconds under load)
        assert elapsed < 30, f"took {elapsed:.1f} s"


def test_the_server_downloads_before_health_answers(hub, tmp_path):
    """`serve` on empty caches: the download happens at start, logged, and /health answers only afterwards."""
    from e2e.backend_process import BackendProcess

    env = env_for(tmp_path, hub, CLIP_MODEL=REPO, DETECTOR="tiny_shapes",
                  DETECTOR_WEIGHTS=str(TINY_DIR / "detector.pt"))
    backend = BackendProcess(tmp_path / "backend", demo=False, env=env)
    # exactly this environment: nothing of the caller's (HF_HUB_OFFLINE, proxies) reaches the server
    backend.environ = lambda: {**env, "MODEL_DIR": str(tmp_path / "state"), "LOG_LEVEL": "INFO",
                               "PYTHONUNBUFFERED": "1", "TORCH_THREADS": "2"}
    with backend:
        assert hub.gets[f"/{REPO}/resolve/{COMMIT}/model.safetensors"] == 1   # done before /health answered
        log = backend.log_text()
        assert log.index(f"downloading CLIP model {REPO}") < log.index("models loaded") < log.index("serving on")


@pytest.mark.parametrize("how", ["OFFLINE=1", "HF_HUB_OFFLINE=1"])
def test_serve_without_the_models_offline_fails_fast_naming_the_model_and_the_command(how, hub, tmp_path):
    name, value = how.split("=")
    env = env_for(tmp_path, hub, **{name: value, "CLIP_MODEL": REPO})
    out = run(["-m", "backend", "serve", "--port", "9"], env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert REPO in out.stderr and "python -m backend download" in out.stderr
    assert not hub.gets, "offline, yet it asked the hub (retries are what made this slow)"


FETCH_CLIP = "from backend.labeling.download import fetch_clip; print(fetch_clip('fake-org/tiny-clip'))"


@pytest.mark.parametrize("what", ["clip", "detector"])
def test_a_process_killed_mid_download_leaves_nothing_that_loads_and_the_next_run_completes(what, hub, tmp_path):
    env = env_for(tmp_path, hub)
    if what == "clip":
        path, code = f"/{REPO}/resolve/{COMMIT}/model.safetensors", ["-c", FETCH_CLIP]
    else:
        path, code = f"/models/{DETECTOR_NAME}", ["-c", FETCH_DETECTOR, f"{hub.url}/models/{DETECTOR_NAME}"]
    hub.hold_once[path] = 20_000
    process = subprocess.Popen([sys.executable, *code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        assert hub.held.wait(120), "the download never reached the file"
    finally:
        process.kill()   # SIGKILL mid-file: no cleanup code of ours runs
        process.wait(30)
        hub.release.set()
    checkpoint = tmp_path / "torch" / "hub" / "checkpoints" / DETECTOR_NAME
    if what == "clip":
        assert run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"}).returncode != 0
    else:
        assert not checkpoint.exists()   # only a .partial file, which nothing loads
    again = run(code, env)
    assert again.returncode == 0, again.stderr[-2000:]
    if what == "clip":
        loaded = run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"})
        assert loaded.returncode == 0 and loaded.stdout.strip() == "(1, 64)", loaded.stderr[-2000:]
    else:
        assert checkpoint.read_bytes() == DETECTOR_BYTES


def test_a_snapshot_missing_any_file_loading_needs_counts_as_absent(tmp_path):
    """A killed download leaves files out in any order: the tokenizer, the processor file or a shard missing
    must send the next run back to the hub, not to a load that fails."""
    import json
    import shutil

    from backend.labeling.download import _complete

    snapshot = tmp_path / "snapshot"
    shutil.copytree(TINY_DIR / "clip", snapshot)
    assert _complete(snapshot)
    for missing in ("tokenizer.json", "processor_config.json", "config.json", "model.safetensors"):
        (snapshot / missing).rename(tmp_path / missing)
        assert not _complete(snapshot), missing
        (tmp_path / missing).rename(snapshot / missing)
    (snapshot / "model.safetensors").rename(snapshot / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not _complete(snapshot)   # one shard of two
    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"")
    assert _complete(snapshot)


def test_a_cached_snapshot_missing_its_tokenizer_is_completed_from_the_hub(hub, tmp_path):
    env = env_for(tmp_path, hub)
    assert run(["-c", FETCH_CLIP], env).returncode == 0
    snapshot = next((tmp_path / "hf" / "hub").glob("models--fake-org--tiny-clip/snapshots/*"))
    (snapshot / "tokenizer.json").unlink()   # as a download killed before the tokenizer leaves it
    offline = run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode != 0 and "not (completely) in the Hugging Face cache" in offline.stderr
    again = run(["-c", FETCH_CLIP], env)
    assert again.returncode == 0, again.stderr[-2000:]
    loaded = run(["-c", LOAD, REPO], {**env, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and loaded.stdout.strip() == "(1, 64)", loaded.stderr[-2000:]
