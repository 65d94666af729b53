"""Structured configs: dataclass schemas in code, YAML files and ``key=value`` overrides on top.

``load_config(schema, yaml_paths, overrides)`` merges ``schema -> YAML files -> dotlist`` with OmegaConf
and returns a real dataclass instance (``__post_init__`` validation runs there). Unknown keys, wrong
types and bad enum values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamstereo.stages.decode import DecodeConfig
from dreamstereo.stages.depth import DepthConfig
from dreamstereo.stages.disparity import DisparityConfig
from dreamstereo.stages.warp import WarpConfig  # noqa: F401  (re-exported: part of every schema)
from dreamstereo.stages.pairs import PairConfig
from dreamstereo.stages.quality import QualityConfig
from dreamstereo.types import Direction, WarpMethod

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


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


@dataclasses.dataclass
class WarpEvalConfig:
    """``dreamstereo warp-eval``: mask quality of every warp method on real stereo pairs."""

    warp: WarpConfig = dataclasses.field(default_factory=WarpConfig)  # delta / hole_margin for GAPW
    methods: list[WarpMethod] = dataclasses.field(default_factory=lambda: list(WarpMethod))

    def __post_init__(self):
        if not self.methods:
            raise ConfigError("methods must name at least one warp method")


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


def schemas() -> dict[str, type]:
    """Folder of ``configs/`` -> the schema its YAML files override (tests load every file against it)."""
    from dreamstereo.inference.convert import ConvertConfig  # these import this module: resolve late
    from dreamstereo.inference.evaluate import EvaluateConfig
    from dreamstereo.pipeline.job import GenerateConfig
    from dreamstereo.training.config import TrainConfig

    return {"pbdp": PbdpConfig, "warp-eval": WarpEvalConfig, "demo": DemoConfig, "process": ProcessConfig,
            "generate": GenerateConfig, "convert": ConvertConfig, "evaluate": EvaluateConfig,
            "train": TrainConfig}


def load_config(schema: type[T], yaml_paths: list[str | Path] = (), overrides: list[str] = ()) -> T:
    """Merge ``schema`` defaults, YAML files and ``key=value`` overrides into a validated dataclass."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    try:
        merged = OmegaConf.structured(schema)
        for path in yaml_paths:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:  # OmegaConf reads YAML with a safe loader: a !!python/... tag is an error, never code
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {str(path)!r} is not plain YAML: "
                                  f"{' '.join(str(exc).split())}") from None
            merged = OmegaConf.merge(merged, loaded)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None
    except ValueError as exc:  # a schema's __post_init__ check (stage configs raise plain ValueError)
        raise ConfigError(str(exc)) from None


def to_plain(config: Any) -> Any:
    """A config dataclass as plain dicts/lists/scalars, enums by value (as written in YAML files)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, enum.Enum):
        return config.value
    return config


def to_yaml(config: Any) -> str:
    """Resolved config as YAML (enums by value); ``load_config`` reads it back to an equal config."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))


def config_hash(config: Any) -> str:
    """Short stable hash of a resolved config, for stats files and manifests."""
    return hashlib.sha256(json.dumps(to_plain(config), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ProcessConfig:
    """``dreamstereo process``: the clip chain on one video, without Ray."""

    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    depth: DepthConfig = dataclasses.field(default_factory=DepthConfig)
    disparity: DisparityConfig = dataclasses.field(default_factory=DisparityConfig)
    pairs: PairConfig = dataclasses.field(default_factory=PairConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    device: str = "cpu"  # where depth models run: cpu, cuda, cuda:1, ...


