"""S3 faults beyond credentials, through a fault-injecting proxy in front of moto's server (tests/faultproxy.py):
throttling, 500s, connections reset mid-upload or mid-download, slow and stalled answers are retried with
backoff; what comes out equals a clean run's, nothing lost or duplicated; a dead endpoint ends in one
StorageError within a bounded time."""

from __future__ import annotations

import logging
import os
import time

import pytest

from dreamstereo.io.storage import S3Config, S3Storage, StorageError
from tests.conftest import S3_SECRET, deadline
from tests.faultproxy import KINDS, FaultProxy, Schedule
from tests.pipeline.test_generate import SMALL, _run, corpus  # noqa: F401 (a fixture)


def _faulty(proxy: FaultProxy, **overrides) -> S3Config:
    """Client settings for runs through the proxy: short timeouts (a stall costs 1 s), more attempts than the
    proxy's ``max_faults`` in a row, so every request gets through in the end."""
    return S3Config(endpoint_url=proxy.url, **{"max_attempts": 6, "connect_timeout_s": 1.0, "read_timeout_s": 1.0,
                                                "multipart_threshold_mb": 5, **overrides})


@pytest.fixture
def quiet_moto():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request


@pytest.mark.parametrize("kind", [*KINDS, "mixed"])
def test_storage_round_trips_exactly_through_faults(kind, s3_bucket, s3_env, tmp_path, caplog, quiet_moto):
    caplog.set_level(logging.WARNING, logger="dreamstereo")
    schedule = Schedule(**{k: 0.1 for k in KINDS}) if kind == "mixed" else Schedule(**{kind: 0.3})
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(6 * 1024 * 1024 + 123))  # over multipart_threshold_mb=5: two parts
    small = {f"sub/{i}.bin": os.urandom(50_000 + i) for i in range(4)}
    with deadline(120), FaultProxy(s3_env, schedule, seed=7) as proxy:
        storage = S3Storage(f"s3://{s3_bucket}/run", _faulty(proxy))
        for key, data in small.items():
            storage.write_bytes(key, data)
        storage.upload_file("shards/big.tar", big)
        (tmp_path / "small.tar").write_bytes(small["sub/0.bin"])
        storage.upload_file("shards/small.tar", tmp_path / "small.tar")  # one PUT
        assert storage.list() == sorted([*small, "shards/big.tar", "shards/small.tar"])  # none lost or doubled
        assert storage.exists("sub/0.bin") and not storage.exists("sub/missing.bin")
        for key, data in small.items():
            assert storage.read_bytes(key) == data
        assert storage.read_bytes("shards/big.tar") == big.read_bytes()
        assert storage.read_bytes("shards/small.tar") == small["sub/0.bin"]
        with storage.open_read("shards/big.tar") as stream:  # small reads, as tarfile does
            pieces = list(iter(lambda: stream.read(64 * 1024), b""))
        assert b"".join(pieces) == big.read_bytes()
    injected = {k: n for k, n in proxy.faults.items() if n}
    if kind == "mixed":  # (which kinds a run meets varies: bucket names and upload ids are random)
        assert len(injected) >= 4 and sum(injected.values()) >= 8, injected
    else:
        assert set(injected) == {kind}, injected  # the faults did happen
    # The clean view of the bucket agrees (what a later reader sees).
    clean = S3Storage(f"s3://{s3_bucket}/run", S3Config(endpoint_url=s3_env))
    assert clean.read_bytes("shards/big.tar") == big.read_bytes()
    if kind in ("reset_response", "stall"):
        assert "resuming in" in caplog.text  # resumed reads are logged
    assert S3_SECRET not in caplog.text


@pytest.mark.parametrize("kind", ["slowdown", "internal", "reset_request", "reset_response", "stall"])
def test_a_permanently_failing_endpoint_ends_in_one_storage_error(kind, s3_bucket, s3_env, caplog, quiet_moto):
    caplog.set_level(logging.WARNING, logger="dreamstereo")
    S3Storage(f"s3://{s3_bucket}", S3Config(endpoint_url=s3_env)).write_bytes("obj.bin", b"x" * 100_000)
    with deadline(60), FaultProxy(s3_env, always=kind) as proxy:
        storage = S3Storage(f"s3://{s3_bucket}", _faulty(proxy, max_attempts=3))
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"s3://{s3_bucket}/obj.bin: ") as info:
            storage.read_bytes("obj.bin")
        assert time.monotonic() - start < 30
        if kind in ("slowdown", "internal"):
            assert ("SlowDown" if kind == "slowdown" else "InternalError") in str(info.value)
            with pytest.raises(StorageError, match=f"s3://{s3_bucket}/new.bin: put_object failed"):
                storage.write_bytes("new.bin", b"data")
        if kind in ("reset_response", "stall"):
            assert "reading the object failed at byte 0 of 100000 after 3 attempt(s)" in str(info.value)
    assert proxy.requests <= 3 * 3  # bounded: botocore's attempts per request times ours per read
    assert "attempt" in caplog.text and S3_SECRET not in caplog.text and S3_SECRET not in str(info.value)


@pytest.mark.parametrize("kind", ["reset_response", "stall"])
def test_an_error_answer_cut_short_is_retried(kind, s3_bucket, s3_env, quiet_moto):
    """GetObject of a missing key whose 404 answer drops mid-body: botocore reads an error body of a streaming
    operation outside its retry loop (urllib3's error escapes unwrapped); the read is retried and ends in the
    StorageError of the real answer."""
    with deadline(60), FaultProxy(s3_env, Schedule(**{kind: 1.0}, max_faults=2)) as proxy:
        storage = S3Storage(f"s3://{s3_bucket}", _faulty(proxy))
        with pytest.raises(StorageError, match=f"s3://{s3_bucket}/missing.bin: get_object failed \\(NoSuchKey"):
            storage.read_bytes("missing.bin")
    assert proxy.faults[kind] == 2


def test_a_resumed_read_never_splices_a_replaced_object(s3_bucket, s3_env, quiet_moto):
    """The object is overwritten while a read of it is under way and the connection then drops: the resumed
    GET is pinned to the first answer's ETag, so the read fails (PreconditionFailed) instead of returning old
    bytes followed by new ones."""
    clean = S3Storage(f"s3://{s3_bucket}", S3Config(endpoint_url=s3_env))
    clean.write_bytes("obj.bin", b"old!" * 25_000)
    with deadline(60), FaultProxy(s3_env, Schedule(reset_response=1.0, max_faults=1)) as proxy:
        stream = S3Storage(f"s3://{s3_bucket}", _faulty(proxy)).open_read("obj.bin")  # its body will drop
        clean.write_bytes("obj.bin", b"new!" * 25_000)
        with pytest.raises(StorageError, match=f"s3://{s3_bucket}/obj.bin: get_object failed \\(PreconditionFailed"):
            stream.read()
    assert proxy.faults["reset_response"] == 1


def test_training_reader_gets_every_sample_once_through_faults(s3_bucket, s3_env, quiet_moto):
    """The training data reader (``iter_raw_samples`` over ``S3Storage.open_read``, and webdataset's ``s3://``
    opener) streams each shard through resets and stalls: every sample exactly once, bytes as stored."""
    import webdataset as wds

    from dreamstereo.io.shards import iter_raw_samples, resolve_shards
    from dreamstereo.io.storage import register_webdataset_s3
    from tests.training.shards import write_shards

    clean = S3Config(endpoint_url=s3_env)
    keys = write_shards(None, shards=2, per_shard=3, frames=5, storage=S3Storage(f"s3://{s3_bucket}/raw", clean))
    urls = resolve_shards(f"s3://{s3_bucket}/raw", clean)
    expected = {url: [{k: v for k, v in s.items()} for s in iter_raw_samples(url, clean)] for url in urls}
    with deadline(120), FaultProxy(s3_env, Schedule(reset_response=0.4, stall=0.2, slowdown=0.1), seed=3) as proxy:
        faulty = _faulty(proxy)
        got = {url: list(iter_raw_samples(url, faulty)) for url in urls}
        register_webdataset_s3(faulty)
        via_wds = [s["__key__"] for url in urls for s in wds.WebDataset(url, shardshuffle=False)]
    assert proxy.faults["reset_response"] + proxy.faults["stall"] > 0
    assert got == expected  # same samples, same order, same member bytes
    assert sorted(s["__key__"] for url in urls for s in got[url]) == sorted(keys)  # each key once
    assert sorted(via_wds) == sorted(keys)


def _members(tar: bytes) -> dict[str, bytes]:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        names = [m.name for m in archive.getmembers()]
        assert len(names) == len(set(names)), "a member was written twice"
        return {name: archive.extractfile(name).read() for name in names}


@pytest.mark.slow
def test_generate_through_faults_equals_a_clean_run(ray_session, corpus, capsys, s3_bucket, s3_env, quiet_moto):
    """`dreamstereo generate` with input and output on S3 (driver and Ray workers) through the proxy gives what
    a clean run gives: the same shards with the same samples and members, the same parquet rows, every tar
    matching the sha256 its manifest entry records, no staging objects left.

    The H.264 members are compared by size class only: two *clean* runs already encode slightly different
    frames (the decoded clips differ by a few levels between runs, before any S3 fault), so their bytes are
    not reproducible; every other member is compared byte for byte."""
    import hashlib
    import io
    import json

    import pyarrow.parquet as pq

    from dreamstereo.io.shards import shard_name

    clean = S3Config(endpoint_url=s3_env)
    inputs = S3Storage(f"s3://{s3_bucket}/in", clean)
    for path in [*corpus.glob("scene[01].*"), corpus / "broken.mp4"]:  # 2 videos + sidecars, 1 corrupt: 2 shards
        inputs.write_bytes(path.name, path.read_bytes())

    def generate(output: str, endpoint: str, *extra: str):
        code, captured = _run(capsys, "generate", "--input", f"s3://{s3_bucket}/in", "--output", output, *SMALL,
                              f"s3.endpoint_url={endpoint}", *extra)
        assert code == 0, captured.err
        storage = S3Storage(output, clean)
        manifest = json.loads(storage.read_bytes("manifest.json"))
        shards = {e["path"]: storage.read_bytes(e["path"]) for e in manifest["shards"]}
        for entry in manifest["shards"]:  # what was stored is what was committed: whole, not duplicated
            assert hashlib.sha256(shards[entry["path"]]).hexdigest() == entry["sha256"]
            assert len(shards[entry["path"]]) == entry["bytes"]
        rows = [{k: v for k, v in r.items() if k not in ("timings", "worker")}  # seconds and pids differ
                for e in manifest["shards"]
                for r in pq.read_table(io.BytesIO(storage.read_bytes(shard_name(e["shard"], "parquet")))).to_pylist()]
        return manifest, {path: _members(tar) for path, tar in shards.items()}, rows, storage.list()

    started = time.monotonic()
    want_manifest, want_shards, want_rows, want_keys = generate(f"s3://{s3_bucket}/clean", s3_env)
    print(f"clean run: {time.monotonic() - started:.1f} s")
    schedule = Schedule(slowdown=0.1, internal=0.08, reset_request=0.08, reset_response=0.12, delay=0.05,
                        stall=0.05, stall_s=3.0, max_faults=2)  # about 1 request in 2 (of ~35) meets a fault
    started = time.monotonic()
    with deadline(300), FaultProxy(s3_env, schedule, seed=11) as proxy:
        manifest, shards, rows, keys = generate(f"s3://{s3_bucket}/faulty", proxy.url, "s3.max_attempts=6",
                                                "s3.read_timeout_s=2", "s3.connect_timeout_s=2")
    print(f"faulty run: {time.monotonic() - started:.1f} s; {proxy.requests} requests, faults {dict(proxy.faults)}")
    assert sum(proxy.faults.values()) >= 5 and len(proxy.faults) >= 3, dict(proxy.faults)  # faults happened
    strip = ("bytes", "sha256")  # see the docstring: the H.264 bytes differ between clean runs too
    assert [{k: v for k, v in e.items() if k not in strip} for e in manifest["shards"]] == \
        [{k: v for k, v in e.items() if k not in strip} for e in want_manifest["shards"]]
    assert {p: sorted(m) for p, m in shards.items()} == {p: sorted(m) for p, m in want_shards.items()}
    for path, members in shards.items():
        for name, data in members.items():
            if not name.endswith(".mp4"):
                assert data == want_shards[path][name], name
    assert sorted(rows, key=lambda r: r["key"]) == sorted(want_rows, key=lambda r: r["key"])
    assert len({r["key"] for r in rows}) == len(rows) == len(want_rows) > manifest["summary"]["inputs"]  # one per clip
    assert keys == want_keys and not [k for k in keys if k.startswith("_staging/")]
