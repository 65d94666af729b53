"""Shard writing: tar + parquet + stats (written last), read back with webdataset and pyarrow."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from dreamstereo.io.shards import ShardWriter, committed_shards, preview_name, shard_name
from dreamstereo.io.storage import LocalStorage, S3Config, S3Storage


class CountingStorage(LocalStorage):
    """A local folder that remembers the order of writes (to check the commit marker comes last)."""

    def __init__(self, root):
        super().__init__(root)
        self.order = []

    def write_bytes(self, key, data):
        self.order.append(key)
        super().write_bytes(key, data)

    def upload_file(self, key, local):
        self.order.append(key)
        super().upload_file(key, local)


def _fill(writer):
    writer.add({"key": "a-00000000-c000", "source": "a.mp4", "status": "ok", "reason": None,
                "scores": {"mask_ratio": 0.1}}, {"rgb.mp4": b"video", "json": b"{}"})
    writer.add({"key": "b-00000000-c000", "source": "b.mp4", "status": "rejected", "reason": "static",
                "scores": {"motion": 0.0}})
    writer.add({"key": "c-00000000-c000", "source": "c.mp4", "status": "failed", "reason": "decode_failed",
                "scores": {}})


def test_commit_writes_tar_parquet_then_stats(tmp_path):
    import webdataset as wds

    storage = CountingStorage(tmp_path / "out")
    writer = ShardWriter(storage, 7, config_hash="abc")
    _fill(writer)
    stats = writer.commit({"decode": 1.5})
    assert storage.order == [shard_name(7, "tar"), shard_name(7, "parquet"), shard_name(7, "stats.json")]
    assert (stats["count"], stats["samples"], stats["ok"], stats["rejected"], stats["failed"]) == (3, 1, 1, 1, 1)
    assert stats["reasons"] == {"failed:decode_failed": 1, "rejected:static": 1}
    samples = list(wds.WebDataset(str(tmp_path / "out" / "shards" / "000007.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a-00000000-c000"] and samples[0]["rgb.mp4"] == b"video"
    table = pq.read_table(tmp_path / "out" / "shards" / "000007.parquet").to_pylist()
    assert [r["status"] for r in table] == ["ok", "rejected", "failed"]  # every input accounted for
    assert json.loads(table[1]["scores"]) == {"motion": 0.0}
    assert committed_shards(storage) == {7}
    assert stats["previews"] == 0 and not (tmp_path / "out" / preview_name(7)).exists()


def test_a_rejected_clips_preview_goes_to_the_previews_tar_never_the_shard(tmp_path):
    import webdataset as wds

    storage = CountingStorage(tmp_path / "out")
    writer = ShardWriter(storage, 3)
    _fill(writer)
    writer.add({"key": "d-00000000-c000", "source": "d.mp4", "status": "rejected", "reason": "mask_ratio_low",
                "scores": {}}, {"preview.jpg": b"\xff\xd8jpeg"})
    with pytest.raises(ValueError, match="a failed clip has no sample, only a preview.jpg"):
        writer.add({"key": "e-00000000-c000", "source": "e.mp4", "status": "failed", "reason": "decode_failed",
                    "scores": {}}, {"rgb.mp4": b"video"})
    stats = writer.commit()
    assert storage.order == [shard_name(3, "tar"), shard_name(3, "parquet"), preview_name(3),
                             shard_name(3, "stats.json")]  # the stats file still commits last
    assert (stats["samples"], stats["rejected"], stats["previews"]) == (1, 2, 1)
    shard = list(wds.WebDataset(str(tmp_path / "out" / shard_name(3, "tar")), shardshuffle=False))
    assert [s["__key__"] for s in shard] == ["a-00000000-c000"]
    previews = list(wds.WebDataset(str(tmp_path / "out" / preview_name(3)), shardshuffle=False))
    assert [(s["__key__"], s["preview.jpg"]) for s in previews] == [("d-00000000-c000", b"\xff\xd8jpeg")]
    # a later commit of the shard without previews (a retry) leaves none of the earlier one behind
    writer = ShardWriter(storage, 3)
    _fill(writer)
    assert writer.commit()["previews"] == 0 and not (tmp_path / "out" / preview_name(3)).exists()


def test_uncommitted_shard_is_not_done(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    storage.write_bytes(shard_name(3, "tar"), b"partial")  # a crash before the stats file
    assert committed_shards(storage) == set()


def test_bad_status_is_refused(tmp_path):
    with pytest.raises(ValueError, match="status"):
        ShardWriter(LocalStorage(tmp_path), 0).add({"key": "k", "status": "done"})


def test_same_on_s3(s3_bucket, s3_env):
    storage = S3Storage(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    writer = ShardWriter(storage, 0)
    _fill(writer)
    writer.commit()
    assert committed_shards(storage) == {0}
    table = pq.read_table(io.BytesIO(storage.read_bytes(shard_name(0, "parquet"))))
    assert table.num_rows == 3


def test_staged_samples_commit_in_input_order_and_leave_no_staging(tmp_path):
    import webdataset as wds

    from dreamstereo.io.shards import commit_staged, read_staged, stage_sample

    storage = CountingStorage(tmp_path / "out")
    members = {"b": {"rgb.mp4": b"video-b", "json": b'{"k": "b"}'}, "a": {"rgb.mp4": b"video-a", "json": b"{}"}}
    records = []
    for key, index in (("b-00000000-c000", 1), ("a-00000000-c000", 0)):  # arrive out of input order
        part = stage_sample(storage, 4, key, members[key[0]])
        assert read_staged(storage, part, key) == members[key[0]]  # staging round trip is exact
        records.append({"key": key, "source": f"{key[0]}.mp4", "input_index": index, "clip_index": 0,
                        "status": "ok", "reason": None, "scores": {}, "part": part,
                        "placement": {"decode": "cpu", "depth": "cuda:0", "pair": "cuda:0", "write": "cpu"}})
    records.append({"key": "c-00000000-c000", "source": "c.mp4", "input_index": 2, "clip_index": 0,
                    "status": "failed", "reason": "decode_failed", "scores": {}, "placement": {"decode": "cpu"}})
    stats = commit_staged(storage, 4, records, {"pair": 2.0}, config_hash="h")
    assert (stats["count"], stats["samples"], stats["failed"]) == (3, 2, 1)
    samples = list(wds.WebDataset(str(tmp_path / "out" / shard_name(4, "tar")), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a-00000000-c000", "b-00000000-c000"]
    assert samples[1]["rgb.mp4"] == b"video-b"
    table = pq.read_table(tmp_path / "out" / shard_name(4, "parquet")).to_pylist()
    assert [r["key"][0] for r in table] == ["a", "b", "c"] and "part" not in table[0]
    # Where each stage ran: per record in the parquet, counted per stage and device in the stats.
    assert [json.loads(r["placement"]) for r in table] == [records[1]["placement"], records[0]["placement"],
                                                          {"decode": "cpu"}]
    assert stats["stage_placement"] == {"decode": {"cpu": 3}, "depth": {"cuda:0": 2}, "pair": {"cuda:0": 2},
                                        "write": {"cpu": 2}}
    assert storage.list("_staging/") == []
    assert not (tmp_path / "out" / "_staging" / "000004").exists()  # nor its empty folder (issue 13, item 5)
    writes = len(storage.order)
    assert commit_staged(storage, 4, records) == stats and len(storage.order) == writes  # a retried task


def test_a_full_disk_is_a_storage_error_naming_the_object_and_leaves_no_partial_shard(tiny_disk):
    import os

    from dreamstereo.io.shards import commit_staged, stage_sample
    from dreamstereo.io.storage import StorageError

    storage = LocalStorage(tiny_disk.path / "out")
    tiny_disk.fill(leave=700 * 1024)
    records = []
    for index, key in enumerate(("a-00000000-c000", "b-00000000-c000")):
        part = stage_sample(storage, 4, key, {"bin": os.urandom(300 * 1024)})
        records.append({"key": key, "source": f"{key[0]}.mp4", "input_index": index, "clip_index": 0,
                        "status": "ok", "reason": None, "scores": {}, "part": part})
    with pytest.raises(StorageError) as info:  # a third sample does not fit
        stage_sample(storage, 4, "c-00000000-c000", {"bin": os.urandom(300 * 1024)})
    assert str(info.value) == (f"cannot write {str(tiny_disk.path / 'out' / '_staging' / '000004' / 'c-00000000-c000.tar')!r}: "
                               f"No space left on device [ENOSPC]")
    with pytest.raises(StorageError, match=r"cannot write '.*/out/shards/000004\.tar': No space left on device"):
        commit_staged(storage, 4, records)  # the shard tar (600 KB) does not fit beside its staged samples
    staged = ["out/_staging/000004/a-00000000-c000.tar", "out/_staging/000004/b-00000000-c000.tar"]
    assert [n for n in tiny_disk.files() if not n.endswith(("/shards", "/_staging", "/000004", "out"))] == staged
    tiny_disk.free()  # a rerun with room commits the same shard from the kept staging objects
    stats = commit_staged(storage, 4, records)
    assert stats["samples"] == 2 and committed_shards(storage) == {4} and storage.list("_staging/") == []
    assert not [n for n in tiny_disk.files() if "/." in n]


def test_a_read_only_disk_is_an_unwritable_storage_error_naming_the_object(tiny_disk):
    from dreamstereo.io.storage import UnwritableStorageError

    storage = LocalStorage(tiny_disk.path / "out")
    storage.write_bytes("kept.json", b"{}")
    tiny_disk.read_only()
    with pytest.raises(UnwritableStorageError) as info:
        storage.write_bytes("shards/000000_stats.json", b"{}")
    assert str(info.value) == (f"cannot write {str(tiny_disk.path / 'out' / 'shards' / '000000_stats.json')!r}: "
                               f"Read-only file system [EROFS]")
    assert storage.read_bytes("kept.json") == b"{}" and storage.list() == ["kept.json"]


def test_prune_removes_only_an_empty_folder(tmp_path, s3_bucket, s3_env):
    storage = LocalStorage(tmp_path / "out")
    storage.write_bytes("_staging/000001/a.tar", b"a")
    storage.write_bytes("_staging/000002/b.tar", b"b")
    storage.prune("_staging/000001/")  # holds a.tar: stays
    assert storage.list("_staging/") == ["_staging/000001/a.tar", "_staging/000002/b.tar"]
    storage.delete("_staging/000001/a.tar")
    storage.prune("_staging/000001/")
    storage.prune("_staging/")  # still holds 000002/: stays
    assert not (tmp_path / "out" / "_staging" / "000001").exists() and (tmp_path / "out" / "_staging").is_dir()
    storage.prune("no/such/folder/")  # nothing there: nothing to do
    storage.prune("")  # never the root itself
    assert (tmp_path / "out").is_dir()
    s3 = S3Storage(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    s3.write_bytes("_staging/000001/a.tar", b"a")
    s3.prune("_staging/000001/")  # S3 has no folders: the object is untouched
    assert s3.list("_staging/") == ["_staging/000001/a.tar"]



def test_an_output_of_kept_failed_and_empty_shards_reads_as_one_table(tmp_path):
    """Issue 13, item 4: one typed schema in every shard's parquet, so the whole output is one table for
    pyarrow, pandas and DuckDB (before, a shard without failures wrote null-typed reason/message columns
    and reading the folder failed with "Unsupported cast from string to null")."""
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    from dreamstereo.io.shards import PARQUET_SCHEMA, PARQUET_SCHEMA_VERSION

    storage = LocalStorage(tmp_path / "out")
    scores = {"frames": 9, "short_side": 64, "mask_ratio": 0.12, "disparity_finite": True, "disparity_range": 3.5,
              "max_cut_score": 0.1, "motion": 0.02, "contrast": 0.3}
    kept = ShardWriter(storage, 0)
    for i in range(2):
        kept.add({"key": f"a-{i}", "source": "a.mp4", "input_index": 0, "clip_index": i, "status": "ok",
                  "reason": None, "message": None, "frames": 9, "worker": "w:1", "scores": scores,
                  "placement": {"decode": "cpu"}}, {"json": b"{}"})
    stats = [kept.commit()]
    failed = ShardWriter(storage, 1)
    failed.add({"key": "b-0", "source": "b.mp4", "input_index": 1, "clip_index": 0, "status": "failed",
                "reason": "decode_failed", "message": "not a video", "frames": 0, "worker": "w:2",
                "scores": {"message": "not a video"}})
    # a record that crossed JSON in the pipeline: its bool score arrives as 1.0
    failed.add({"key": "c-0", "source": "c.mp4", "input_index": 2, "clip_index": 0, "status": "rejected",
                "reason": "mask_ratio_high", "message": None, "frames": 9, "worker": "w:2",
                "scores": {**scores, "disparity_finite": 1.0, "mask_ratio": 0.9}})
    stats.append(failed.commit())
    stats.append(ShardWriter(storage, 2).commit())  # an input list whose last shard kept nothing
    assert all(s["parquet_schema_version"] == PARQUET_SCHEMA_VERSION for s in stats)
    for k in range(3):
        assert pq.read_schema(tmp_path / "out" / shard_name(k, "parquet")) == PARQUET_SCHEMA

    parquets = sorted(str(p) for p in (tmp_path / "out" / "shards").glob("*.parquet"))
    table = ds.dataset(parquets, format="parquet").to_table()
    assert table.num_rows == 4 and table.schema == PARQUET_SCHEMA
    # the folder itself, its tars and stats files passed over
    folder = ds.dataset(tmp_path / "out" / "shards", format="parquet", exclude_invalid_files=True).to_table()
    assert folder.sort_by("key").equals(table.sort_by("key"))
    frame = pd.read_parquet(parquets)  # the files: the folder also holds the tars and stats (issue 13 decides)
    assert sorted(frame["status"]) == ["failed", "ok", "ok", "rejected"]
    assert frame.loc[frame["key"] == "c-0", "quality_disparity_finite"].item() is True
    assert frame["quality_mask_ratio"].isna().sum() == 1  # the failed clip was never scored
    rows = duckdb.sql(f"SELECT status, count(*) AS n, avg(quality_mask_ratio) AS mask FROM "
                      f"read_parquet('{tmp_path}/out/shards/*.parquet') GROUP BY status ORDER BY status").fetchall()
    assert rows == [("failed", 1, None), ("ok", 2, pytest.approx(0.12)), ("rejected", 1, pytest.approx(0.9))]
