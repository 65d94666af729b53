"""The built-in toy models by name (``toy``): built once, shared safely, loadable by every part, and every
output they touch says that its weights are random."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from dreamstereo import toy_models
from dreamstereo.models import wan_inpaint as wan
from dreamstereo.scenes import demo_scene, write_scene
from dreamstereo.stages.depth import DepthConfig, load_backend
from dreamstereo.types import DepthBackendName, UserError
from tests.conftest import run_with_file_size_limit


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    root = tmp_path / "toy-cache"
    monkeypatch.setenv("DREAMSTEREO_TOY_CACHE", str(root))
    return root


def test_a_toy_is_built_once_and_two_builders_at_once_leave_one_whole_copy(own_cache):
    from transformers import DepthAnythingConfig  # noqa: F401 (transformers' lazy imports are not thread-safe)

    results, errors = [], []

    def build():
        try:
            results.append(toy_models.toy_folder("depth-anything-v2"))
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(results)) == 1
    folder = results[0]
    assert [p.name for p in own_cache.iterdir()] == [folder.name]  # no half-built temporary folder left
    assert (folder / "config.json").is_file() and toy_models.toy_note(folder) == toy_models.SMOKE_TEST
    inode = folder.stat().st_ino
    assert toy_models.toy_folder("depth-anything-v2").stat().st_ino == inode  # reused, not rebuilt
    assert oct(own_cache.stat().st_mode & 0o777) == "0o700"


def test_a_build_killed_half_way_is_cleared_once_it_is_old(own_cache):
    own_cache.mkdir(mode=0o700)
    old, recent = own_cache / ".depth-anything-v2-old", own_cache / ".depth-anything-v2-recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "config.json").write_text("{")  # half-written
    os.utime(old, (0, 0))
    folder = toy_models.toy_folder("depth-anything-v2")
    assert not old.exists() and recent.exists()  # a recent one may be another process's build in progress
    assert (folder / "config.json").read_text().startswith("{\n")


def test_a_cache_folder_others_can_write_to_is_refused(own_cache):
    own_cache.mkdir()
    os.chmod(own_cache, 0o777)
    with pytest.raises(UserError, match="not this user's own folder.*DREAMSTEREO_TOY_CACHE"):
        toy_models.toy_folder("wan")


def test_a_disk_without_room_is_one_line_naming_the_cache_and_leaves_nothing(own_cache, tmp_path):
    video = tmp_path / "in.mp4"
    write_scene(demo_scene(width=64, height=48, num_frames=4), video, fps=8)
    done = run_with_file_size_limit("from dreamstereo.cli import main\n"
                                    "raise SystemExit(main(['convert', sys.argv[1], sys.argv[2], '--checkpoint', 'toy']))",
                                    str(video), str(tmp_path / "out.mp4"), limit=4096,
                                    env={**os.environ, "DREAMSTEREO_TOY_CACHE": str(own_cache)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line == (f"dreamstereo convert: error: cannot build the toy wan model in '{own_cache}': Error while "
                    "serializing: I/O error: File too large (os error 27) (it needs a few MB: free some, or set "
                    "DREAMSTEREO_TOY_CACHE to a folder with room)"), line
    assert list(own_cache.iterdir()) == []  # no half-built folder
    (tmp_path / "a-file").write_text("")
    os.environ["DREAMSTEREO_TOY_CACHE"] = str(tmp_path / "a-file" / "cache")  # (restored by the fixture)
    with pytest.raises(UserError, match="toy model cache '.*a-file/cache' cannot be made.*DREAMSTEREO_TOY_CACHE"):
        toy_models.toy_folder("wan")


def test_only_the_toy_names_resolve():
    assert toy_models.is_toy("toy") and toy_models.is_toy(" TOY ") and not toy_models.is_toy("toy/")
    assert not toy_models.is_toy(None) and not toy_models.is_toy("/models/toy-wan")
    with pytest.raises(ValueError, match="no toy model 'sd'; there are wan, depth-anything-v2, depthcrafter"):
        toy_models.toy_folder("sd")


def test_the_toy_wan_loads_as_the_36_channel_inpainter_and_says_it_is_random(tmp_path):
    transformer = wan.load_inpaint_model("toy")
    assert transformer.config.in_channels == wan.INPAINT_IN_CHANNELS
    assert wan.load_vae("toy").config.z_dim == wan.LATENT_CHANNELS
    embedding, source = wan.resolve_prompt_embedding("toy", transformer.config.text_dim)
    assert embedding.shape == (1, wan.TEXT_MAX_LEN, transformer.config.text_dim) and "umT5" in source
    assert wan.smoke_test("toy") == toy_models.SMOKE_TEST
    assert wan.smoke_test(wan.model_folder("toy")) == toy_models.SMOKE_TEST  # the folder says it too
    plain = Path(toy_models.save_toy_wan(tmp_path / "plain", text_encoder=False))  # a folder of one's own
    assert wan.smoke_test(plain) is None and wan.smoke_test(None) is None


@pytest.mark.parametrize("backend", [DepthBackendName.DEPTH_ANYTHING_V2, DepthBackendName.DEPTHCRAFTER])
def test_depth_weights_toy_runs_each_model_backend(backend):
    cfg = DepthConfig(backend=backend, weights="toy", input_size=56, max_resolution=128, window=8, overlap=2, steps=1)
    assert cfg.smoke_test == toy_models.SMOKE_TEST
    frames = np.random.default_rng(0).integers(0, 255, (5, 48, 64, 3), dtype=np.uint8)
    disparity = load_backend(cfg)(frames)
    assert disparity.shape == (5, 48, 64) and disparity.dtype == np.float32 and np.isfinite(disparity).all()
    assert DepthConfig(backend=DepthBackendName.ORACLE, weights="toy").smoke_test is None  # no model runs
