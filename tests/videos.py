"""Real video files for tests, written with PyAV (no mocks of the decoder)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def moving_pattern(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(T, H, W, 3) uint8`` frames: a textured background panning right and a bright box moving down."""
    rng = np.random.default_rng(seed)
    base = (rng.random((height, width + 4 * num_frames, 3)) * 200).astype(np.uint8)
    base = np.ascontiguousarray(np.repeat(np.repeat(base[::4, ::4], 4, 0), 4, 1)[:height, : width + 4 * num_frames])
    frames = np.stack([base[:, 4 * t: 4 * t + width] for t in range(num_frames)])
    for t in range(num_frames):
        y = (3 * t) % max(1, height - 8)
        frames[t, y:y + 8, 4:12] = 255
    return frames


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24, *, codec: str = "libx264",
                rotation: int | None = None, pix_fmt: str = "yuv420p", timestamps: list[float] | None = None,
                faststart: bool = True) -> str:
    """Encode ``frames`` to ``path``; ``timestamps`` (seconds) makes a variable-frame-rate file."""
    path = str(path)
    options = {"movflags": "faststart"} if faststart and path.endswith(".mp4") else {}
    with av.open(path, "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "8"}  # near-lossless, so decoded frames can be compared
        if timestamps is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for k, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if timestamps is not None:
                vf.pts, vf.time_base = round(timestamps[k] * 1000), Fraction(1, 1000)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_with_phantom_frame(path: str | Path, frames: np.ndarray, fps: float = 24) -> str:
    """An H.264 .mp4 whose container lists ``len(frames) + 1`` frames while only ``len(frames)`` decode.

    The extra sample, one frame after the last, holds only an access unit delimiter (a NAL unit with no
    picture): decoders accept it and return no frame, as with the real clip whose header says 142 frames
    and which decodes to 141 (PyAV, OpenCV; decord's ``len()`` says 142).
    """
    path = str(path)
    with av.open(path, "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "8", "bf": "0"}
        packets = []
        for frame in frames:
            packets += stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24"))
        packets += stream.encode()
        step = packets[-1].pts - packets[-2].pts  # encoder time base, before muxing rescales the packets
        phantom = av.Packet(b"\x00\x00\x00\x02\x09\xf0")  # length-prefixed AUD NAL (type 9)
        phantom.time_base, phantom.duration = packets[-1].time_base, step
        phantom.pts = phantom.dts = packets[-1].pts + step
        phantom.stream = stream
        for packet in packets + [phantom]:
            container.mux(packet)
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0) -> str:
    """An .mp4 with one AAC audio stream and no video."""
    path = str(path)
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for k in range(int(seconds * 16000 / 1024)):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
