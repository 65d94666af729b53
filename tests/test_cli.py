"""The command line, end to end on real files: pbdp on images and videos, warp-eval, demo, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dreamstereo.cli import main
from dreamstereo.io import media
from dreamstereo.scenes import demo_scene, step_scene, write_scene
from dreamstereo.stages.warp import double_project


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def image_pair(tmp_path):
    scene = step_scene(width=48, height=20)
    media.write_image(tmp_path / "left.png", scene.frames_uint8()[0])
    np.save(tmp_path / "disp.npy", scene.disparity[0])
    return scene, tmp_path / "left.png", tmp_path / "disp.npy"


def test_pbdp_on_an_image_writes_views_masks_preview_manifest(capsys, tmp_path, image_pair):
    scene, left, disp = image_pair
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "pbdp", str(left), "--disparity", str(disp), "--direction", "left",
                           "--out", str(out))
    assert code == 0 and "mask1" in stdout
    names = {p.name for p in out.iterdir()}
    assert names == {"view2.png", "mask2.png", "view1.png", "mask1.png", "preview.png", "disparity2.npy",
                     "manifest.json", "config.yaml"}
    frames = torch.from_numpy(media.read_image(left)).permute(2, 0, 1)[None]
    expected = double_project(frames, torch.from_numpy(scene.disparity), "left")
    assert np.array_equal(cv2.imread(str(out / "mask1.png"), 0) > 127, expected.mask1[0].numpy())
    assert np.array_equal(cv2.imread(str(out / "mask2.png"), 0) > 127, expected.mask2[0].numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["direction"] == "left" and manifest["frames"] == 1
    assert set(manifest["outputs"].values()) <= names
    assert "direction: left" in (out / "config.yaml").read_text()
    sheet = cv2.imread(str(out / "preview.png"))
    assert sheet.shape[0] > 2 * 20 and sheet.shape[1] > 2 * 48


@pytest.mark.parametrize("video_output", ["lossless", "png"])
def test_pbdp_on_a_video_with_sidecar(capsys, tmp_path, video_output):
    scene = demo_scene(width=64, height=48, num_frames=5)
    video, sidecar = write_scene(scene, tmp_path / "clip.mp4", fps=10)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, "pbdp", video, "--disparity", sidecar, "--out", str(out),
                      f"video_output={video_output}", "warp.delta=1.5", "chunk_frames=2")  # 3 chunks
    assert code == 0
    frames, _ = media.read_video(video)
    frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    expected = double_project(frames_t, torch.from_numpy(scene.disparity), "right", delta=1.5)
    if video_output == "lossless":
        mask1 = media.read_video(out / "mask1.mkv")[0][..., 0] > 127
        view2 = media.read_video(out / "view2.mkv")[0]
    else:
        mask1 = np.stack([cv2.imread(str(p), 0) > 127 for p in sorted((out / "mask1").glob("*.png"))])
        view2 = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                          for p in sorted((out / "view2").glob("*.png"))])
    assert np.array_equal(mask1, expected.mask1.numpy())
    assert np.array_equal(view2, media.to_uint8(expected.view2.permute(0, 2, 3, 1).numpy()))
    assert np.array_equal(np.load(out / "disparity2.npy"), expected.disparity2.numpy())
    assert "delta: 1.5" in (out / "config.yaml").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frames"] == 5
    assert manifest["mask1_ratio"] == pytest.approx(float(expected.mask1.float().mean()))


def test_pbdp_reads_scaled_png_disparity(capsys, tmp_path, image_pair):
    scene, left, _ = image_pair
    cv2.imwrite(str(tmp_path / "disp1.png"), (scene.disparity[0] * 2).astype(np.uint8))  # Middlebury style
    code, _, _ = _run(capsys, "pbdp", str(left), "--disparity", str(tmp_path / "disp1.png"),
                      "--config", "configs/pbdp/middlebury.yaml", "--out", str(tmp_path / "o"))
    assert code == 0
    mask2 = cv2.imread(str(tmp_path / "o" / "mask2.png"), 0) > 127
    assert np.array_equal(mask2, scene.holes[next(iter(scene.holes))][0])  # right = first direction


@pytest.mark.parametrize("case", ["missing_input", "garbage_video", "shape_mismatch", "bad_override",
                                  "nan_disparity", "truncated_video", "truncated_npz", "structured_npz",
                                  "npz_bomb", "fifo_disparity"])
def test_pbdp_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, image_pair, case):
    _, left, disp = image_pair
    args = [str(left), "--disparity", str(disp)]
    if case == "missing_input":
        args[0] = str(tmp_path / "nope.png")
    elif case == "garbage_video":
        (tmp_path / "junk.mp4").write_bytes(b"\x01\x02" * 500)
        args[0] = str(tmp_path / "junk.mp4")
    elif case == "shape_mismatch":
        np.save(tmp_path / "small.npy", np.zeros((10, 10), np.float32))
        args[2] = str(tmp_path / "small.npy")
    elif case == "bad_override":
        args.append("warp.delta=zero")
    elif case == "truncated_video":  # decodes some frames, then fails: no output may be left behind
        scene = demo_scene(width=48, height=20, num_frames=40)
        video, sidecar = write_scene(scene, tmp_path / "long.mp4")
        data = (tmp_path / "long.mp4").read_bytes()
        (tmp_path / "long.mp4").write_bytes(data[: len(data) * 2 // 3])
        args = [video, "--disparity", sidecar, "chunk_frames=4"]
    elif case == "nan_disparity":
        np.save(tmp_path / "nan.npy", np.full((20, 48), np.nan, np.float32))
        args[2] = str(tmp_path / "nan.npy")
    elif case == "truncated_npz":  # a partial upload
        np.savez(tmp_path / "d.npz", disparity=np.load(disp))
        data = (tmp_path / "d.npz").read_bytes()
        (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
        args[2] = str(tmp_path / "d.npz")
    elif case == "structured_npz":
        np.savez(tmp_path / "d.npz", disparity=np.zeros((20, 48), [("a", "f4"), ("b", "i4")]))
        args[2] = str(tmp_path / "d.npz")
    elif case == "npz_bomb":  # 160 MiB of zeros in 160 KB; refused from its header, never inflated
        np.savez_compressed(tmp_path / "d.npz", disparity=np.zeros((40, 1024, 1024), np.float32))
        args[2] = str(tmp_path / "d.npz")
    elif case == "fifo_disparity":
        os.mkfifo(tmp_path / "d.npz")
        args[2] = str(tmp_path / "d.npz")
    out = tmp_path / "out"
    code, _, err = _run(capsys, "pbdp", *args, "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamstereo pbdp: error:")
    assert case not in ("truncated_npz", "structured_npz", "npz_bomb", "fifo_disparity") or "d.npz" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def _write_middlebury_like_pair(folder, *, w=64, h=12, d_back=4, d_front=12, x0=21, x1=41):
    """A two-layer pair built by hand: the front layer covers left-view columns x0..x1-1."""
    rng = np.random.default_rng(5)
    tex_back, tex_front = rng.random((h, w + 40, 3)), rng.random((h, w + 40, 3))
    disp1 = np.where((np.arange(w) >= x0) & (np.arange(w) < x1), d_front, d_back)[None].repeat(h, 0)
    left = np.where((disp1 == d_front)[..., None], tex_front[:, :w], tex_back[:, :w])
    right, disp5 = np.zeros_like(left), np.zeros((h, w))
    for j in range(w):  # right view column j sees left column j + d of the nearest layer there
        if x0 <= j + d_front < x1:
            right[:, j], disp5[:, j] = tex_front[:, j + d_front], d_front
        else:
            right[:, j], disp5[:, j] = tex_back[:, j + d_back], d_back if j + d_back < w else 0
    folder.mkdir(parents=True)
    media.write_image(folder / "view1.png", left)
    media.write_image(folder / "view5.png", right)
    cv2.imwrite(str(folder / "disp1.png"), (disp1 * 2).astype(np.uint8))
    cv2.imwrite(str(folder / "disp5.png"), (disp5 * 2).astype(np.uint8))


def test_warp_eval_prints_table_and_writes_json(capsys, tmp_path):
    _write_middlebury_like_pair(tmp_path / "pairs" / "Step")
    report = tmp_path / "report.json"
    code, stdout, _ = _run(capsys, "warp-eval", str(tmp_path / "pairs"), "--json", str(report))
    assert code == 0
    for method in ("gapw", "soft_splat", "zbuffer_splat"):
        assert f"Step       {method}" in stdout
    rows = {r["method"]: r for r in json.loads(report.read_text())["rows"]}
    assert set(rows) == {"gapw", "soft_splat", "zbuffer_splat"}
    # The occluded band left of the front layer (x0 - 8 .. x0 - 1) and the left border are found exactly.
    assert rows["gapw"]["recall"] == 1.0 and rows["gapw"]["precision"] == 1.0
    assert rows["gapw"]["fly_points"] == 0


def test_warp_eval_missing_folder_exits_2(capsys, tmp_path):
    code, _, err = _run(capsys, "warp-eval", str(tmp_path / "none"), "--json", str(tmp_path / "r.json"))
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_demo_only_data_runs_the_data_side_end_to_end(capsys, tmp_path, ray_session):
    out = tmp_path / "demo"
    code, stdout, _ = _run(capsys, "demo", "--out", str(out), "--only", "data", "num_videos=2", "width=160",
                           "height=96")
    assert code == 0, stdout
    result = json.loads((out / "manifest.json").read_text())
    assert result["direction"] == "left" and result["mask1_iou_vs_analytic"] >= 0.9
    summary = result["generate"]
    assert summary["inputs"] == 4 and summary["samples"] == 2 and summary["failed"] == 1
    assert summary["reasons"] == {"failed:decode_failed": 1, "rejected:static": 1} and summary["previews"] == 1
    assert (out / "pbdp" / "preview.png").is_file() and (out / "config.yaml").is_file()
    assert (out / "pairs" / "manifest.json").is_file() and (out / "pairs" / "_run_config.yaml").is_file()
    assert summary["samples"] == 0 or (out / "sample-preview.png").is_file()
    frames, _ = media.read_video(out / "stereo.mp4")  # the first scene converted, side by side
    assert frames.shape[1:] == (96, 320, 3) and (out / "stereo.preview.png").is_file()
    assert result["convert"]["inpainting"] == "opencv-telea"
    assert not (out / "train").exists() and not (out / "raw").exists() and "smoke_test" not in result
    listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("  /")]
    assert listed[0] == str(out / "report" / "index.html") and str(out / "stereo.mp4") in listed
    assert all(Path(path).exists() for path in listed)


@pytest.mark.slow
def test_demo_runs_the_whole_mission_on_the_toy_models(capsys, tmp_path, ray_session):
    """scenes -> generate raw and pairs -> Stage 1 -> Stage 2 -> export -> convert through the model (SASI)
    -> evaluate on the held-out shard -> report; every output the toy model touched says it is random."""
    out = tmp_path / "demo"
    code, stdout, _ = _run(capsys, "demo", "--out", str(out), "num_videos=2", "width=160", "height=96",
                           "train_steps=3")
    assert code == 0, stdout
    result = json.loads((out / "manifest.json").read_text())
    note = result["smoke_test"]
    assert "random" in note and "smoke test" in note
    assert result["raw"]["inputs"] == 4 and result["raw"]["samples"] == 2  # the still clip is rejected there too
    stage1, stage2 = result["train"]["stage1"], result["train"]["stage2"]
    assert stage1["steps"] == stage2["steps"] == 3
    meta2 = json.loads((Path(stage2["checkpoint"]) / "meta.json").read_text())
    assert meta2["base"] == "toy" and meta2["smoke_test"] == note
    config2 = (out / "train" / "stage2" / "config.yaml").read_text()
    assert config2.startswith(f"# {note}") and "init_from: " + stage1["checkpoint"] in config2
    assert "stage: pairs" in config2 and "holdout_shards: 1" in config2
    info = json.loads((out / "model" / "dreamstereo_model.json").read_text())
    assert info["checkpoint"] == stage2["checkpoint"] and info["smoke_test"] == note
    record = json.loads((out / "stereo.mp4.json").read_text())
    assert record["inpainting"].startswith("model (SASI k=")  # the sparse-token path, not OpenCV or dense
    assert "inpainting: " + note in record["smoke_test"]
    assert media.read_video(out / "stereo.mp4")[0].shape[1:] == (96, 320, 3)
    report = json.loads((out / "eval" / "eval.json").read_text())
    pairs = json.loads((out / "pairs" / "manifest.json").read_text())
    assert report["shards"] == str(out / "pairs" / pairs["shards"][-1]["path"])  # the shard Stage 2 held out
    assert report["samples"] == pairs["shards"][-1]["num_samples"] == 1 and report["smoke_test"] == note
    assert {row["method"] for row in report["table"]} == {"sparse", "dense", "opencv"}
    assert (out / "eval" / "eval.md").read_text().startswith("SMOKE TEST")
    listed = [line.split()[0] for line in stdout.splitlines() if line.startswith("  /")]
    assert str(out / "eval" / "eval.md") in listed and all(Path(path).exists() for path in listed)
    assert listed[0] == str(out / "report" / "index.html")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "dreamstereo"  # the entry point pip installed next to python
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("dreamstereo ")


@pytest.mark.parametrize("command", ["pbdp", "demo", "warp-eval"])
def test_unusable_output_paths_exit_2_before_any_work(capsys, tmp_path, image_pair, command):
    _, left, disp = image_pair
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    if command == "pbdp":
        argv = ["pbdp", str(left), "--disparity", str(disp), "--out", str(a_file / "sub")]
    elif command == "demo":
        argv = ["demo", "--out", str(a_file)]
    else:
        _write_middlebury_like_pair(tmp_path / "pairs" / "Step")
        argv = ["warp-eval", str(tmp_path / "pairs"), "--json", str(tmp_path)]
    code, stdout, err = _run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stdout == ""  # nothing was computed or printed first
    assert a_file.read_text() == "x"


def test_pbdp_takes_a_disparity_of_the_frames_that_decode(capsys, tmp_path):
    """The container lists 13 frames and 12 decode: a 12-map disparity fits, a 13-map one does not."""
    from tests.videos import moving_pattern, write_video_with_phantom_frame

    video = write_video_with_phantom_frame(tmp_path / "phantom.mp4", moving_pattern(12, 32, 48))
    np.save(tmp_path / "d12.npy", np.full((12, 32, 48), 2.0, np.float32))
    np.save(tmp_path / "d13.npy", np.full((13, 32, 48), 2.0, np.float32))
    code, _, err = _run(capsys, "pbdp", video, "--disparity", str(tmp_path / "d12.npy"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["frames"] == 12
    code, _, err = _run(capsys, "pbdp", video, "--disparity", str(tmp_path / "d13.npy"), "--out", str(tmp_path / "p"))
    assert code == 2 and "(13, 32, 48)" in err and "(12, 32, 48)" in err


@pytest.mark.parametrize("video_output", ["png", "lossless"])
def test_pbdp_on_a_full_disk_exits_2_naming_the_file_and_keeps_what_was_there(tmp_path, tiny_disk, video_output):
    # Old code wrote disparity2.npy through a memory map and died of SIGBUS on a full disk, leaving hidden
    # temp files (so the command runs in a child process here).
    video, sidecar = write_scene(demo_scene(width=96, height=64, num_frames=16), tmp_path / "clip.mp4", fps=10)
    out = tiny_disk.path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("from an earlier run")
    command = [sys.executable, "-m", "dreamstereo.cli", "-q", "pbdp", str(video), "--disparity", str(sidecar),
               "--out", str(out), f"video_output={video_output}"]
    tiny_disk.fill(leave=64 * 1024)  # disparity2.npy alone is 16 x 64 x 96 x 4 = 393 KB
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"dreamstereo pbdp: error: cannot write '{out}/"), lines[0]
    assert lines[0].endswith("No space left on device [ENOSPC]") and ".tmp-" not in lines[0]
    assert tiny_disk.files() == ["out", "out/manifest.json"]  # no temp files, nothing half-written
    assert (out / "manifest.json").read_text() == "from an earlier run"
    tiny_disk.free()  # with room, the same command writes everything
    assert subprocess.run(command, capture_output=True, text=True, timeout=300).returncode == 0
    assert json.loads((out / "manifest.json").read_text())["frames"] == 16
    assert not [name for name in tiny_disk.files() if "/." in name]


def test_warp_eval_report_on_a_full_disk_exits_2_naming_it(capsys, tmp_path, tiny_disk):
    _write_middlebury_like_pair(tmp_path / "pairs" / "Step")
    report = tiny_disk.path / "report.json"
    tiny_disk.fill(leave=0)
    code, _, err = _run(capsys, "warp-eval", str(tmp_path / "pairs"), "--json", str(report))
    assert code == 2 and err == f"dreamstereo warp-eval: error: cannot write {str(report)!r}: " \
                                "No space left on device [ENOSPC]\n"
    assert tiny_disk.files() == []


@pytest.mark.parametrize("raised,exit_code", [
    (ValueError("a bug: an index went wrong"), None),  # not ours to blame on the input: the traceback stays
    (KeyError("also a bug"), None),
    (media.MediaError("'v.mp4': has no video stream"), 2),  # a UserError: one line, exit 2
    (OSError(28, "No space left on device"), 2),
])
def test_only_user_errors_become_one_line_and_exit_2(raised, exit_code, tmp_path, capsys, monkeypatch):
    """One mapping (cli.main, USER_ERRORS): a UserError or OSError is the user's to fix; anything else is a
    bug and must keep its traceback (before, `generate` and `evaluate` caught every ValueError)."""
    import dreamstereo.pipeline.job as job

    def run_generate(*_, **__):
        raise raised

    monkeypatch.setattr(job, "run_generate", run_generate)
    argv = ["generate", "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    if exit_code is None:
        with pytest.raises(type(raised)):
            main(argv)
    else:
        assert main(argv) == exit_code
        assert capsys.readouterr().err.strip().splitlines() == [f"dreamstereo generate: error: {raised}"]
