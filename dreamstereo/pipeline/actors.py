"""Thin Ray Data operators around the clip stages: batch (dict of numpy arrays) in, batch out.

The work on each clip is the clip chain (``clip.py``, shared with ``dreamstereo process``); these operators
only carry it between processes. One row per clip flows through ``decode_batch`` (CPU: read the input,
decode clips, oracle disparity) -> ``DepthActor`` (loads a depth model once per actor; GPU in production) ->
``PairActor`` (disparity, PBDP pair, quality verdict, sample members) -> ``WriteActor`` (stages the members in the output's
storage; only the record goes on to the driver, which commits shards). With ``resources.pair_placement=depth`` the
depth actor runs the pair stage itself, on its own device, right after depth (:class:`DepthPairActor`), and there
is no pair operator: disparity never travels between processes. An input that yields no clip is one row with its
verdict or error, so every input is accounted for. Per-sample problems are values (``status``,
``reason``), a decoder crash included (the decode runs in a child process: pipeline/isolate.py); anything
else raises, and Ray retries the task a bounded number of times (``resources.worker_retries``).

Each operator records where it ran its stage (``placement``: stage -> device, e.g. ``{"decode": "cpu",
"depth": "cuda:0", "pair": "cuda:0", "write": "cpu"}``); the record carries it into the shard's parquet, and
the shard's stats and the run's manifest count clips per stage and device (``stage_placement``).

Large payloads travel as bytes: frames and disparity as ``.npy`` bytes, members as a JSON index plus their
bytes (:func:`pack_members`; no pickle anywhere on the way).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import time

import numpy as np

from dreamstereo.io import preview
from dreamstereo.io.sample import make_key
from dreamstereo.io.shards import PREVIEW_MEMBER, stage_sample
from dreamstereo.io.storage import StorageError, open_storage
from dreamstereo.pipeline.clip import ClipResult, model_relative, oracle_relatives, pair_clip, raw_clip, read_input
from dreamstereo.stages.decode import Clip, VideoProbe
from dreamstereo.stages.depth import DepthBackendName, load_backend
from dreamstereo.types import ErrorCode, SampleError, SampleStatus

# Columns every operator reads or writes (checked when the graph is built: pipeline/job.py).
INPUT_COLUMNS = ("shard", "input_index", "uri", "problem")  # problem: why a manifest row names no input
DECODE_COLUMNS = INPUT_COLUMNS + ("clip_index", "clips", "status", "reason", "message", "frames", "relative",
                                  "clip_meta", "timings", "placement")
PAIR_COLUMNS = ("shard", "input_index", "uri", "clip_index", "clips", "record", "members", "timings")
WRITE_COLUMNS = ("shard", "input_index", "clips", "record", "timings")
DRIVER_COLUMNS = WRITE_COLUMNS  # read by the shard router

# (operator, columns it reads, columns it writes); pipeline/job.py checks the chain of the graph it builds:
# decode -> [depth] -> pair -> write -> driver, or decode -> depth+pair -> write -> driver (pair_placement=depth).
CONTRACT = (
    ("decode", INPUT_COLUMNS, DECODE_COLUMNS),
    ("depth", ("status", "frames", "timings", "placement"), DECODE_COLUMNS),
    ("depth+pair", DECODE_COLUMNS, PAIR_COLUMNS),
    ("pair", DECODE_COLUMNS, PAIR_COLUMNS),
    ("write", PAIR_COLUMNS, WRITE_COLUMNS),
    ("driver", DRIVER_COLUMNS, ()),
)

logger = logging.getLogger(__name__)


def pack(array: np.ndarray | None) -> bytes:
    if array is None:
        return b""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack(data: bytes) -> np.ndarray | None:
    """The array :func:`pack` wrote, as a read-only view of ``data`` (no copy: a pair actor then holds a clip's
    frames and disparity once, not twice; issue 12)."""
    if not data:
        return None
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("packed array holds Python objects")
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def pack_members(members: dict[str, bytes]) -> bytes:
    """A sample's members as one bytes value: a JSON index (name -> length), a newline, the bytes in order."""
    index = json.dumps([[name, len(data)] for name, data in members.items()]).encode()
    return b"".join([index, b"\n", *members.values()])


def unpack_members(data: bytes) -> dict[str, bytes]:
    """The inverse of :func:`pack_members`."""
    index, _, payload = data.partition(b"\n")
    members, offset = {}, 0
    for name, length in json.loads(index):
        members[name] = payload[offset:offset + length]
        offset += length
    return members


def _rows_to_batch(rows: list[dict], columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for column in columns:
        values = [row.get(column) for row in rows]
        out[column] = np.array(values, dtype=object) if values else np.empty(0, dtype=object)
    return out


def _rows(batch: dict[str, np.ndarray]) -> list[dict]:
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def decode_batch(batch: dict[str, np.ndarray], *, cfg, s3=None, raw: bool = False) -> dict[str, np.ndarray]:
    """Read and decode each input; one row per clip (or one row with the input's verdict).

    With the oracle backend the clip's disparity comes from the sidecar here (no model to run); ``raw``
    (clean clips only) needs no disparity at all.
    """
    out = []
    for row in _rows(batch):
        start = time.perf_counter()
        base = {k: row[k] for k in INPUT_COLUMNS}
        try:
            if isinstance(row["problem"], str) and row["problem"]:  # "" when the row is fine
                raise SampleError(ErrorCode.INVALID_URI, "read", str(row["problem"]))
            probe, clips = read_input(str(row["uri"]), s3, cfg.decode)  # a decoder crash is a row, not a lost worker
        except SampleError as exc:
            result = ClipResult.from_error(str(row["uri"]), 0, exc)
            out.append({**base, "clip_index": 0, "clips": 1, "status": result.status.value, "reason": result.reason,
                        "message": result.message, "frames": b"", "relative": b"",
                        "clip_meta": "{}", "timings": json.dumps({"decode": time.perf_counter() - start}),
                        "placement": json.dumps({"decode": "cpu"})})
            continue
        oracle = cfg.depth.backend is DepthBackendName.ORACLE and not raw
        relatives = oracle_relatives(str(row["uri"]), s3, probe, clips, cfg.depth) if oracle else None
        seconds = (time.perf_counter() - start) / len(clips)
        for index, clip in enumerate(clips):
            relative = relatives[index] if relatives is not None else None
            error = relative if isinstance(relative, SampleError) else None
            meta = {"indices": list(clip.indices), "fps": clip.fps, "bucket": list(clip.bucket),
                    "probe": {k: getattr(probe, k) for k in probe.__dataclass_fields__}}
            out.append({**base, "clip_index": index, "clips": len(clips),
                        "status": (SampleStatus.for_error(error.code) if error else SampleStatus.PENDING).value,
                        "reason": error.code.value if error else None,
                        "message": error.message if error else None, "frames": pack(clip.frames),
                        "relative": b"" if error or relative is None else pack(relative),
                        "clip_meta": json.dumps(meta), "timings": json.dumps({"decode": seconds}),
                        "placement": json.dumps({"decode": "cpu"})})
    return _rows_to_batch(out, DECODE_COLUMNS)


class Recycled:
    """An actor that replaces its process after ``recycle_after`` batches (0: never), so memory that a
    model or a decoder library leaks over time is returned. The process exits when the next batch
    arrives; the actor pools restart actors that die and retry their tasks (both bounded by
    ``ResourcesConfig.actor_restarts``, which counts the recycles), so that batch runs again on the
    fresh actor: nothing is lost."""

    recycle_after = 0
    _batches = 0

    def _count_batch(self) -> None:
        self._batches += 1
        if self.recycle_after and self._batches > self.recycle_after:
            logger.info("%s: recycling the actor process after %d batches", type(self).__name__, self.recycle_after)
            os._exit(0)  # an exit Ray sees as a crash: the actor restarts (exit_actor() would end it for good)


def device_name(device) -> str:
    """Where a stage ran, as recorded in ``placement``: ``cpu``, or ``cuda:N`` (a bare ``cuda`` resolved to
    the index it means in this process, which under Ray is the actor's own GPU)."""
    name = str(device)
    if name == "cuda":
        import torch  # local: the CPU operators never need it

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
    return name


def _placed(row: dict, **stages: str) -> None:
    """Record in ``row["placement"]`` where ``stages`` ran."""
    placement = json.loads(row.get("placement") or "{}")
    placement.update(stages)
    row["placement"] = json.dumps(placement)


class DepthActor(Recycled):
    """Loads the depth model once per actor (on ``device``), then fills ``relative`` for pending rows."""

    def __init__(self, cfg, device: str = "cpu", recycle_after: int = 0):
        self.backend = load_backend(cfg.depth, device)
        self.device = device_name(device)
        self.recycle_after = recycle_after

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._count_batch()
        return _rows_to_batch(self._depth(_rows(batch)), DECODE_COLUMNS)

    def _depth(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if row["status"] != SampleStatus.PENDING.value:
                continue
            start = time.perf_counter()
            relative = model_relative(self.backend, unpack(row["frames"]))
            if isinstance(relative, SampleError):
                row["status"], row["reason"], row["message"] = (SampleStatus.for_error(relative.code).value,
                                                                relative.code.value, relative.message)
            else:
                row["relative"] = pack(relative)
            timings = json.loads(row["timings"])
            timings["depth"] = time.perf_counter() - start
            row["timings"] = json.dumps(timings)
            _placed(row, depth=self.device)
        return rows


class PairActor(Recycled):
    """Disparity -> PBDP pair -> quality verdict -> sample members (or the row's verdict/error); the
    projection runs on ``device`` (the CPU, unless a :class:`DepthPairActor` passes its own)."""

    def __init__(self, cfg, depth_weights: str | None = None, raw: bool = False, recycle_after: int = 0,
                 device: str = "cpu", preview_rejected: bool = False):
        self.cfg, self.depth_weights, self.raw, self.preview_rejected = cfg, depth_weights, raw, preview_rejected
        self.recycle_after = recycle_after
        self.pair_device, self.device = device, device_name(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._count_batch()
        return _rows_to_batch(self._pair(_rows(batch)), PAIR_COLUMNS)

    def _pair(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            start = time.perf_counter()
            uri, index = str(row["uri"]), int(row["clip_index"])
            timings = json.loads(row["timings"])
            record = {"key": make_key(uri, index), "source": uri, "input_index": int(row["input_index"]),
                      "clip_index": index, "status": row["status"], "reason": row["reason"],
                      "message": row["message"], "frames": 0, "worker": f"{socket.gethostname()}:{os.getpid()}", "scores": {}}
            members = None
            placement = json.loads(row.get("placement") or "{}")
            if row["status"] == SampleStatus.PENDING.value:
                meta = json.loads(row["clip_meta"])
                clip = Clip(unpack(row["frames"]), tuple(meta["indices"]), meta["fps"], tuple(meta["bucket"]))
                probe = VideoProbe(**meta["probe"])
                if self.raw:
                    result = raw_clip(clip, index, uri, probe, self.cfg, preview_rejected=self.preview_rejected)
                else:
                    result = pair_clip(clip, index, uri, probe, unpack(row["relative"]), self.cfg,
                                       self.depth_weights, preview_rejected=self.preview_rejected,
                                       device=self.pair_device)
                record.update(status=result.status.value, reason=result.reason, message=None, scores=result.scores,
                              frames=len(clip.indices))
                members = result.members
                if result.status is SampleStatus.REJECTED and result.preview is not None:
                    members = {PREVIEW_MEMBER: preview.encode_jpeg(result.preview)}  # -> previews/, not the shard
                timings["pair"] = time.perf_counter() - start
                placement["pair"] = self.device
            record["placement"] = placement
            out.append({"shard": row["shard"], "input_index": row["input_index"], "uri": uri, "clip_index": index,
                        "clips": row["clips"], "record": json.dumps(record, default=float),
                        "members": pack_members(members) if members is not None else b"",
                        "timings": json.dumps(timings)})
        return out


class DepthPairActor(DepthActor, PairActor):
    """Depth, then the pair stage, in one actor on the depth model's device (``resources.pair_placement=
    depth``): the clip's disparity stays in this process, and the projection runs where depth ran. Same
    rows in and out as ``DepthActor`` followed by ``PairActor``, so the same samples."""

    def __init__(self, cfg, device: str = "cpu", depth_weights: str | None = None, recycle_after: int = 0,
                 preview_rejected: bool = False):
        DepthActor.__init__(self, cfg, device, recycle_after)
        PairActor.__init__(self, cfg, depth_weights, raw=False, recycle_after=recycle_after, device=device,
                           preview_rejected=preview_rejected)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._count_batch()
        return _rows_to_batch(self._pair(self._depth(_rows(batch))), PAIR_COLUMNS)


class WriteActor:
    """Stages each kept sample's members in the output storage and passes on the record naming the staged
    part. A small pool of long-lived actors (not tasks): one process per writer, started once, instead of
    a stream of short tasks that each start a worker process."""

    def __init__(self, output: str, s3=None):
        self.storage = open_storage(output, s3)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return write_batch(batch, self.storage)


def write_batch(batch: dict[str, np.ndarray], storage) -> dict[str, np.ndarray]:
    """Stage each kept sample's members in ``storage``; pass on the record naming the staged part (or, when
    the storage refused it, ``staging_error``: the job cannot go on, and the driver stops it)."""
    out = []
    for row in _rows(batch):
        start = time.perf_counter()
        record, timings = json.loads(row["record"]), json.loads(row["timings"])
        if row["members"]:
            try:
                record["part"] = stage_sample(storage, int(row["shard"]), record["key"], unpack_members(row["members"]))
            except StorageError as exc:  # a full or unreachable output: the driver ends the job with this line
                record["staging_error"] = str(exc)  # (raised here, Ray would print its traceback instead)
            timings["write"] = time.perf_counter() - start
            record.setdefault("placement", {})["write"] = "cpu"
        out.append({"shard": row["shard"], "input_index": row["input_index"], "clips": row["clips"],
                    "record": json.dumps(record), "timings": json.dumps(timings)})
    return _rows_to_batch(out, WRITE_COLUMNS)
