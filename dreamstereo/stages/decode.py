"""Decode: probe encoded video bytes, plan clips, and decode them to resolution buckets.

Input is the encoded file as ``bytes`` (never a path: the pipeline reads storage, the stage decodes).
Frames leave as ``(T, H, W, 3) uint8`` RGB in display orientation.

Decoder choice (measured here, 2026-11-25): ``decord`` 0.6.0 decodes, through its ``VideoReader`` over a
file object (random access by index, frame timestamps); PyAV decodes whatever decord cannot (AV1:
decord 0.6.0 cannot open SVT-AV1 files; rotated streams: its batch copy fails on them) and applies the
display rotation itself. A file counts as undecodable only when PyAV fails too. ``decord2`` 3.4.0, which imports as
``decord`` and reads AV1, was evaluated and not taken: at some frame sizes (64x96, and a 48x80 clip
with 90 degree rotation) it returns 4-channel frames whose contents are wrong (not RGBA; 73 grey
levels mean error against decord 0.6.0) and ``get_batch`` fails. Readers are opened inside the call,
so each worker process opens its own (a decord reader must not cross a fork).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import typing

import av
import cv2
import numpy as np

from dreamstereo.types import CHUNK_FRAMES, ErrorCode, SampleError

logger = logging.getLogger(__name__)

STAGE = "decode"
DEFAULT_BUCKETS = ((480, 832), (576, 1024), (768, 1280))  # (height, width), landscape; Wan2.1 sizes


@dataclasses.dataclass
class DecodeConfig:
    """Clip sampling and resizing."""

    clip_frames: int = 49  # frames per clip; 4k + 1 as Wan's VAE needs
    target_fps: float | None = None  # resample to this frame rate (never above the source); None = source
    clip_stride: int | None = None  # frames (after resampling) between clip starts; None = clip_frames
    max_clips: int = 4  # clips per video at most, spread evenly over the video
    buckets: list[list[int]] = dataclasses.field(default_factory=lambda: [list(b) for b in DEFAULT_BUCKETS])
    min_short_side: int = 256  # px; smaller videos are rejected as too small, larger ones may be upscaled
    max_input_mb: float = 4096  # larger input files are refused unread (too_large)
    # Containment (pipeline/isolate.py, not this stage): each video decodes in a child process; one that
    # crashes or overruns is tried again, then recorded as decode_crashed.
    attempts: int = 2  # decode children per video at most
    timeout_s: float = 300.0  # wall-clock seconds per decode child before it is killed

    @property
    def max_input_bytes(self) -> int:
        return int(self.max_input_mb * 2**20)

    def __post_init__(self):
        if self.clip_frames < 1 or (self.clip_stride is not None and self.clip_stride < 1) or self.max_clips < 1:
            raise ValueError(f"decode: clip_frames, clip_stride and max_clips must be >= 1, got "
                             f"{self.clip_frames}, {self.clip_stride}, {self.max_clips}")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"decode.target_fps must be > 0 or None, got {self.target_fps}")
        if not self.max_input_mb > 0:
            raise ValueError(f"decode.max_input_mb must be > 0, got {self.max_input_mb}")
        if self.attempts < 1 or not self.timeout_s > 0:
            raise ValueError(f"decode.attempts must be >= 1 and decode.timeout_s > 0, got {self.attempts}, "
                             f"{self.timeout_s}")
        if not self.buckets or any(len(b) != 2 or min(b) < 2 for b in self.buckets):
            raise ValueError(f"decode.buckets must be [height, width] pairs, got {self.buckets}")


@dataclasses.dataclass(frozen=True)
class VideoProbe:
    """What the container says about a video (sizes in display orientation)."""

    frames: int
    fps: float
    width: int
    height: int
    rotation: int  # display rotation in degrees, counter-clockwise (0, 90, 180, 270)
    codec: str
    duration_s: float


@dataclasses.dataclass(frozen=True)
class Clip:
    """One decoded clip: ``frames (T, H, W, 3) uint8``, the source frame index of each, its fps and bucket."""

    frames: np.ndarray
    indices: tuple[int, ...]
    fps: float
    bucket: tuple[int, int]  # (height, width)


def probe_video(source: bytes | typing.BinaryIO, *, count_frames: bool = False) -> VideoProbe:
    """Read container metadata (and the first frame's display rotation) from an encoded video.

    Args:
        source: the encoded file's bytes, or a seekable binary file object over them (read from its start).
        count_frames: report in ``frames`` the frames that decode (:func:`count_decodable_frames`: every
            packet is demuxed, the last GOP decoded) instead of what the container claims.

    Raises:
        SampleError: ``DECODE_FAILED`` for unreadable bytes, ``NO_VIDEO_STREAM`` for e.g. audio-only files.
    """
    try:
        with av.open(_stream(source), mode="r") as container:
            if not container.streams.video:
                raise SampleError(ErrorCode.NO_VIDEO_STREAM, STAGE, "the file has no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise SampleError(ErrorCode.DECODE_FAILED, STAGE, "no frame could be decoded")
            rotation = _rotation_degrees(first.rotation)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
            duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
            frames = int(stream.frames or 0)
            width, height = first.width, first.height
            codec = stream.codec_context.name
        if count_frames:
            frames = count_decodable_frames(source) or frames
    except SampleError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as exc:
        raise SampleError(ErrorCode.DECODE_FAILED, STAGE, f"{type(exc).__name__}: {exc}") from None
    if rotation in (90, 270):
        width, height = height, width
    return VideoProbe(frames=frames, fps=fps, width=width, height=height, rotation=rotation, codec=codec,
                      duration_s=duration)


def count_decodable_frames(source: bytes | typing.BinaryIO) -> int:
    """The frames of a video that decode: its packets' timestamps up to the last frame that decodes
    (:func:`decodable_end_s`), without decoding more than the last GOP."""
    with av.open(_stream(source), mode="r") as container:
        stream = container.streams.video[0]
        times = np.sort([float(p.pts * p.time_base) for p in container.demux(stream) if p.size and p.pts is not None])
    return len(decodable_timestamps(times, decodable_end_s(_stream(source))))


def _stream(source: bytes | typing.BinaryIO) -> typing.BinaryIO:
    """A binary stream over ``source`` positioned at its start."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    source.seek(0)
    return source


def _rotation_degrees(value) -> int:
    """PyAV's display rotation as 0/90/180/270 (an unusable display matrix counts as no rotation)."""
    value = int(value or 0)
    return (round(value / 90) * 90) % 360 if -360 <= value <= 360 else 0


def choose_bucket(width: int, height: int, cfg: DecodeConfig) -> tuple[int, int]:
    """Largest bucket (oriented like the source) that fits without upscaling, else the smallest one.

    Raises:
        SampleError: ``TOO_SMALL`` when the short side is below ``cfg.min_short_side``.
    """
    if min(width, height) < cfg.min_short_side:
        raise SampleError(ErrorCode.TOO_SMALL, STAGE, f"{width}x{height} is below the minimum short side "
                                                      f"{cfg.min_short_side}")
    portrait = height > width
    oriented = sorted(((max(b), min(b)) if portrait else (min(b), max(b)) for b in cfg.buckets),
                      key=lambda b: b[0] * b[1])
    fitting = [b for b in oriented if b[0] <= height and b[1] <= width]
    return fitting[-1] if fitting else oriented[0]


def resize_center_crop(frames: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Scale ``(T, H, W, 3) uint8`` frames to cover ``bucket`` (height, width), then crop its centre."""
    out_h, out_w = bucket
    t, h, w, _ = frames.shape
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    out = np.empty((t, out_h, out_w, 3), np.uint8)
    for k in range(t):
        out[k] = cv2.resize(frames[k], (new_w, new_h), interpolation=interp)[top:top + out_h, left:left + out_w]
    return out


def plan_clips(timestamps: np.ndarray, source_fps: float, cfg: DecodeConfig) -> tuple[list[list[int]], float]:
    """Source frame indices of each clip, sampling at ``cfg.target_fps`` by presentation time.

    Args:
        timestamps: ``(N,)`` float seconds, presentation time of every decodable frame (any spacing:
            variable frame rate is handled by picking the frame nearest to each sample time).
        source_fps: the container's average frame rate.

    Returns:
        (clips, fps): a list of index lists of length ``cfg.clip_frames``, and the clips' frame rate.

    Raises:
        SampleError: ``TOO_SHORT`` when not even one clip fits.
    """
    n = len(timestamps)
    fps = source_fps if cfg.target_fps is None else min(cfg.target_fps, source_fps or cfg.target_fps)
    if n == 0 or not fps > 0:
        raise SampleError(ErrorCode.TOO_SHORT, STAGE, f"{n} frame(s) at {source_fps} fps")
    start, end = float(timestamps[0]), float(timestamps[-1])
    samples = int(math.floor((end - start) * fps + 1e-6)) + 1  # sample times within the video
    if samples < cfg.clip_frames:
        raise SampleError(ErrorCode.TOO_SHORT, STAGE, f"{samples} frame(s) at {fps:g} fps, a clip needs "
                                                      f"{cfg.clip_frames}")
    times = start + np.arange(samples) / fps
    nearest = np.clip(np.searchsorted(timestamps, times), 1, n - 1)
    nearest -= (times - timestamps[nearest - 1]) < (timestamps[nearest] - times)  # the closer neighbour
    nearest = np.clip(nearest, 0, n - 1)
    stride = cfg.clip_stride or cfg.clip_frames
    starts = list(range(0, samples - cfg.clip_frames + 1, stride))
    if len(starts) > cfg.max_clips:  # spread the kept clips over the whole video, not its first seconds
        starts = [starts[round(k)] for k in np.linspace(0, len(starts) - 1, cfg.max_clips)]
    return [nearest[s:s + cfg.clip_frames].tolist() for s in starts], fps


def decode_clips(data: bytes, cfg: DecodeConfig) -> tuple[VideoProbe, list[Clip]]:
    """Probe, plan and decode every clip of one encoded video.

    Args:
        data: the encoded file's bytes.
        cfg: clip sampling and buckets.

    Returns:
        The probe (``frames`` = the frames that decode) and the decoded clips (``frames (T, H, W, 3)
        uint8`` in display orientation).

    Raises:
        SampleError: ``DECODE_FAILED``, ``NO_VIDEO_STREAM``, ``TOO_SHORT`` or ``TOO_SMALL``.
    """
    probe = probe_video(data)
    bucket = choose_bucket(probe.width, probe.height, cfg)

    def shrink(frames: np.ndarray) -> np.ndarray:
        """Check decoded frames and bring them to the bucket at once (memory stays ~ one source clip)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1:3] != (probe.height, probe.width):
            raise SampleError(ErrorCode.DECODE_FAILED, STAGE, f"decoder returned frames of shape {frames.shape}, "
                                                              f"expected {probe.height}x{probe.width}x3")
        return resize_center_crop(frames, bucket)

    end_s = decodable_end_s(data)
    try:
        clips, fps, decoded, count = _decode_with_decord(data, probe, cfg, shrink, end_s)
    except _DecordCannot:
        clips, fps, decoded, count = _decode_with_pyav(data, probe, cfg, shrink, end_s)
    probe = dataclasses.replace(probe, frames=count)  # what decodes, not what the container claims
    return probe, [Clip(frames, tuple(int(i) for i in indices), fps, bucket) for indices, frames in zip(clips, decoded)]


_TIME_TOLERANCE_S = 1e-3  # decord's timestamps are float32 seconds; real frames are never 1 ms apart


def decodable_end_s(data: bytes | typing.BinaryIO) -> float | None:
    """Presentation time (seconds) of the last frame that actually decodes, or None when unknown.

    ``data``: the encoded file's bytes, or a seekable binary file object over them.

    Containers can list frames that do not decode (measured here: a real H.264 clip says 142 frames,
    PyAV and OpenCV decode 141, decord's ``len()`` says 142 and its ``get_batch`` fails on the last
    index). Only the tail matters, so this seeks to the last keyframe and decodes from there to the end
    (one GOP: 0.13 s for the last 39 frames of a 1280x720 clip here) and stops at the first packet
    that does not decode.
    """
    last = None
    try:
        with av.open(_stream(data)) as container:
            stream = container.streams.video[0]
            container.seek(2 ** 62, stream=stream, backward=True)  # lands on the last keyframe
            try:
                for frame in container.decode(stream):
                    if frame.pts is not None:
                        last = frame.pts if last is None else max(last, frame.pts)
            except (av.FFmpegError, ValueError) as exc:  # a broken tail packet: what decoded before it counts
                logger.debug("tail decode stopped (%s)", str(exc)[:100])
            time_base = float(stream.time_base)
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        logger.debug("cannot seek to the tail (%s); trusting the container's frame list", str(exc)[:100])
        return None
    return None if last is None else last * time_base


def decodable_timestamps(timestamps: np.ndarray, end_s: float | None) -> np.ndarray:
    """The leading timestamps up to the last decodable frame (all of them when that is unknown)."""
    if end_s is None:
        return timestamps
    return timestamps[: int(np.searchsorted(timestamps, end_s + _TIME_TOLERANCE_S, side="right"))]


class _DecordCannot(Exception):
    """decord could not open the stream (e.g. AV1); PyAV takes over."""


def _decode_with_decord(data: bytes, probe: VideoProbe, cfg: DecodeConfig, shrink, end_s: float | None):
    import decord  # imported here so a worker process sets up its own library state

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as exc:
        logger.debug("decord cannot open the stream (%s); decoding with PyAV", str(exc)[:100])
        raise _DecordCannot from None
    try:
        timestamps = decodable_timestamps(reader.get_frame_timestamp(range(len(reader)))[:, 0].astype(np.float64), end_s)
        clips, fps = plan_clips(timestamps, float(reader.get_avg_fps()) or probe.fps, cfg)
        return clips, fps, [_batched(reader, indices, shrink) for indices in clips], len(timestamps)
    except SampleError:
        raise
    except (RuntimeError, decord.DECORDError, IndexError) as exc:
        # e.g. decord's batch copy fails on rotated streams (size check); PyAV decides for good.
        logger.debug("decord failed (%s); decoding with PyAV", str(exc)[:100])
        raise _DecordCannot from None




def _batched(reader, indices: list[int], shrink) -> np.ndarray:
    """The frames ``indices`` of a decord reader, brought to the bucket :data:`CHUNK_FRAMES` at a time
    (issue 12: a 81-frame 720p clip held whole at its source size cost 224 MB more in the decode child)."""
    out = None
    for start in range(0, len(indices), CHUNK_FRAMES):
        part = shrink(reader.get_batch(indices[start:start + CHUNK_FRAMES]).asnumpy())
        if out is None:
            out = np.empty((len(indices), *part.shape[1:]), part.dtype)
        out[start:start + len(part)] = part
    return out


def _decode_with_pyav(data: bytes, probe: VideoProbe, cfg: DecodeConfig, shrink, end_s: float | None):
    """Two passes: packet timestamps to plan the clips, then decode up to the last frame needed (a frame
    finds its index by its timestamp, so a packet that yields no frame shifts nothing)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
            timestamps = decodable_timestamps(np.asarray(pts, np.float64) * float(stream.time_base), end_s)
        pts = pts[:len(timestamps)]
        position = {p: k for k, p in enumerate(pts)}
        clips, fps = plan_clips(timestamps, probe.fps, cfg)
        wanted = {i for clip in clips for i in clip}
        frames: dict[int, np.ndarray] = {}
        with av.open(io.BytesIO(data)) as container:
            for count, frame in enumerate(container.decode(container.streams.video[0])):
                index = position.get(frame.pts, count)  # no timestamp (or an unknown one): decode order
                if index in wanted:
                    frames[index] = shrink(np.rot90(frame.to_ndarray(format="rgb24"), k=probe.rotation // 90)[None])[0]
                if index >= max(wanted):
                    break
        missing = sorted(wanted - frames.keys())
        if missing:
            raise SampleError(ErrorCode.DECODE_FAILED, STAGE, f"frame(s) {missing[:5]} of {len(pts)} did not decode")
        return clips, fps, [np.stack([frames[i] for i in clip]) for clip in clips], len(timestamps)
    except SampleError:
        raise
    except (av.FFmpegError, OSError, ValueError, KeyError, IndexError) as exc:
        raise SampleError(ErrorCode.DECODE_FAILED, STAGE, f"{type(exc).__name__}: {str(exc)[:200]}") from None
