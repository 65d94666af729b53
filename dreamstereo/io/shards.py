"""Output shards: ``shards/{id:06d}.tar`` (WebDataset), ``.parquet`` (one row per input clip or input),
and ``{id:06d}_stats.json``, written last as the commit marker (as video2dataset does).

A shard counts as done only when its stats file exists. The tar and parquet are uploaded first (each
all-or-nothing, see ``storage.py``), so a crash at any point leaves either a committed shard or one
that a rerun redoes; a rerun overwrites the partial objects under the same names.

In the Ray job, sample bytes never pass through the driver: the ``write`` operator stages each kept
sample as a one-sample tar under ``_staging/{shard:06d}/<key>.tar`` (``stage_sample``) and passes on
only its record; when every input of a shard is accounted for, a commit task (``commit_staged``)
assembles the staged samples in input order into the shard tar, writes parquet and stats, then
removes the staging objects.

Reading (training, evaluation, tools): :func:`resolve_shards` turns a generate output, a brace pattern or one
tar into tar URLs, and :func:`iter_raw_samples` yields the samples of one tar as webdataset groups them.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import io
import json
import logging
import subprocess
import tarfile
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from dreamstereo import __version__
from dreamstereo.io.storage import S3Config, S3Storage, StorageError, open_storage
from dreamstereo.stages.quality import QualityScores
from dreamstereo.types import SampleStatus

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
STAGING_DIR = "_staging"
# Rejected clips' contact sheets (first frame: frame, disparity, round trip, mask, as far as the clip got), one
# tar per shard beside the shards, never in them: ``previews/000012.tar`` holds ``<key>.preview.jpg``.
PREVIEW_DIR = "previews"
PREVIEW_MEMBER = "preview.jpg"
# The parquet of every shard has this one typed schema, whatever its clips did (all kept, all failed, none),
# so a whole output reads as one table (pyarrow.dataset, pandas, DuckDB: docs/dataset-format.md). Version 1
# (before) inferred the types per shard: a shard without failures had null-typed reason/message columns.
# The quality scores are typed columns (``quality_<name>``, null when a clip failed before scoring) beside
# the JSON ``scores``; ``placement`` is JSON (stage -> device).
PARQUET_SCHEMA_VERSION = 2
_QUALITY_TYPES = {int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
QUALITY_COLUMNS = {f"quality_{name}": _QUALITY_TYPES[kind] for name, kind in typing.get_type_hints(QualityScores).items()}
_QUALITY_CASTS = {f"quality_{name}": kind for name, kind in typing.get_type_hints(QualityScores).items()}
PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("source", pa.string()), ("input_index", pa.int64()), ("clip_index", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()), ("message", pa.string()), ("frames", pa.int64()),
    ("worker", pa.string()), ("scores", pa.string()), ("placement", pa.string()),
    *QUALITY_COLUMNS.items(),
])

# What a stored record may say (``pending`` exists only in flight).
STATUSES = tuple(s.value for s in (SampleStatus.OK, SampleStatus.REJECTED, SampleStatus.FAILED))


def shard_name(shard_id: int, suffix: str) -> str:
    """``shards/000012.tar``, ``shards/000012.parquet``, ``shards/000012_stats.json``."""
    sep = "_" if suffix == "stats.json" else "."
    return f"{SHARD_DIR}/{shard_id:06d}{sep}{suffix}"


def preview_name(shard_id: int) -> str:
    """``previews/000012.tar``: the contact sheets of shard 12's rejected clips."""
    return f"{PREVIEW_DIR}/{shard_id:06d}.tar"


def committed_shards(storage) -> set[int]:
    """Ids of shards whose stats file (the commit marker) exists."""
    done = set()
    for key in storage.list(f"{SHARD_DIR}/"):
        name = key.rsplit("/", 1)[-1]
        if name.endswith("_stats.json") and name[:6].isdigit():
            done.add(int(name[:6]))
    return done


def git_sha() -> str | None:
    """The package checkout's commit, when it is one (stats carry it next to the package version)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


class ShardWriter:
    """Collect one shard's samples and records, then commit tar -> parquet -> previews -> stats.

    Records are plain dicts with at least ``key``, ``source``, ``status`` (ok | rejected | failed) and
    ``reason``; kept samples also pass their WebDataset members, rejected ones may pass ``{PREVIEW_MEMBER: jpeg}``
    (written to ``previews/<shard>.tar``).
    """

    def __init__(self, storage, shard_id: int, *, config_hash: str = ""):
        self.storage, self.shard_id, self.config_hash = storage, shard_id, config_hash
        self._dir = tempfile.TemporaryDirectory(prefix=f"shard-{shard_id:06d}-")
        self._tar_path = Path(self._dir.name) / "shard.tar"
        self._tar = None
        self._previews = None
        self.records: list[dict] = []
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.samples = self.previews = 0

    def add(self, record: dict, members: dict[str, bytes] | None = None) -> None:
        """Record one input clip (or input); write its members to the tar when it was kept, its preview to the
        previews tar when it was rejected with one."""
        if record.get("status") not in STATUSES:
            raise ValueError(f"record status must be one of {STATUSES}, got {record.get('status')!r}")
        if members is not None and record["status"] != SampleStatus.OK.value:
            if set(members) != {PREVIEW_MEMBER}:
                raise ValueError(f"{record['key']}: a {record['status']} clip has no sample, only a {PREVIEW_MEMBER} "
                                 f"(got {sorted(members)})")
            if self._previews is None:
                self._previews = wds.TarWriter(str(Path(self._dir.name) / "previews.tar"), mtime=0)
            self._previews.write({"__key__": record["key"], **members})
            self.previews += 1
        elif members is not None:
            if self._tar is None:
                self._tar = wds.TarWriter(str(self._tar_path), mtime=0)  # no wall clock: same samples, same bytes
            self._tar.write({"__key__": record["key"], **members})
            self.samples += 1
        self.records.append(record)

    def commit(self, timings: dict[str, float] | None = None) -> dict:
        """Upload the tar and parquet, then the stats file (the commit marker); return the stats."""
        try:
            return self._commit(timings)
        finally:
            self._dir.cleanup()  # the local tar also goes when the upload fails

    def _commit(self, timings: dict[str, float] | None) -> dict:
        if self._tar is None:  # an empty shard still gets a (valid, empty) tar

            self._tar = wds.TarWriter(str(self._tar_path), mtime=0)  # no wall clock: same samples, same bytes
        self._tar.close()
        tar_bytes = self._tar_path.stat().st_size
        digest = hashlib.sha256()
        with open(self._tar_path, "rb") as fh:  # shards can be GBs: hash in chunks
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        sha = digest.hexdigest()
        self.storage.upload_file(shard_name(self.shard_id, "tar"), self._tar_path)
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([parquet_row(r) for r in self.records], schema=PARQUET_SCHEMA), buffer)
        self.storage.write_bytes(shard_name(self.shard_id, "parquet"), buffer.getvalue())
        if self._previews is not None:
            self._previews.close()
            self.storage.upload_file(preview_name(self.shard_id), Path(self._dir.name) / "previews.tar")
        else:  # none this time: one of an earlier commit of this shard (a retry) must not stay
            self.storage.delete(preview_name(self.shard_id))
        counts = collections.Counter(r["status"] for r in self.records)
        reasons = collections.Counter(f"{r['status']}:{r['reason']}" for r in self.records if r.get("reason"))
        placement: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in self.records:  # where each stage ran, as the operator that ran it recorded (pipeline/actors.py)
            for stage, device in (r.get("placement") or {}).items():
                placement[stage][device] += 1
        stats = {
            "shard": self.shard_id,
            "count": len(self.records),
            "samples": self.samples,
            **{status: counts.get(status, 0) for status in STATUSES},
            "reasons": dict(sorted(reasons.items())),
            "tar_bytes": tar_bytes,
            "tar_sha256": sha,
            "previews": self.previews,  # rejected clips with a contact sheet in previews/<shard>.tar
            "seconds_per_stage": timings or {},
            "stage_placement": {k: dict(sorted(v.items())) for k, v in sorted(placement.items())},  # clips
            "start": self.started.isoformat(),
            "end": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "config_hash": self.config_hash,
            "parquet_schema_version": PARQUET_SCHEMA_VERSION,
            "package_version": __version__,
            "git_sha": git_sha(),
        }
        self.storage.write_bytes(shard_name(self.shard_id, "stats.json"), json.dumps(stats, indent=2).encode())
        return stats


def parquet_row(record: dict) -> dict:
    """One record as a row of :data:`PARQUET_SCHEMA`: the JSON columns serialised, the quality scores typed."""
    scores = record.get("scores") or {}
    row = {name: record.get(name) for name in PARQUET_SCHEMA.names}
    row["scores"] = json.dumps(scores, sort_keys=True)
    row["placement"] = json.dumps(record["placement"], sort_keys=True) if record.get("placement") else None
    for column, kind in _QUALITY_CASTS.items():  # numpy scalars, or floats after a JSON round trip (True -> 1.0)
        value = scores.get(column[len("quality_"):])
        row[column] = None if value is None else kind(value)
    return row


def _discard_uncommitted(storage, shard_id: int) -> None:
    """Delete the tar, parquet and previews of a shard whose commit failed (no stats file: a rerun redoes it), so
    no half-written shard stays and a full disk gets its space back; the staged samples stay for the rerun."""
    for name in (shard_name(shard_id, "tar"), shard_name(shard_id, "parquet"), preview_name(shard_id)):
        try:
            storage.delete(name)
        except (StorageError, OSError) as exc:  # the commit's own error is the one to report
            logger.warning("shard %06d: could not remove its uncommitted %s: %s", shard_id, name, exc)


def staging_name(shard_id: int, key: str) -> str:
    return f"{STAGING_DIR}/{shard_id:06d}/{key}.tar"


def stage_sample(storage, shard_id: int, key: str, members: dict[str, bytes]) -> str:
    """Write one sample's members as a one-sample tar into the staging area; return its storage key."""
    name = staging_name(shard_id, key)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for ext, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o444
            tar.addfile(info, io.BytesIO(data))
    storage.write_bytes(name, buffer.getvalue())
    return name


def read_staged(storage, name: str, key: str) -> dict[str, bytes]:
    """The members of a staged sample (inverse of ``stage_sample``)."""
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(name)), mode="r") as tar:
        return {m.name[len(key) + 1:]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def commit_staged(storage, shard_id: int, records: list[dict], timings: dict | None = None, *,
                  config_hash: str = "") -> dict:
    """Assemble a shard from its records (in input order) and their staged samples; commit it; clear
    its staging objects. Idempotent: an already committed shard returns its stats (a retried task)."""
    marker = shard_name(shard_id, "stats.json")
    if storage.exists(marker):
        stats = json.loads(storage.read_bytes(marker))
    else:
        writer = ShardWriter(storage, shard_id, config_hash=config_hash)
        try:
            for record in sorted(records, key=lambda r: (r["input_index"], r["clip_index"])):
                record = dict(record)
                part = record.pop("part", None)
                writer.add(record, read_staged(storage, part, record["key"]) if part else None)
            stats = writer.commit(timings)
        except StorageError:
            _discard_uncommitted(storage, shard_id)
            raise
    for name in storage.list(f"{STAGING_DIR}/{shard_id:06d}/"):
        storage.delete(name)
    storage.prune(f"{STAGING_DIR}/{shard_id:06d}/")  # its (now empty) staging folder goes with them
    return stats


# ----------------------------------------------------------------------------------------------------
# Reading


def resolve_shards(spec: str, s3: S3Config | None = None) -> list[str]:
    """Tar URLs (local paths or ``s3://bucket/key``) from a generate output, a brace pattern or one tar.

    Raises:
        StorageError: no manifest at the location, or the manifest lists no samples.
    """
    spec = spec.rstrip("/")
    if spec.endswith(".tar") or "{" in spec:
        return list(braceexpand.braceexpand(spec))
    storage = open_storage(spec, s3)
    try:
        manifest = json.loads(storage.read_bytes("manifest.json"))
    except StorageError:
        raise StorageError(f"{spec!r} has no manifest.json: give a `dreamstereo generate` output, a brace "
                           f"pattern of tar URLs (e.g. {spec}/shards/{{000000..000009}}.tar) or one .tar") from None
    urls = [f"{spec}/{entry['path']}" for entry in manifest["shards"] if entry.get("num_samples", 1) > 0]
    if not urls:
        raise StorageError(f"{spec}/manifest.json lists no shard with samples")
    return urls


def open_shard(url: str, s3: S3Config | None):
    """A binary stream of one shard tar (a local path or ``s3://bucket/key``)."""
    if url.startswith("s3://"):
        bucket, _, key = url[len("s3://"):].partition("/")
        return S3Storage(f"s3://{bucket}", s3).open_read(key)
    return open(url, "rb")


def iter_raw_samples(url: str, s3: S3Config | None = None) -> Iterator[dict]:
    """The samples of one tar in order: ``{"__key__", "__url__", "<ext>": bytes, ...}`` (webdataset grouping)."""
    from webdataset.tariterators import (  # local: webdataset imports torch (~1 s)
        group_by_keys,
        tar_file_iterator,
    )

    stream = open_shard(url, s3)
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)
    finally:
        stream.close()


def sample_members(raw: dict) -> dict:
    """A webdataset sample's members by extension (no leading dot, no ``__key__``-style fields)."""
    return {k.lstrip("."): v for k, v in raw.items() if not k.startswith("__")}


def read_keys(url: str, s3: S3Config | None = None) -> list[str]:
    """Sample keys of one tar, in order (for tests and tools)."""
    return [raw["__key__"] for raw in iter_raw_samples(url, s3)]
