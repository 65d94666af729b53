"""The clip chain: what becomes of one input and each of its clips, for ``dreamstereo process`` (one video, no
Ray: ``process.py``) and for the Ray operators of ``dreamstereo generate`` (``actors.py``) alike.

read and decode (in a child process: ``isolate.py``) -> depth (the oracle sidecar, or a model) -> disparity in
pixels -> PBDP training pair -> quality verdict -> sample members. Every clip ends as one
:class:`ClipResult`: ``ok`` with its members, ``rejected`` with the verdict and its scores, or ``failed`` with
an error code. Which error codes are rejections rather than failures is :meth:`SampleStatus.for_error`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dreamstereo import __version__
from dreamstereo.config import config_hash, to_plain
from dreamstereo.io import preview
from dreamstereo.io.sample import SampleEncoder, encode_raw_sample, make_key
from dreamstereo.io.sidecar import read_sidecar, sidecar_of
from dreamstereo.io.storage import StorageError, read_uri, uri_exists
from dreamstereo.pipeline.isolate import decode_contained
from dreamstereo.stages.decode import Clip, DecodeConfig, VideoProbe
from dreamstereo.stages.depth import DepthConfig, oracle_for_clips
from dreamstereo.stages.disparity import (
    CHUNK_FRAMES,
    DisparityConfig,
    disparity_bounds,
    normalize_disparity,
    sample_max_disparity,
)
from dreamstereo.stages.pairs import PairConfig, pair_frames, plan_pair
from dreamstereo.stages.quality import QualityConfig, decide, score_quality
from dreamstereo.types import ErrorCode, SampleError, SampleStatus


@dataclasses.dataclass
class ClipConfig:
    """The chain's settings: the top level of ``dreamstereo process``, ``process:`` of ``dreamstereo generate``."""

    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    disparity: DisparityConfig = dataclasses.field(default_factory=DisparityConfig)
    pairs: PairConfig = dataclasses.field(default_factory=PairConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)


@dataclasses.dataclass
class ClipResult:
    """What became of one clip (or of an input without clips: ``clip_index`` 0)."""

    key: str
    clip_index: int
    status: SampleStatus
    reason: str | None  # the RejectReason or ErrorCode value; None when ok
    scores: dict  # quality scores (for an error: {"message": ...})
    message: str | None = None  # an error's message
    members: dict[str, bytes] | None = None  # the sample, when ok
    preview: np.ndarray | None = None  # a contact sheet, when asked for: of the sample (ok) or of why (rejected)

    @classmethod
    def from_error(cls, source: str, clip_index: int, exc: SampleError) -> "ClipResult":
        """The record of a sample error: rejected for a rejection code, failed otherwise."""
        return cls(make_key(source, clip_index), clip_index, SampleStatus.for_error(exc.code), exc.code.value,
                   {"message": exc.message}, exc.message)


def read_input(uri: str, s3, cfg: DecodeConfig) -> tuple[VideoProbe, list[Clip]]:
    """Read one input (a regular file of at most ``decode.max_input_mb``) and decode its clips in a child
    process, so a native decoder crash is an error code and not a lost worker.

    Raises:
        SampleError: ``NOT_A_FILE``, ``TOO_LARGE``, ``INVALID_URI``, ``READ_FAILED`` (storage; maybe
            transient), or a decode code (``DECODE_FAILED``, ``DECODE_CRASHED``, ``TOO_SHORT``, ...).
    """
    try:
        data = read_uri(uri, s3, max_bytes=cfg.max_input_bytes)
    except StorageError as exc:
        raise SampleError(ErrorCode.READ_FAILED, "read", str(exc)) from None
    return decode_contained(data, cfg)


def oracle_relatives(uri: str, s3, probe: VideoProbe, clips: list[Clip], cfg: DepthConfig) -> list:
    """Per clip: the oracle disparity from the input's sidecar, or the SampleError that stands for it."""
    sidecar_uri = sidecar_of(uri)
    try:
        sidecar = read_sidecar(sidecar_uri, s3, cfg, probe)
    except StorageError as exc:  # absent: a data problem; present but unreadable: maybe transient
        absent = not _exists_or_unknown(sidecar_uri, s3)
        code = ErrorCode.DEPTH_MISSING if absent else ErrorCode.READ_FAILED
        sidecar = SampleError(code, "depth", f"disparity sidecar {sidecar_uri!r}: {exc}")
    except SampleError as exc:
        sidecar = exc
    return oracle_for_clips(sidecar, clips, probe.frames, (probe.height, probe.width))


def _exists_or_unknown(uri: str, s3) -> bool:
    try:
        return uri_exists(uri, s3)
    except StorageError:
        return True  # cannot even tell: treat as a transient read failure


def model_relative(backend, frames: np.ndarray) -> np.ndarray | SampleError:
    """The depth model's relative disparity of one clip, or the SampleError (no finite output) instead."""
    try:
        return backend(frames)
    except SampleError as exc:
        return exc


def pair_clip(clip: Clip, clip_index: int, source: str, probe: VideoProbe, relative: np.ndarray | SampleError,
              cfg: ClipConfig, depth_weights: str | None, *, make_preview: bool = False,
              preview_rejected: bool = False, device: str = "cpu") -> ClipResult:
    """Disparity -> PBDP pair -> verdict -> members for one decoded clip with its relative disparity (or the
    depth stage's error), plus a contact sheet of its first frame when ``make_preview`` and it is kept, or
    ``preview_rejected`` and it is rejected (as far as it got: frame and disparity, or the whole pair). The
    projection runs on ``device`` (the caller's choice: ``resources.pair_placement``); everything else on the
    host."""
    if isinstance(relative, SampleError):
        return ClipResult.from_error(source, clip_index, relative)
    key = make_key(source, clip_index)
    frames = clip.frames
    t, h, width = frames.shape[:3]
    pre = score_quality(frames, relative, None)
    verdict = decide(pre, cfg.quality, check_mask=False)
    if not verdict.keep:
        return ClipResult(key, clip_index, SampleStatus.REJECTED, verdict.reason.value, dataclasses.asdict(pre),
                          preview=_sheet(frames[0], relative[0]) if preview_rejected else None)
    max_disparity = sample_max_disparity(key, cfg.disparity)
    bounds = disparity_bounds(relative)
    plan = plan_pair(key, cfg.pairs)
    holes, first = 0, None
    # Frame chunk by frame chunk (issue 12): disparity in pixels, PBDP and the encoders see CHUNK_FRAMES frames
    # at a time, so what grows with the clip is only its decoded frames, its relative disparity and the
    # compressed members. Every step is per frame, so the arrays are those of the whole clip at once.
    with SampleEncoder((t, h, width), clip.fps) as encoder:
        for start in range(0, t, CHUNK_FRAMES):
            stop = min(start + CHUNK_FRAMES, t)
            disparity_px = normalize_disparity(relative[start:stop], width, max_disparity,
                                               cfg.disparity.convergence, bounds=bounds)
            part = pair_frames(frames[start:stop], disparity_px, plan, cfg.pairs, device=device)
            holes += int(np.count_nonzero(part.mask))
            encoder.add(part.clean, part.warped, part.mask, part.disparity)
            if (make_preview or preview_rejected) and start == 0:  # the first frame's arrays, for a sheet
                first = [part.clean[0].copy(), part.disparity[0].copy(), part.warped[0].copy(), part.mask[0].copy()]
            del part, disparity_px
        # = score_quality(frames, relative, mask) of the whole mask: the other scores do not depend on it, and
        # mask.mean() of a bool array is its count over its size in float64
        scores = dataclasses.replace(pre, mask_ratio=float(np.float64(holes) / np.float64(t * h * width)))
        verdict = decide(scores, cfg.quality)
        if not verdict.keep:
            return ClipResult(key, clip_index, SampleStatus.REJECTED, verdict.reason.value,
                              dataclasses.asdict(scores), preview=_sheet(*first) if preview_rejected else None)
        meta = {
            **_clip_meta(key, clip, clip_index, source, probe),
            "max_disparity": max_disparity, "max_disparity_px": max_disparity * width,
            "convergence": cfg.disparity.convergence, "direction": plan.direction.value,
            "synthesized_eye": cfg.pairs.synthesized_eye.value, "flip": plan.flipped,
            "mask_ratio": scores.mask_ratio, "quality": dataclasses.asdict(scores),
            "depth_backend": cfg.depth.backend.value, "depth_weights": depth_weights,
            "warp": to_plain(cfg.pairs.warp), "config_hash": chain_hash(cfg), "package_version": __version__,
        }
        members = encoder.finish(meta)
    return ClipResult(key, clip_index, SampleStatus.OK, None, dataclasses.asdict(scores), members=members,
                      preview=_sheet(*first) if make_preview else None)


def _sheet(clean0: np.ndarray, disparity0: np.ndarray | None = None, warped0: np.ndarray | None = None,
           mask0: np.ndarray | None = None) -> np.ndarray:
    """The contact sheet of a clip's first frame: as many of frame, disparity, round trip, mask as it has."""
    tiles = [("frame", clean0)]
    if disparity0 is not None:
        tiles.append(("disparity", preview.colourize_disparity(disparity0)))
    if warped0 is not None:
        tiles += [("round trip", warped0), ("mask", preview.overlay_mask(clean0, mask0))]
    return preview.contact_sheet(tiles, columns=2)


def raw_clip(clip: Clip, clip_index: int, source: str, probe: VideoProbe, cfg: ClipConfig, *,
             preview_rejected: bool = False) -> ClipResult:
    """A clean clip for Stage 1: the quality checks that need no depth, then ``rgb.mp4`` + ``json`` (a contact
    sheet of the first frame when rejected and ``preview_rejected``)."""
    key = make_key(source, clip_index)
    frames = clip.frames
    no_depth = np.broadcast_to(np.float32(0.0), frames.shape[:3])  # a view: no clip-sized array of zeros
    scores = score_quality(frames, no_depth, None)
    verdict = decide(scores, cfg.quality, check_mask=False, check_depth=False)
    if not verdict.keep:
        return ClipResult(key, clip_index, SampleStatus.REJECTED, verdict.reason.value, dataclasses.asdict(scores),
                          preview=_sheet(frames[0]) if preview_rejected else None)
    meta = {**_clip_meta(key, clip, clip_index, source, probe), "quality": dataclasses.asdict(scores),
            "config_hash": chain_hash(cfg), "package_version": __version__}
    return ClipResult(key, clip_index, SampleStatus.OK, None, dataclasses.asdict(scores),
                      members=encode_raw_sample(frames, meta, clip.fps))


def chain_settings(cfg: ClipConfig) -> dict:
    """The settings that decide a clip's samples, as plain values: the chain's own fields (a ProcessConfig's
    ``device`` left out) without ``pairs.warp.kernel`` (every kernel gives the same samples)."""
    settings = to_plain({f.name: getattr(cfg, f.name) for f in dataclasses.fields(ClipConfig)})
    settings["pairs"]["warp"].pop("kernel", None)
    return settings


def chain_hash(cfg: ClipConfig) -> str:
    """The hash of :func:`chain_settings`, so ``process`` and ``generate`` label samples made with the same
    settings alike, whichever GAPW kernel made them."""
    return config_hash(chain_settings(cfg))


def _clip_meta(key: str, clip: Clip, clip_index: int, source: str, probe: VideoProbe) -> dict:
    """The sample ``json`` fields every mode writes: where the clip came from and its size."""
    return {"key": key, "source": source, "clip_index": clip_index, "frame_indices": list(clip.indices),
            "fps": clip.fps, "height": int(clip.frames.shape[1]), "width": int(clip.frames.shape[2]),
            "bucket": list(clip.bucket), "source_width": probe.width, "source_height": probe.height,
            "rotation": probe.rotation, "codec": probe.codec}
