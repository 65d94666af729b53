"""`dreamstereo process` on real files: samples, verdicts, and every kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreamstereo.cli import main
from dreamstereo.sample import read_sample_files
from dreamstereo.scenes import demo_scene, write_scene
from tests.conftest import REPO, SHARED_DATA
from tests.videos import moving_pattern, write_audio_only, write_video

SMALL = ["--config", str(REPO / "configs" / "process" / "small.yaml"), "decode.buckets=[[64,96]]", "decode.min_short_side=32",
         "decode.clip_frames=9"]


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _sidecar_for(video: str, frames: int, h: int, w: int):
    ramp = np.tile(np.linspace(1.0, 3.0, w, dtype=np.float32), (frames, h, 1))
    np.savez(video.rsplit(".", 1)[0] + ".disparity.npz", disparity=ramp)


def test_oracle_on_a_synthetic_scene(capsys, tmp_path):
    video, _ = write_scene(demo_scene(width=192, height=128, num_frames=30), tmp_path / "scene one.mp4", fps=24)
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "process", video, "--out", str(out), "--depth", "oracle", *SMALL)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [c for c in manifest["clips"] if c["status"] == "kept"]
    assert kept and all(f"{c['key']}: kept" in stdout for c in kept)
    sample = read_sample_files(out, kept[0]["key"])
    assert sample.clean.shape == (9, 64, 96, 3) and sample.mask.shape == (9, 64, 96)
    assert sample.meta["direction"] == "left" and sample.meta["depth_backend"] == "oracle"
    assert 0.02 * 96 <= sample.meta["max_disparity_px"] <= 0.08 * 96
    assert (out / "preview.png").is_file() and "backend: oracle" in (out / "config.yaml").read_text()
    # Reruns are identical: same keys, same baseline, same mask.
    code, _, _ = _run(capsys, "process", video, "--out", str(tmp_path / "again"), "--depth", "oracle", *SMALL)
    again = read_sample_files(tmp_path / "again", kept[0]["key"])
    assert np.array_equal(again.mask, sample.mask) and again.meta["max_disparity"] == sample.meta["max_disparity"]


def test_keys_do_not_depend_on_how_the_path_is_spelled(capsys, tmp_path, monkeypatch):
    video, _ = write_scene(demo_scene(width=192, height=128, num_frames=12), tmp_path / "v.mp4", fps=24)
    monkeypatch.chdir(tmp_path)
    _run(capsys, "process", "v.mp4", "--out", "a", "--depth", "oracle", *SMALL)
    _run(capsys, "process", str(tmp_path / "." / "v.mp4"), "--out", "b", "--depth", "oracle", *SMALL)
    keys_a = [c["key"] for c in json.loads((tmp_path / "a" / "manifest.json").read_text())["clips"]]
    keys_b = [c["key"] for c in json.loads((tmp_path / "b" / "manifest.json").read_text())["clips"]]
    assert keys_a == keys_b and keys_a


def test_tiny_depth_anything_v2(capsys, tmp_path, tiny_dav2):
    video = write_video(tmp_path / "clip.mp4", moving_pattern(20, 64, 96))
    code, stdout, _ = _run(capsys, "process", video, "--out", str(tmp_path / "o"), "--depth", "depth-anything-v2",
                           f"depth.weights={tiny_dav2}", "depth.input_size=56", *SMALL)
    assert code == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["clips"] and all(c["status"] in ("kept", "rejected") for c in manifest["clips"])
    assert manifest["depth_weights"] == tiny_dav2


def test_tiny_depthcrafter(capsys, tmp_path, tiny_depthcrafter):
    unet, base = tiny_depthcrafter
    video = write_video(tmp_path / "clip.mp4", moving_pattern(20, 64, 96))
    code, _, err = _run(capsys, "process", video, "--out", str(tmp_path / "o"), "--depth", "depthcrafter",
                        f"depth.weights={unet}", f"depth.base_weights={base}", "depth.steps=2",
                        "depth.max_resolution=64", *SMALL)
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["depth_backend"] == "depthcrafter" and manifest["depth_weights"] == unet
    assert manifest["clips"] and all(c["status"] in ("kept", "rejected") for c in manifest["clips"])


def _bad_input(kind: str, tmp_path):
    """Build one bad input; returns (video path, sidecar frames or None)."""
    if kind == "missing":
        return str(tmp_path / "nope.mp4"), None
    if kind == "empty":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return str(tmp_path / "empty.mp4"), None
    if kind == "random":
        (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
        return str(tmp_path / "random.mp4"), None
    if kind == "text":
        (tmp_path / "notes.mp4").write_text("this is a text file\n" * 50)
        return str(tmp_path / "notes.mp4"), None
    if kind == "directory":
        (tmp_path / "folder.mp4").mkdir()
        return str(tmp_path / "folder.mp4"), None
    if kind == "device":
        return "/dev/zero", None
    if kind == "sidecar_nan":
        return write_video(tmp_path / "nan.mp4", moving_pattern(20, 64, 96)), 20
    if kind == "audio_only":
        return write_audio_only(tmp_path / "audio.mp4"), None
    if kind in ("truncated_index_at_end", "truncated_faststart", "header_only"):
        faststart = kind != "truncated_index_at_end"
        path = write_video(tmp_path / f"{kind}.mp4", moving_pattern(30, 64, 96), faststart=faststart)
        data = open(path, "rb").read()
        cut = data.find(b"mdat") + 8 if kind == "header_only" else len(data) // 2
        open(path, "wb").write(data[:cut])
        return path, 30
    if kind == "single_frame":
        return write_video(tmp_path / "one.mp4", moving_pattern(1, 64, 96)), 1
    if kind == "tiny_16x16":
        return write_video(tmp_path / "tiny.mp4", moving_pattern(20, 16, 16)), 20
    if kind == "portrait_rotated":
        return write_video(tmp_path / "portrait.mp4", moving_pattern(20, 64, 96), rotation=90), 20
    if kind == "variable_frame_rate":
        times = np.cumsum(np.r_[0, np.where(np.arange(29) % 2, 0.02, 0.06)]).tolist()
        return write_video(tmp_path / "vfr.mp4", moving_pattern(30, 64, 96), fps=25, timestamps=times), 30
    if kind == "av1":
        try:
            return write_video(tmp_path / "av1.mp4", moving_pattern(20, 64, 96), codec="libsvtav1"), 20
        except Exception as exc:
            pytest.skip(f"PyAV cannot write AV1 here: {exc}")
    if kind == "grayscale":
        gray = moving_pattern(20, 64, 96)[..., :1].repeat(3, axis=3)
        return write_video(tmp_path / "gray.mp4", gray, codec="libx264", pix_fmt="gray"), 20
    if kind == "odd_name":
        return write_video(tmp_path / "a clip – été 視頻.mp4", moving_pattern(20, 64, 96)), 20
    if kind == "sidecar_wrong_frames":
        return write_video(tmp_path / "wrong.mp4", moving_pattern(20, 64, 96)), 7
    raise AssertionError(kind)


UNREADABLE = ["missing", "empty", "random", "text", "audio_only", "truncated_index_at_end", "header_only",
              "directory", "device"]
READABLE = ["single_frame", "tiny_16x16", "portrait_rotated", "variable_frame_rate", "av1", "grayscale",
            "odd_name", "sidecar_wrong_frames", "truncated_faststart", "sidecar_nan"]


@pytest.mark.parametrize("kind", UNREADABLE + READABLE)
def test_bad_inputs_give_a_sample_a_verdict_or_one_error_line(capsys, tmp_path, kind):
    video, sidecar_frames = _bad_input(kind, tmp_path)
    if sidecar_frames is not None:
        rotated = kind == "portrait_rotated"
        _sidecar_for(video, sidecar_frames, 96 if rotated else 64, 64 if rotated else 96)
        if kind == "sidecar_nan":
            sidecar = video.rsplit(".", 1)[0] + ".disparity.npz"
            disparity = np.load(sidecar)["disparity"]
            disparity[:, 10, 10] = np.nan
            np.savez(sidecar, disparity=disparity)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "process", video, "--out", str(out), "--depth", "oracle", *SMALL,
                             "decode.buckets=[[64,96]]")
    assert "Traceback" not in err
    if kind in UNREADABLE:
        assert code == 2, (kind, stdout, err)
        line = err.strip().splitlines()
        assert len(line) == 1 and line[0].startswith("dreamstereo process: error:") and video.split("/")[-1] in line[0]
        assert "Traceback" not in err
        assert not out.exists()
        return
    assert code == 0, (kind, err)
    clips = json.loads((out / "manifest.json").read_text())["clips"]
    assert clips and all(f"{c['key']}: {c['status']}" in stdout for c in clips)
    statuses = {c["status"]: c["reason"] for c in clips}
    if kind == "single_frame":
        assert statuses == {"rejected": "too_short"}
    elif kind == "tiny_16x16":
        assert statuses == {"rejected": "too_small"}
    elif kind == "sidecar_wrong_frames":
        assert statuses == {"failed": "depth_mismatch"}
    elif kind == "sidecar_nan":
        assert statuses == {"rejected": "degenerate_depth"}
    else:
        assert set(statuses) <= {"kept", "rejected"}
        if kind == "portrait_rotated":
            assert (out / "manifest.json").read_text().count('"rotation": 90') == 1


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", ["davis_rollercoaster.mp4", "davis_dolphins.mp4", "01_dog.mp4"])
def test_shared_videos_with_an_oracle_sidecar_and_a_tiny_model(capsys, tmp_path, name, tiny_dav2):
    source = SHARED_DATA / "videos" / name
    if not source.is_file():
        pytest.skip(f"real videos not found at {source}")
    import shutil

    video = str(tmp_path / name)
    shutil.copy(source, video)
    from dreamstereo.stages.decode import probe_video

    probe = probe_video(open(video, "rb").read())
    frames = {"davis_rollercoaster.mp4": 70, "davis_dolphins.mp4": 59, "01_dog.mp4": 289}[name]
    _sidecar_for(video, frames, probe.height, probe.width)
    small = ["--config", "configs/process/small.yaml"]
    for depth, extra in (("oracle", []), ("depth-anything-v2", [f"depth.weights={tiny_dav2}", "depth.input_size=56"])):
        out = tmp_path / depth
        code, stdout, err = _run(capsys, "process", video, "--out", str(out), "--depth", depth, *small, *extra)
        assert code == 0, err
        clips = json.loads((out / "manifest.json").read_text())["clips"]
        assert clips and all(c["status"] in ("kept", "rejected") for c in clips), clips
        if depth == "oracle":
            assert any(c["status"] == "kept" for c in clips)


def test_a_full_disk_exits_2_naming_the_file_and_leaves_the_output_as_it_was(capsys, tmp_path, tiny_disk):
    video, _ = write_scene(demo_scene(width=192, height=128, num_frames=30), tmp_path / "scene.mp4", fps=24)
    out = tiny_disk.path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("from an earlier run")
    (out / "notes.txt").write_text("the user's")
    argv = ["process", video, "--out", str(out), "--depth", "oracle", *SMALL]
    tiny_disk.fill(leave=32 * 1024)  # less than one sample's members
    code, stdout, err = _run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dreamstereo process: error: cannot write '{out}/"), err
    assert lines[0].endswith("No space left on device [ENOSPC]") and ".staging" not in lines[0]
    assert tiny_disk.files() == ["out", "out/manifest.json", "out/notes.txt"]  # no members, no temp files
    assert (out / "manifest.json").read_text() == "from an earlier run"
    tiny_disk.free()  # with room, the same command completes
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    kept = [c for c in manifest["clips"] if c["status"] == "kept"]
    assert kept and read_sample_files(out, kept[0]["key"]).clean.shape == (9, 64, 96, 3)
    assert (out / "notes.txt").read_text() == "the user's" and not [n for n in tiny_disk.files() if "/." in n]
