"""``dreamstereo pbdp``: double projection of one image or video with a given disparity.

Each run validates every input before it writes anything, writes each file through a temporary name,
and leaves ``config.yaml`` (the resolved config) and ``manifest.json`` (what was written) beside its
outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dreamstereo import __version__
from dreamstereo.config import ConfigError, config_hash, to_yaml
from dreamstereo.io import media, preview
from dreamstereo.stages import metrics
from dreamstereo.stages.warp import WarpConfig, double_project
from dreamstereo.types import Direction, DoubleProjection

logger = logging.getLogger(__name__)


class VideoOutput(str, enum.Enum):
    """How ``dreamstereo pbdp`` writes the views of a video input."""

    LOSSLESS = "lossless"  # FFV1 in .mkv, bit-exact frames
    PNG = "png"  # one PNG per frame in a folder per output


@dataclasses.dataclass
class PbdpConfig:
    """``dreamstereo pbdp``: double projection of one image or video with a given disparity."""

    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)
    direction: Direction = Direction.RIGHT  # where view 2 lies: right | left
    disparity_scale: float | None = None  # pixels per stored unit (required for PNG, e.g. 1/256); None = 1
    video_output: VideoOutput = VideoOutput.LOSSLESS  # lossless | png, for video inputs
    preview_frame: int = 0  # frame of a video shown in preview.png
    chunk_frames: int = 16  # frames of a video processed at once (memory ~ 100 MB per 16 frames at 720p)

    def __post_init__(self):
        if self.disparity_scale is not None and not self.disparity_scale > 0:
            raise ConfigError(f"disparity_scale must be > 0, got {self.disparity_scale}")
        if self.chunk_frames < 1:
            raise ConfigError(f"chunk_frames must be >= 1, got {self.chunk_frames}")


class _PngWriter:
    """One PNG, written when closed cleanly (the image counterpart of :class:`media.VideoWriter`)."""

    def __init__(self, path: Path):
        self.path, self._frame = path, None

    def write(self, frames: np.ndarray) -> None:
        self._frame = frames[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._frame is not None:
            media.write_image(self.path, self._frame)


class _ArrayWriter:
    """A ``(T, H, W)`` float32 ``.npy`` appended chunk by chunk; it appears only when closed cleanly.

    Plain writes, not a memory map: a store through a mapping into a file on a full disk kills the
    process with SIGBUS, while ``write()`` raises ENOSPC (a :class:`media.WriteError`)."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self._atomic = media.atomic_path(path)
        tmp = self._atomic.__enter__()
        self._file = None
        try:
            self._file = open(tmp, "wb")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                      "shape": self.shape}
            np.lib.format.write_array_header_1_0(self._file, header)  # as np.save writes it
        except BaseException as exc:
            self._close(exc)
            raise

    def write(self, values: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(values, dtype="<f4").tobytes())

    def _close(self, exc: BaseException | None) -> None:
        """Close the file, then rename it into place (``exc`` None) or delete it; a refused write is
        re-raised as a WriteError naming the output."""
        try:
            if self._file is not None:
                self._file.close()  # flushes: a full disk can fail here too
        except BaseException as error:
            exc = error
        if exc is None:
            self._atomic.__exit__(None, None, None)
        elif not self._atomic.__exit__(type(exc), exc, exc.__traceback__):
            raise exc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(exc)


VIEW_NAMES = ("view2", "mask2", "view1", "mask1")


def run_pbdp(input_path: str | Path, disparity_path: str | Path, out_dir: str | Path,
             cfg: PbdpConfig) -> dict:
    """Double-project an image or a video with its disparity; write views, masks, preview and manifest.

    A video is streamed in chunks of ``cfg.chunk_frames`` frames, so its length is not bounded by
    memory. Inputs are checked before anything is written (a NaN deep inside a long video's disparity
    is found when its chunk is read). Outputs are written into a hidden folder in ``out_dir`` and moved
    into place together, manifest last, once all are complete: a failure (a full disk included) leaves
    nothing behind and loses nothing ``out_dir`` held. Returns the manifest also written to
    ``out_dir/manifest.json``.
    """
    start = time.perf_counter()
    input_path, out_dir = Path(input_path), Path(out_dir)
    if media.is_image(input_path):
        image = media.to_uint8(media.read_image(input_path))[None]
        fps, expected, chunks = None, image.shape[:3], iter([image])
    else:
        info = media.probe_video(input_path)
        fps, expected = info.fps, (info.frames, info.height, info.width)
        chunks = media.iter_video(input_path, cfg.chunk_frames)
    # The input's shape first: a disparity file of another shape is refused from its header, unread.
    disparity = media.DisparitySource(disparity_path, scale=cfg.disparity_scale, expect=tuple(expected))
    if disparity.shape != tuple(expected):
        raise media.MediaError(
            f"disparity file {str(disparity_path)!r}: shape (T, H, W) = {disparity.shape} does not match "
            f"{str(input_path)!r} with {expected[0]} frame(s) of {expected[2]}x{expected[1]}")
    with media.staged_folder(out_dir) as stage:  # all outputs appear together, manifest last, or none
        outputs, totals, sheet = _stream_pbdp(chunks, disparity, stage, fps, expected, cfg)
        media.write_image(stage / "preview.png", sheet)
        outputs["preview"] = "preview.png"
        manifest = _pbdp_manifest(input_path, disparity_path, expected, fps, cfg, totals, outputs, start)
        media.write_text(stage / "config.yaml", to_yaml(cfg))
        media.write_text(stage / "manifest.json", json.dumps(manifest, indent=2))
    logger.info("pbdp: %d frame(s) %dx%d -> %s (mask1 %.1f%%)", manifest["frames"], manifest["width"],
                manifest["height"], out_dir, 100 * manifest["mask1_ratio"])
    return manifest


def _pbdp_manifest(input_path, disparity_path, expected, fps, cfg: PbdpConfig, totals: dict, outputs: dict,
                   start: float) -> dict:
    """What ``manifest.json`` of a pbdp run records."""
    return {
        "command": "pbdp",
        "version": __version__,
        "input": str(input_path),
        "disparity": str(disparity_path),
        "frames": int(expected[0]),
        "height": int(expected[1]),
        "width": int(expected[2]),
        "fps": fps,
        "direction": cfg.direction.value,
        "method": cfg.warp.method.value,
        "mask2_ratio": totals["mask2"] / totals["pixels"],
        "mask1_ratio": totals["mask1"] / totals["pixels"],
        "roundtrip_psnr_db": metrics.psnr_from_error(totals["error"], totals["values"]),
        "seconds": round(time.perf_counter() - start, 3),
        "config_hash": config_hash(cfg),
        "outputs": outputs,
    }


def _open_writers(stack: contextlib.ExitStack, out_dir: Path, fps: float | None, expected, cfg: PbdpConfig):
    """One writer per output (PNG for an image; lossless video or PNG frames for a video)."""
    outputs, writers = {}, {}
    for name in VIEW_NAMES:
        if fps is None:
            outputs[name] = f"{name}.png"
            writers[name] = stack.enter_context(_PngWriter(out_dir / outputs[name]))
        elif cfg.video_output is VideoOutput.LOSSLESS:
            outputs[name] = f"{name}.mkv"
            writers[name] = stack.enter_context(media.VideoWriter(out_dir / outputs[name], fps, lossless=True))
        else:
            outputs[name] = f"{name}/"
            writers[name] = stack.enter_context(media.ImageSequenceWriter(out_dir / name))
    outputs["disparity2"] = "disparity2.npy"
    writers["disparity2"] = stack.enter_context(_ArrayWriter(out_dir / "disparity2.npy", tuple(expected)))
    return outputs, writers


def _stream_pbdp(chunks, disparity: media.DisparitySource, out_dir: Path, fps: float | None,
                 expected: tuple[int, int, int], cfg: PbdpConfig):
    """Run the double projection chunk by chunk into the output writers; see :func:`run_pbdp`."""
    total = expected[0]
    preview_index = min(max(cfg.preview_frame, 0), total - 1)
    totals = {"mask1": 0, "mask2": 0, "pixels": 0, "error": 0.0, "values": 0}
    sheet = None
    with contextlib.ExitStack() as stack:
        outputs, writers = _open_writers(stack, out_dir, fps, expected, cfg)
        done = 0
        for chunk in chunks:
            disp = disparity.frames(done, done + len(chunk))
            if len(disp) != len(chunk):
                raise media.MediaError(f"disparity file {str(disparity.path)!r} has {total} frames but the "
                                       f"video decodes more")
            frames_t = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)  # (n, 3, H, W)
            result = double_project(frames_t, torch.from_numpy(disp), cfg.direction, **cfg.warp.options())
            for name in VIEW_NAMES:
                value = getattr(result, name)
                writers[name].write(value.permute(0, 2, 3, 1).numpy() if value.ndim == 4 else value.numpy())
            writers["disparity2"].write(result.disparity2.numpy())
            totals["mask1"] += int(result.mask1.sum())
            totals["mask2"] += int(result.mask2.sum())
            totals["pixels"] += result.mask1.numel()
            err, count = metrics.squared_error(result.view1, frames_t, ~result.mask1)
            totals["error"] += err
            totals["values"] += count
            if done <= preview_index < done + len(chunk):
                k = preview_index - done
                sheet = pbdp_preview(chunk[k], disp[k], result, k)
            done += len(chunk)
            if fps is not None:
                logger.info("pbdp: %d/%d frames", done, total)
        if done != total:
            raise media.MediaError(f"disparity file {str(disparity.path)!r} has {total} frames but the "
                                   f"video decodes {done}")
    return outputs, totals, sheet


def pbdp_preview(frame: np.ndarray, disparity: np.ndarray, result: DoubleProjection, index: int) -> np.ndarray:
    """Contact sheet: input, disparity colour map, view 2 with its holes, round trip with mask 1."""
    view2 = result.view2[index].permute(1, 2, 0).numpy()
    view1 = result.view1[index].permute(1, 2, 0).numpy()
    return preview.contact_sheet([
        ("input", frame),
        ("disparity", preview.colourize_disparity(disparity)),
        ("view 2 + holes", preview.overlay_mask(view2, result.mask2[index].numpy())),
        ("round trip + mask 1", preview.overlay_mask(view1, result.mask1[index].numpy())),
    ])
