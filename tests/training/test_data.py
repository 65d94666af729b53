"""Shard streams: shard lists, disjoint splits, one bucket per batch, exact positions, pairs, S3."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreamstereo.io.sample import read_sample
from dreamstereo.io.shards import iter_raw_samples, resolve_shards
from dreamstereo.io.storage import S3Config, S3Storage, StorageError
from dreamstereo.training.data import (
    DataConfig,
    ShardStream,
    TrainBatches,
    TrainStage,
    shards_of_stream,
    validation_batches,
)
from tests.training.shards import write_shards


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"num_frames": 5, "buckets": [[64, 64]], "shuffle_buffer": 4, "num_workers": 0, **kw})


def test_shard_list_from_manifest_brace_pattern_or_tar(raw_shards, tmp_path):
    folder, keys = raw_shards
    urls = resolve_shards(folder)
    assert urls == [f"{folder}/shards/{i:06d}.tar" for i in range(4)]
    assert resolve_shards(f"{folder}/shards/{{000001..000002}}.tar") == urls[1:3]
    assert resolve_shards(urls[0]) == urls[:1]
    assert sorted(k for u in urls for k in (r["__key__"] for r in iter_raw_samples(u))) == sorted(keys)
    with pytest.raises(StorageError, match="no manifest.json.*brace pattern"):
        resolve_shards(str(tmp_path))


def test_streams_get_disjoint_shards_and_need_one_each():
    urls = [f"s{i}.tar" for i in range(5)]
    parts = [shards_of_stream(urls, s, 3) for s in range(3)]
    assert sorted(sum(parts, [])) == urls and all(parts)
    with pytest.raises(ValueError, match="2 shard\\(s\\) for 3 data streams"):
        shards_of_stream(urls[:2], 0, 3)


def test_stream_is_endless_deterministic_and_resumes_exactly(raw_shards):
    urls = resolve_shards(raw_shards[0])
    stream = ShardStream(urls, _cfg(), batch_size=2, seed=3, stream_id=0)
    run = [b for _, b in zip(range(10), stream.batches())]  # 10 batches of 2 from 8 samples: several passes
    assert all(len(b["keys"]) == 2 for b in run)
    again = [b for _, b in zip(range(10), stream.batches())]
    assert [b["keys"] for b in run] == [b["keys"] for b in again]
    assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(run, again))
    for k in (1, 2, 5):  # from the state after batch k, the stream continues with batch k + 1
        resumed = [b for _, b in zip(range(3), stream.batches(run[k - 1]["state"]))]
        assert [b["keys"] for b in resumed] == [b["keys"] for b in run[k:k + 3]]
        assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(resumed, run[k:k + 3]))


def test_loader_processes_resume_in_turn(raw_shards):
    """Two DataLoader processes: resuming at batch n continues the interleaving exactly."""
    urls = resolve_shards(raw_shards[0])
    cfg = _cfg(num_workers=2)
    full = TrainBatches(urls, cfg, batch_size=1, seed=0, rank=0, world=1)
    run = [b for _, b in zip(range(7), full.loader())]
    states = list(full.states)
    for n, batch in enumerate(run[:3], start=1):
        states[batch["logical"]] = batch["state"]
    resumed = TrainBatches(urls, cfg, batch_size=1, seed=0, rank=0, world=1, states=states, batches_done=3)
    assert [b["keys"] for _, b in zip(range(4), resumed.loader())] == [b["keys"] for b in run[3:7]]


def test_batches_hold_one_bucket(tmp_path):
    write_shards(tmp_path / "a", shards=1, per_shard=3, height=64, width=64, frames=5)
    write_shards(tmp_path / "b", shards=1, per_shard=3, height=64, width=96, frames=5)
    urls = resolve_shards(str(tmp_path / "a")) + resolve_shards(str(tmp_path / "b"))
    cfg = _cfg(buckets=[[64, 64], [64, 96]], shuffle_buffer=6)
    stream = ShardStream(urls, cfg, batch_size=2, seed=0, stream_id=0)
    shapes = [tuple(b["clean"].shape) for _, b in zip(range(8), stream.batches())]
    assert {s[2:4] for s in shapes} == {(64, 64), (64, 96)}
    for s in shapes:
        assert s[0] == 2 and s[1] == 5


def test_stage2_batches_carry_the_stored_pair(pair_shards):
    folder, _ = pair_shards
    urls = resolve_shards(folder)
    stored = {r["__key__"]: read_sample(r, r["__key__"]) for u in urls for r in iter_raw_samples(u)}
    cfg = _cfg(stage=TrainStage.PAIRS, num_frames=9)
    (batch,) = validation_batches(urls, cfg, batch_size=2, seed=0, max_batches=1)
    for i, key in enumerate(batch["keys"]):
        assert np.array_equal(batch["mask"][i].numpy(), stored[key].mask)  # M1 exactly as generated
        assert np.array_equal(batch["cond"][i].numpy(), stored[key].warped)  # V1' in
        assert np.array_equal(batch["clean"][i].numpy(), stored[key].clean)  # V1 as target
    assert batch["mask"].any()


def test_shards_stream_from_s3_over_http(s3_bucket, s3_env, tmp_path):
    """moto's S3 server on 127.0.0.1: shards and manifest are read over the wire with boto3."""
    s3 = S3Config(endpoint_url=s3_env)
    keys = write_shards(None, shards=2, per_shard=2, frames=5, storage=S3Storage(f"s3://{s3_bucket}/raw", s3))
    urls = resolve_shards(f"s3://{s3_bucket}/raw", s3)
    assert urls == [f"s3://{s3_bucket}/raw/shards/00000{i}.tar" for i in range(2)]
    stream = ShardStream(urls, _cfg(s3=s3), batch_size=2, seed=0, stream_id=0)
    seen = {k for _, b in zip(range(4), stream.batches()) for k in b["keys"]}
    assert seen == set(keys)
    assert json.loads(S3Storage(f"s3://{s3_bucket}/raw", s3).read_bytes("manifest.json"))["shards"]


def test_a_portrait_clip_trains_in_a_portrait_bucket(tmp_path):
    from pathlib import Path

    from dreamstereo.config import load_config
    from dreamstereo.training.config import TrainConfig
    from dreamstereo.training.data import nearest_bucket

    presets = Path(__file__).resolve().parents[2] / "configs" / "train"
    for preset in ("stage1.yaml", "stage2.yaml"):
        buckets = load_config(TrainConfig, [presets / preset]).data.buckets
        portrait, landscape = nearest_bucket(1280, 720, buckets), nearest_bucket(720, 1280, buckets)  # 9:16, 16:9
        assert portrait[0] > portrait[1] and landscape[0] < landscape[1]
        assert portrait == landscape[::-1]
    # Nearly square portrait: closer in aspect ratio to the landscape bucket, yet it takes the portrait one.
    assert nearest_bucket(720, 704, [[512, 528], [832, 480]]) == (832, 480)
    assert nearest_bucket(720, 704, [[512, 528]]) == (512, 528)  # no portrait bucket: the closest there is
    write_shards(tmp_path, shards=1, per_shard=2, height=64, width=32, frames=5)
    stream = ShardStream(resolve_shards(str(tmp_path)), _cfg(buckets=[[32, 64], [64, 32]]), batch_size=2, seed=0,
                         stream_id=0)
    batch = next(stream.batches())
    assert tuple(batch["clean"].shape) == (2, 5, 64, 32, 3) and tuple(batch["mask"].shape) == (2, 5, 64, 32)


def _damaged_shards(tmp_path, raw_shards) -> list[str]:
    """The 4 good shards, then one of random bytes and one cut short in the middle of its second sample."""
    import shutil

    urls = resolve_shards(raw_shards[0])
    good = [str(shutil.copy(u, tmp_path / f"good{i}.tar")) for i, u in enumerate(urls)]
    (tmp_path / "random.tar").write_bytes(np.random.default_rng(0).bytes(20_000))
    whole = (tmp_path / "good0.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:len(whole) * 3 // 4])
    return good + [str(tmp_path / "random.tar"), str(tmp_path / "cut.tar")]


def test_a_damaged_shard_is_skipped_with_a_warning_and_counted(raw_shards, tmp_path, caplog):
    urls = _damaged_shards(tmp_path, raw_shards)
    stream = ShardStream(urls, _cfg(), batch_size=2, seed=0, stream_id=0)
    with caplog.at_level("WARNING", logger="dreamstereo.training.data"):
        run = [b for _, b in zip(range(10), stream.batches())]  # 10 batches of 2: about two passes
    good_keys = {k for u in urls[:4] for k in (r["__key__"] for r in iter_raw_samples(u))}
    assert {k for b in run for k in b["keys"]} == good_keys  # the cut shard's first sample is good0's
    skipped = sum(b["shards_skipped"] for b in run)
    assert skipped >= 2 and skipped % 2 == 0  # both damaged shards, once per pass
    warned = {r.getMessage().split()[1] for r in caplog.records if "is not a readable tar" in r.getMessage()}
    assert warned == {urls[4], urls[5]}
    # Positions stay exact across the skipped shards: resuming from any batch continues the same run.
    resumed = [b for _, b in zip(range(3), stream.batches(run[4]["state"]))]
    assert [b["keys"] for b in resumed] == [b["keys"] for b in run[5:8]]
    # Validation skips it too, and data.strict=true stops instead, naming the shard.
    assert validation_batches(urls[4:] + urls[:1], _cfg(), batch_size=2, seed=0, max_batches=1)
    from dreamstereo.training.data import DamagedShard

    with pytest.raises(DamagedShard, match=rf"shard {urls[4]} is not a readable tar .*data.strict=false"):
        list(zip(range(10), ShardStream(urls, _cfg(strict=True), batch_size=2, seed=0, stream_id=0).batches()))


def test_every_clip_shorter_than_num_frames_fails_fast(raw_shards):
    """9-frame clips with data.num_frames=13: one pass over the shards, then a clear error (it looped forever)."""
    from dreamstereo.training.data import TrainDataError
    from tests.conftest import deadline

    urls = resolve_shards(raw_shards[0])
    with deadline(60), pytest.raises(TrainDataError, match=r"no clip in a whole pass over its 4 shard\(s\) has "
                                                           r"data.num_frames=13 frames .*lower data.num_frames"):
        next(ShardStream(urls, _cfg(num_frames=13), batch_size=2, seed=0, stream_id=0).batches())


def test_shards_that_are_all_damaged_say_so(tmp_path):
    from dreamstereo.training.data import TrainDataError

    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"not a tar at all")
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(TrainDataError, match=r"its 2 shard\(s\) hold no readable sample"):
        next(ShardStream(urls, _cfg(), batch_size=1, seed=0, stream_id=0).batches())
