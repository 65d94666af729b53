"""`dreamstereo evaluate` on real PBDP shards with the toy model (real diffusers classes, random weights)."""

from __future__ import annotations

import json

import pytest

from dreamstereo.cli import main
from tests.training.shards import write_shards


@pytest.fixture(scope="module")
def pair_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_shards(folder, shards=2, per_shard=1, pairs=True, height=48, width=64, frames=9)
    return str(folder)


def test_report_table_and_sheet(toy_wan_model, pair_output, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["-q", "evaluate", "--checkpoint", toy_wan_model, "--shards", pair_output, "--json", str(out),
                 "model.sasi.bucket_multiple=4", "model.sasi.k=0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "LPIPS not computed" in captured.out and "| method | output | PSNR" in captured.out
    report = json.loads(out.read_text())
    assert report["samples"] == 2 and report["frames"] == 2 * 9
    table = {(e["method"], e["variant"]): e for e in report["table"]}
    assert set(table) == {(m, v) for m in ("sparse", "dense", "opencv") for v in ("raw", "blended")}
    for (method, variant), e in table.items():
        assert 0 < e["psnr"] and -1 <= e["ssim"] <= 1 and e["ms_per_frame"] > 0
    assert 0 < table["sparse", "raw"]["retention"] < 1 and table["dense", "raw"]["retention"] == 1
    assert table["opencv", "raw"]["dit_ms_per_frame"] is None
    # Blending keeps V1' outside the mask, which is V1 there up to the round trip: never worse than raw.
    assert table["sparse", "blended"]["psnr"] >= table["sparse", "raw"]["psnr"]
    assert out.with_suffix(".md").read_text().startswith("| method |") and out.with_suffix(".png").is_file()


def test_raw_clip_shards_are_refused(toy_wan_model, tmp_path, capsys):
    write_shards(tmp_path / "raw", shards=1, per_shard=1, height=32, width=32, frames=5)
    code = main(["-q", "evaluate", "--checkpoint", toy_wan_model, "--shards", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a PBDP pair" in err and len(err.strip().splitlines()) == 1
    code = main(["-q", "evaluate", "--checkpoint", toy_wan_model, "--shards", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "has no manifest.json" in err


def test_lpips_is_reported_when_weights_are_given(toy_wan_model, pair_output, lpips_folder, capsys):
    code = main(["-q", "evaluate", "--checkpoint", toy_wan_model, "--shards", pair_output, "max_samples=1",
                 f"lpips_weights={lpips_folder}", "model.sasi.bucket_multiple=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "LPIPS not computed" not in captured.out and "| LPIPS |" in captured.out
