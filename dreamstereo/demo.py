"""``dreamstereo demo``: the whole mission on built-in data and the built-in toy models, in a few minutes on a
CPU: synthetic scenes -> PBDP -> the Ray job (raw clips and pairs) -> Stage 1 and Stage 2 training -> export ->
a stereo video through the trained model (SASI) -> evaluation on a held-out shard -> the data report.

``only=data`` (``dreamstereo demo --only data``) keeps to the data side: scenes, PBDP, the pairs job and a
stereo video with OpenCV filling the holes (about a minute).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from dreamstereo import __version__, toy_models
from dreamstereo.config import ConfigError, config_hash, to_yaml
from dreamstereo.inference.convert import ConvertConfig, InpaintMethod, convert_video
from dreamstereo.io import media, preview
from dreamstereo.io.sample import read_sample
from dreamstereo.pbdp import PbdpConfig, run_pbdp
from dreamstereo.pipeline.job import GenerateConfig, GenerateMode, run_generate
from dreamstereo.report import ReportConfig, build_report
from dreamstereo.scenes import demo_scene, write_scene
from dreamstereo.stages import metrics
from dreamstereo.stages.warp import WarpConfig, training_direction
from dreamstereo.types import DepthBackendName, Direction

logger = logging.getLogger(__name__)


class DemoPart(str, enum.Enum):
    ALL = "all"  # data, training, export, a stereo video through the model, evaluation, report
    DATA = "data"  # scenes, PBDP, the pairs job, a stereo video with OpenCV filling the holes


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
    only: DemoPart = DemoPart.ALL
    train_steps: int = 24  # optimizer steps of each training stage (the toy model, batches of 2)
    train_scale: float = 0.5  # training clips at this fraction of the scene size (rounded to 16 px)

    def __post_init__(self):
        if self.width < 32 or self.height < 32 or self.num_frames < 1 or self.num_videos < 1:
            raise ConfigError(f"demo size must be >= 32x32 with >= 1 frame, got "
                              f"{self.width}x{self.height}x{self.num_frames}")
        if self.train_steps < 1 or not 0 < self.train_scale <= 1:
            raise ConfigError(f"demo: need train_steps >= 1 and 0 < train_scale <= 1, got {self.train_steps}, "
                              f"{self.train_scale}")
        if self.only is DemoPart.ALL and (self.num_frames < 5 or self.num_videos < 2):
            raise ConfigError(f"demo: training needs num_frames >= 5 (1 + 4k frames per clip) and num_videos >= 2 "
                              f"(one shard is held out), got {self.num_frames} and {self.num_videos}; or only=data")


def run_demo(out_dir: str | Path, cfg: DemoConfig, *, echo=print) -> dict:
    """The whole mission on built-in data, in ``out_dir``:

    1. ``videos/``: ``cfg.num_videos`` synthetic scenes (mp4 + disparity sidecar), a still one (rejected as static)
       and a corrupt file (failed);
    2. ``pbdp/``: a double projection of the first scene, scored against its analytic mask;
    3. ``pairs/``: ``dreamstereo generate`` (PBDP pairs) with the oracle backend on a local Ray (WebDataset
       shards, parquet, stats, ``manifest.json``, ``previews/`` of rejected clips), and ``sample-preview.png`` from
       a sample read back;
    4. with ``only=all`` (the default):
       ``raw/``: ``generate mode=raw`` of the same videos; ``train/stage1``: Stage 1 (random masks on the raw
       clips) of the toy Wan (``model.base=toy``); ``train/stage2``: Stage 2 (the pairs, the last shard held out
       for validation) from Stage 1's checkpoint; ``model/``: ``dreamstereo export`` of Stage 2;
       ``stereo.mp4``: ``dreamstereo convert`` of the first scene with that model (the SASI path);
       ``eval/eval.json`` (``.md``, ``.png``): ``dreamstereo evaluate`` on the held-out shard;
       with ``only=data``: ``stereo.mp4`` with OpenCV filling the holes, and no training;
    5. ``report/index.html``: ``dreamstereo report`` of ``pairs/``.

    Training pairs round-trip through the view opposite to ``cfg.synthesized_eye``. Returns a summary (also
    ``manifest.json``); ``result["open"]`` lists what to look at.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    videos = out_dir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    scenes = []
    for k in range(cfg.num_videos):
        scene = demo_scene(width=cfg.width, height=cfg.height, num_frames=cfg.num_frames, seed=cfg.seed + k)
        scenes.append((scene, *write_scene(scene, videos / f"scene{k:02d}.mp4", fps=cfg.fps)))
    (videos / "corrupt.mp4").write_bytes(b"\x00 not a video " * 64)  # every real corpus has one
    first = scenes[0][0]  # and a still shot (the quality filter rejects it as static)
    write_scene(dataclasses.replace(first, frames=np.repeat(first.frames[:1], cfg.num_frames, 0),
                                    disparity=np.repeat(first.disparity[:1], cfg.num_frames, 0)),
                videos / "still.mp4", fps=cfg.fps)

    scene, video, sidecar = scenes[0]
    direction = training_direction(cfg.synthesized_eye)
    manifest = run_pbdp(video, sidecar, out_dir / "pbdp", PbdpConfig(warp=cfg.warp, direction=direction))
    # Masks depend on disparity only (exact in the sidecar), so the written mask 1 is scored as is.
    mask1 = media.read_video(out_dir / "pbdp" / manifest["outputs"]["mask1"])[0][..., 0] > 127
    iou = metrics.mask_scores(mask1, scene.occluded[direction]).iou
    echo(f"pbdp: round trip through the {direction.value} view, mask 1 IoU vs the analytic answer {iou:.3f}")

    summary = run_generate(str(videos), str(out_dir / "pairs"), _generate_config(cfg, GenerateMode.PAIRS), echo=echo)
    first = _first_sample(out_dir / "pairs")
    if first is not None:
        media.write_image(out_dir / "sample-preview.png", preview.contact_sheet([
            ("clean V1", first.clean[0]), ("disparity", preview.colourize_disparity(first.disparity[0])),
            ("round trip V1'", first.warped[0]), ("mask M1", preview.overlay_mask(first.clean[0], first.mask[0]))]))
    result = {"command": "demo", "version": __version__, "config_hash": config_hash(cfg), "only": cfg.only.value,
              "direction": direction.value, "mask1_iou_vs_analytic": iou, "pbdp": manifest, "generate": summary}
    result["report"] = str(build_report(str(out_dir / "pairs"), out_dir / "report", ReportConfig()))
    echo(f"report: {result['report']}")
    convert_cfg = ConvertConfig(warp=cfg.warp, max_disparity=0.05)
    convert_cfg.depth.backend = DepthBackendName.ORACLE
    inpainter = None
    if cfg.only is DemoPart.ALL:
        model_dir, result["train"], result["raw"] = _train_and_export(out_dir, videos, cfg, echo)
        from dreamstereo.inference.inpaint import StereoInpainter  # local: diffusers takes seconds to import

        inpainter = StereoInpainter(model_dir)
        convert_cfg.inpaint = InpaintMethod.MODEL
    stereo = convert_video(video, out_dir / "stereo.mp4", convert_cfg, inpainter=inpainter,
                           preview=out_dir / "stereo.preview.png", echo=echo, progress=False)
    result["convert"] = {k: stereo[k] for k in ("output", "frames", "format", "hole_ratio", "ms_per_frame",
                                                "inpainting")}
    if cfg.only is DemoPart.ALL:
        from dreamstereo.inference.evaluate import EvaluateConfig, evaluate

        holdout = _holdout_shard(out_dir / "pairs")
        (out_dir / "eval").mkdir(exist_ok=True)
        report = evaluate(str(model_dir), holdout, EvaluateConfig(max_samples=4, frames=cfg.num_frames),
                          json_out=out_dir / "eval" / "eval.json", echo=echo)
        result["evaluate"] = {"shards": holdout, "samples": report["samples"], "table": report["table"]}
        result["smoke_test"] = toy_models.SMOKE_TEST
    result["open"] = _what_to_open(out_dir, cfg)
    result["seconds"] = round(time.perf_counter() - start, 1)
    media.write_text(out_dir / "config.yaml", to_yaml(cfg, note=result.get("smoke_test")))
    media.write_text(out_dir / "manifest.json", json.dumps(result, indent=2))
    return result


def _generate_config(cfg: DemoConfig, mode: GenerateMode) -> GenerateConfig:
    """The demo's job: the oracle depth (the scenes' exact disparity), clips of the whole scene, 2 inputs a shard."""
    job = GenerateConfig(shard_size=2, mode=mode)
    job.process.depth.backend = DepthBackendName.ORACLE
    job.process.decode.clip_frames = cfg.num_frames
    job.process.decode.buckets = [[cfg.height, cfg.width]]
    job.process.decode.min_short_side = min(cfg.height, cfg.width)
    job.process.pairs.synthesized_eye = cfg.synthesized_eye
    job.process.pairs.warp = cfg.warp
    return job


def _train_config(cfg: DemoConfig, out: Path, shards: str, stage: str, init_from: str | None = None):
    """A few dozen steps of the toy Wan on the CPU (as ``configs/train/tiny.yaml``), in ``out``."""
    from dreamstereo.training.config import TrainConfig
    from dreamstereo.training.data import TrainStage

    def size(n: int) -> int:
        return max(16, 16 * round(n * cfg.train_scale / 16))

    train = TrainConfig(output_dir=str(out), max_steps=cfg.train_steps, batch_size=2, micro_batch_size=2,
                        device="cpu", gradient_checkpointing=False, overwrite=True)  # the demo's own folder
    train.model.base, train.model.init_from = toy_models.TOY, init_from
    train.data.shards, train.data.stage = shards, TrainStage(stage)
    train.data.num_frames = 1 + 4 * ((cfg.num_frames - 1) // 4)
    train.data.buckets = [[size(cfg.height), size(cfg.width)]]
    train.data.shuffle_buffer, train.data.num_workers = 8, 0
    train.data.holdout_shards = 1 if train.data.stage is TrainStage.PAIRS else 0  # evaluate reads the same shard
    train.lora.rank, train.lora.alpha = 8, 8
    train.optim.lr, train.optim.weight_decay = 0.005, 0.0
    train.schedule.warmup_steps = min(5, cfg.train_steps)
    train.log.every, train.log.val_every, train.log.val_batches = 6, cfg.train_steps, 2
    train.log.checkpoint_every, train.log.keep_checkpoints, train.log.tensorboard = cfg.train_steps, 1, False
    return train


def _train_and_export(out_dir: Path, videos: Path, cfg: DemoConfig, echo) -> tuple[Path, dict, dict]:
    """``raw/``, Stage 1 on it, Stage 2 on ``pairs/`` from Stage 1, ``model/``: returns the model folder and
    what each stage ended at."""
    from dreamstereo.training.export import export_model
    from dreamstereo.training.train import check_config, train

    raw = run_generate(str(videos), str(out_dir / "raw"), _generate_config(cfg, GenerateMode.RAW), echo=echo)
    stages, init = {}, None
    for name, shards, stage in (("stage1", out_dir / "raw", "random_masks"), ("stage2", out_dir / "pairs", "pairs")):
        train_cfg = _train_config(cfg, out_dir / "train" / name, str(shards), stage, init)
        check_config(train_cfg)
        done = train(train_cfg)
        init = done["checkpoint"]
        stages[name] = {"steps": done["step"], "first_loss": done["losses"][0], "last_loss": done["losses"][-1],
                        "checkpoint": init}
        echo(f"train {name} ({stage}, toy Wan): {done['step']} steps, loss {done['losses'][0]:.3f} -> "
             f"{done['losses'][-1]:.3f}, checkpoint {init}")
    model_dir = export_model(init, out_dir / "model")
    echo(f"export: {model_dir}")
    return model_dir, stages, raw


def _holdout_shard(pairs_dir: Path) -> str:
    """The pairs shard that Stage 2 held out (``data.holdout_shards=1``: the last one listed)."""
    listing = json.loads((pairs_dir / "manifest.json").read_text())
    return str(pairs_dir / listing["shards"][-1]["path"])


def _what_to_open(out_dir: Path, cfg: DemoConfig) -> list[tuple[str, str]]:
    """(path, what it shows) for the outputs the demo wrote, in the order worth opening them."""
    items = [("report/index.html", "the pairs dataset: counts, scores against thresholds, a gallery"),
             ("stereo.mp4", "the first scene in side-by-side 3D, holes filled by the trained toy model (SASI)"
              if cfg.only is DemoPart.ALL else "the first scene in side-by-side 3D, holes filled by OpenCV"),
             ("stereo.preview.png", "its first frame: input, warped view, mask, output"),
             ("eval/eval.md", "the model on the held-out shard: SASI vs dense vs OpenCV (eval.png: samples)"),
             ("pbdp/preview.png", "double projection of the first scene"),
             ("sample-preview.png", "a training pair read back from the shards"),
             ("train/stage2/metrics.jsonl", "training losses (stage1/ likewise), checkpoints beside them"),
             ("model/", "the exported model: `dreamstereo convert VIDEO OUT.mp4 --checkpoint model`")]
    return [(str(out_dir / path), what) for path, what in items if (out_dir / path).exists()]


def _first_sample(shards_dir: Path):
    """The first sample of the first non-empty shard, decoded (None when the run kept nothing)."""
    listing = json.loads((shards_dir / "manifest.json").read_text())
    for entry in listing["shards"]:
        if entry["num_samples"]:
            sample = next(iter(wds.WebDataset(str(shards_dir / entry["path"]), shardshuffle=False)))
            return read_sample(sample, sample["__key__"])
    return None
