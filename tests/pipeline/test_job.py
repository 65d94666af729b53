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
    for override in ("resources.depth_device=cuda", "resources.pair_actors=3", "progress_every_s=5"):
        assert input_fingerprint(INPUTS, load_config(GenerateConfig, [], [override])) == base, override
