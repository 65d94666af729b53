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
import re
from pathlib import Path

from dreamstereo.pipeline.io.storage import S3Config, StorageError, open_storage, uri_exists

logger = logging.getLogger(__name__)

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


@dataclasses.dataclass(frozen=True)
class InputVideo:
    uri: str  # local path or s3:// URI
    row: dict  # the manifest row (empty for folders and globs)


def parse_filter(text: str):
    """``"column>=value"`` -> (column, comparison, number); ValueError naming the filter otherwise."""
    match = _FILTER.match(text)
    if not match:
        raise ValueError(f"input filter {text!r} must look like 'column>=number' (ops: {', '.join(_OPS)})")
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
            raise ValueError("input filters need a CSV or parquet manifest with the filtered columns")
        videos = [InputVideo(uri, {}) for uri in _list_videos(source, s3)]
    if not videos:
        raise StorageError(f"no input videos found in {source!r}")
    # Local paths become absolute: sample keys hash the URI, so they must not depend on the cwd.
    videos = [v if "://" in v.uri else InputVideo(str(Path(v.uri).resolve()), v.row) for v in videos]
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
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if source.startswith("s3://"):
        bucket_uri, _, key = source[len("s3://"):].partition("/")
        data = io.BytesIO(open_storage(f"s3://{bucket_uri}", s3).read_bytes(key))
    else:
        if not Path(source).is_file():
            raise StorageError(f"manifest {source!r} does not exist")
        data = source
    table = pq.read_table(data) if source.lower().endswith(".parquet") else pacsv.read_csv(data)
    columns = set(table.column_names)
    if cfg.path_column not in columns:
        raise ValueError(f"manifest {source!r} has no column {cfg.path_column!r} (columns: {sorted(columns)}); "
                         f"set input.path_column")
    for column, _, _ in filters:
        if column not in columns:
            raise ValueError(f"input filter on {column!r}: manifest {source!r} has no such column")
    out = []
    for row in table.to_pylist():
        if all(row[c] is not None and op(float(row[c]), v) for c, op, v in filters):
            out.append(InputVideo(_join(cfg.base_uri, str(row[cfg.path_column])), row))
    logger.info("manifest %s: %d of %d rows selected", source, len(out), table.num_rows)
    return out


def split_shards(videos: list[InputVideo], shard_size: int) -> list[list[InputVideo]]:
    """Consecutive groups of ``shard_size`` inputs; shard ``k`` always holds the same inputs."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [videos[i:i + shard_size] for i in range(0, len(videos), shard_size)]


def check_input_access(inputs: list[InputVideo], s3: S3Config | None = None) -> None:
    """Fail fast (before any work) when an input bucket is unreachable or denies access: one HEAD on the
    first input of each bucket. A missing object is left to the job (recorded per input)."""
    first: dict[str, str] = {}
    for video in inputs:
        if video.uri.startswith("s3://"):
            first.setdefault(video.uri[len("s3://"):].partition("/")[0], video.uri)
    for bucket, uri in first.items():
        try:
            uri_exists(uri, s3)
        except StorageError as exc:
            raise StorageError(f"input {uri!r} cannot be read: {exc}") from None
