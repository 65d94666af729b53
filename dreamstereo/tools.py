"""The work behind the single-machine commands (``dreamstereo pbdp`` and ``dreamstereo demo``).

Each run validates every input before it writes anything, writes each file through a temporary name,
and leaves ``config.yaml`` (the resolved config) and ``manifest.json`` (what was written) beside its
outputs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from dreamstereo import __version__, media, preview
from dreamstereo.config import DemoConfig, PbdpConfig, VideoOutput, config_hash, to_yaml
from dreamstereo.stages import metrics
from dreamstereo.stages.gapw import double_project, training_direction
from dreamstereo.types import DoubleProjection

logger = logging.getLogger(__name__)


def load_pbdp_inputs(input_path: str | Path, disparity_path: str | Path, scale: float):
    """Frames ``(T, H, W, 3)`` uint8, disparity ``(T, H, W)`` float32 px, fps (None for an image)."""
    input_path = Path(input_path)
    if media.is_image(input_path):
        frames, fps = media.to_uint8(media.read_image(input_path))[None], None
    else:
        frames, fps = media.read_video(input_path)
    disparity = media.read_disparity(disparity_path, scale=scale)
    if disparity.shape != frames.shape[:3]:
        raise media.MediaError(
            f"disparity file {str(disparity_path)!r}: shape (T, H, W) = {disparity.shape} does not match "
            f"{str(input_path)!r} with {frames.shape[0]} frame(s) of {frames.shape[2]}x{frames.shape[1]}"
        )
    return frames, disparity, fps


def run_pbdp(input_path: str | Path, disparity_path: str | Path, out_dir: str | Path,
             cfg: PbdpConfig) -> dict:
    """Double-project one image or video and write view 2, mask 2, view 1 round trip, mask 1, preview.

    Returns the manifest that is also written to ``out_dir/manifest.json``.
    """
    start = time.perf_counter()
    frames, disparity, fps = load_pbdp_inputs(input_path, disparity_path, cfg.disparity_scale)
    frames_t = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
    result = double_project(frames_t, torch.from_numpy(disparity), cfg.direction, **cfg.warp.options())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = _write_views(result, out_dir, fps, cfg.video_output)
    index = min(max(cfg.preview_frame, 0), frames.shape[0] - 1)
    media.write_image(out_dir / "preview.png", pbdp_preview(frames[index], disparity[index], result, index))
    outputs["preview"] = "preview.png"
    manifest = {
        "command": "pbdp",
        "version": __version__,
        "input": str(input_path),
        "disparity": str(disparity_path),
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": fps,
        "direction": cfg.direction.value,
        "method": cfg.warp.method.value,
        "mask2_ratio": float(result.mask2.float().mean()),
        "mask1_ratio": float(result.mask1.float().mean()),
        "roundtrip_psnr_db": metrics.psnr(result.view1, frames_t, ~result.mask1),
        "seconds": round(time.perf_counter() - start, 3),
        "config_hash": config_hash(cfg),
        "outputs": outputs,
    }
    _write_text(out_dir / "config.yaml", to_yaml(cfg))
    _write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    logger.info("pbdp: %d frame(s) %dx%d -> %s (mask1 %.1f%%)", manifest["frames"], manifest["width"],
                manifest["height"], out_dir, 100 * manifest["mask1_ratio"])
    return manifest


def _write_views(result: DoubleProjection, out_dir: Path, fps: float | None,
                 video_output: VideoOutput) -> dict[str, str]:
    arrays = {
        "view2": result.view2.permute(0, 2, 3, 1).numpy(),
        "mask2": result.mask2.numpy(),
        "view1": result.view1.permute(0, 2, 3, 1).numpy(),
        "mask1": result.mask1.numpy(),
    }
    outputs = {}
    for name, array in arrays.items():
        if fps is None:  # an image
            outputs[name] = f"{name}.png"
            media.write_image(out_dir / outputs[name], array[0])
        elif video_output is VideoOutput.LOSSLESS:
            outputs[name] = f"{name}.mkv"
            media.write_video(out_dir / outputs[name], array, fps, lossless=True)
        else:
            folder = out_dir / name
            folder.mkdir(exist_ok=True)
            for k, frame in enumerate(array):
                media.write_image(folder / f"{k:06d}.png", frame)
            outputs[name] = f"{name}/"
    with media.atomic_path(out_dir / "disparity2.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, disparity=result.disparity2.numpy().astype(np.float32))
    outputs["disparity2"] = "disparity2.npz"
    return outputs


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


def _write_text(path: Path, text: str) -> None:
    with media.atomic_path(path) as tmp:
        tmp.write_text(text)


def run_demo(out_dir: str | Path, cfg: DemoConfig) -> dict:
    """Render a synthetic scene to ``out_dir/scene.mp4`` (+ sidecar) and double-project it into ``out_dir/pbdp``.

    The round trip goes through the view opposite to ``cfg.synthesized_eye`` (the training-pair rule).
    Returns the pbdp manifest plus the IoU of mask 1 against the scene's analytic answer.
    """
    from dreamstereo.scenes import demo_scene, write_scene

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene = demo_scene(width=cfg.width, height=cfg.height, num_frames=cfg.num_frames, seed=cfg.seed)
    video, sidecar = write_scene(scene, out_dir / "scene.mp4", fps=cfg.fps)
    direction = training_direction(cfg.synthesized_eye)
    pbdp_cfg = PbdpConfig(warp=cfg.warp, direction=direction)
    manifest = run_pbdp(video, sidecar, out_dir / "pbdp", pbdp_cfg)
    frames, disparity = scene.tensors()
    exact = double_project(frames, disparity, direction, **cfg.warp.options())
    manifest["mask1_iou_vs_analytic"] = metrics.mask_scores(exact.mask1, scene.occluded[direction]).iou
    _write_text(out_dir / "config.yaml", to_yaml(cfg))
    _write_text(out_dir / "manifest.json", json.dumps(
        {"command": "demo", "version": __version__, "scene": "scene.mp4", "sidecar": Path(sidecar).name,
         "pbdp": "pbdp/", "config_hash": config_hash(cfg), **{k: manifest[k] for k in
         ("direction", "method", "mask1_ratio", "roundtrip_psnr_db", "mask1_iou_vs_analytic")}}, indent=2))
    return manifest
