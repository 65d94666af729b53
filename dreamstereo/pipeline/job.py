"""``dreamstereo generate``: the Ray job over a video list, writing WebDataset shards to a folder or S3.

Order of work: check the output (fail fast) -> read the input list -> split it into shards -> skip the
shards already committed (their stats file exists) -> stream the pending inputs through the Ray Data
graph (``decode`` tasks -> ``DepthActor`` pool -> ``PairActor`` pool -> ``WriteActor`` pool staging each
kept sample in the output; with ``resources.pair_placement=depth`` one ``DepthPairActor`` pool does depth
and pairs on the depth device) -> the driver routes the records (no sample bytes) to their shard and starts a
commit task (tar, parquet, stats last) as soon as all its inputs are accounted for -> ``manifest.json``
lists the committed shards and the run summary. Rerunning the same command skips committed shards and
redoes partial ones, so nothing is duplicated and nothing is lost.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import io
import json
import logging
import os
import time
import typing

import pyarrow.parquet as pq
import ray

from dreamstereo import __version__
from dreamstereo.config import config_hash, to_yaml
from dreamstereo.io.shards import (
    PARQUET_SCHEMA_VERSION,
    STAGING_DIR,
    STATUSES,
    commit_staged,
    committed_shards,
    shard_name,
)
from dreamstereo.io.storage import S3Config, StorageError, UnwritableStorageError, open_storage
from dreamstereo.pipeline.actors import (
    CONTRACT,
    INPUT_COLUMNS,
    DepthActor,
    DepthPairActor,
    PairActor,
    WriteActor,
    decode_batch,
)
from dreamstereo.pipeline.clip import ClipConfig, chain_settings
from dreamstereo.pipeline.manifest import InputConfig, check_input_access, group_into_shards, read_inputs
from dreamstereo.stages.depth import DepthBackendName
from dreamstereo.stages.warp import WarpKernel
from dreamstereo.types import RETRYABLE_CODES, SampleStatus, UserError, original_error

logger = logging.getLogger(__name__)


class PairPlacement(str, enum.Enum):
    """Where the pair stage (disparity -> PBDP -> verdict -> members) runs."""

    CPU = "cpu"  # its own pool of CPU actors (PairActor)
    DEPTH = "depth"  # inside each depth actor, on its device, right after depth (DepthPairActor)


@dataclasses.dataclass
class ResourcesConfig:
    """Placement and parallelism per operator (cluster shape only; behaviour lives in the stage configs)."""

    # CPUs per decode task: fractional (2-CPU machines must not deadlock) and different from the actors'
    # request, or Ray Data fuses decode into the next actor and decode no longer scales on its own.
    decode_num_cpus: float = 0.25
    depth_actors: int = 1  # depth model replicas (one model load each)
    depth_num_gpus: float = 0.0  # GPUs per depth actor (1 on a GPU cluster)
    depth_num_cpus: float = 0.5
    depth_device: str = "cpu"  # cuda when depth_num_gpus > 0
    pair_actors: int = 1  # PBDP / filter / encode replicas (pair_placement=cpu)
    pair_num_cpus: float = 0.5
    # `depth`: the pair stage runs in the depth actors on depth_device (a GPU on a cluster), so disparity
    # never leaves the depth process and the depth actors need CPUs for the encoding (depth_num_cpus); no
    # pair pool then. Only with a depth model: with the oracle backend or mode=raw there is no depth actor,
    # and pairs run on the CPU pool. docs/benchmarks.md, "Capacity plan", sizes both.
    pair_placement: PairPlacement = PairPlacement.CPU
    write_actors: int = 1  # processes staging finished samples in the output (I/O bound)
    write_num_cpus: float = 0.1  # per writer, and per shard-commit task
    batch_size: int = 1  # clips per batch through each operator
    recycle_after: int = 0  # batches before a depth/pair actor replaces its process (0: never)
    max_shard_retries: int = 2  # commit attempts per shard before it is reported as failed
    # Ray re-runs of a decode task, and restarts of an actor (with re-runs of its batches), after its
    # worker process died. Ray Data's defaults are unbounded (-1): one input that kills its worker was
    # retried forever (168 restarts in 11 minutes). Recycling adds the restarts it needs on top. Losing a
    # node costs several: Ray counts every submission that finds the actor still restarting (measured: 4
    # for one node lost mid-job on a 2-node cluster), so the default leaves room for a few such losses.
    worker_retries: int = 10

    def __post_init__(self):
        if self.worker_retries < 0 or self.recycle_after < 0:
            raise ValueError(f"resources.worker_retries and resources.recycle_after must be >= 0, got "
                             f"{self.worker_retries}, {self.recycle_after}")

    def actor_restarts(self, rows: int) -> int:
        """Bounded ``max_restarts`` / ``max_task_retries`` for an actor pool seeing at most ``rows`` rows:
        a recycling actor exits at most once per ``recycle_after`` batches (a batch holds >= 1 row), and
        each exit re-runs the batches it had queued once, on the fresh process."""
        recycles = -(-rows // self.recycle_after) if self.recycle_after else 0
        return self.worker_retries + recycles


class GenerateMode(str, enum.Enum):
    PAIRS = "pairs"  # PBDP training pairs (Stage 2)
    RAW = "raw"  # clean clips only, rgb.mp4 + json (Stage 1 draws its own random masks)


@dataclasses.dataclass
class GenerateConfig:
    """``dreamstereo generate``."""

    mode: GenerateMode = GenerateMode.PAIRS
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    process: ClipConfig = dataclasses.field(default_factory=ClipConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    shard_size: int = 16  # inputs per shard
    ray_address: str | None = None  # None: RAY_ADDRESS, else an embedded local Ray
    progress_every_s: float = 30.0  # a progress line at least this often (0: only when a shard commits)
    rejected_previews: bool = True  # a small JPEG of each rejected clip in previews/<shard>.tar (dreamstereo report)

    # `process.device` was accepted and never read (depth runs where resources.depth_device says).
    MOVED_KEYS: typing.ClassVar[dict[str, str]] = {"process.device": "resources.depth_device"}

    def __post_init__(self):
        if self.resources.decode_num_cpus in (self.resources.depth_num_cpus, self.resources.pair_num_cpus):
            logger.warning("resources.decode_num_cpus equals an actor's num_cpus: Ray Data will fuse decode into "
                           "that actor (decode then runs inside it)")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        fused = self.resources.pair_placement is PairPlacement.DEPTH
        if (fused and self.process.pairs.warp.kernel is WarpKernel.NUMBA
                and not self.resources.depth_device.startswith("cpu")):
            raise ValueError(f"process.pairs.warp.kernel=numba runs on the CPU, but resources.pair_placement=depth "
                             f"runs pairs on resources.depth_device={self.resources.depth_device!r}: use "
                             f"warp.kernel=auto, or pair_placement=cpu")

    @property
    def smoke_test(self) -> str | None:
        """What every output says when the run's depth model is the random toy (``process.depth.weights=toy``)."""
        return None if self.mode is GenerateMode.RAW else self.process.depth.smoke_test


def _init_ray(address: str | None):
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    return ray


def build_dataset(items: list[dict], cfg: GenerateConfig, output: str):
    """The Ray Data graph over ``items`` (one per input: shard, input_index, uri); kept samples are
    staged in ``output``'s storage by the last operator."""
    res = cfg.resources
    raw = cfg.mode is GenerateMode.RAW
    model_depth = not raw and cfg.process.depth.backend is not DepthBackendName.ORACLE
    fused = model_depth and res.pair_placement is PairPlacement.DEPTH
    if res.pair_placement is PairPlacement.DEPTH and not fused:
        logger.warning("resources.pair_placement=depth: no depth model runs (%s), so pairs run on the CPU pair "
                       "actors", "mode=raw" if raw else "oracle depth")
    check_contract(graph_operators(model_depth, fused))
    # Every retry is bounded (Ray Data's defaults are -1: forever); decode crashes are already contained
    # in a child process (pipeline/isolate.py), so these only cover workers lost to the machine.
    rows = len(items) * cfg.process.decode.max_clips  # clip rows at most (an input without clips: one)
    recycled = {"max_restarts": res.actor_restarts(rows), "max_task_retries": res.actor_restarts(rows)}
    ds = ray.data.from_items(items)
    ds = ds.map_batches(decode_batch, batch_size=1, num_cpus=res.decode_num_cpus, max_retries=res.worker_retries,
                        fn_kwargs={"cfg": cfg.process, "s3": cfg.s3, "raw": raw})
    depth_weights = cfg.process.depth.resolved_weights() if model_depth else None
    if model_depth:
        depth_kwargs = {"cfg": cfg.process, "device": res.depth_device, "recycle_after": res.recycle_after}
        ds = ds.map_batches(DepthPairActor if fused else DepthActor, batch_size=res.batch_size,
                            num_cpus=res.depth_num_cpus, num_gpus=res.depth_num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=res.depth_actors),
                            fn_constructor_kwargs={**depth_kwargs, **({"depth_weights": depth_weights,
                                                                        "preview_rejected": cfg.rejected_previews}
                                                                       if fused else {})},
                            **recycled)
    if not fused:
        ds = ds.map_batches(PairActor, batch_size=res.batch_size, num_cpus=res.pair_num_cpus,
                            compute=ray.data.ActorPoolStrategy(size=res.pair_actors),
                            fn_constructor_kwargs={"cfg": cfg.process, "depth_weights": depth_weights, "raw": raw,
                                                   "recycle_after": res.recycle_after,
                                                   "preview_rejected": cfg.rejected_previews}, **recycled)
    return ds.map_batches(WriteActor, batch_size=res.batch_size, num_cpus=res.write_num_cpus,
                          compute=ray.data.ActorPoolStrategy(size=res.write_actors),
                          max_restarts=res.worker_retries, max_task_retries=res.worker_retries,
                          fn_constructor_kwargs={"output": output, "s3": cfg.s3})


def graph_operators(model_depth: bool, fused: bool) -> list[str]:
    """The operators of the graph :func:`build_dataset` builds, in order (names as in ``CONTRACT``)."""
    middle = ["depth+pair"] if fused else (["depth"] if model_depth else []) + ["pair"]
    return ["decode", *middle, "write", "driver"]


def check_contract(operators: list[str]) -> None:
    """Every column an operator reads must be written by the operator before it (or be an input column);
    ``operators`` in graph order, names as in ``CONTRACT``."""
    declared = {name: (reads, writes) for name, reads, writes in CONTRACT}
    available = set(INPUT_COLUMNS)
    for name in operators:
        reads, writes = declared[name]
        missing = set(reads) - available
        if missing:
            raise RuntimeError(f"pipeline graph: {name} reads {sorted(missing)}, which nothing upstream writes")
        available = set(writes) or available


def run_generate(source: str, output: str, cfg: GenerateConfig, *, echo=print, retry_failed: bool = False) -> dict:
    """Run (or resume) the job; return the run summary also written into ``output/manifest.json``.

    ``retry_failed`` also redoes committed shards holding a sample that failed with a retryable code
    (``types.RETRYABLE_CODES``: unreadable input, depth model failure); their keys do not change.

    Raises:
        StorageError: the output cannot be used: unreachable, or it refused a write (a full or read-only
            disk, named with its cause). The job stops at once, commits in flight end first, and no
            temporary file stays; committed shards stay, the others are redone by a rerun.
    """
    start = time.perf_counter()
    if "://" not in output:  # workers open it too: not relative to their working directory
        output = os.path.abspath(output)
    storage = open_storage(output, cfg.s3)
    inputs = read_inputs(source, cfg.input, cfg.s3)  # the inputs first: a bad input list creates no output
    check_input_access(inputs, cfg.s3)
    storage.check()
    _remove_temp_files(storage)  # of writers killed in an earlier run
    shards = group_into_shards(inputs, cfg.shard_size)
    _claim_output(storage, inputs, cfg)
    if cfg.smoke_test:
        logger.warning("process.depth.weights=toy: %s", cfg.smoke_test)
    storage.write_bytes("_run_config.yaml", to_yaml(cfg, note=cfg.smoke_test).encode())
    done = committed_shards(storage) & set(range(len(shards)))
    if retry_failed:
        for k in sorted(done & set(range(len(shards)))):
            if _has_retryable_failure(storage, k):
                storage.delete(shard_name(k, "stats.json"))  # uncommit first: a crash now leaves it pending
                done.discard(k)
    pending = [k for k in range(len(shards)) if k not in done]
    echo(f"generate: {len(inputs)} input(s) in {len(shards)} shard(s); {len(done)} already committed, "
         f"{len(pending)} to do")
    failed_shards: list[int] = []
    if pending:
        ray = _init_ray(cfg.ray_address)
        if "://" not in output and sum(n["Alive"] for n in ray.nodes()) > 1:
            logger.warning("output %r is a local path on a %d-node cluster: every node must see it at the same "
                           "path (a shared filesystem), or use s3://", output, sum(n["Alive"] for n in ray.nodes()))
        items = [{"shard": k, "input_index": i, "uri": v.uri, "problem": v.problem or ""}
                 for k in pending for i, v in enumerate(shards[k])]
        try:
            failed_shards = _stream(build_dataset(items, cfg, output), shards, pending, output, cfg, echo, len(done))
        except StorageError:
            _remove_temp_files(storage)  # of writers Ray stopped mid-write when the job ended
            raise
    _clear_staging(storage, committed_shards(storage))
    summary = None if pending else _recorded_summary(storage, cfg, len(shards))
    if summary is None:  # a rerun with nothing to do keeps the figures of the run that did the work
        summary = write_manifest(storage, shards, cfg, time.perf_counter() - start, failed_shards)
    echo(format_summary(summary))
    return summary


FINGERPRINT = "_inputs.json"  # what the shards of this output were cut from


class OutputConflict(UserError, ValueError):
    """An output that holds shards of another job (other inputs, shard size or stage settings)."""


def input_fingerprint(inputs, cfg: GenerateConfig) -> str:
    """Hash of everything that decides which samples a shard id holds: the ordered input URIs, the
    shard size, the mode and the stage settings (not resources, storage or the Ray address)."""
    # The stage settings are hashed as they were when `process:` also held `device` (always "cpu" there) and
    # before `warp.kernel` existed (every kernel gives the same samples), so outputs begun by earlier versions
    # still resume, whichever kernel a rerun uses.
    process = {**chain_settings(cfg.process), "device": "cpu"}
    payload = json.dumps({"uris": [v.uri for v in inputs], "shard_size": cfg.shard_size,
                          "mode": cfg.mode.value, "process": config_hash(process)})
    return hashlib.sha256(payload.encode()).hexdigest()


def _claim_output(storage, inputs, cfg: GenerateConfig) -> None:
    """Record the fingerprint on a fresh output; refuse to resume an output made from other inputs,
    another shard size or other stage settings (shard ids would then mean other inputs: lost and
    duplicated samples)."""
    fingerprint = input_fingerprint(inputs, cfg)
    if storage.exists(FINGERPRINT):
        recorded = json.loads(storage.read_bytes(FINGERPRINT))
        if recorded.get("fingerprint") != fingerprint:
            raise OutputConflict(
                f"output {storage.uri!r} holds shards cut from another input list, shard size or stage settings "
                f"({recorded.get('inputs')} inputs, shard_size {recorded.get('shard_size')}); resume with the same "
                f"command, or write to a new output")
        return
    storage.write_bytes(FINGERPRINT, json.dumps({"fingerprint": fingerprint, "inputs": len(inputs),
                                                 "shard_size": cfg.shard_size, "mode": cfg.mode.value}).encode())


def _stream(ds, shards, pending, output, cfg, echo, already: int) -> list[int]:
    """Route finished records to their shard; when all inputs of a shard are accounted for, hand the
    shard to a commit task (sample bytes stay in the workers and the output storage). A sample the output
    refused to stage, or a commit it refused (full, read-only), stops the job with that StorageError."""
    # Per-shard state lives only while a shard is open, so the driver does not grow with the corpus.
    records: dict[int, list[dict]] = {}
    clips_seen: dict[int, collections.Counter] = {}  # shard -> input index -> clips arrived
    inputs_done: dict[int, int] = {}
    timings: dict[int, collections.Counter] = {}
    commits: dict = {}  # in-flight commit task -> shard
    failed = []
    fatal: list[StorageError] = []  # an output that refuses writes (or staging that failed) ends the job
    config = config_hash(cfg)
    commit_task = ray.remote(commit_shard).options(num_cpus=cfg.resources.write_num_cpus,
                                                   max_retries=cfg.resources.worker_retries)
    progress = _Progress(echo, len(shards), already, len(pending), cfg.progress_every_s)

    def collect(timeout: float) -> None:
        done, _ = ray.wait(list(commits), num_returns=len(commits), timeout=timeout) if commits else ([], [])
        for ref in done:
            shard = commits.pop(ref)
            try:
                ray.get(ref)
                progress.committed(shard, len(commits))
            except Exception as exc:  # storage kept failing: the shard stays pending for a rerun
                error = storage_error(exc)
                if isinstance(error, UnwritableStorageError):
                    fatal.append(error)
                else:
                    logger.error("shard %06d did not commit: %s", shard, exc)
                failed.append(shard)

    rows = iter(ds.iter_rows())
    for row in rows:
        record, clip_timings = json.loads(row["record"]), json.loads(row["timings"])
        if record.get("staging_error"):  # the output refused a sample (see actors.write_batch)
            fatal.append(StorageError(record["staging_error"]))
            break
        shard, index = int(row["shard"]), int(row["input_index"])
        if shard not in records:
            records[shard], clips_seen[shard], inputs_done[shard] = [], collections.Counter(), 0
            timings[shard] = collections.Counter()
        records[shard].append(record)
        timings[shard].update(clip_timings)
        progress.clip(record.get("frames", 0), clip_timings, len(records))
        clips_seen[shard][index] += 1
        if clips_seen[shard][index] == int(row["clips"]):
            inputs_done[shard] += 1
        if inputs_done[shard] == len(shards[shard]):
            ref = commit_task.remote(output, cfg.s3, shard, records.pop(shard), dict(timings.pop(shard)), config,
                                     cfg.resources.max_shard_retries)
            commits[ref] = shard
            del clips_seen[shard], inputs_done[shard]
        collect(timeout=0)
        if fatal:
            break
    rows.close()  # stops the graph when the job ends early
    collect(timeout=None)  # commits in flight end (commit or fail whole) before the driver does
    if fatal:
        raise fatal[0]
    failed.extend(records)  # shards that never completed (should not happen: every input yields a row)
    return sorted(failed)


def storage_error(exc: BaseException) -> StorageError | None:
    """The StorageError a Ray task raised, unwrapped from Ray's exceptions; None when ``exc`` is something
    else (a bug)."""
    return original_error(exc, StorageError)


class _Progress:
    """One line per committed shard (shards done, clips and frames per second so far, ETA), and between
    commits a line every ``every_s`` seconds with the worker clips/s of each stage so far (Ray Data's own
    progress bars show rows done and in flight per operator)."""

    def __init__(self, echo, shards: int, already: int, todo: int, every_s: float = 30.0):
        self.echo, self.shards, self.done, self.todo, self.todo_total = echo, shards, already, todo, todo
        self.start, self.clips, self.frames = time.monotonic(), 0, 0
        self.every_s, self.last = every_s, time.monotonic()
        self.stage_seconds: collections.Counter = collections.Counter()

    def clip(self, frames: int, timings: dict[str, float], open_shards: int) -> None:
        self.clips += 1
        self.frames += frames
        self.stage_seconds.update(timings)
        now = time.monotonic()
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            elapsed = now - self.start
            stages = ", ".join(f"{k} {self.clips / v:.2f}" for k, v in sorted(self.stage_seconds.items()) if v > 0)
            self.echo(f"  {self.clips} clips in {elapsed:.0f} s ({self.clips / elapsed:.2f} clips/s, "
                      f"{self.frames / elapsed:.1f} frames/s; {open_shards} shard(s) open); "
                      f"clips/s per worker: {stages}")

    def committed(self, shard: int, in_flight: int) -> None:
        self.done += 1
        self.todo -= 1
        elapsed = max(time.monotonic() - self.start, 1e-9)
        finished = self.todo_total - self.todo
        eta = elapsed / finished * self.todo
        self.echo(f"  shard {shard:06d} committed ({self.done}/{self.shards} shards done, {in_flight} committing; "
                  f"{self.clips} clips, {self.clips / elapsed:.2f} clips/s, {self.frames / elapsed:.1f} frames/s; "
                  f"ETA {eta:.0f} s)")


def commit_shard(output: str, s3: S3Config, shard: int, records: list[dict], timings: dict, config: str,
                 attempts: int) -> dict:
    """A Ray task: assemble and commit one shard from its staged samples, retrying storage faults."""
    storage = open_storage(output, s3)
    for attempt in range(1, attempts + 1):
        try:
            return commit_staged(storage, shard, records, timings, config_hash=config)
        except UnwritableStorageError:  # a full or read-only disk stays so: no retry
            raise
        except Exception as exc:
            if attempt == attempts:
                raise
            logger.warning("shard %06d: commit attempt %d/%d failed: %s", shard, attempt, attempts, exc)
            time.sleep(min(2 ** attempt, 10))
    raise AssertionError("unreachable")


def _remove_temp_files(storage) -> None:
    """Delete (and log) temporary files that writers killed mid-write left in the output."""
    for name in storage.remove_temp_files():
        logger.info("removed %s (a write that did not finish)", name)


def _clear_staging(storage, committed: set[int]) -> None:
    """Remove staging objects left by a crash after their shard committed (pending shards keep theirs:
    a rerun overwrites them under the same names)."""
    for name in storage.list(f"{STAGING_DIR}/"):
        parts = name.split("/")
        if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) in committed:
            storage.delete(name)
    for shard in sorted(committed):
        storage.prune(f"{STAGING_DIR}/{shard:06d}/")
    storage.prune(f"{STAGING_DIR}/")  # gone when no shard is pending


def _has_retryable_failure(storage, shard: int) -> bool:
    rows = pq.read_table(io.BytesIO(storage.read_bytes(shard_name(shard, "parquet")))).to_pylist()
    retryable = {code.value for code in RETRYABLE_CODES}
    return any(r.get("status") == SampleStatus.FAILED.value and r.get("reason") in retryable for r in rows)


def _recorded_summary(storage, cfg, shards: int) -> dict | None:
    """The summary in ``manifest.json`` when a run of these settings wrote it with every shard committed
    (``None`` when there is none, it cannot be read, or it says otherwise)."""
    if not storage.exists("manifest.json"):
        return None
    try:
        summary = json.loads(storage.read_bytes("manifest.json"))["summary"]
    except (ValueError, KeyError, TypeError):
        return None
    complete = summary.get("committed_shards") == shards and not summary.get("failed_shards")
    return summary if complete and summary.get("config_hash") == config_hash(cfg) else None


def write_manifest(storage, shards, cfg, seconds: float, failed_shards: list[int]) -> dict:
    """``manifest.json``: committed shards (path, samples, bytes, sha256) and the run summary."""
    entries, totals, reasons, stage_seconds = [], collections.Counter(), collections.Counter(), collections.Counter()
    placement: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for k in sorted(committed_shards(storage) & set(range(len(shards)))):
        stats = json.loads(storage.read_bytes(shard_name(k, "stats.json")))
        entries.append({"shard": k, "path": shard_name(k, "tar"), "num_samples": stats["samples"],
                        "bytes": stats["tar_bytes"], "sha256": stats["tar_sha256"]})
        for key in ("count", "samples", *STATUSES):
            totals[key] += stats[key]
        totals["previews"] += stats.get("previews", 0)  # absent in shards of earlier versions
        reasons.update(stats["reasons"])
        stage_seconds.update(stats.get("seconds_per_stage", {}))
        for stage, devices in stats.get("stage_placement", {}).items():  # absent in shards of earlier versions
            placement[stage].update(devices)
    summary = {
        "version": __version__, "config_hash": config_hash(cfg), "parquet_schema_version": PARQUET_SCHEMA_VERSION,
        "inputs": sum(len(s) for s in shards),
        "shards": len(shards), "committed_shards": len(entries), "failed_shards": failed_shards,
        "clips": totals["count"], "samples": totals["samples"], "rejected": totals["rejected"],
        "failed": totals["failed"], "reasons": dict(sorted(reasons.items())), "previews": totals["previews"],
        "wall_seconds": round(seconds, 2),
        # Worker seconds per stage summed over every clip, and the clips/s one worker sustains in it.
        "stage_seconds": {k: round(v, 3) for k, v in sorted(stage_seconds.items())},
        "stage_clips_per_s": {k: round(totals["count"] / v, 2) for k, v in sorted(stage_seconds.items()) if v > 0},
        # Clips per stage and the device that ran the stage for them (cpu, cuda:0, ...).
        "stage_placement": {k: dict(sorted(v.items())) for k, v in sorted(placement.items())},
        **({"smoke_test": cfg.smoke_test} if cfg.smoke_test else {}),
    }
    storage.write_bytes("manifest.json", json.dumps({"summary": summary, "shards": entries}, indent=2).encode())
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"inputs {summary['inputs']}, shards {summary['committed_shards']}/{summary['shards']} committed, "
             f"clips {summary['clips']}: {summary['samples']} samples, {summary['rejected']} rejected, "
             f"{summary['failed']} failed, {summary['wall_seconds']} s"]
    lines += [f"  {reason}: {count}" for reason, count in summary["reasons"].items()]
    placement = summary.get("stage_placement", {})
    lines += [f"  stage {stage}: {summary['stage_seconds'][stage]:.1f} worker-s, {rate} clips/s per worker"
              + (f" (on {', '.join(sorted(placement[stage]))})" if placement.get(stage) else "")
              for stage, rate in summary.get("stage_clips_per_s", {}).items()]
    if summary["failed_shards"]:
        lines.append(f"  shards that did not commit (rerun to retry): {summary['failed_shards']}")
    if summary.get("smoke_test"):
        lines.append(f"  SMOKE TEST: {summary['smoke_test']}")
    return "\n".join(lines)
