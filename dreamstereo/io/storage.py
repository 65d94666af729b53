"""Object storage for the generation job: a local folder or an S3 bucket/prefix, behind one interface.

Writes are all-or-nothing: locally through a temporary name and a rename, on S3 because an object only
appears when its PUT (or multipart upload) completes. S3 goes through boto3 with the standard credential
chain (environment, shared profiles, instance roles) and endpoint settings (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, or ``s3.endpoint_url`` in the config); keys are never part of a config, a log
line or an error message.

Faults of the service are retried with backoff, each retry bounded in count and time and logged at warning
level (operation and object path, never a header): 5xx, throttling (503 SlowDown), timeouts and connections
dropped while a request is sent or its answer's headers arrive are retried by botocore's ``standard`` retry mode
(``s3.max_attempts`` attempts; a reset mid-upload resends the seekable body or part). A connection dropped or
stalled while an object's *body* is read is not seen by botocore (the call already returned), so
:class:`_ResumingBody` re-GETs the object from the byte it got to (``Range``, ``If-Match`` on the first
answer's ETag so a replaced object is never spliced), at most ``s3.max_attempts`` times in a row without
progress and within ``s3.retry_time_s``. After the last attempt: a :class:`StorageError` naming the object
and the cause.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import logging
import os
import random
import shutil
import stat
import time
from pathlib import Path
from urllib.parse import urlparse

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import ProtocolError
from urllib3.exceptions import ReadTimeoutError as URLLib3ReadTimeoutError

from dreamstereo.types import UNWRITABLE_ERRNOS, ErrorCode, SampleError, UserError, write_error_reason

logger = logging.getLogger(__name__)


class StorageError(UserError, RuntimeError):
    """Storage that cannot be used: unreachable endpoint, missing bucket, denied access, a missing key."""


class UnwritableStorageError(StorageError):
    """The output refuses writes: a full disk, a quota, a read-only or forbidden folder. Retrying cannot
    help, so a job stops at the first one (the message names the file and the cause)."""


def refused_write(what: str, exc: BaseException) -> StorageError:
    """``cannot write <what>: <reason>`` for a write that failed with ``exc`` (``what``: the name the user knows,
    never a temporary one): UnwritableStorageError when the disk refuses it (full, read-only, quota, permission;
    or a library's own error type for a failed write, such as safetensors'), else StorageError."""
    refused = not isinstance(exc, OSError) or exc.errno in UNWRITABLE_ERRNOS
    return (UnwritableStorageError if refused else StorageError)(f"cannot write {what}: {write_error_reason(exc)}")


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
    retry_time_s: float = 300.0  # most seconds a read keeps resuming a dropped object body without progress

    def __post_init__(self):
        if self.multipart_threshold_mb < 5:
            raise ValueError(f"s3.multipart_threshold_mb must be >= 5 (S3's smallest part), got "
                             f"{self.multipart_threshold_mb}")
        if self.max_attempts < 1:
            raise ValueError(f"s3.max_attempts must be >= 1, got {self.max_attempts}")
        if not self.retry_time_s > 0:
            raise ValueError(f"s3.retry_time_s must be > 0, got {self.retry_time_s}")


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
            raise refused_write(repr(str(path)), exc) from None
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

    def prune(self, prefix: str) -> None:
        """Remove the folder ``prefix`` when nothing is left in it, as an object store has no empty folders
        (a folder something is being written to, or that holds anything, stays)."""
        folder = self._path(prefix.rstrip("/"))
        if folder != self.root and folder.is_dir():
            try:
                folder.rmdir()
            except OSError:  # not empty (or a writer's file appeared): it stays
                pass

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
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def check(self) -> None:
        """Fail fast (before any work) when the bucket is unreachable, missing or not accessible."""
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
        from boto3.s3.transfer import TransferConfig  # local, like every boto3 import: see _cached_client

        part = self.cfg.multipart_threshold_mb * 1024 * 1024
        config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, use_threads=False)
        self._call("upload_file", key, Filename=str(local), Bucket=self.bucket, Key=self._key(key), Config=config)

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def remove_temp_files(self) -> list[str]:
        """Nothing to remove: an S3 object appears only when its upload completes (see LocalStorage's)."""
        return []

    def open_read(self, key: str) -> "_ResumingBody":
        """A read-only binary stream of the object that survives dropped connections (see the module doc).

        Raises:
            StorageError: the object cannot be fetched, or its body could not be read to the end within
                ``s3.max_attempts`` resumptions without progress and ``s3.retry_time_s``.
        """
        return _ResumingBody(self, key)

    def exists(self, key: str) -> bool:
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

    def prune(self, prefix: str) -> None:
        """Nothing to do: a prefix without objects does not exist in S3."""

    def _call(self, method: str, key: str, **kwargs):
        from boto3.exceptions import S3UploadFailedError  # local: see _cached_client

        try:
            return getattr(self.client, method)(**kwargs)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise StorageError(f"{self.uri}/{key}: {method} failed ({self._describe(exc)})") from None


# A dropped or stalled connection while a GetObject body is read: botocore wraps urllib3's errors in
# ``StreamingBody.read``; the bare urllib3/socket ones escape when it reads the body of an error answer.
def _stream_errors() -> tuple[type[BaseException], ...]:
    return (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, BotoConnectionError, ProtocolError,
            URLLib3ReadTimeoutError, ConnectionError, TimeoutError)


class _ResumingBody(io.RawIOBase):
    """An S3 object read as a stream that re-GETs from the byte it got to when the connection drops.

    botocore retries a request until its answer's headers arrive; a reset or a stall while the body is read
    (``ResponseStreamingError``, ``IncompleteReadError``, ``ReadTimeoutError``) reaches the reader instead. Here
    such a read is resumed with ``Range: bytes=<offset>-`` and ``If-Match: <first ETag>`` (an object replaced
    meanwhile fails with ``PreconditionFailed`` instead of splicing two versions), after a jittered exponential
    backoff. The GET itself is retried the same way: botocore reads the body of a GetObject *error* answer
    (404, 503) outside its retry loop, so a drop there reaches us as a bare urllib3 error. Bounds:
    ``max_attempts`` failures in a row without a new byte, and ``retry_time_s`` since the first of them; each
    resumption is logged at warning level.
    """

    _CHUNK = 1 << 20  # read(-1) goes in chunks, so a drop late in a large object keeps what came before

    def __init__(self, storage: "S3Storage", key: str):
        super().__init__()
        self._storage, self._key = storage, key
        self._offset, self._etag, self._size = 0, None, None
        self._body = None
        self._retrying(self._get)

    def _get(self) -> None:
        ranged = {"Range": f"bytes={self._offset}-"} if self._offset else {}
        if self._etag:  # every re-GET, from byte 0 too: the size and bytes already read are the first version's
            ranged["IfMatch"] = self._etag
        response = self._storage._call("get_object", self._key, Bucket=self._storage.bucket,
                                       Key=self._storage._key(self._key), **ranged)
        if self._etag is None:
            self._etag, self._size = response.get("ETag"), int(response["ContentLength"])
        self._body = response["Body"]

    @property
    def size(self) -> int:
        """The object's length in bytes (from the first answer's headers)."""
        return self._size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(self._CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if self.closed:
            raise ValueError("read of a closed S3 object stream")
        return self._retrying(lambda: self._read_once(size))

    def _read_once(self, size: int) -> bytes:
        if self._offset >= self._size:
            return b""
        if self._body is None:
            self._get()
        data = self._body.read(size)
        if size > 0 and not data:  # botocore checks Content-Length; this keeps a short body from passing as EOF

            raise IncompleteReadError(actual_bytes=self._offset, expected_bytes=self._size)
        self._offset += len(data)
        return data

    def _retrying(self, action):
        """``action()``, repeated after a dropped or stalled connection (also one that drops while botocore
        reads an error answer's body: for GetObject that happens outside its retry loop, and urllib3's error
        escapes unwrapped)."""
        failures, first_failure = 0, None
        while True:
            try:
                return action()
            except _stream_errors() as exc:
                self._drop_body()
                failures += 1
                first_failure = first_failure or time.monotonic()
                cfg, where = self._storage.cfg, f"{self._storage.uri}/{self._key}"
                waited = time.monotonic() - first_failure
                if failures >= cfg.max_attempts or waited >= cfg.retry_time_s:
                    raise StorageError(f"{where}: reading the object failed at byte {self._offset} of "
                                       f"{self._size if self._size is not None else '?'} after {failures} "
                                       f"attempt(s) in {waited:.1f} s ({self._storage._describe(exc)})") from None
                delay = min(cfg.retry_time_s - waited, _backoff_s(failures))
                logger.warning("%s: read dropped at byte %d (%s); resuming in %.2f s (attempt %d of %d)", where,
                               self._offset, self._storage._describe(exc), delay, failures + 1, cfg.max_attempts)
                time.sleep(delay)

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except _stream_errors():
                pass  # the connection is gone already; a new GET opens another
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def _backoff_s(failures: int) -> float:
    """Full-jitter exponential backoff (as botocore's standard mode): up to 0.1 s * 2**n, at most 5 s."""
    return random.uniform(0, min(5.0, 0.1 * 2 ** failures))


def _log_retry(request_dict=None, response=None, caught_exception=None, attempts=None, operation=None, **_):
    """botocore ``needs-retry`` hook: a warning for each failed attempt that botocore's retry mode may retry
    (the path of the request and the cause; no headers, so no credentials)."""
    if caught_exception is not None:
        cause = f"{type(caught_exception).__name__}: {str(caught_exception).splitlines()[0][:200]}"
    elif response is not None and response[0].status_code >= 500:
        error = response[1].get("Error", {}) if isinstance(response[1], dict) else {}
        status, code = response[0].status_code, error.get("Code", "")
        cause = f"HTTP {status} {code}" if code and code != str(status) else f"HTTP {status}"  # HEAD: no body
    else:
        return None
    path = urlparse((request_dict or {}).get("url", "")).path
    logger.warning("S3 %s %s: attempt %s failed (%s); retried with backoff while attempts remain",
                   getattr(operation, "name", "?"), path, attempts, cause)
    return None


def make_s3_client(cfg: S3Config):
    """A boto3 S3 client from the standard chain plus ``cfg`` (endpoint, region, profile, retries); one per
    process and setting (clients are thread-safe, and new sessions would fetch credentials again)."""
    return _cached_client(tuple(sorted(dataclasses.asdict(cfg).items())), _credential_env_digest())


_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                   "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


def _credential_env_digest() -> str:
    """A digest of the credential-chain environment: a changed key gets a new client, not a stale one."""
    return hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_ENV).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_client(settings: tuple, env_digest: str):
    import boto3  # local: boto3 takes about 1 s to import and only S3 storage needs it

    cfg = S3Config(**dict(settings))

    session = boto3.session.Session(profile_name=cfg.profile) if cfg.profile else boto3.session.Session()
    config = Config(retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                    connect_timeout=cfg.connect_timeout_s, read_timeout=cfg.read_timeout_s,
                    s3={"addressing_style": "path"} if cfg.endpoint_url else None)
    client = session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)
    client.meta.events.register("needs-retry.s3", _log_retry)
    return client


def open_storage(uri: str, s3: S3Config | None = None):
    """:class:`S3Storage` for ``s3://...``, else :class:`LocalStorage` for a folder path."""
    if uri.startswith("s3://"):
        return S3Storage(uri, s3)
    if "://" in uri:
        raise StorageError(f"{uri!r}: unsupported scheme (use a local folder or s3://bucket/prefix)")
    return LocalStorage(uri)


def register_webdataset_s3(s3: S3Config | None = None) -> None:
    """Let webdataset open ``s3://bucket/key`` URLs through boto3 (webdataset 1.0 has no S3 reader)."""
    import webdataset  # local: webdataset imports torch (~1 s), and only its readers of s3:// URLs need this
    def opener(url, mode="rb", bufsize=8192, **_):
        parsed = urlparse(url)
        storage = S3Storage(f"s3://{parsed.netloc}", s3)
        return storage.open_read(parsed.path.lstrip("/"))

    webdataset.gopen_schemes["s3"] = opener


def read_uri(uri: str, s3: S3Config | None = None, *, max_bytes: int | None = None) -> bytes:
    """The bytes of one input file: a local path or ``s3://bucket/key``, at most ``max_bytes`` of them.

    A local file is opened without blocking and checked to be a regular file before anything is read
    (a FIFO would hang, ``/dev/zero`` never ends), then read in bounded pieces.

    Raises:
        SampleError: ``INVALID_URI`` (empty, or a scheme other than ``s3://``), ``NOT_A_FILE`` (a FIFO,
            device or folder), ``TOO_LARGE`` (over ``max_bytes``): problems of the input itself.
        StorageError: the file or object does not exist or cannot be read (may be transient).
    """
    check_input_uri(uri)
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        with S3Storage(f"s3://{bucket}", s3).open_read(key) as body:  # one GET: the size from its headers
            if max_bytes is not None and body.size > max_bytes:
                raise _too_large(uri, body.size, max_bytes)
            return body.read()
    try:
        fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO opens without a writer
    except OSError as exc:
        raise StorageError(f"{uri!r}: cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "special file")
        raise SampleError(ErrorCode.NOT_A_FILE, "read", f"{uri!r} is a {kind}, not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as fh:
        limit = max_bytes if max_bytes is not None else float("inf")
        pieces, total = [], 0
        try:
            while piece := fh.read(_READ_PIECE):
                total += len(piece)
                if total > limit:  # also a file that grows while it is read
                    raise _too_large(uri, max(total, os.fstat(fd).st_size), max_bytes)
                pieces.append(piece)
        except OSError as exc:
            raise StorageError(f"{uri!r}: cannot read ({exc.strerror or exc})") from None
    return b"".join(pieces)


_READ_PIECE = 1 << 24
_FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "folder"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def _too_large(uri: str, size: int, max_bytes: int) -> SampleError:
    return SampleError(ErrorCode.TOO_LARGE, "read", f"{uri!r} is {size / 2**20:.1f} MiB, more than the limit of "
                                                    f"{max_bytes / 2**20:.1f} MiB (decode.max_input_mb)")


def check_input_uri(uri) -> None:
    """Refuse what cannot name an input: not text, empty, or a scheme other than ``s3://``.

    Raises:
        SampleError: ``INVALID_URI``, not retryable (the manifest itself is wrong).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SampleError(ErrorCode.INVALID_URI, "read", f"no input path (got {uri!r})")
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme and scheme != "s3":
        raise SampleError(ErrorCode.INVALID_URI, "read", f"{uri!r}: unsupported scheme {scheme!r} (use a local path "
                                                         f"or s3://bucket/key)")


def uri_exists(uri: str, s3: S3Config | None = None) -> bool:
    """Whether a local path or ``s3://bucket/key`` object exists (StorageError if that cannot be told)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return S3Storage(f"s3://{bucket}", s3).exists(key)
    return Path(uri).is_file()
