"""``dreamstereo convert``: a monocular video -> a stereo video.

Per window of frames: depth (oracle sidecar or a depth model) -> disparity in pixels on one running
range for the whole video -> the other eye by GAPW backward warping with its hole mask -> the holes
inpainted (the SASI model when a checkpoint is given; otherwise OpenCV's Telea inpainting, announced as
a fallback) -> blended into the warped view -> packed as side-by-side, top-bottom or anaglyph ->
H.264. With the model, consecutive windows overlap by ``overlap`` frames: those frames are inpainted by
both windows and the two results cross-faded linearly, so no seam shows; each frame is written once. The source's audio is copied into the result. The output file appears only when complete, with
``<output>.json`` beside it (resolved config, timings, what filled the holes).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dreamstereo import __version__
from dreamstereo.config import to_plain
from dreamstereo.inference.inpaint import InpaintConfig
from dreamstereo.io import media
from dreamstereo.io.preview import colourize_disparity, contact_sheet, overlay_mask
from dreamstereo.io.sidecar import read_sidecar, sidecar_of
from dreamstereo.stages.depth import DepthBackendName, DepthConfig, load_backend, oracle_disparity
from dreamstereo.stages.stereo import DisparityRange, StereoFormat, blend, compose, crossfade, inpaint_opencv
from dreamstereo.stages.warp import WarpConfig, warp
from dreamstereo.types import Direction, ErrorCode, SampleError

logger = logging.getLogger(__name__)

Inpainter = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (warped (T,H,W,3) uint8, mask (T,H,W)) -> filled


class InpaintMethod(str, enum.Enum):
    AUTO = "auto"  # the model when a checkpoint is given, else OpenCV
    MODEL = "model"  # require a checkpoint
    OPENCV = "opencv"  # OpenCV Telea inpainting (no model)


@dataclasses.dataclass
class ConvertConfig:
    """``dreamstereo convert``."""

    format: StereoFormat = StereoFormat.SBS
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    synthesized_eye: Direction = Direction.RIGHT  # the input is the other eye
    max_disparity: float = 0.03  # fraction of the width given to the nearest point (comfortable: 0.02-0.05)
    convergence: float = 0.0  # normalised disparity on the screen plane (0: the far plane)
    range_momentum: float = 0.8  # smoothing of the disparity range across windows (DisparityRange)
    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)
    window: int = 17  # new frames per step (depth, warp, inpainting)
    overlap: int = 4  # model only: a window also re-inpaints the previous one's last frames; cross-faded there
    frames: int = 0  # convert only the first N frames (0: all); the audio is cut to match
    inpaint: InpaintMethod = InpaintMethod.AUTO
    model: InpaintConfig = dataclasses.field(default_factory=InpaintConfig)  # with --checkpoint (SASI)
    opencv_radius: int = 3  # px, OpenCV inpainting neighbourhood
    feather_px: int = 2  # soft seam outside the hole when blending the inpainted pixels
    crf: int = 18  # H.264 quality of the output
    device: str = "cpu"  # depth model and inpainting model

    def __post_init__(self):
        if not 0 < self.max_disparity < 0.5:
            raise ValueError(f"max_disparity must be in (0, 0.5), got {self.max_disparity}")
        if not 0.0 <= self.convergence <= 1.0:
            raise ValueError(f"convergence must be in [0, 1], got {self.convergence}")
        if self.window < 1 or self.frames < 0 or not 0 <= self.overlap < self.window:
            raise ValueError(f"need window >= 1, frames >= 0 and 0 <= overlap < window, got window={self.window}, "
                             f"frames={self.frames}, overlap={self.overlap}")


def convert_video(source: str | Path, output: str | Path, cfg: ConvertConfig, *, inpainter: Inpainter | None = None,
                  preview: str | Path | None = None, echo=print, progress: bool = True) -> dict:
    """Convert ``source`` into the stereo video ``output``; return the run record (also ``<output>.json``).

    ``inpainter`` fills the holes of the synthesized view (the SASI model); None uses OpenCV.

    Raises:
        MediaError: unreadable input, no video stream, an oracle sidecar that does not fit.
    """
    source, output = Path(source), Path(output)
    info = media.probe_video(source)  # MediaError: missing, unreadable, no video stream
    total = min(info.frames, cfg.frames) if cfg.frames else info.frames
    if cfg.inpaint is InpaintMethod.MODEL and inpainter is None:
        raise media.MediaError("inpaint=model needs --checkpoint DIR (a trained or exported inpainting model)")
    depth = _depth_source(source, info, cfg)
    if inpainter is None or cfg.inpaint is InpaintMethod.OPENCV:
        inpainter = None
        echo("convert: no inpainting model (--checkpoint): holes are filled with OpenCV's Telea inpainting, a "
             "fallback of lower quality")
    direction = cfg.synthesized_eye  # GAPW places view 2 on this side of the input
    disparity_range = DisparityRange(cfg.range_momentum)
    overlap = cfg.overlap if inpainter else 0  # OpenCV fills frame by frame: nothing to join
    seconds = {"depth": 0.0, "warp": 0.0, "inpaint": 0.0, "encode": 0.0}
    sheet_tiles, done, written, hole_pixels = None, 0, 0, 0
    pending = None  # the last `overlap` frames of the previous window: (frames, synth, mask, filled), not written
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dreamstereo-convert-") as tmp:
        picture = Path(tmp) / "video.mp4"
        with media.VideoWriter(picture, info.fps, crf=cfg.crf) as writer, \
                tqdm(total=total, unit="frame", desc="convert", disable=not progress) as bar:

            def emit(frames, synth, mask, filled):
                nonlocal written
                t0 = time.perf_counter()
                synth = blend(synth, filled, mask, cfg.feather_px)
                left, right = (frames, synth) if direction is Direction.RIGHT else (synth, frames)
                writer.write(compose(left, right, cfg.format))
                seconds["encode"] += time.perf_counter() - t0
                written += len(frames)
                return left, right

            for frames in media.iter_video(source, chunk_frames=cfg.window):
                frames = frames[:total - done]
                if not len(frames):
                    break
                t0 = time.perf_counter()
                relative = depth(frames, done)
                t1 = time.perf_counter()
                norm = disparity_range.normalize(relative)
                disparity = frames.shape[2] * cfg.max_disparity * (norm - cfg.convergence)
                view, _, mask = warp(torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0),
                                     torch.from_numpy(disparity), direction, **cfg.warp.options())
                synth = media.to_uint8(view.permute(0, 2, 3, 1).numpy())
                mask = mask.numpy()
                t2 = time.perf_counter()
                if inpainter is None:
                    filled = inpaint_opencv(synth, mask, cfg.opencv_radius)
                elif pending is None:
                    filled = inpainter(synth, mask)
                else:  # the window starts `overlap` frames early; the two predictions there are cross-faded
                    frames, synth, mask = (np.concatenate([a, b]) for a, b in zip(pending[:3], (frames, synth, mask)))
                    filled = inpainter(synth, mask)
                    filled[:len(pending[3])] = crossfade(pending[3], filled[:len(pending[3])])
                seconds["depth"] += t1 - t0
                seconds["warp"] += t2 - t1
                seconds["inpaint"] += time.perf_counter() - t2
                hole_pixels += int(mask[0 if pending is None else len(pending[3]):].sum())
                keep = min(overlap, len(frames) - 1) if overlap else 0
                left, right = emit(frames[:len(frames) - keep], synth[:len(frames) - keep],
                                   mask[:len(frames) - keep], filled[:len(frames) - keep])
                if sheet_tiles is None and preview:
                    sheet_tiles = _preview_tiles(frames[0], norm[0], mask[0], left[0], right[0])
                pending = (frames[-keep:], synth[-keep:], mask[-keep:], filled[-keep:]) if keep else None
                done += len(relative)
                bar.update(len(relative))
            if pending is not None:
                emit(*pending)
        assert written == done, (written, done)  # every frame once: no frame lost or repeated at a seam
        t0 = time.perf_counter()
        audio = media.mux_audio(picture, source, output, seconds=done / info.fps)
        if not audio:
            with media.atomic_path(output) as final:
                final.write_bytes(picture.read_bytes())
        seconds["encode"] += time.perf_counter() - t0
    wall = time.perf_counter() - start
    record = {
        "version": __version__, "source": str(source), "output": str(output), "frames": done, "fps": info.fps,
        "input_size": [info.width, info.height], "format": cfg.format.value, "audio_copied": audio,
        "inpainting": _describe(inpainter), "hole_ratio": hole_pixels / max(1, done * info.width
                                                                                             * info.height),
        "ms_per_frame": {k: round(1000 * v / max(done, 1), 2) for k, v in seconds.items()},
        "wall_seconds": round(wall, 2), "config": to_plain(cfg),
    }
    smoke = [f"{what}: {note}" for what, note in (("depth", cfg.depth.smoke_test),
                                                  ("inpainting", inpainter and inpainter.smoke_test)) if note]
    if smoke:
        record["smoke_test"] = "; ".join(smoke)
    if preview and sheet_tiles is not None:
        media.write_image(preview, contact_sheet(sheet_tiles, columns=2))
        record["preview"] = str(preview)
    media.write_text(f"{output}.json", json.dumps(record, indent=2))
    echo(f"convert: {done} frames -> {output} ({cfg.format.value}, {'with' if audio else 'no'} audio, "
         f"{1000 * wall / max(done, 1):.0f} ms/frame)" + (" SMOKE TEST: random toy weights" if smoke else ""))
    return record


def _depth_source(source: Path, info: media.VideoInfo, cfg: ConvertConfig):
    """A function (frames, first frame index) -> relative disparity ``(T, H, W)``."""
    if cfg.depth.backend is DepthBackendName.ORACLE:
        sidecar_path = sidecar_of(str(source))
        try:
            sidecar = read_sidecar(sidecar_path, None, cfg.depth, info)
        except SampleError as exc:
            if exc.code is ErrorCode.DEPTH_MISSING:
                raise media.MediaError(f"--depth oracle needs the disparity sidecar {sidecar_path!r} beside the "
                                       f"video") from None
            raise media.MediaError(f"{exc.code.value}: {exc.message}") from None

        def oracle(frames: np.ndarray, first: int) -> np.ndarray:
            try:
                return oracle_disparity(sidecar, tuple(range(first, first + len(frames))), info.frames,
                                        (info.height, info.width), frames.shape[1:3])
            except SampleError as exc:
                raise media.MediaError(f"{sidecar_path!r}: {exc.message}") from None

        return oracle
    backend = load_backend(cfg.depth, cfg.device)  # DepthWeightsError says how to provide the weights
    return lambda frames, first: backend(frames)


def _preview_tiles(frame, norm, mask, left, right) -> list[tuple[str, np.ndarray]]:
    return [("input", frame), ("disparity", colourize_disparity(norm)), ("holes to inpaint", overlay_mask(
        frame if left is frame else right, mask)), ("left", left), ("right", right),
        ("anaglyph", compose(left[None], right[None], StereoFormat.ANAGLYPH)[0])]


def _describe(inpainter) -> str:
    if inpainter is None:
        return "opencv-telea"
    stats = getattr(inpainter, "stats", None)
    if not stats:
        return "model"
    mode = f"SASI k={inpainter.cfg.sasi.k}" if inpainter.cfg.sparse else "dense"
    frames = max(stats["frames"], 1)
    return (f"model ({mode}, {inpainter.cfg.steps} step(s), token retention {inpainter.retention():.3f}, "
            f"DiT {1000 * stats['dit_s'] / frames:.1f} ms/frame, VAE {1000 * stats['vae_s'] / frames:.1f} ms/frame)")
