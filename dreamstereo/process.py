"""``dreamstereo process``: the clip chain on one video, without Ray.

decode -> depth -> disparity in pixels -> PBDP training pair -> quality verdict -> sample members.
Every clip ends as one line and one manifest entry: kept (members written as ``DIR/<key>.<ext>``),
rejected with a reason and its scores, or failed with an error code. The distributed pipeline runs the
same per-clip function (:func:`process_clip`) inside its Ray operators.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from dreamstereo import __version__
from dreamstereo.config import ProcessConfig, config_hash, to_plain, to_yaml
from dreamstereo.io import media, preview
from dreamstereo.io.sample import (
    encode_raw_sample,
    encode_sample,
    make_key,
    write_sample_files,
)
from dreamstereo.io.sidecar import read_sidecar, sidecar_of
from dreamstereo.io.storage import StorageError, read_uri
from dreamstereo.pipeline.isolate import decode_contained
from dreamstereo.stages.decode import Clip, VideoProbe
from dreamstereo.stages.depth import DepthBackendName, load_backend, oracle_for_clips
from dreamstereo.stages.disparity import normalize_disparity, sample_max_disparity
from dreamstereo.stages.pairs import make_pair
from dreamstereo.stages.quality import decide, score_quality
from dreamstereo.types import ErrorCode, SampleError

logger = logging.getLogger(__name__)

# The video itself cannot be read (a decoder crash included): exit 2 with one line.
UNREADABLE = (ErrorCode.DECODE_FAILED, ErrorCode.DECODE_CRASHED, ErrorCode.NO_VIDEO_STREAM)


@dataclasses.dataclass
class ClipResult:
    """What became of one clip: ``status`` kept | rejected | failed, with the reason and scores."""

    key: str
    clip_index: int
    status: str
    reason: str | None
    scores: dict
    members: dict[str, bytes] | None = None
    preview: np.ndarray | None = None

    def record(self) -> dict:
        return {"key": self.key, "clip_index": self.clip_index, "status": self.status, "reason": self.reason,
                "scores": self.scores}


def process_clip(clip: Clip, clip_index: int, source: str, probe: VideoProbe, relative: np.ndarray,
                 cfg: ProcessConfig, depth_weights: str | None, *, make_preview: bool = False) -> ClipResult:
    """Disparity -> pair -> verdict -> members for one decoded clip with its relative disparity
    (plus a contact sheet when ``make_preview``)."""
    key = make_key(source, clip_index)
    frames = clip.frames
    width = frames.shape[2]
    pre = score_quality(frames, relative, None)
    verdict = decide(pre, cfg.quality, check_mask=False)
    if not verdict.keep:
        return ClipResult(key, clip_index, "rejected", verdict.reason.value, dataclasses.asdict(pre))
    max_disparity = sample_max_disparity(key, cfg.disparity)
    disparity_px = normalize_disparity(relative, width, max_disparity, cfg.disparity.convergence)
    pair = make_pair(frames, disparity_px, key, cfg.pairs)
    scores = score_quality(frames, relative, pair.mask)
    verdict = decide(scores, cfg.quality)
    if not verdict.keep:
        return ClipResult(key, clip_index, "rejected", verdict.reason.value, dataclasses.asdict(scores))
    meta = {
        "key": key, "source": source, "clip_index": clip_index, "frame_indices": list(clip.indices),
        "fps": clip.fps, "height": int(frames.shape[1]), "width": width, "bucket": list(clip.bucket),
        "source_width": probe.width, "source_height": probe.height, "rotation": probe.rotation,
        "codec": probe.codec, "max_disparity": max_disparity, "max_disparity_px": max_disparity * width,
        "convergence": cfg.disparity.convergence, "direction": pair.direction.value,
        "synthesized_eye": cfg.pairs.synthesized_eye.value, "flip": pair.flipped,
        "mask_ratio": scores.mask_ratio, "quality": dataclasses.asdict(scores),
        "depth_backend": cfg.depth.backend.value, "depth_weights": depth_weights,
        "warp": to_plain(cfg.pairs.warp), "config_hash": config_hash(cfg), "package_version": __version__,
    }
    members = encode_sample(pair.clean, pair.warped, pair.mask, pair.disparity, meta, clip.fps)
    sheet = None
    if make_preview:
        sheet = preview.contact_sheet([
            ("frame", pair.clean[0]),
            ("disparity", preview.colourize_disparity(pair.disparity[0])),
            ("round trip", pair.warped[0]),
            ("mask", preview.overlay_mask(pair.clean[0], pair.mask[0])),
        ])
    return ClipResult(key, clip_index, "kept", None, dataclasses.asdict(scores), members, sheet)


def raw_clip(clip: Clip, clip_index: int, source: str, probe: VideoProbe, cfg: ProcessConfig) -> ClipResult:
    """A clean clip for Stage 1: the quality checks that need no depth, then ``rgb.mp4`` + ``json``."""
    key = make_key(source, clip_index)
    frames = clip.frames
    scores = score_quality(frames, np.zeros(frames.shape[:3], np.float32), None)
    verdict = decide(scores, cfg.quality, check_mask=False, check_depth=False)
    if not verdict.keep:
        return ClipResult(key, clip_index, "rejected", verdict.reason.value, dataclasses.asdict(scores))
    meta = {"key": key, "source": source, "clip_index": clip_index, "frame_indices": list(clip.indices),
            "fps": clip.fps, "height": int(frames.shape[1]), "width": int(frames.shape[2]),
            "bucket": list(clip.bucket), "source_width": probe.width, "source_height": probe.height,
            "rotation": probe.rotation, "codec": probe.codec, "quality": dataclasses.asdict(scores),
            "config_hash": config_hash(cfg), "package_version": __version__}
    return ClipResult(key, clip_index, "kept", None, dataclasses.asdict(scores),
                      encode_raw_sample(frames, meta, clip.fps))


def run_process(video: str | Path, out_dir: str | Path, cfg: ProcessConfig, *, echo=print) -> dict:
    """Run the chain on one video; write kept samples, ``preview.png``, ``manifest.json``, ``config.yaml``.

    Raises:
        media.MediaError: the video cannot be read (nothing is written then).
        media.WriteError: the output cannot be written (full, read-only); what ``out_dir`` held is kept.
    """
    start = time.perf_counter()
    video, out_dir = Path(video), Path(out_dir)
    source = str(video.resolve())  # keys and seeds follow the file, not how its path was spelled
    try:  # refuses FIFOs, devices and folders before reading, and files over decode.max_input_mb
        data = read_uri(str(video), max_bytes=cfg.decode.max_input_bytes)
    except SampleError as exc:
        raise media.MediaError(f"{exc.code.value}: {exc.message}") from None
    except StorageError as exc:
        raise media.MediaError(str(exc)) from None
    results: list[ClipResult] = []
    try:
        probe, clips = decode_contained(data, cfg.decode)  # a native crash comes back as DECODE_CRASHED
    except SampleError as exc:
        if exc.code in UNREADABLE:
            raise media.MediaError(f"{source!r}: {exc.code.value}: {exc.message}") from None
        probe, clips = None, []
        results.append(ClipResult(make_key(source, 0), 0, "rejected", exc.code.value, {"message": exc.message}))
    depth_weights = None
    if clips:
        if cfg.depth.backend is DepthBackendName.ORACLE:
            try:
                sidecar = read_sidecar(sidecar_of(str(video)), None, cfg.depth, probe)
            except SampleError as exc:
                sidecar = exc
            relatives = oracle_for_clips(sidecar, clips, probe.frames, (probe.height, probe.width))
        else:
            backend = load_backend(cfg.depth, cfg.device)
            depth_weights = backend.weights
            relatives = []
            for clip in clips:
                try:
                    relatives.append(backend(clip.frames))
                except SampleError as exc:
                    relatives.append(exc)
        for index, (clip, relative) in enumerate(zip(clips, relatives)):
            if isinstance(relative, SampleError):
                results.append(ClipResult(make_key(source, index), index, "failed", relative.code.value,
                                          {"message": relative.message}))
            else:
                first_kept = not any(r.status == "kept" for r in results)
                results.append(process_clip(clip, index, source, probe, relative, cfg, depth_weights,
                                            make_preview=first_kept))
    # Members, preview, config and manifest appear together (manifest last) or not at all: a full disk
    # leaves the output folder as it was.
    with media.staged_folder(out_dir) as stage:
        sheet = None
        for result in results:
            if result.members is not None:
                write_sample_files(stage, result.key, result.members)
                sheet = sheet if sheet is not None else result.preview
            detail = f" ({result.reason})" if result.reason else f" (mask {100 * result.scores['mask_ratio']:.1f}%)"
            echo(f"{result.key}: {result.status}{detail}")
        if sheet is not None:
            media.write_image(stage / "preview.png", sheet)
        manifest = {
            "command": "process", "version": __version__, "source": source,
            "probe": dataclasses.asdict(probe) if probe else None, "depth_backend": cfg.depth.backend.value,
            "depth_weights": depth_weights, "config_hash": config_hash(cfg),
            "clips": [r.record() for r in results],
            "kept": sum(r.status == "kept" for r in results), "seconds": round(time.perf_counter() - start, 3),
        }
        media.write_text(stage / "config.yaml", to_yaml(cfg))
        media.write_text(stage / "manifest.json", json.dumps(manifest, indent=2))
    return manifest
