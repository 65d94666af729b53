"""S3 faults beyond credentials, through a fault-injecting proxy in front of moto's server (tests/faultproxy.py):
throttling, 500s, connections reset mid-upload or mid-download, slow and stalled answers are retried with
backoff; what comes out equals a clean run's, nothing lost or duplicated; a dead endpoint ends in one
StorageError within a bounded time."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

import pytest

from dreamstereo.pipeline.io.storage import S3Config, S3Storage, StorageError
from tests.conftest import S3_SECRET
from tests.faultproxy import KINDS, FaultProxy, Schedule


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail the test (instead of hanging CI) when it runs past ``seconds``."""
    def expired(*_):
        raise TimeoutError(f"test ran past its {seconds} s bound")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
    schedule = Schedule(**{k: 0.07 for k in KINDS}) if kind == "mixed" else Schedule(**{kind: 0.5})
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(6 * 1024 * 1024 + 123))  # over multipart_threshold_mb=5: two parts
    small = {f"sub/{i}.bin": os.urandom(50_000 + i) for i in range(4)}
    with _deadline(120), FaultProxy(s3_env, schedule, seed=7) as proxy:
        storage = S3Storage(f"s3://{s3_bucket}/run", _faulty(proxy))
        for key, data in small.items():
            storage.write_bytes(key, data)
        storage.upload_file("shards/big.tar", big)
        (tmp_path / "small.tar").write_bytes(small["sub/0.bin"])
        storage.upload_file("shards/small.tar", tmp_path / "small.tar")  # one PUT
        assert storage.list() == sorted([*small, "shards/big.tar", "shards/small.tar"])  # nothing lost, nothing duplicated
        assert storage.exists("sub/0.bin") and not storage.exists("sub/missing.bin")
        for key, data in small.items():
            assert storage.read_bytes(key) == data
        assert storage.read_bytes("shards/big.tar") == big.read_bytes()
        assert storage.read_bytes("shards/small.tar") == small["sub/0.bin"]
        with storage.open_read("shards/big.tar") as stream:  # small reads, as tarfile does
            pieces = list(iter(lambda: stream.read(64 * 1024), b""))
        assert b"".join(pieces) == big.read_bytes()
    injected = {k: n for k, n in proxy.faults.items() if n}
    assert set(injected) == (set(KINDS) if kind == "mixed" else {kind}), injected  # the faults did happen
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
    with _deadline(60), FaultProxy(s3_env, always=kind) as proxy:
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


def test_training_reader_gets_every_sample_once_through_faults(s3_bucket, s3_env, quiet_moto):
    """The training data reader (``iter_raw_samples`` over ``S3Storage.open_read``, and webdataset's ``s3://``
    opener) streams each shard through resets and stalls: every sample exactly once, bytes as stored."""
    import webdataset as wds

    from dreamstereo.pipeline.io.storage import register_webdataset_s3
    from dreamstereo.training.data import iter_raw_samples, resolve_shards
    from tests.training.shards import write_shards

    clean = S3Config(endpoint_url=s3_env)
    keys = write_shards(None, shards=2, per_shard=3, frames=5, storage=S3Storage(f"s3://{s3_bucket}/raw", clean))
    urls = resolve_shards(f"s3://{s3_bucket}/raw", clean)
    expected = {url: [{k: v for k, v in s.items()} for s in iter_raw_samples(url, clean)] for url in urls}
    with _deadline(120), FaultProxy(s3_env, Schedule(reset_response=0.4, stall=0.2, slowdown=0.1), seed=3) as proxy:
        faulty = _faulty(proxy)
        got = {url: list(iter_raw_samples(url, faulty)) for url in urls}
        register_webdataset_s3(faulty)
        via_wds = [s["__key__"] for url in urls for s in wds.WebDataset(url, shardshuffle=False)]
    assert proxy.faults["reset_response"] + proxy.faults["stall"] > 0
    assert got == expected  # same samples, same order, same member bytes
    assert sorted(s["__key__"] for url in urls for s in got[url]) == sorted(keys)  # each key once
    assert sorted(via_wds) == sorted(keys)
