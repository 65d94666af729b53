"""`dreamstereo report`: the HTML report of a real `generate` output (oracle depth, tiny synthetic videos, a static
clip that is rejected and a corrupt file that fails), read from a folder and from S3, damaged, with hostile
names, and loaded in a real headless Chromium."""

from __future__ import annotations

import dataclasses
import html.parser
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamstereo.cli import main
from dreamstereo.io.shards import PARQUET_SCHEMA, QUALITY_COLUMNS
from dreamstereo.report import ItemSample, Reservoir, ValueSample
from dreamstereo.scenes import demo_scene, write_scene
from tests.conftest import S3_SECRET

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium as root, on a machine with no network (docs: environment.md, "A real browser").
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = '<img src=x onerror=alert(1)>"&\'<script>alert(2)</script>'
SMALL = ["process.depth.backend=oracle", "process.decode.clip_frames=9", "process.decode.max_clips=2",
         "process.decode.buckets=[[64,96]]", "process.decode.min_short_side=32", "shard_size=2",
         "process.pairs.warp.kernel=torch"]  # (torch: no numba compile in the Ray workers of a 9-clip run)


@pytest.fixture(scope="module")
def output(tmp_path_factory, ray_session):
    """A real `generate` output: 2 moving scenes (4 kept clips), a still clip (2 rejected: static) and a corrupt
    file (1 failed: decode_failed), in 2 shards."""
    folder = tmp_path_factory.mktemp("report-corpus")
    for seed in range(2):
        write_scene(demo_scene(width=192, height=128, num_frames=20, seed=seed), folder / f"scene{seed}.mp4", fps=24)
    moving = demo_scene(width=192, height=128, num_frames=20, seed=7)
    still = dataclasses.replace(moving, frames=np.repeat(moving.frames[:1], 20, 0),
                                disparity=np.repeat(moving.disparity[:1], 20, 0))
    write_scene(still, folder / "still.mp4", fps=24)
    (folder / "broken.mp4").write_bytes(b"\x00not a video" * 100)
    out = tmp_path_factory.mktemp("report-output") / "dst"
    assert main(["generate", "--input", str(folder), "--output", str(out), *SMALL]) == 0
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert (summary["samples"], summary["rejected"], summary["failed"]) == (4, 2, 1)
    return out


class _Page(html.parser.HTMLParser):
    """What the tests read off a page: counts (data-count / data-reason with data-of), images, links, text."""

    def __init__(self, text: str):
        super().__init__()
        self.counts, self.reasons, self.images, self.links, self.attrs = {}, {}, [], [], []
        self.text, self._cell = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.attrs.append((tag, attrs))
        if "data-count" in attrs:
            self._cell = (self.counts, (attrs["data-count"], attrs["data-of"]))
        elif "data-reason" in attrs:
            self._cell = (self.reasons, (attrs["data-reason"], attrs["data-of"]))
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("href", "src"):
            if name in attrs:
                self.links.append(attrs[name])

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            table, key = self._cell
            table[key] = data
            self._cell = None


def _report(capsys, dst, out, *overrides) -> tuple[Path, _Page]:
    code = main(["report", str(dst), "--out", str(out), *overrides])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    index = Path(captured.out.strip().splitlines()[-1])
    assert index == Path(out) / "index.html"
    return index, _Page(index.read_text())


def _assert_counts_equal_the_manifest(page: _Page, summary: dict, origins=("manifest", "parquet")) -> None:
    names = {"clips": "clips", "ok": "samples", "rejected": "rejected", "failed": "failed"}
    for origin in origins:
        for name, key in names.items():
            assert int(page.counts[(name, origin)]) == summary[key], (name, origin)
        for reason, count in summary["reasons"].items():
            assert int(page.reasons[(reason, origin)]) == count, (reason, origin)
    assert int(page.counts[("inputs", "manifest")]) == summary["inputs"]


@pytest.mark.slow
def test_the_page_counts_what_the_manifest_counts_and_every_image_decodes(output, tmp_path, capsys):
    summary = json.loads((output / "manifest.json").read_text())["summary"]
    index, page = _report(capsys, output, tmp_path / "report")
    _assert_counts_equal_the_manifest(page, summary)
    text = " ".join(page.text)
    # self-contained: relative images beside the page, no address outside it, no script
    assert page.images and all(link.startswith(("img/", "data:")) for link in page.links)
    assert not [tag for tag, _ in page.attrs if tag in ("script", "iframe", "object")]
    files = sorted(p.name for p in (index.parent / "img").iterdir())
    assert sorted(src[len("img/"):] for src in page.images) == files
    for name in files:
        with Image.open(index.parent / "img" / name) as image:
            image.load()
            assert image.size[0] > 0 and image.size[1] > 0
    # every quality score has its histogram; the gallery has each kept sample (4 tiles) and the 3 others
    for score in QUALITY_COLUMNS:
        assert f"hist-{score[len('quality_'):]}.png" in files
    assert sum(name.startswith("kept-") for name in files) == 4 * 4
    with Image.open(index.parent / "img" / "kept-00-frame.jpg") as image:
        assert image.size == (96, 64)  # tiles narrower than tile_width keep their size
    # the rejected clips show the contact sheet generate kept of them (previews/<shard>.tar); the failed one none
    assert summary["previews"] == 2 and sum(name.endswith("-preview.jpg") for name in files) == 2
    cards = [a for tag, a in page.attrs if "data-status" in a]
    assert sorted(a["data-status"] for a in cards) == ["failed"] + ["ok"] * 4 + ["rejected"] * 2
    assert "beyond the thresholds: motion" in text and "decode_failed" in text
    assert "mask_ratio 0 " not in text  # a clip rejected before pairing shows no placeholder mask ratio
    assert summary["config_hash"] in text
    assert "All 4 sources." in text
    # a second run replaces the report as a whole
    index2, _ = _report(capsys, output, tmp_path / "report", "gallery=1", "seed=3")
    assert sum(p.name.startswith("kept-") for p in (index2.parent / "img").iterdir()) == 4
    assert [p.name for p in index2.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_large_outputs_are_sampled_and_the_page_says_how(output, tmp_path, capsys):
    index, page = _report(capsys, output, tmp_path / "report", "max_hist_values=3", "gallery=2", "max_sources=2",
                          "tile_width=40")
    # gallery tiles are scaled to tile_width (a full-size clip would add megabytes a sample); each links to itself
    tiles = [src for src in page.images if src.startswith(("img/kept-", "img/other-"))]
    assert sum(src.startswith("img/kept-") for src in tiles) == 2 * 4
    for src in tiles:
        assert page.links.count(src) == 2  # <a href> and <img src>
        with Image.open(index.parent / src) as image:
            assert image.size[0] == 40, (src, image.size)
            if src.startswith("img/kept-"):
                assert image.size[1] == 27  # 96x64 scaled, aspect kept
    motion = next(a for tag, a in page.attrs if a.get("data-hist") == "motion")
    assert (motion["data-shown"], motion["data-of"]) == ("3", "6")  # 4 kept + 2 rejected clips have scores
    mask = next(a for tag, a in page.attrs if a.get("data-hist") == "mask_ratio")
    assert mask["data-of"] == "4"  # the rejected clips' mask ratio was never measured
    text = " ".join(page.text)
    assert "a seeded uniform sample (seed 0) of 6" in text
    assert "2 of 4 kept samples" in text and "2 of 3 rejected or failed clips" in text
    assert "The 2 sources with the most clips" in text and "of 4." in text


def test_reservoirs_are_uniform_seeded_and_bounded():
    values = ValueSample(100, np.random.default_rng(0))
    stream = np.arange(100_000, dtype=np.float64)
    for start in range(0, len(stream), 7_000):
        part = stream[start:start + 7_000]
        values.add(part, part % 2 == 0)
    got, kept = values.arrays()
    assert len(got) == 100 and values.seen == 100_000 and len(set(got)) == 100
    assert np.array_equal(kept, got % 2 == 0)
    assert abs(got.mean() - 50_000) < 8_000  # uniform over the stream (a biased sample sits near one end)
    again = Reservoir(100, np.random.default_rng(0))
    assert Reservoir(100, np.random.default_rng(0)).offer(500) == again.offer(500)
    items = ItemSample(3, np.random.default_rng(1))
    items.add(2, lambda i: i)
    assert items.taken() == [0, 1]


def _damage(output: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of ``output`` with shard 0's parquet truncated and shard 1's tar cut in its first sample."""
    copy = tmp_path / "damaged"
    shutil.copytree(output, copy)
    parquet = copy / "shards" / "000000.parquet"
    parquet.write_bytes(parquet.read_bytes()[: parquet.stat().st_size // 2])
    tar = copy / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:1500])
    return copy, json.loads((copy / "manifest.json").read_text())["summary"]


@pytest.mark.slow
def test_a_damaged_shard_is_listed_and_the_report_completes(output, tmp_path, capsys):
    dst, summary = _damage(output, tmp_path)
    _, page = _report(capsys, dst, tmp_path / "report")
    unreadable = {a["data-unreadable-file"] for tag, a in page.attrs if "data-unreadable-file" in a}
    assert unreadable == {"shards/000000.parquet", "shards/000001.tar"}
    text = " ".join(page.text)
    assert "2 shard file(s) could not be read" in text and "do not give the manifest's counts" in text
    for name, key in {"clips": "clips", "ok": "samples"}.items():  # the manifest's counts stay on the page
        assert int(page.counts[(name, "manifest")]) == summary[key]
    assert int(page.counts[("clips", "parquet")]) < summary["clips"]
    assert "its shard's tar is unreadable" in text


def _rewrite_parquet(path: Path, edit) -> None:
    table = pq.read_table(path)
    pq.write_table(edit(table), path)


@pytest.mark.slow
def test_strings_from_the_data_are_escaped_and_version_1_parquet_is_read(output, tmp_path, capsys):
    copy = tmp_path / "hostile"
    shutil.copytree(output, copy)
    for path in sorted((copy / "shards").glob("*.parquet")):
        def edit(table):
            rows = table.to_pylist()
            for row in rows:
                row["source"] = HOSTILE + row["source"]
                row["message"] = HOSTILE if row["status"] == "failed" else row["message"]
            return pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
        _rewrite_parquet(path, edit)
    first = copy / "shards" / "000000.parquet"  # shard 0 as version 1 wrote it: no typed quality columns
    _rewrite_parquet(first, lambda table: table.drop_columns(list(QUALITY_COLUMNS)))
    summary = json.loads((copy / "manifest.json").read_text())["summary"]
    index, page = _report(capsys, copy, tmp_path / "report")
    raw = index.read_text()
    assert "<script>" not in raw and "<img src=x" not in raw and "&lt;script&gt;alert(2)" in raw
    assert sum(HOSTILE in text for text in page.text) >= 4  # the parsed text holds the strings as given
    _assert_counts_equal_the_manifest(page, summary)
    motion = next(a for tag, a in page.attrs if a.get("data-hist") == "motion")
    assert motion["data-of"] == "6"  # the scores of the version-1 shard come from its JSON column


@pytest.mark.slow
def test_an_s3_output_is_reported_without_its_secrets(output, tmp_path, capsys, s3_bucket, s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"run/{path.relative_to(output).as_posix()}")
    summary = json.loads((output / "manifest.json").read_text())["summary"]
    index, page = _report(capsys, f"s3://{s3_bucket}/run", tmp_path / "report", f"s3.endpoint_url={s3_env}")
    _assert_counts_equal_the_manifest(page, summary)
    assert sum(p.name.startswith("kept-") for p in (index.parent / "img").iterdir()) == 16
    assert all(S3_SECRET not in p.read_bytes().decode("latin-1") for p in index.parent.rglob("*") if p.is_file())
    code = main(["report", f"s3://{s3_bucket}/nothing", "--out", str(tmp_path / "none"), f"s3.endpoint_url={s3_env}"])
    err = capsys.readouterr().err
    assert code == 2 and f"s3://{s3_bucket}/nothing" in err and "no manifest.json" in err, err


def test_a_folder_that_is_no_generate_output_is_one_line_naming_it(tmp_path, capsys):
    for dst in (tmp_path / "missing", tmp_path):
        code = main(["report", str(dst), "--out", str(tmp_path / "report")])
        err = capsys.readouterr().err
        assert code == 2 and str(dst) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "report").exists()


def _browser():
    """Debian's Chromium through playwright, or a skip (a failure with DREAMSTEREO_REQUIRE_BROWSER=1)."""
    required = os.environ.get("DREAMSTEREO_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        (pytest.fail if required else pytest.skip)(f"playwright is not installed ({exc})")
    if not CHROMIUM.exists():
        (pytest.fail if required else pytest.skip)(f"{CHROMIUM} is missing (apt-get install chromium)")
    return sync_playwright


@pytest.mark.slow
def test_the_page_in_a_real_browser(output, tmp_path, capsys):
    sync_playwright = _browser()
    copy = tmp_path / "hostile"  # hostile names too: an injected <img onerror> would show as a console error
    shutil.copytree(output, copy)
    path = copy / "shards" / "000000.parquet"
    rows = pq.read_table(path).to_pylist()
    for row in rows:
        row["source"] = HOSTILE
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), path)
    summary = json.loads((copy / "manifest.json").read_text())["summary"]
    index, _ = _report(capsys, copy, tmp_path / "report")
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(index.resolve().as_uri(), wait_until="load")
            images = page.evaluate("""async () => Promise.all([...document.images].map(async img => {
                let error = null;
                try { await img.decode(); } catch (e) { error = String(e); }
                return {src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth, error};
            }))""")
            counts = page.evaluate("""() => [...document.querySelectorAll('[data-count],[data-reason]')].map(e =>
                [e.dataset.count || e.dataset.reason, e.dataset.of, e.textContent.trim()])""")
        finally:
            browser.close()
    assert errors == []
    assert len(images) > 16 and all(i["complete"] and i["width"] > 0 and i["error"] is None for i in images), images
    found = {(name, origin): value for name, origin, value in counts}
    names = {"clips": "clips", "ok": "samples", "rejected": "rejected", "failed": "failed", "inputs": "inputs"}
    for name, key in names.items():
        assert int(found[(name, "manifest")]) == summary[key], name
        if name != "inputs":
            assert int(found[(name, "parquet")]) == summary[key], name
    for reason, count in summary["reasons"].items():
        assert int(found[(reason, "manifest")]) == int(found[(reason, "parquet")]) == count


def test_the_report_config_refuses_bad_settings():
    from dreamstereo.config import ConfigError, load_config
    from dreamstereo.report import ReportConfig

    for bad in ("gallery=-1", "max_hist_values=0", "batch_rows=0"):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            load_config(ReportConfig, [], [bad])
    assert load_config(ReportConfig, [], ["gallery=0"]).gallery == 0


def test_io_bytes_helpers_read_only_the_first_frame():
    from dreamstereo.arrays import ArrayFile
    from dreamstereo.io import media

    clip = np.arange(3 * 4 * 5, dtype=np.float16).reshape(3, 4, 5)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, disparity=clip)
    assert np.array_equal(ArrayFile(buffer.getvalue()).read_first(40), clip[0])  # 4 x 5 x 2 bytes: within 40
    with pytest.raises(ValueError, match="more than the limit"):
        ArrayFile(buffer.getvalue()).read_first(39)
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    frames[0] = 200
    first = media.decode_first_frame_bytes(media.encode_video_bytes(frames, 12.0, crf=0))
    assert first.shape == (16, 16, 3) and abs(int(first.mean()) - 200) <= 2


@pytest.mark.parametrize("manifest", ['{"summary": {}, "shards": [{"shard": "x"}]}', '{"summary": {}, "shards": 7}',
                                      '{"summary": {}, "shards": [null]}', '{"summary": {"reasons": 5}}',
                                      '{"shards": []}', '[1, 2]'])
def test_a_damaged_manifest_is_one_line_naming_the_output(tmp_path, capsys, manifest):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "manifest.json").write_text(manifest)
    code = main(["report", str(tmp_path / "dst"), "--out", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "dst") in err
    assert not (tmp_path / "report").exists()
