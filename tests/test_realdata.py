"""Real stereo pairs (Middlebury 2005/2006, ../shared/data): GAPW against the soft splat on GT occlusion."""

from __future__ import annotations

import pytest

from dreamstereo.warp_eval import evaluate_pair, find_pairs, load_pair

pytestmark = pytest.mark.realdata


def test_finds_the_three_pairs(middlebury_dir):
    assert [p.name for p in find_pairs(middlebury_dir)] == ["Cloth3", "Reindeer", "Wood2"]


@pytest.mark.parametrize("name", ["Cloth3", "Reindeer", "Wood2"])
def test_gapw_beats_soft_splat_on_real_occlusion(middlebury_dir, name):
    rows = {r["method"]: r for r in evaluate_pair(load_pair(middlebury_dir / name), ["gapw", "soft_splat"])}
    gapw, soft = rows["gapw"], rows["soft_splat"]
    assert gapw["recall"] >= soft["recall"]
    assert gapw["iou"] >= 0.97 * soft["iou"]
    assert gapw["roundtrip_psnr"] >= soft["roundtrip_psnr"] + 1.5
    # Sanity on absolute levels, so a broken ground truth cannot make both look alike.
    assert gapw["iou"] > 0.8 and gapw["precision"] > 0.9
