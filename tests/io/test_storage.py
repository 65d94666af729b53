"""Storage: a local folder and S3 (boto3 against moto's server over HTTP) behave the same."""

from __future__ import annotations

import logging
import os
import time

import pytest

from dreamstereo.io.storage import (
    LocalStorage,
    S3Config,
    S3Storage,
    StorageError,
    open_storage,
    read_uri,
    register_webdataset_s3,
)
from dreamstereo.types import SampleError
from tests.conftest import S3_SECRET


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_env")
    return S3Storage(f"s3://{bucket}/runs/one", S3Config(endpoint_url=endpoint, multipart_threshold_mb=5))


def test_round_trip_list_delete(storage, tmp_path):
    storage.check()
    storage.write_bytes("shards/000000.tar", b"tar bytes")
    storage.write_bytes("shards/000000_stats.json", b"{}")
    storage.write_bytes("manifest.json", b"[]")
    assert storage.read_bytes("shards/000000.tar") == b"tar bytes"
    assert storage.exists("manifest.json") and not storage.exists("shards/000001.tar")
    assert storage.list("shards/") == ["shards/000000.tar", "shards/000000_stats.json"]
    assert storage.list() == ["manifest.json", "shards/000000.tar", "shards/000000_stats.json"]
    assert storage.size("shards/000000.tar") == 9
    storage.delete("manifest.json")
    assert not storage.exists("manifest.json")
    with pytest.raises(StorageError, match="no such object|NoSuchKey"):
        storage.read_bytes("missing.bin")


def test_large_upload_in_parts(storage, tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(11 * 1024 * 1024))  # 11 MiB: three parts of 5 MiB on S3
    storage.upload_file("shards/big.tar", big)
    assert storage.read_bytes("shards/big.tar") == big.read_bytes()


def test_missing_bucket_and_unreachable_endpoint_fail_fast(s3_env):
    with pytest.raises(StorageError, match="'no-such-bucket' does not exist"):
        S3Storage("s3://no-such-bucket/x", S3Config(endpoint_url=s3_env)).check()
    start = time.monotonic()
    closed = S3Storage("s3://b/x", S3Config(endpoint_url="http://127.0.0.1:1", max_attempts=2, connect_timeout_s=1))
    with pytest.raises(StorageError, match="unreachable"):
        closed.check()
    assert time.monotonic() - start < 20


def test_secrets_never_appear_in_logs_or_errors(s3_env, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StorageError) as info:
        S3Storage("s3://no-such-bucket/x", S3Config(endpoint_url=s3_env)).check()
    assert S3_SECRET not in str(info.value)
    assert S3_SECRET not in caplog.text


def test_open_storage_and_bad_uris(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    with pytest.raises(StorageError, match="unsupported scheme"):
        open_storage("gs://bucket/x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot be created"):
        LocalStorage(blocker / "sub").check()


def test_webdataset_reads_s3_through_boto3(s3_bucket, s3_env, tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"sample{k}", "txt": f"hello {k}".encode()})
    cfg = S3Config(endpoint_url=s3_env)
    S3Storage(f"s3://{s3_bucket}", cfg).upload_file("shards/s.tar", tmp_path / "s.tar")
    register_webdataset_s3(cfg)
    keys = [s["__key__"] for s in wds.WebDataset(f"s3://{s3_bucket}/shards/s.tar", shardshuffle=False)]
    assert keys == ["sample0", "sample1", "sample2"]


def test_s3_settings_are_checked_when_loaded():
    with pytest.raises(ValueError, match="multipart_threshold_mb must be >= 5"):
        S3Config(multipart_threshold_mb=1)


def test_upload_to_a_missing_bucket_is_a_storage_error(s3_env, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageError, match="upload_file failed"):
        S3Storage("s3://no-such-bucket-2/p", S3Config(endpoint_url=s3_env)).upload_file("k", tmp_path / "f")


def _read_within(seconds: float, *args, **kwargs):
    """read_uri in a thread that must finish within ``seconds`` (a FIFO or a device must not block it)."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["data"] = read_uri(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the test inspects whatever came out)
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), f"read_uri{args} is still reading after {seconds} s"
    return outcome


@pytest.mark.parametrize("kind, code", [("fifo", "not_a_file"), ("device", "not_a_file"), ("folder", "not_a_file"),
                                        ("large", "too_large"), ("empty_uri", "invalid_uri"),
                                        ("http", "invalid_uri"), ("not_text", "invalid_uri")])
def test_inputs_that_are_not_readable_files_are_refused_unread(tmp_path, kind, code):
    path = tmp_path / "input.mp4"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "large":
        path.write_bytes(bytes(3000))
    uri = {"device": "/dev/zero", "empty_uri": " ", "http": "http://example.invalid/a.mp4", "not_text": 17}.get(
        kind, str(path))
    outcome = _read_within(10, uri, max_bytes=2048)
    error = outcome.get("error")
    assert isinstance(error, SampleError) and error.code.value == code, outcome
    assert code == "invalid_uri" or str(uri) in error.message


def test_a_small_enough_file_is_read_whole_local_and_s3(tmp_path, s3_bucket, s3_env):
    data = os.urandom(5000)
    (tmp_path / "v.mp4").write_bytes(data)
    s3 = S3Config(endpoint_url=s3_env)
    S3Storage(f"s3://{s3_bucket}", s3).write_bytes("in/v.mp4", data)
    assert read_uri(str(tmp_path / "v.mp4"), max_bytes=5000) == data
    assert read_uri(f"s3://{s3_bucket}/in/v.mp4", s3, max_bytes=5000) == data
    with pytest.raises(SampleError, match="more than the limit") as info:
        read_uri(f"s3://{s3_bucket}/in/v.mp4", s3, max_bytes=4999)
    assert info.value.code.value == "too_large"
    with pytest.raises(StorageError):
        read_uri(str(tmp_path / "none.mp4"))
