"""`dreamstereo process` on real files: samples, verdicts, and every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import threading

import numpy as np
import pytest

from dreamstereo.cli import main
from dreamstereo.io.sample import read_sample_files
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
    if kind == "fifo":  # a reader would wait for a writer forever
        os.mkfifo(tmp_path / "pipe.mp4")
        return str(tmp_path / "pipe.mp4"), None
    if kind == "too_large":  # over decode.max_input_mb (set to 0.01 below)
        return write_video(tmp_path / "large.mp4", np.random.default_rng(2).integers(0, 255, (20, 64, 96, 3), np.uint8)), None
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
              "directory", "device", "fifo", "too_large"]
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
    extra = ["decode.max_input_mb=0.01"] if kind == "too_large" else []
    code, stdout, err = _run(capsys, "process", video, "--out", str(out), "--depth", "oracle", *SMALL,
                             "decode.buckets=[[64,96]]", *extra)
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


def _hostile_sidecar(kind: str, path: str, frames: int, h: int, w: int) -> None:
    """Write a damaged, odd or oversized sidecar, as a corpus has them."""
    good = np.tile(np.linspace(1.0, 3.0, w, dtype=np.float32), (frames, h, 1))
    buffer = io.BytesIO()
    np.savez(buffer, disparity=good)
    if kind == "truncated":  # a partial upload
        open(path, "wb").write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif kind == "npy_bytes":  # an .npy saved under the .npz name: a plain array, read as such
        np.save(open(path, "wb"), good)
    elif kind == "structured":
        np.savez(path, disparity=np.zeros((frames, h, w), [("d", "f4"), ("c", "f4")]))
    elif kind == "random_bytes":
        open(path, "wb").write(np.random.default_rng(3).bytes(5000))
    elif kind == "bomb":  # 75 MiB of zeros declared in a small file, and not this video's frame count
        np.savez_compressed(path, disparity=np.zeros((frames * 10, h * 4, w * 4), np.float32))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind, status, reason", [
    ("truncated", "failed", "depth_unreadable"), ("structured", "failed", "depth_unreadable"),
    ("random_bytes", "failed", "depth_unreadable"), ("bomb", "failed", "depth_mismatch"),
    ("fifo", "failed", "not_a_file"), ("npy_bytes", None, None),
])
def test_a_hostile_sidecar_is_a_sample_failure_with_its_reason(capsys, tmp_path, kind, status, reason):
    video = write_video(tmp_path / "clip.mp4", moving_pattern(20, 64, 96))
    _hostile_sidecar(kind, str(tmp_path / "clip.disparity.npz"), 20, 64, 96)
    out = tmp_path / "out"
    result = {}
    worker = threading.Thread(target=lambda: result.update(run=_run(capsys, "process", video, "--out", str(out),
                                                                     "--depth", "oracle", *SMALL)), daemon=True)
    worker.start()
    worker.join(timeout=60)  # a FIFO sidecar must not block the reader
    assert not worker.is_alive(), "process hung on the sidecar"
    code, stdout, err = result["run"]
    assert code == 0 and "Traceback" not in err, err
    clips = json.loads((out / "manifest.json").read_text())["clips"]
    if status is None:  # read as the plain array it is
        assert all(c["status"] in ("kept", "rejected") for c in clips)
    else:
        assert {(c["status"], c["reason"]) for c in clips} == {(status, reason)}
        assert f"{clips[0]['key']}: {status} ({reason})" in stdout


def test_a_decoder_crash_is_one_error_line(tmp_path):
    """The hostile video kills the clip decoder with SIGSEGV: `process` (a real CLI process, so a crash
    would show as its exit status) exits 2 with one line naming the file and decode_crashed."""
    import os
    import shutil
    import subprocess
    import sys

    source = SHARED_DATA / "hostile" / "dolphins_mutated_segv.mp4"
    if not source.is_file():
        pytest.skip(f"hostile video not found at {source} (set DREAMSTEREO_SHARED_DATA)")
    video = tmp_path / "crasher.mp4"
    shutil.copy(source, video)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONFAULTHANDLER", None)
    proc = subprocess.run([sys.executable, "-m", "dreamstereo.cli", "process", str(video), "--out", str(out),
                           "--depth", "oracle"], capture_output=True, text=True, timeout=120, env=env)
    ours = [line for line in proc.stderr.splitlines() if "dreamstereo" in line]  # FFmpeg's own notes aside
    assert proc.returncode == 2, proc.stderr
    assert ours == [f"dreamstereo process: error: {str(video)!r}: decode_crashed: decoder killed by SIGSEGV "
                    f"(2 attempts)"]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_sidecar_of_the_decodable_frames_is_accepted(capsys, tmp_path):
    """The container lists 21 frames, 20 decode; the oracle sidecar has 20 maps: no depth_mismatch."""
    from tests.videos import write_video_with_phantom_frame

    video = write_video_with_phantom_frame(tmp_path / "phantom.mp4", moving_pattern(20, 64, 96))
    _sidecar_for(video, 20, 64, 96)
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "process", video, "--out", str(out), "--depth", "oracle", "decode.clip_frames=9",
                             "decode.buckets=[[64,96]]", "decode.min_short_side=32")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["probe"]["frames"] == 20 and len(manifest["clips"]) == 2
    assert manifest["clips"] and all(c["status"] in ("kept", "rejected") for c in manifest["clips"]), manifest


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
