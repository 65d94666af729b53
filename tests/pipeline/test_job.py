"""The generate job's own rules that need no Ray: what decides which samples a shard holds."""

from __future__ import annotations

import types

from dreamstereo.config import load_config
from dreamstereo.pipeline.job import GenerateConfig, input_fingerprint

INPUTS = [types.SimpleNamespace(uri=f"/data/v{i}.mp4") for i in range(3)]


def test_outputs_begun_by_earlier_versions_still_resume():
    """The fingerprint recorded in `_inputs.json` by the version before `process:` lost its unread `device`
    key (computed with that version from the defaults as the CLI loads them): the same inputs and settings give the same fingerprint, so a rerun
    resumes the output instead of refusing it."""
    assert input_fingerprint(INPUTS, load_config(GenerateConfig)) == (
        "8374575088d827340a6081756839e67e2261aba25aa17a42a8ec56c0604f6795")


def test_the_fingerprint_follows_what_decides_the_samples_and_nothing_else():
    base = input_fingerprint(INPUTS, load_config(GenerateConfig))
    for override in ("shard_size=2", "mode=raw", "process.decode.clip_frames=9", "process.pairs.warp.delta=3"):
        assert input_fingerprint(INPUTS, load_config(GenerateConfig, [], [override])) != base, override
    assert input_fingerprint(INPUTS[::-1], load_config(GenerateConfig)) != base
    for override in ("resources.depth_device=cuda", "resources.pair_actors=3", "progress_every_s=5",
                     "resources.pair_placement=depth"):
        assert input_fingerprint(INPUTS, load_config(GenerateConfig, [], [override])) == base, override


def test_pair_placement_takes_cpu_or_depth_and_names_the_key_otherwise():
    import pytest

    from dreamstereo.pipeline.job import PairPlacement

    assert load_config(GenerateConfig).resources.pair_placement is PairPlacement.CPU
    cfg = load_config(GenerateConfig, [], ["resources.pair_placement=depth"])
    assert cfg.resources.pair_placement is PairPlacement.DEPTH
    with pytest.raises(Exception, match="pair_placement"):
        load_config(GenerateConfig, [], ["resources.pair_placement=gpu"])


def test_the_manifest_counts_clips_per_stage_and_device_and_reads_shards_of_earlier_versions(tmp_path):
    """write_manifest sums each shard's `stage_placement`; a stats file written before it existed (no such
    key) still counts its clips and seconds."""
    import json

    from dreamstereo.io.shards import shard_name
    from dreamstereo.io.storage import LocalStorage
    from dreamstereo.pipeline.job import format_summary, write_manifest

    storage = LocalStorage(tmp_path)
    base = {"count": 2, "samples": 2, "ok": 2, "rejected": 0, "failed": 0, "reasons": {}, "tar_bytes": 10,
            "tar_sha256": "x", "seconds_per_stage": {"decode": 1.0, "depth": 2.0, "pair": 3.0}}
    new = {**base, "stage_placement": {"decode": {"cpu": 2}, "depth": {"cuda:0": 2}, "pair": {"cuda:0": 2}}}
    storage.write_bytes(shard_name(0, "stats.json"), json.dumps(base).encode())  # an earlier version's shard
    storage.write_bytes(shard_name(1, "stats.json"), json.dumps({**new, "shard": 1}).encode())
    new["stage_placement"]["pair"] = {"cpu": 1, "cuda:0": 1}
    storage.write_bytes(shard_name(2, "stats.json"), json.dumps({**new, "shard": 2}).encode())
    summary = write_manifest(storage, [[0, 1]] * 3, load_config(GenerateConfig), 5.0, [])
    assert summary["clips"] == 6 and summary["stage_seconds"]["pair"] == 9.0
    assert summary["stage_placement"] == {"decode": {"cpu": 4}, "depth": {"cuda:0": 4},
                                          "pair": {"cpu": 1, "cuda:0": 3}}
    assert json.loads(storage.read_bytes("manifest.json"))["summary"]["stage_placement"] == summary["stage_placement"]
    assert "stage pair: 9.0 worker-s, 0.67 clips/s per worker (on cpu, cuda:0)" in format_summary(summary)


def test_the_gapw_kernel_changes_neither_the_fingerprint_nor_the_sample_label():
    """Every kernel gives the same samples: an output begun with one resumes with another, and samples are
    labelled alike."""
    from dreamstereo.pipeline.clip import chain_hash

    base = load_config(GenerateConfig)
    for kernel in ("torch", "numba"):
        other = load_config(GenerateConfig, [], [f"process.pairs.warp.kernel={kernel}"])
        assert input_fingerprint(INPUTS, other) == input_fingerprint(INPUTS, base), kernel
        assert chain_hash(other.process) == chain_hash(base.process), kernel


def test_the_cpu_kernel_on_a_gpu_placement_is_refused_naming_both_keys():
    import pytest

    from dreamstereo.config import ConfigError

    with pytest.raises(ConfigError, match=r"process.pairs.warp.kernel=numba .* resources.pair_placement=depth"):
        load_config(GenerateConfig, [], ["process.pairs.warp.kernel=numba", "resources.pair_placement=depth",
                                         "resources.depth_device=cuda"])
    load_config(GenerateConfig, [], ["process.pairs.warp.kernel=numba", "resources.pair_placement=depth"])  # cpu
