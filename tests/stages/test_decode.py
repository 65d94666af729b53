"""Decode stage on real files written by PyAV: probe, clip planning, buckets, rotation, bad bytes."""

from __future__ import annotations

import numpy as np
import pytest

from dreamstereo.stages.decode import (
    DecodeConfig,
    choose_bucket,
    decode_clips,
    plan_clips,
    probe_video,
    resize_center_crop,
)
from dreamstereo.stages.depth import oracle_for_clips
from dreamstereo.types import ErrorCode, SampleError
from tests.videos import moving_pattern, write_audio_only, write_video, write_video_with_phantom_frame

SMALL = DecodeConfig(clip_frames=5, max_clips=3, buckets=[[48, 64]], min_short_side=16)


def _bytes(path) -> bytes:
    return open(path, "rb").read()


def test_probe_reports_frames_fps_size_codec(tmp_path):
    path = write_video(tmp_path / "a.mp4", moving_pattern(12, 48, 80), fps=24)
    probe = probe_video(_bytes(path))
    assert (probe.frames, probe.width, probe.height, probe.rotation, probe.codec) == (12, 80, 48, 0, "h264")
    assert probe.fps == pytest.approx(24)


def test_plan_clips_by_time():
    timestamps = np.arange(30) / 24.0
    clips, fps = plan_clips(timestamps, 24.0, DecodeConfig(clip_frames=5, target_fps=12, max_clips=3))
    assert fps == 12 and clips == [[0, 2, 4, 6, 8], [10, 12, 14, 16, 18], [20, 22, 24, 26, 28]]
    # Fewer clips than fit: they are spread over the video (first and last), not bunched at the start.
    clips, _ = plan_clips(timestamps, 24.0, DecodeConfig(clip_frames=5, target_fps=12, max_clips=2))
    assert clips == [[0, 2, 4, 6, 8], [20, 22, 24, 26, 28]]
    clips, _ = plan_clips(timestamps, 24.0, DecodeConfig(clip_frames=5, clip_stride=2, max_clips=30))
    assert clips[:3] == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6], [4, 5, 6, 7, 8]] and len(clips) == 13
    # A target above the source rate keeps the source rate (no duplicated frames).
    clips, fps = plan_clips(timestamps, 24.0, DecodeConfig(clip_frames=30, target_fps=60))
    assert fps == 24 and clips == [list(range(30))]


def test_plan_clips_variable_frame_rate_picks_nearest_frames():
    timestamps = np.array([0.0, 0.05, 0.30, 0.32, 0.55, 0.75, 1.0])  # irregular
    clips, _ = plan_clips(timestamps, 7.0, DecodeConfig(clip_frames=5, target_fps=4))
    assert clips == [[0, 2, 4, 5, 6]]  # nearest to 0, .25, .5, .75, 1.0


def test_too_short_is_a_sample_error():
    with pytest.raises(SampleError) as info:
        plan_clips(np.arange(4) / 24.0, 24.0, DecodeConfig(clip_frames=49))
    assert info.value.code is ErrorCode.TOO_SHORT and "a clip needs 49" in str(info.value)


def test_buckets_follow_source_orientation_and_never_upscale_when_one_fits():
    cfg = DecodeConfig()
    assert choose_bucket(1920, 1080, cfg) == (768, 1280)
    assert choose_bucket(960, 540, cfg) == (480, 832)
    assert choose_bucket(1080, 1920, cfg) == (1280, 768)  # portrait
    assert choose_bucket(400, 300, cfg) == (480, 832)  # nothing fits: the smallest, upscaled
    with pytest.raises(SampleError) as info:
        choose_bucket(16, 16, cfg)
    assert info.value.code is ErrorCode.TOO_SMALL


def test_resize_center_crop_keeps_the_centre():
    frames = np.zeros((1, 100, 200, 3), np.uint8)
    frames[0, 40:60, 90:110] = 255  # a centred square
    out = resize_center_crop(frames, (50, 50))  # scale 0.5 -> 50x100, crop columns 25..75
    assert out.shape == (1, 50, 50, 3)
    ys, xs = np.nonzero(out[0, :, :, 0] > 127)
    assert abs(ys.mean() - 24.5) < 1 and abs(xs.mean() - 24.5) < 1


def test_decode_clips_end_to_end(tmp_path):
    frames = moving_pattern(16, 96, 128)
    probe, clips = decode_clips(_bytes(write_video(tmp_path / "a.mp4", frames, fps=24)), SMALL)
    assert probe.frames == 16 and len(clips) == 3
    assert [c.indices for c in clips] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14)]
    for clip in clips:
        assert clip.frames.shape == (5, 48, 64, 3) and clip.frames.dtype == np.uint8 and clip.bucket == (48, 64)
    # The second clip is frames 5..9 (closer to them than to the same frames one step later).
    def error(a, b):
        return np.abs(a.astype(float) - resize_center_crop(b, (48, 64)).astype(float)).mean()
    assert error(clips[1].frames, frames[5:10]) < 0.5 * error(clips[1].frames, frames[6:11])


@pytest.mark.parametrize("size", [(64, 96), (48, 80), (100, 100)])
def test_frame_sizes_that_broke_decord2(tmp_path, size):
    frames = moving_pattern(6, *size)
    _, clips = decode_clips(_bytes(write_video(tmp_path / "s.mp4", frames)),
                            DecodeConfig(clip_frames=3, buckets=[list(size)], min_short_side=16))
    assert clips[0].frames.shape == (3, *size, 3)
    assert np.abs(clips[0].frames.astype(float) - frames[:3]).mean() < 8


def test_rotation_metadata_is_honoured(tmp_path):
    frames = np.zeros((6, 48, 80, 3), np.uint8)
    frames[:, :8, :16] = 255  # marker in the coded top-left corner
    path = write_video(tmp_path / "rot.mp4", frames, rotation=90)
    probe, clips = decode_clips(_bytes(path), DecodeConfig(clip_frames=3, buckets=[[64, 32]], min_short_side=16))
    assert (probe.rotation, probe.width, probe.height) == (90, 48, 80)  # portrait on display
    out = clips[0].frames[0]
    assert out.shape == (64, 32, 3)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert ys.mean() > 48 and xs.mean() < 10  # counter-clockwise: the corner moves to the bottom left


def test_av1_is_decoded(tmp_path):
    frames = moving_pattern(8, 64, 96)
    try:
        path = write_video(tmp_path / "av1.mp4", frames, codec="libsvtav1")
    except Exception as exc:  # the encoder is part of PyAV's bundled FFmpeg; skip where it is not
        pytest.skip(f"PyAV cannot write AV1 here: {exc}")
    probe, clips = decode_clips(_bytes(path), DecodeConfig(clip_frames=4, buckets=[[48, 64]], min_short_side=16))
    assert probe.codec in ("libdav1d", "av1", "libaom-av1") and clips[0].frames.shape == (4, 48, 64, 3)
    # decord cannot open AV1; the PyAV path must give the same frames as a plain PyAV decode.
    assert np.abs(clips[0].frames.astype(float) - resize_center_crop(
        np.stack([f.to_ndarray(format="rgb24") for f in __import__("av").open(path).decode(video=0)])[:4],
        (48, 64)).astype(float)).max() == 0


def test_variable_frame_rate_file(tmp_path):
    times = [0.0, 0.04, 0.2, 0.24, 0.5, 0.54, 0.8, 0.84, 1.0]
    path = write_video(tmp_path / "vfr.mp4", moving_pattern(9, 48, 64), fps=9, timestamps=times)
    _, clips = decode_clips(_bytes(path), DecodeConfig(clip_frames=5, target_fps=4, buckets=[[48, 64]],
                                                       min_short_side=16))
    assert clips[0].indices == (0, 3, 4, 6, 8)  # nearest to 0, .25, .5, .75, 1.0 s


@pytest.mark.parametrize("make,code", [
    (lambda p: b"", ErrorCode.DECODE_FAILED),
    (lambda p: np.random.default_rng(0).bytes(5000), ErrorCode.DECODE_FAILED),
    (lambda p: b"hello, I am text pretending to be a video\n" * 20, ErrorCode.DECODE_FAILED),
    (lambda p: _bytes(write_audio_only(p / "audio.mp4")), ErrorCode.NO_VIDEO_STREAM),
    (lambda p: _bytes(write_video(p / "tiny.mp4", moving_pattern(10, 16, 16))), ErrorCode.TOO_SMALL),
    (lambda p: _bytes(write_video(p / "one.mp4", moving_pattern(1, 48, 64))), ErrorCode.TOO_SHORT),
])
def test_bad_bytes_are_sample_errors(tmp_path, make, code):
    with pytest.raises(SampleError) as info:
        decode_clips(make(tmp_path), DecodeConfig(clip_frames=5, buckets=[[48, 64]], min_short_side=32))
    assert info.value.code is code and info.value.stage == "decode"


def test_truncated_files_never_crash(tmp_path):
    data = _bytes(write_video(tmp_path / "a.mp4", moving_pattern(30, 48, 64)))
    for cut in (100, len(data) // 3, len(data) * 2 // 3):
        try:
            _, clips = decode_clips(data[:cut], SMALL)
        except SampleError as exc:
            assert exc.code in (ErrorCode.DECODE_FAILED, ErrorCode.TOO_SHORT, ErrorCode.NO_VIDEO_STREAM)
        else:
            assert all(c.frames.shape[1:] == (48, 64, 3) for c in clips)


def test_frames_are_counted_as_they_decode_not_as_the_container_says(tmp_path):
    """A container listing 12 frames of which 11 decode: clips are planned on the 11, the last listed
    index is never read, and an oracle sidecar written per decoded frame (11 maps) is accepted."""
    frames = moving_pattern(11, 48, 64)
    data = _bytes(write_video_with_phantom_frame(tmp_path / "phantom.mp4", frames))
    assert probe_video(data).frames == 12  # what the header says
    cfg = DecodeConfig(clip_frames=11, buckets=[[48, 64]], min_short_side=16)
    # decord's threaded reader hits the phantom sample only sometimes (then PyAV took over and counted
    # right): repeat so that counting what the container lists cannot pass by chance.
    counts = {decode_clips(data, cfg)[0].frames for _ in range(8)}
    assert counts == {11}
    probe, clips = decode_clips(data, cfg)
    assert probe.frames == 11 and [c.indices for c in clips] == [tuple(range(11))]
    assert np.abs(clips[0].frames.astype(float) - frames).mean() < 8  # the real frames, in order
    sidecar = np.ones((11, 48, 64), np.float32)
    (relative,) = oracle_for_clips(sidecar, clips, probe.frames, (probe.height, probe.width))
    assert not isinstance(relative, SampleError) and relative.shape == (11, 48, 64)
    # A clip that would need the phantom frame does not fit: too short, not a decode failure.
    with pytest.raises(SampleError) as info:
        decode_clips(data, DecodeConfig(clip_frames=12, buckets=[[48, 64]], min_short_side=16))
    assert info.value.code is ErrorCode.TOO_SHORT and "11 frame(s)" in info.value.message
