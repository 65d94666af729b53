"""``dreamstereo demo``: synthetic scenes through the data chain (PBDP, the Ray job, a stereo video)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import webdataset as wds

from dreamstereo import __version__
from dreamstereo.config import ConfigError, config_hash, to_yaml
from dreamstereo.inference.convert import ConvertConfig, convert_video
from dreamstereo.io import media, preview
from dreamstereo.io.sample import read_sample
from dreamstereo.pbdp import PbdpConfig, run_pbdp
from dreamstereo.pipeline.job import GenerateConfig, run_generate
from dreamstereo.scenes import demo_scene, write_scene
from dreamstereo.stages import metrics
from dreamstereo.stages.warp import WarpConfig, training_direction
from dreamstereo.types import DepthBackendName, Direction


@dataclasses.dataclass
class DemoConfig:
    """``dreamstereo demo``: make synthetic scenes and run the data chain and the Ray job on them."""

    width: int = 320  # px
    height: int = 192  # px
    num_frames: int = 9  # frames of each scene video (= frames per clip)
    num_videos: int = 4  # scene videos for the generation job (plus one corrupt file)
    seed: int = 0  # scene layout and textures (video k uses seed + k)
    fps: float = 12.0
    synthesized_eye: Direction = Direction.RIGHT  # training pairs round-trip through the opposite view
    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)

    def __post_init__(self):
        if self.width < 32 or self.height < 32 or self.num_frames < 1 or self.num_videos < 1:
            raise ConfigError(f"demo size must be >= 32x32 with >= 1 frame, got "
                              f"{self.width}x{self.height}x{self.num_frames}")


def run_demo(out_dir: str | Path, cfg: DemoConfig, *, echo=print) -> dict:
    """The whole data side on built-in data, in ``out_dir``:

    1. ``videos/``: ``cfg.num_videos`` synthetic scenes (mp4 + disparity sidecar) and one corrupt file;
    2. ``pbdp/``: a double projection of the first scene, scored against its analytic mask;
    3. ``shards/``: ``dreamstereo generate`` with the oracle backend on a local Ray (WebDataset shards,
       parquet, stats, ``manifest.json``), and ``sample-preview.png`` from a sample read back;
    4. ``stereo.mp4``: ``dreamstereo convert`` of the first scene, side by side (holes filled by OpenCV: the
       demo has no trained model), with ``stereo.preview.png``.

    Training pairs round-trip through the view opposite to ``cfg.synthesized_eye``. Returns a summary.
    """
    out_dir = Path(out_dir)
    videos = out_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    scenes = []
    for k in range(cfg.num_videos):
        scene = demo_scene(width=cfg.width, height=cfg.height, num_frames=cfg.num_frames, seed=cfg.seed + k)
        scenes.append((scene, *write_scene(scene, videos / f"scene{k:02d}.mp4", fps=cfg.fps)))
    (videos / "corrupt.mp4").write_bytes(b"\x00 not a video " * 64)  # every real corpus has one

    scene, video, sidecar = scenes[0]
    direction = training_direction(cfg.synthesized_eye)
    manifest = run_pbdp(video, sidecar, out_dir / "pbdp", PbdpConfig(warp=cfg.warp, direction=direction))
    # Masks depend on disparity only (exact in the sidecar), so the written mask 1 is scored as is.
    mask1 = media.read_video(out_dir / "pbdp" / manifest["outputs"]["mask1"])[0][..., 0] > 127
    iou = metrics.mask_scores(mask1, scene.occluded[direction]).iou
    echo(f"pbdp: round trip through the {direction.value} view, mask 1 IoU vs the analytic answer {iou:.3f}")

    job = GenerateConfig(shard_size=2)
    job.process.depth.backend = DepthBackendName.ORACLE
    job.process.decode.clip_frames = cfg.num_frames
    job.process.decode.buckets = [[cfg.height, cfg.width]]
    job.process.decode.min_short_side = min(cfg.height, cfg.width)
    job.process.pairs.synthesized_eye = cfg.synthesized_eye
    job.process.pairs.warp = cfg.warp
    summary = run_generate(str(videos), str(out_dir / "shards"), job, echo=echo)
    first = _first_sample(out_dir / "shards")
    if first is not None:
        media.write_image(out_dir / "sample-preview.png", preview.contact_sheet([
            ("clean V1", first.clean[0]), ("disparity", preview.colourize_disparity(first.disparity[0])),
            ("round trip V1'", first.warped[0]), ("mask M1", preview.overlay_mask(first.clean[0], first.mask[0]))]))
    convert_cfg = ConvertConfig(warp=cfg.warp, max_disparity=0.05)
    convert_cfg.depth.backend = DepthBackendName.ORACLE
    stereo = convert_video(video, out_dir / "stereo.mp4", convert_cfg, preview=out_dir / "stereo.preview.png",
                           echo=echo, progress=False)
    result = {"command": "demo", "version": __version__, "config_hash": config_hash(cfg),
              "direction": direction.value, "mask1_iou_vs_analytic": iou, "pbdp": manifest, "generate": summary,
              "convert": {k: stereo[k] for k in ("output", "frames", "format", "hole_ratio", "ms_per_frame")}}
    media.write_text(out_dir / "config.yaml", to_yaml(cfg))
    media.write_text(out_dir / "manifest.json", json.dumps(result, indent=2))
    return result


def _first_sample(shards_dir: Path):
    """The first sample of the first non-empty shard, decoded (None when the run kept nothing)."""
    listing = json.loads((shards_dir / "manifest.json").read_text())
    for entry in listing["shards"]:
        if entry["num_samples"]:
            sample = next(iter(wds.WebDataset(str(shards_dir / entry["path"]), shardshuffle=False)))
            return read_sample(sample, sample["__key__"])
    return None
