"""Inputs from folders, globs and CSV/parquet manifests (OpenVid-style), local and on S3."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamstereo.io.storage import S3Config, S3Storage, StorageError
from dreamstereo.pipeline.manifest import InputConfig, group_into_shards, parse_filter, read_inputs

OPENVID_CSV = (
    "video,caption,aesthetic score,motion score,temporal consistency score,camera motion,frame,fps,seconds\n"
    "clip_b.mp4,a dog,5.1,3.2,0.99,static,120,24,5.0\n"
    "clip_a.mp4,a cat,4.2,1.0,0.98,pan,96,24,4.0\n"
    "sub/clip_c.mp4,a car,6.0,8.0,0.97,zoom,48,24,2.0\n"
)


def test_folder_and_glob_are_sorted_videos_only(tmp_path):
    for name in ("b.mp4", "a.MOV", "notes.txt", "sub/c.mkv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    uris = [v.uri for v in read_inputs(str(tmp_path), InputConfig())]
    assert uris == sorted(str(tmp_path / n) for n in ("a.MOV", "b.mp4", "sub/c.mkv"))
    assert [v.uri for v in read_inputs(str(tmp_path / "*.mp4"), InputConfig())] == [str(tmp_path / "b.mp4")]


def test_openvid_csv_with_base_uri_and_filters(tmp_path):
    (tmp_path / "OpenVid-1M.csv").write_text(OPENVID_CSV)
    cfg = InputConfig(base_uri="s3://corpus/openvid", filters=["aesthetic score>=4.5", "motion score < 5"])
    videos = read_inputs(str(tmp_path / "OpenVid-1M.csv"), cfg)
    assert [v.uri for v in videos] == ["s3://corpus/openvid/clip_b.mp4"]  # row order, filters applied
    assert videos[0].row["caption"] == "a dog"
    assert len(read_inputs(str(tmp_path / "OpenVid-1M.csv"), InputConfig(limit=2))) == 2


def test_parquet_manifest_on_s3(s3_bucket, s3_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["x/1.mp4", "x/2.mp4"], "score": [1.0, 2.0]}), tmp_path / "m.parquet")
    cfg = S3Config(endpoint_url=s3_env)
    S3Storage(f"s3://{s3_bucket}", cfg).upload_file("meta/m.parquet", tmp_path / "m.parquet")
    videos = read_inputs(f"s3://{s3_bucket}/meta/m.parquet",
                         InputConfig(path_column="path", base_uri=f"s3://{s3_bucket}/videos", filters=["score>1"]), cfg)
    assert [v.uri for v in videos] == [f"s3://{s3_bucket}/videos/x/2.mp4"]


def test_s3_prefix_listing(s3_bucket, s3_env):
    cfg = S3Config(endpoint_url=s3_env)
    storage = S3Storage(f"s3://{s3_bucket}/raw", cfg)
    for key in ("b.mp4", "a.mp4", "readme.md"):
        storage.write_bytes(key, b"x")
    assert [v.uri for v in read_inputs(f"s3://{s3_bucket}/raw", InputConfig(), cfg)] == [
        f"s3://{s3_bucket}/raw/a.mp4", f"s3://{s3_bucket}/raw/b.mp4"]


@pytest.mark.parametrize("cfg,needle", [
    (InputConfig(path_column="file"), "no column 'file'"),
    (InputConfig(filters=["nope>1"]), "no such column"),
    (InputConfig(filters=["aesthetic score ~ 3"]), "must look like"),
])
def test_bad_manifest_settings_are_named(tmp_path, cfg, needle):
    (tmp_path / "m.csv").write_text(OPENVID_CSV)
    with pytest.raises(ValueError, match=needle):
        read_inputs(str(tmp_path / "m.csv"), cfg)


def test_missing_sources(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        read_inputs(str(tmp_path / "none.csv"), InputConfig())
    with pytest.raises(StorageError, match="neither a folder"):
        read_inputs(str(tmp_path / "none"), InputConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no input videos"):
        read_inputs(str(tmp_path / "empty"), InputConfig())


def test_shards_are_deterministic():
    assert group_into_shards(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert parse_filter("a b>=2")[0] == "a b"
    with pytest.raises(ValueError):
        group_into_shards([1], 0)


def test_operator_contract_is_a_chain():
    from dreamstereo.pipeline import actors
    from dreamstereo.pipeline.job import check_contract

    check_contract(["decode", "depth", "pair", "driver"])
    check_contract(["decode", "pair", "driver"])  # the oracle needs no depth operator
    with pytest.raises(RuntimeError, match="pair reads"):
        check_contract(["pair", "driver"])
    assert set(actors.DRIVER_COLUMNS) <= set(actors.PAIR_COLUMNS)


def test_duplicate_uris_are_dropped(tmp_path):
    (tmp_path / "m.csv").write_text("video\na.mp4\nb.mp4\na.mp4\n")
    videos = read_inputs(str(tmp_path / "m.csv"), InputConfig(base_uri="s3://x/v"))
    assert [v.uri for v in videos] == ["s3://x/v/a.mp4", "s3://x/v/b.mp4"]


def test_rows_that_name_no_input_become_invalid_inputs_not_errors(tmp_path):
    (tmp_path / "m.csv").write_text('video,n\nok.mp4,1\n,2\n"  ",3\nhttp://example.invalid/x.mp4,4\n'
                                    's3://other/y.mp4,5\n../escape.mp4,6\n/abs/z.mp4,7\n')
    videos = read_inputs(str(tmp_path / "m.csv"), InputConfig(base_uri="s3://corpus/v"))
    problems = {v.row["n"]: v.problem for v in videos}
    assert [v.uri for v in videos if not v.problem] == ["s3://corpus/v/ok.mp4", "s3://other/y.mp4",
                                                          "s3://corpus/v/../escape.mp4", str(Path("/abs/z.mp4"))]
    assert "row 2" in problems[2] and "empty 'video' cell" in problems[2] and "empty" in problems[3]
    assert "unsupported scheme 'http'" in problems[4]
    # each invalid row keeps a unique, traceable name (its own sample key) and is never read
    assert [v.uri for v in videos if v.problem] == [f"{tmp_path / 'm.csv'}#row={n}" for n in (2, 3, 4)]
    confined = read_inputs(str(tmp_path / "m.csv"), InputConfig(base_uri="s3://corpus/v", allow_outside_base=False))
    outside = {v.row["n"] for v in confined if v.problem and "outside input.base_uri" in v.problem}
    assert outside == {5, 6, 7}


def test_non_text_path_cells_are_invalid_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"video": [1, 2], "score": [1.0, 2.0]}), tmp_path / "m.parquet")
    videos = read_inputs(str(tmp_path / "m.parquet"), InputConfig())
    assert all("holds int 1" in v.problem or "holds int 2" in v.problem for v in videos) and len(videos) == 2


@pytest.mark.parametrize("text, cfg, needle", [
    ("", InputConfig(), "cannot be read as CSV"),
    ("video,score\na.mp4,1\nb.mp4,2,3\n", InputConfig(), "cannot be read as CSV"),  # ragged
    ("video,score\na.mp4,high\nb.mp4,2\n", InputConfig(filters=["score>1"]), "holds string, not numbers"),
])
def test_unreadable_manifests_and_filters_name_the_file(tmp_path, text, cfg, needle):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError, match=needle) as info:
        read_inputs(str(tmp_path / "m.csv"), cfg)
    assert str(tmp_path / "m.csv") in str(info.value)
