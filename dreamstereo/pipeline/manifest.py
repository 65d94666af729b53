"""Inputs of the generation job: a folder or glob of videos, or a CSV/parquet manifest, local or on S3.

Every input becomes an :class:`InputVideo` with its full URI and its manifest row; the list comes out in
a deterministic order (sorted URIs for folders and globs, row order for manifests) so shards are the
same on every rerun. OpenVid-1M's CSV works as is: ``path_column=video``, ``base_uri=`` the folder that
holds the clips, and filters such as ``"aesthetic score>=4.5"``.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import operator
import os
import posixpath
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dreamstereo.io.storage import S3Config, StorageError, check_input_uri, open_storage, uri_exists
from dreamstereo.types import SampleError, UserError

logger = logging.getLogger(__name__)


class ManifestError(UserError, ValueError):
    """An input list (folder, glob, CSV or parquet manifest, filters) that cannot be used; the message says why."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
        "<": operator.lt}
_FILTER = re.compile(r"^\s*(.+?)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclasses.dataclass
class InputConfig:
    """How the input list is read."""

    path_column: str = "video"  # manifest column with the video path or URI
    base_uri: str | None = None  # joined in front of relative paths (a folder or s3://bucket/prefix)
    filters: list[str] = dataclasses.field(default_factory=list)  # e.g. ["aesthetic score>=4.5"]
    limit: int | None = None  # keep the first N inputs (after filtering)
    # Rows may name absolute paths or full URIs outside base_uri (a manifest that mixes sources); false
    # records such rows as invalid_uri instead (a job that must read from base_uri only).
    allow_outside_base: bool = True


@dataclasses.dataclass(frozen=True)
class InputVideo:
    uri: str  # local path or s3:// URI; for an invalid row, ``MANIFEST#row=N`` (unique and traceable)
    row: dict  # the manifest row (empty for folders and globs)
    problem: str | None = None  # why the row names no usable input (recorded as invalid_uri, never read)


def parse_filter(text: str):
    """``"column>=value"`` -> (column, comparison, number); ValueError naming the filter otherwise."""
    match = _FILTER.match(text)
    if not match:
        raise ManifestError(f"input filter {text!r} must look like 'column>=number' (ops: {', '.join(_OPS)})")
    column, op, value = match.groups()
    return column, _OPS[op], float(value)


def _join(base: str | None, path: str) -> str:
    if base is None or "://" in path or path.startswith("/"):
        return path
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def read_inputs(source: str, cfg: InputConfig, s3: S3Config | None = None) -> list[InputVideo]:
    """The input videos named by ``source`` (folder, glob, ``.csv`` or ``.parquet``; local or ``s3://``).

    Raises:
        ValueError: a manifest without the path column, a bad filter or a filter on a missing column.
        StorageError: ``source`` does not exist or cannot be read.
    """
    filters = [parse_filter(f) for f in cfg.filters]
    lower = source.lower()
    if lower.endswith((".csv", ".parquet")):
        videos = _read_table(source, cfg, filters, s3)
    else:
        if filters:
            raise ManifestError("input filters need a CSV or parquet manifest with the filtered columns")
        videos = [InputVideo(uri, {}) for uri in _list_videos(source, s3)]
    if not videos:
        raise StorageError(f"no input videos found in {source!r}")
    # Local paths become absolute: sample keys hash the URI, so they must not depend on the cwd.
    videos = [v if "://" in v.uri or v.problem else dataclasses.replace(v, uri=str(Path(v.uri).resolve()))
              for v in videos]
    seen: set[str] = set()
    unique = [v for v in videos if not (v.uri in seen or seen.add(v.uri))]  # first occurrence wins
    if len(unique) < len(videos):  # the same video twice would give the same keys twice
        logger.warning("inputs: %d duplicate URI(s) in %s dropped", len(videos) - len(unique), source)
        videos = unique
    return videos[: cfg.limit] if cfg.limit is not None else videos


def _list_videos(source: str, s3: S3Config | None) -> list[str]:
    if source.startswith("s3://"):
        storage = open_storage(source, s3)
        return [f"{storage.uri}/{k}" for k in storage.list() if k.lower().endswith(VIDEO_SUFFIXES)]
    if any(ch in source for ch in "*?["):
        return sorted(p for p in glob.glob(source, recursive=True) if p.lower().endswith(VIDEO_SUFFIXES))
    folder = Path(source)
    if not folder.is_dir():
        raise StorageError(f"input {source!r} is neither a folder, a glob, nor a .csv/.parquet manifest")
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _read_table(source: str, cfg: InputConfig, filters, s3: S3Config | None) -> list[InputVideo]:
    if source.startswith("s3://"):
        bucket_uri, _, key = source[len("s3://"):].partition("/")
        data = io.BytesIO(open_storage(f"s3://{bucket_uri}", s3).read_bytes(key))
    else:
        if not Path(source).is_file():
            raise StorageError(f"manifest {source!r} does not exist or is not a regular file")
        data = source
    parquet = source.lower().endswith(".parquet")
    try:
        table = pq.read_table(data) if parquet else pacsv.read_csv(data)
    except (pa.ArrowException, OSError) as exc:  # empty, ragged, not CSV/parquet at all
        raise ManifestError(f"manifest {source!r} cannot be read as {'parquet' if parquet else 'CSV'}: "
                         f"{str(exc).splitlines()[0]}") from None
    columns = set(table.column_names)
    if cfg.path_column not in columns:
        raise ManifestError(f"manifest {source!r} has no column {cfg.path_column!r} (columns: {sorted(columns)}); "
                         f"set input.path_column")
    for column, _, _ in filters:
        if column not in columns:
            raise ManifestError(f"input filter on {column!r}: manifest {source!r} has no such column")
        kind = table.schema.field(column).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise ManifestError(f"input filter on {column!r}: column {column!r} of manifest {source!r} holds {kind}, "
                             f"not numbers")
    out = []
    for number, row in enumerate(table.to_pylist(), start=1):
        if all(row[c] is not None and op(float(row[c]), v) for c, op, v in filters):
            out.append(_input_of_row(source, number, row, cfg))
    logger.info("manifest %s: %d of %d rows selected", source, len(out), table.num_rows)
    return out


def _input_of_row(source: str, number: int, row: dict, cfg: InputConfig) -> InputVideo:
    """The input a manifest row names, or a placeholder carrying why it names none (recorded per input,
    as ``invalid_uri``, so one bad row neither stops the job nor becomes a retryable read failure)."""
    value = row[cfg.path_column]
    if value is None or (isinstance(value, str) and not value.strip()):
        problem = f"row {number} of {source}: empty {cfg.path_column!r} cell"
    elif not isinstance(value, str):
        problem = f"row {number} of {source}: {cfg.path_column!r} holds {type(value).__name__} {value!r}, not a path"
    else:
        uri = _join(cfg.base_uri, value)
        try:
            check_input_uri(uri)
        except SampleError as exc:
            problem = f"row {number} of {source}: {exc.message}"
        else:
            if cfg.allow_outside_base or cfg.base_uri is None or _inside(uri, cfg.base_uri):
                return InputVideo(uri, row)
            problem = f"row {number} of {source}: {uri!r} is outside input.base_uri {cfg.base_uri!r}"
    return InputVideo(f"{source}#row={number}", row, problem)


def _inside(uri: str, base: str) -> bool:
    """Whether ``uri`` lies under ``base`` once ``..`` and ``.`` are resolved (local paths and s3:// keys)."""
    def parts(text: str) -> tuple[str, str]:
        if "://" in text:
            scheme, _, rest = text.partition("://")
            return scheme, posixpath.normpath("/" + rest)
        return "", os.path.normpath(os.path.abspath(text))

    (scheme, path), (base_scheme, base_path) = parts(uri), parts(base)
    return scheme == base_scheme and (path == base_path or path.startswith(base_path.rstrip("/") + "/"))


def group_into_shards(videos: list[InputVideo], shard_size: int) -> list[list[InputVideo]]:
    """Consecutive groups of ``shard_size`` inputs; shard ``k`` always holds the same inputs."""
    if shard_size < 1:
        raise ManifestError(f"shard_size must be >= 1, got {shard_size}")
    return [videos[i:i + shard_size] for i in range(0, len(videos), shard_size)]


def check_input_access(inputs: list[InputVideo], s3: S3Config | None = None) -> None:
    """Fail fast (before any work) when an input bucket is unreachable or denies access: one HEAD on the
    first input of each bucket. A missing object is left to the job (recorded per input)."""
    first: dict[str, str] = {}
    for video in inputs:
        if video.uri.startswith("s3://") and not video.problem:
            first.setdefault(video.uri[len("s3://"):].partition("/")[0], video.uri)
    for bucket, uri in first.items():
        try:
            uri_exists(uri, s3)
        except StorageError as exc:
            raise StorageError(f"input {uri!r} cannot be read: {exc}") from None
