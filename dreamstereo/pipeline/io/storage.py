"""Object storage for the generation job: a local folder or an S3 bucket/prefix, behind one interface.

Writes are all-or-nothing: locally through a temporary name and a rename, on S3 because an object only
appears when its PUT (or multipart upload) completes. S3 goes through boto3 with the standard credential
chain (environment, shared profiles, instance roles) and endpoint settings (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, or ``s3.endpoint_url`` in the config); keys are never part of a config, a log
line or an error message. Retries with backoff on 5xx and throttling come from botocore's ``standard``
retry mode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from dreamstereo.types import UNWRITABLE_ERRNOS, os_error_reason

logger = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """Storage that cannot be used: unreachable endpoint, missing bucket, denied access, a missing key."""


class UnwritableStorageError(StorageError):
    """The output refuses writes: a full disk, a quota, a read-only or forbidden folder. Retrying cannot
    help, so a job stops at the first one (the message names the file and the cause)."""


@dataclasses.dataclass
class S3Config:
    """How to reach S3 (credentials come from the standard chain, never from here)."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000; None = AWS_ENDPOINT_URL_S3 / AWS default
    region: str | None = None  # None = from the environment / profile
    profile: str | None = None  # a shared-config profile name
    max_attempts: int = 8  # botocore standard retry mode (5xx, throttling, connection errors)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    multipart_threshold_mb: int = 64  # uploads larger than this go in parts of this size (S3 minimum: 5)

    def __post_init__(self):
        if self.multipart_threshold_mb < 5:
            raise ValueError(f"s3.multipart_threshold_mb must be >= 5 (S3's smallest part), got "
                             f"{self.multipart_threshold_mb}")
        if self.max_attempts < 1:
            raise ValueError(f"s3.max_attempts must be >= 1, got {self.max_attempts}")


class LocalStorage:
    """A folder; keys are relative paths with ``/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def check(self) -> None:
        """Fail fast when the folder cannot be created or written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"output {self.uri!r} cannot be created: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"output {self.uri!r} is not writable")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    def upload_file(self, key: str, local: str | Path) -> None:
        self._write(key, lambda tmp: shutil.copyfile(local, tmp))

    def _write(self, key: str, fill) -> None:
        """Call ``fill(tmp)`` on a temporary sibling, then rename it to the key's path (all-or-nothing).

        Raises:
            StorageError: the write failed (its path and cause); :class:`UnwritableStorageError` when the
                disk refuses it (full, read-only, quota, permission).
        """
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fill(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            names = {Path(os.fsdecode(n)) for n in (exc.filename, exc.filename2) if n is not None}
            if names and not names & {tmp, path, *path.parents}:
                raise  # another file's error (e.g. the local file to upload is gone): not this write
            error = UnwritableStorageError if exc.errno in UNWRITABLE_ERRNOS else StorageError
            raise error(f"cannot write {str(path)!r}: {os_error_reason(exc)}") from None
        finally:
            if tmp.exists():  # (unlink of a missing file on a read-only disk fails with EROFS)
                tmp.unlink()

    def remove_temp_files(self) -> list[str]:
        """Delete the temporary files of writes whose process was killed mid-write; return their paths.
        Only while no other job writes to this folder (its writes in progress would be lost)."""
        if not self.root.is_dir():
            return []
        found = sorted(str(p) for p in self.root.rglob(".*.tmp-*") if p.is_file())  # _write's temporary names
        for name in found:
            Path(name).unlink(missing_ok=True)
        return found

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.uri}/{key}: no such object") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (temporary files excluded), sorted."""
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith("."))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def open_read(self, key: str):
        return open(self._path(key), "rb")


class S3Storage:
    """``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(self, uri: str, cfg: S3Config | None = None):
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{uri!r} is not an s3://bucket/prefix URI")
        self.uri, self.bucket, self.prefix = uri.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        self.cfg = cfg or S3Config()
        self.client = make_s3_client(self.cfg)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _describe(self, exc) -> str:
        """A one-line reason from a botocore error (no request headers, so no credentials)."""
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def check(self) -> None:
        """Fail fast (before any work) when the bucket is unreachable, missing or not accessible."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            what = {"404": "does not exist", "NoSuchBucket": "does not exist", "403": "access is denied "
                    "(check the credentials of the profile or environment)"}.get(code, self._describe(exc))
            raise StorageError(f"bucket {self.bucket!r} {what}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 endpoint for {self.uri!r} is unreachable ({self._describe(exc)})") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("put_object", key, Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, local: str | Path) -> None:
        from boto3.s3.transfer import TransferConfig

        part = self.cfg.multipart_threshold_mb * 1024 * 1024
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, use_threads=False)
        self._call("upload_file", key, Filename=str(local), Bucket=self.bucket, Key=self._key(key), Config=config)

    def read_bytes(self, key: str) -> bytes:
        return self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def open_read(self, key: str):
        return self._call("get_object", key, Bucket=self.bucket, Key=self._key(key))["Body"]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            what = "access is denied (check the credentials of the profile or environment)" if code == "403" \
                else self._describe(exc)
            raise StorageError(f"{self.uri}/{key}: {what}") from None
        except BotoCoreError as exc:
            raise StorageError(f"S3 endpoint for {self.uri!r} is unreachable ({self._describe(exc)})") from None

    def size(self, key: str) -> int:
        return int(self._call("head_object", key, Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        start = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"]
                    keys.append(key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"{self.uri}/{prefix}: listing failed ({self._describe(exc)})") from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call("delete_object", key, Bucket=self.bucket, Key=self._key(key))

    def _call(self, method: str, key: str, **kwargs):
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(**kwargs)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise StorageError(f"{self.uri}/{key}: {method} failed ({self._describe(exc)})") from None


def make_s3_client(cfg: S3Config):
    """A boto3 S3 client from the standard chain plus ``cfg`` (endpoint, region, profile, retries); one per
    process and setting (clients are thread-safe, and new sessions would fetch credentials again)."""
    return _cached_client(tuple(sorted(dataclasses.asdict(cfg).items())), _credential_env_digest())


_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def _credential_env_digest() -> str:
    """A digest of the credential-chain environment: a changed key gets a new client, not a stale one."""
    import hashlib

    return hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_ENV).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_client(settings: tuple, env_digest: str):
    import boto3

    cfg = S3Config(**dict(settings))
    from botocore.config import Config

    session = boto3.session.Session(profile_name=cfg.profile) if cfg.profile else boto3.session.Session()
    config = Config(retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                    connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s,
                    s3={"addressing_style": "path"} if cfg.endpoint_url else None)
    return session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)


def open_storage(uri: str, s3: S3Config | None = None):
    """:class:`S3Storage` for ``s3://...``, else :class:`LocalStorage` for a folder path."""
    if uri.startswith("s3://"):
        return S3Storage(uri, s3)
    if "://" in uri:
        raise StorageError(f"{uri!r}: unsupported scheme (use a local folder or s3://bucket/prefix)")
    return LocalStorage(uri)


def register_webdataset_s3(s3: S3Config | None = None) -> None:
    """Let webdataset open ``s3://bucket/key`` URLs through boto3 (webdataset 1.0 has no S3 reader)."""
    import webdataset

    def opener(url, mode="rb", bufsize=8192, **_):
        parsed = urlparse(url)
        storage = S3Storage(f"s3://{parsed.netloc}", s3)
        return storage.open_read(parsed.path.lstrip("/"))

    webdataset.gopen_schemes["s3"] = opener


def read_uri(uri: str, s3: S3Config | None = None) -> bytes:
    """The bytes of one input file: a local path or ``s3://bucket/key``.

    Raises:
        StorageError: the file or object does not exist or cannot be read.
    """
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return S3Storage(f"s3://{bucket}", s3).read_bytes(key)
    try:
        return Path(uri).read_bytes()
    except OSError as exc:
        raise StorageError(f"{uri!r}: cannot read ({exc.strerror or exc})") from None


def uri_exists(uri: str, s3: S3Config | None = None) -> bool:
    """Whether a local path or ``s3://bucket/key`` object exists (StorageError if that cannot be told)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return S3Storage(f"s3://{bucket}", s3).exists(key)
    return Path(uri).is_file()


def sibling_uri(uri: str, name: str) -> str:
    """The URI of file ``name`` in the same folder (or S3 prefix) as ``uri``."""
    head, sep, _ = uri.rpartition("/")
    return f"{head}{sep}{name}" if sep else name
