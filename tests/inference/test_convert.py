"""`dreamstereo convert` end to end: geometry on a scene with a known answer, audio, layouts, bad input."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from dreamstereo.cli import main
from dreamstereo.io.media import read_video
from dreamstereo.scenes import step_scene, write_scene
from dreamstereo.types import Direction
from tests.conftest import SHARED_DATA

D_FRONT, WIDTH, HEIGHT, EDGE = 8, 96, 32, 47.5


@pytest.fixture(scope="module")
def step_video(tmp_path_factory):
    """Two planes: a near one (8 px) left of x = 47.5, the far one (0 px) right of it, 5 frames."""
    scene = step_scene(width=WIDTH, height=HEIGHT, d_back=0.0, d_front=float(D_FRONT), edge=EDGE, num_frames=5)
    video, _ = write_scene(scene, tmp_path_factory.mktemp("step") / "step.mp4", fps=24)
    return video, scene


def _run(capsys, *argv):
    code = main(["-q", *argv])
    return code, capsys.readouterr()


def test_sbs_geometry_matches_the_scene(step_video, tmp_path, capsys):
    video, scene = step_video
    out = tmp_path / "out.mp4"
    # max_disparity = 8 / 96 maps the near plane to 8 px and the far one to 0: the scene's own geometry.
    code, captured = _run(capsys, "convert", video, str(out), "--depth", "oracle", "--preview",
                          f"max_disparity={D_FRONT / WIDTH}", "feather_px=0")
    assert code == 0, captured.err
    frames, _ = read_video(out)
    source, _ = read_video(video)
    assert frames.shape == (5, HEIGHT, 2 * WIDTH, 3)  # sbs: twice as wide
    left, right = frames[..., :WIDTH, :].astype(int), frames[..., WIDTH:, :].astype(int)
    assert np.abs(left - source).mean() < 3  # the left eye is the input
    near = slice(4, int(EDGE) - D_FRONT - 4)  # right-view columns showing the near plane, away from edges
    shifted = np.abs(right[..., near, :] - left[..., near.start + D_FRONT:near.stop + D_FRONT, :]).mean()
    unshifted = np.abs(right[..., near, :] - left[..., near, :]).mean()
    assert shifted < 4 < unshifted  # the near plane moved left by exactly its disparity
    far = slice(int(EDGE) + 12, WIDTH - 4)
    assert np.abs(right[..., far, :] - left[..., far, :]).mean() < 4  # the far plane (0 px) did not move
    record = json.loads((tmp_path / "out.mp4.json").read_text())
    truth = scene.holes[Direction.RIGHT].mean()  # analytic disocclusion of the right view
    assert record["hole_ratio"] == pytest.approx(truth, abs=0.002) and truth > 0.05
    assert record["inpainting"] == "opencv-telea" and record["frames"] == 5 and not record["audio_copied"]
    assert (tmp_path / "out.preview.png").is_file()


@pytest.mark.parametrize("fmt, shape", [("half-sbs", (HEIGHT, WIDTH)), ("tb", (2 * HEIGHT, WIDTH)),
                                        ("half-tb", (HEIGHT, WIDTH)), ("anaglyph", (HEIGHT, WIDTH))])
def test_layouts(step_video, tmp_path, capsys, fmt, shape):
    code, captured = _run(capsys, "convert", step_video[0], str(tmp_path / "o.mp4"), "--depth", "oracle",
                          "--format", fmt, "frames=1")
    assert code == 0, captured.err
    assert read_video(tmp_path / "o.mp4")[0].shape == (1, *shape, 3)


def test_bad_inputs_end_with_one_line(step_video, tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    audio_only = tmp_path / "tone.m4a"
    with av.open(str(audio_only), "w") as container:  # a real file with an audio stream and no video
        stream = container.add_stream("aac", rate=16000)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    cases = [
        ([str(text), str(tmp_path / "a.mp4")], "cannot open video"),
        ([str(audio_only), str(tmp_path / "b.mp4")], "has no video stream"),
        ([str(tmp_path / "missing.mp4"), str(tmp_path / "c.mp4")], "no such file"),
        # the input is checked before a model is loaded (the 1.3B model takes a minute to load)
        ([str(tmp_path / "missing.mp4"), str(tmp_path / "c.mp4"), "--checkpoint", str(tmp_path / "no-model")],
         "no such file"),
        ([step_video[0], str(tmp_path / "d.mp4"), "--format", "cross-eyed"], "invalid choice"),
        ([step_video[0], str(tmp_path / "e.avi")], "must be an .mp4"),
        ([step_video[0], str(tmp_path / "f.mp4"), "--depth", "oracle", "max_disparity=2"], "max_disparity"),
    ]
    for argv, message in cases:
        code, captured = _run(capsys, "convert", *argv)
        assert code == 2 and message in captured.err, (argv, captured.err)
        assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert not list(tmp_path.glob("*.mp4.json")) and not (tmp_path / "a.mp4").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_real_video_keeps_its_audio(tiny_dav2, toy_wan_model, tmp_path, capsys):
    video = SHARED_DATA / "videos" / "01_dog.mp4"
    if not video.is_file():
        pytest.skip(f"real videos not found at {video.parent} (set DREAMSTEREO_SHARED_DATA)")
    out = tmp_path / "dog-sbs.mp4"
    code, captured = _run(capsys, "convert", str(video), str(out), "--depth", "depth-anything-v2",
                          f"depth.weights={tiny_dav2}", "--checkpoint", toy_wan_model, "frames=5", "window=5")
    assert code == 0, captured.err
    with av.open(str(out)) as container:
        v, a = container.streams.video[0], container.streams.audio[0]
        assert (v.codec_context.width, v.codec_context.height) == (2 * 1280, 720) and v.frames == 5
        assert a.codec_context.name == "aac" and a.frames > 0
        audio_seconds = float(a.duration * a.time_base)
    assert audio_seconds == pytest.approx(5 / 29.97, abs=0.1)  # the audio is cut to the converted frames
    record = json.loads((tmp_path / "dog-sbs.mp4.json").read_text())
    assert record["audio_copied"] is True and record["inpainting"].startswith("model (SASI")


@pytest.mark.parametrize("damage", ["truncated", "structured", "fifo"])
def test_a_hostile_oracle_sidecar_ends_with_one_line_naming_it(step_video, tmp_path, capsys, damage):
    import os
    import shutil

    video = tmp_path / "clip.mp4"
    shutil.copy(step_video[0], video)
    sidecar = tmp_path / "clip.disparity.npz"
    if damage == "truncated":  # a partial upload
        sidecar.write_bytes(open(step_video[0].replace(".mp4", ".disparity.npz"), "rb").read()[:500])
    elif damage == "structured":
        np.savez(sidecar, disparity=np.zeros((3, 4, 5), [("d", "f4"), ("c", "f4")]))
    else:
        os.mkfifo(sidecar)
    code, captured = _run(capsys, "convert", str(video), str(tmp_path / "out.mp4"), "--depth", "oracle")
    assert code == 2 and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "clip.disparity.npz" in captured.err, captured.err
    assert not (tmp_path / "out.mp4").exists()
