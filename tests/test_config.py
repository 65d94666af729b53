"""Structured configs: every shipped YAML loads against its schema; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamstereo.cli import SCHEMAS, schema
from dreamstereo.config import ConfigError, config_hash, load_config, to_yaml
from dreamstereo.pbdp import PbdpConfig
from dreamstereo.pipeline.job import GenerateConfig
from dreamstereo.stages.warp import WarpConfig
from dreamstereo.types import Direction, WarpMethod

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_folder_has_a_schema():
    assert YAMLS, "configs/ holds no YAML"
    assert {p.parent.name for p in YAMLS} <= set(SCHEMAS)


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CONFIGS)) for p in YAMLS])
def test_shipped_yaml_loads_against_its_schema(path):
    cfg = load_config(schema(path.parent.name), [path])
    assert isinstance(cfg, schema(path.parent.name))


def test_every_command_schema_resolves_to_a_dataclass():
    import dataclasses

    for command in SCHEMAS:
        assert dataclasses.is_dataclass(schema(command)), command


def test_a_moved_key_keeps_working_with_a_deprecation_warning(tmp_path, caplog):
    """`generate process.device=...` was accepted and never read (depth runs on resources.depth_device): it
    is now read as resources.depth_device, from an override and from a YAML file, and says so."""
    cfg = load_config(GenerateConfig, [], ["process.device=cuda:1"])
    assert cfg.resources.depth_device == "cuda:1" and not hasattr(cfg.process, "device")
    assert "'process.device' is deprecated: use 'resources.depth_device'" in caplog.text
    caplog.clear()
    path = tmp_path / "old.yaml"
    path.write_text("process:\n  device: cuda\n  decode:\n    clip_frames: 9\n")
    cfg = load_config(GenerateConfig, [path])
    assert cfg.resources.depth_device == "cuda" and cfg.process.decode.clip_frames == 9
    assert "deprecated" in caplog.text and str(path) in caplog.text
    # the new key given too: the later source wins, as for any key
    assert load_config(GenerateConfig, [path], ["resources.depth_device=cpu"]).resources.depth_device == "cpu"


def test_a_key_no_command_reads_is_refused():
    with pytest.raises(ConfigError, match="process.nonsense"):
        load_config(GenerateConfig, [], ["process.nonsense=1"])


def test_overrides_apply_with_types_and_enums():
    cfg = load_config(PbdpConfig, [CONFIGS / "pbdp" / "soft_splat.yaml"], ["warp.delta=2.5", "direction=left"])
    assert cfg.warp.method is WarpMethod.SOFT_SPLAT
    assert cfg.warp.delta == 2.5 and cfg.direction is Direction.LEFT
    assert isinstance(cfg.warp, WarpConfig)


@pytest.mark.parametrize("override,needle", [
    (["warp.nope=1"], "warp.nope"),
    (["warp.delta=abc"], "warp.delta"),
    (["warp.method=splat"], "warp.method"),
    (["direction=up"], "direction"),
    (["warp.delta=0.5"], "warp.delta must be >= 1"),
    (["disparity_scale=0"], "disparity_scale must be > 0"),
    (["delta"], "not key=value"),
])
def test_bad_override_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(PbdpConfig, [], override)


def test_missing_yaml_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PbdpConfig, [tmp_path / "nope.yaml"])


def test_resolved_config_round_trips_and_hash_is_stable(tmp_path):
    cfg = load_config(PbdpConfig, [], ["warp.method=zbuffer_splat"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(PbdpConfig, [path])
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(PbdpConfig)) != config_hash(cfg)


def test_a_yaml_tag_that_would_build_python_objects_is_a_config_error_and_runs_nothing(tmp_path):
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "config.yaml"  # e.g. a checkpoint's config.yaml given back with --config
    planted.write_text(f"max_steps: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    from dreamstereo.training.config import TrainConfig

    with pytest.raises(ConfigError, match=r"config file '.*config.yaml' is not plain YAML: .*python/object/apply"):
        load_config(TrainConfig, [planted])
    assert not marker.exists()
