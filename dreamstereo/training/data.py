"""Training data: WebDataset shards streamed from a folder or ``s3://``, as batches of one resolution bucket.

Shard list: a ``dreamstereo generate`` output (a folder or ``s3://bucket/prefix`` holding ``manifest.json``),
a brace pattern of tar URLs (``s3://b/p/shards/{000000..000099}.tar``) or one ``.tar``.

Order of work in one stream (``ShardStream``):

1. Split: the shards are dealt to streams, ``shards[s::S]``, where the S = world size x loader workers
   streams are numbered ``s = rank * workers + worker``: no two streams read the same shard.
2. Endless: a stream visits its shards over and over, in a fresh seeded order each pass (webdataset's
   ``ResampledShards`` draws with replacement instead; a permutation visits every shard once per pass).
3. Shuffle window: raw samples (undecoded bytes) are gathered ``shuffle_buffer`` at a time; each window is
   permuted with a generator seeded by (seed, stream, window index), its samples grouped by resolution
   bucket into batches of ``batch_size`` (the last, incomplete batch of each bucket is dropped: the endless
   stream brings those samples back in later windows).
4. Decode: only the batches that are emitted are decoded (``sample.read_sample`` for pairs; the clip and a
   random mask for Stage 1), cut to ``num_frames`` and fitted to their bucket.

Position: the stream's state is ``(visit, skip, window, emitted)``: where the current window starts (shard
visit index, samples to skip in that shard), its index and how many of its batches have been emitted.
Every batch carries the state after it, so a checkpoint stores a few integers per stream and a resumed
stream re-reads one window of raw bytes (no decoding) and continues with the next batch exactly.

Bad data: a shard that is not a readable tar (random bytes, cut short) is skipped with a warning after the
samples read before the damage, and counted (``shards_skipped`` on the next batch, summed in
``metrics.jsonl``); ``data.strict=true`` stops training instead. A stream that finds no clip of
``num_frames`` frames in a whole pass over its shards stops with ``TrainDataError`` rather than loop.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator

import numpy as np
import torch

from dreamstereo.io import media
from dreamstereo.io.sample import read_sample
from dreamstereo.io.shards import iter_raw_samples, sample_members
from dreamstereo.io.storage import S3Config, StorageError
from dreamstereo.stages.decode import probe_video, resize_center_crop
from dreamstereo.training.masks import MaskConfig, random_video_mask
from dreamstereo.types import UserError

logger = logging.getLogger(__name__)


class TrainDataError(UserError, ValueError):
    """Shards that cannot give a single training batch (no samples, every clip too short); says what to change."""


class DamagedShard(StorageError):
    """A shard tar that cannot be read to its end (``data.strict=true``; otherwise it is skipped)."""


class TrainStage(str, enum.Enum):
    RANDOM_MASKS = "random_masks"  # Stage 1: clean clips (rgb.mp4 or mp4), masks drawn here
    PAIRS = "pairs"  # Stage 2: PBDP pairs; V1' (warped.mp4) and M1 (mask.npz) in, V1 (rgb.mp4) as target


@dataclasses.dataclass
class DataConfig:
    """Where the shards are and how they become batches."""

    shards: str | None = None  # generate output (folder or s3:// with manifest.json), brace pattern, or .tar
    val_shards: str | None = None  # held-out shards for validation loss (same forms); None = see holdout_shards
    holdout_shards: int = 0  # without val_shards: the last N shards of `shards` validate instead of training
    stage: TrainStage = TrainStage.RANDOM_MASKS  # random_masks (Stage 1) | pairs (Stage 2)
    num_frames: int = 49  # frames per training clip, 1 + 4k (Wan's VAE); longer clips are cut, shorter skipped
    # [height, width], multiples of 16; a clip trains in the nearest bucket of its orientation
    buckets: list[list[int]] = dataclasses.field(default_factory=lambda: [[480, 832]])
    shuffle_buffer: int = 64  # raw samples per shuffle window (memory: this many encoded samples per stream)
    num_workers: int = 2  # DataLoader processes per training worker (0 = decode in the training process)
    masks: MaskConfig = dataclasses.field(default_factory=MaskConfig)  # Stage 1 random masks
    s3: S3Config = dataclasses.field(default_factory=S3Config)  # endpoint/region; keys come from the environment
    strict: bool = False  # a damaged shard tar ends training; False = skip it with a warning (shards_skipped)

    def __post_init__(self):
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"data.num_frames must be 1 + 4k, got {self.num_frames}")
        if not self.buckets or any(len(b) != 2 or b[0] % 16 or b[1] % 16 or min(b) < 16 for b in self.buckets):
            raise ValueError(f"data.buckets must be [height, width] pairs, multiples of 16, got {self.buckets}")
        if self.shuffle_buffer < 1 or self.num_workers < 0 or self.holdout_shards < 0:
            raise ValueError(f"data: shuffle_buffer >= 1, num_workers >= 0, holdout_shards >= 0, got "
                             f"{self.shuffle_buffer}, {self.num_workers}, {self.holdout_shards}")


# ----------------------------------------------------------------------------------------------------
# Damaged shards (shard lists and raw samples: io/shards.py)


def damaged_shard(url: str, exc: tarfile.TarError, cfg: DataConfig) -> None:
    """Deal with a shard tar that broke off (``exc``): raise with ``cfg.strict``, else warn (the caller skips it).

    Raises:
        DamagedShard: ``cfg.strict`` is set.
    """
    if cfg.strict:
        raise DamagedShard(f"shard {url} is not a readable tar ({exc}): regenerate or remove it, or set "
                           f"data.strict=false to skip damaged shards") from None
    logger.warning("shard %s is not a readable tar (%s): skipped from there on (data.strict=false)", url, exc)


def _seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def sample_rng(seed: int, key: str, window: int) -> np.random.Generator:
    """The generator of one sample's random choices (mask, start frame): seeded by the run seed, the sample
    key and the shuffle window it was drawn in (so a clip gets a new mask on each pass)."""
    return np.random.default_rng(_seed("sample", seed, key, window))


def _orientation(height: int, width: int) -> int:
    return (width > height) - (width < height)  # 1 landscape, -1 portrait, 0 square


def nearest_bucket(height: int, width: int, buckets: list[list[int]]) -> tuple[int, int]:
    """The configured bucket of the clip's orientation (portrait, landscape or square) closest in aspect
    ratio (ties: closest in area), so a portrait clip is never centre-cropped to a landscape frame; when no
    bucket has the clip's orientation, the closest of all."""
    def distance(b):
        return (abs(np.log((b[1] / b[0]) / (width / height))), abs(np.log(b[0] * b[1] / (height * width))))
    same = [b for b in buckets if _orientation(b[0], b[1]) == _orientation(height, width)]
    best = min(same or buckets, key=distance)
    return int(best[0]), int(best[1])


def raw_bucket(raw: dict, buckets: list[list[int]]) -> tuple[int, int]:
    """The bucket a raw sample trains in, from its metadata (``bucket`` or ``height``/``width``), else from
    the video's container header."""
    members = sample_members(raw)
    meta = json.loads(members["json"]) if "json" in members else {}
    if meta.get("bucket"):
        h, w = meta["bucket"]
    elif meta.get("height") and meta.get("width"):
        h, w = meta["height"], meta["width"]
    else:
        probe = probe_video(members.get("rgb.mp4") or members["mp4"])
        h, w = probe.height, probe.width
    return nearest_bucket(int(h), int(w), buckets)


def plan_window(raws: list[dict], rng: np.random.Generator, batch_size: int,
                buckets: list[list[int]]) -> list[tuple[tuple[int, int], list[dict]]]:
    """Permute one window and group it into ``(bucket, samples)`` batches of ``batch_size``, in order of
    completion; incomplete batches are dropped."""
    order = rng.permutation(len(raws))
    pending: dict[tuple[int, int], list[dict]] = {}
    batches = []
    for i in order:
        bucket = raw_bucket(raws[i], buckets)
        pending.setdefault(bucket, []).append(raws[i])
        if len(pending[bucket]) == batch_size:
            batches.append((bucket, pending.pop(bucket)))
    return batches


# ----------------------------------------------------------------------------------------------------
# Decoding one sample into training arrays


def _fit_mask(mask: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Resize/crop a ``(T, H, W) bool`` mask like ``resize_center_crop``; a pixel is masked when any part of
    it was (area interpolation > 0), so no hole is lost."""
    as_rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
    return resize_center_crop(as_rgb, bucket)[..., 0] > 0 if mask.shape[1:] != bucket else mask


def _fit(frames: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    return frames if frames.shape[1:3] == bucket else resize_center_crop(frames, bucket)


def decode_raw(raw: dict, cfg: DataConfig, bucket: tuple[int, int], seed: int, window: int) -> dict | None:
    """One training example, or None when the clip is shorter than ``num_frames``.

    Returns:
        ``{"key", "clean": (T, H, W, 3) uint8, "cond": (T, H, W, 3) uint8, "mask": (T, H, W) bool}``: the
        target clip, the clip the masked-video latent is made from (Stage 1: the clean clip; Stage 2: V1'),
        and the pixels to inpaint.
    """
    members = sample_members(raw)
    key = raw["__key__"]
    rng = sample_rng(seed, key, window)
    t = cfg.num_frames
    if cfg.stage is TrainStage.PAIRS:
        sample = read_sample(members, key)
        clean, cond, mask = sample.clean, sample.warped, sample.mask
    else:
        clean = media.decode_video_bytes(members.get("rgb.mp4") or members["mp4"])
        cond, mask = clean, None
    if len(clean) < t:
        logger.warning("sample %s: %d frames < data.num_frames=%d, skipped", key, len(clean), t)
        return None
    start = int(rng.integers(len(clean) - t + 1))
    clean, cond = _fit(clean[start:start + t], bucket), _fit(cond[start:start + t], bucket)
    if mask is None:
        mask = random_video_mask(t, bucket[0], bucket[1], rng, cfg.masks)
    else:
        mask = _fit_mask(mask[start:start + t], bucket)
    return {"key": key, "url": raw.get("__url__", ""), "clean": clean, "cond": cond, "mask": mask}


def collate(examples: list[dict]) -> dict:
    """Stack examples of one bucket: ``clean``/``cond`` ``(B, T, H, W, 3) uint8``, ``mask`` ``(B, T, H, W)
    bool`` tensors, ``keys`` and the ``urls`` of their shards."""
    return {"keys": [e["key"] for e in examples], "urls": [e["url"] for e in examples],
            "clean": torch.from_numpy(np.stack([e["clean"] for e in examples])),
            "cond": torch.from_numpy(np.stack([e["cond"] for e in examples])),
            "mask": torch.from_numpy(np.stack([e["mask"] for e in examples]))}


# ----------------------------------------------------------------------------------------------------
# The stream


def initial_state() -> dict:
    return {"visit": 0, "skip": 0, "window": 0, "emitted": 0}


class ShardStream:
    """One endless stream over a fixed list of shards (see the module docstring)."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int, stream_id: int):
        if not urls:
            raise TrainDataError(f"stream {stream_id} has no shards")
        self.urls, self.cfg, self.batch_size, self.seed, self.stream_id = urls, cfg, batch_size, seed, stream_id
        self.skipped = 0  # damaged shard visits not yet reported on a batch

    def _shard_of_visit(self, visit: int) -> str:
        n = len(self.urls)
        order = np.random.default_rng(_seed("pass", self.seed, self.stream_id, visit // n)).permutation(n)
        return self.urls[order[visit % n]]

    def _raw(self, visit: int, skip: int) -> Iterator[tuple[dict, int, int]]:
        """``(raw sample, visit, index after it)`` from a position on, endlessly."""
        empty_visits = 0
        while True:
            count, url = 0, self._shard_of_visit(visit)
            try:
                for index, raw in enumerate(iter_raw_samples(url, self.cfg.s3)):
                    count += 1
                    if index >= skip:
                        yield raw, visit, index + 1
            except tarfile.TarError as exc:
                damaged_shard(url, exc, self.cfg)
                self.skipped += 1
            empty_visits = empty_visits + 1 if count == 0 else 0
            if empty_visits > len(self.urls):
                raise TrainDataError(f"data stream {self.stream_id}: its {len(self.urls)} shard(s) hold no readable "
                                     f"sample (e.g. {self.urls[0]})")
            visit, skip = visit + 1, 0

    def batches(self, state: dict | None = None) -> Iterator[dict]:
        """Decoded batches, each with ``stream`` (id) and ``state`` (the position after it)."""
        state = dict(state or initial_state())
        start = (state["visit"], state["skip"])
        window, emitted = state["window"], state["emitted"]
        raws = self._raw(*start)
        idle = 0
        usable_visit = start[0]  # the shard visit of the latest window that gave a clip of num_frames frames
        while True:
            chunk, end = [], start
            for raw, visit, after in raws:
                chunk.append(raw)
                end = (visit, after)
                if len(chunk) == self.cfg.shuffle_buffer:
                    break
            rng = np.random.default_rng(_seed("window", self.seed, self.stream_id, window))
            plan = plan_window(chunk, rng, self.batch_size, self.cfg.buckets)
            idle = 0 if plan else idle + 1
            if idle > 100:
                raise TrainDataError(f"no bucket reached batch_size={self.batch_size} in 100 shuffle windows of "
                                 f"{self.cfg.shuffle_buffer} samples: raise data.shuffle_buffer")
            for index, (bucket, group) in enumerate(plan):
                if index < emitted:
                    usable_visit = end[0]  # emitted before the checkpoint, so it had clips
                    continue
                examples = [e for e in (decode_raw(r, self.cfg, bucket, self.seed, window) for r in group) if e]
                if not examples:
                    continue
                usable_visit = end[0]
                batch = collate(examples)
                batch["stream"] = self.stream_id
                batch["state"] = {"visit": start[0], "skip": start[1], "window": window, "emitted": index + 1}
                batch["shards_skipped"], self.skipped = self.skipped, 0
                yield batch
            if plan and end[0] - usable_visit > len(self.urls):  # a whole pass decoded, not one clip long enough
                raise TrainDataError(f"data stream {self.stream_id}: no clip in a whole pass over its "
                                     f"{len(self.urls)} shard(s) has data.num_frames={self.cfg.num_frames} frames "
                                     f"(e.g. {self.urls[0]}): lower data.num_frames (1 + 4k) or give longer clips")
            start, window, emitted = end, window + 1, 0


def shards_of_stream(urls: list[str], stream_id: int, num_streams: int) -> list[str]:
    """The shards of one stream: every ``num_streams``-th from ``stream_id``, so streams never overlap.

    Raises:
        TrainDataError: fewer shards than streams.
    """
    if len(urls) < num_streams:
        raise TrainDataError(f"{len(urls)} shard(s) for {num_streams} data streams (workers x data.num_workers): "
                         f"every stream needs its own shard; write smaller shards or lower the worker counts")
    return urls[stream_id::num_streams]


class TrainBatches(torch.utils.data.IterableDataset):
    """The streams of one training worker (rank), one per DataLoader process.

    Batch ``n`` of this rank comes from logical stream ``n % L`` (L = max(1, num_workers)): the DataLoader
    takes batches from its processes in turn, and on resume at batch ``n`` process ``w`` plays logical stream
    ``(w + n) % L``, so the interleaving continues where it stopped.
    """

    def __init__(self, urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int, rank: int, world: int,
                 states: list[dict] | None = None, batches_done: int = 0):
        super().__init__()
        self.num_streams = max(1, cfg.num_workers)
        self.urls, self.cfg, self.batch_size, self.seed = urls, cfg, batch_size, seed
        self.rank, self.world = rank, world
        self.states = states or [initial_state() for _ in range(self.num_streams)]
        self.batches_done = batches_done
        for logical in range(self.num_streams):  # fail here, not inside a loader process
            shards_of_stream(urls, rank * self.num_streams + logical, world * self.num_streams)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.batches_done) % self.num_streams
        stream_id = self.rank * self.num_streams + logical
        stream = ShardStream(shards_of_stream(self.urls, stream_id, self.world * self.num_streams), self.cfg,
                             batch_size=self.batch_size, seed=self.seed, stream_id=stream_id)
        for batch in stream.batches(self.states[logical]):
            batch["logical"] = logical
            yield batch

    def loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.cfg.num_workers,
                                           persistent_workers=False, prefetch_factor=2 if self.cfg.num_workers else None)

    def batches(self) -> Iterator[dict]:
        """The batches of :meth:`loader`; a data error from a loader process comes out with its own one-line
        message (see :func:`worker_message`)."""
        try:
            yield from self.loader()
        except (TrainDataError, DamagedShard) as exc:
            raise type(exc)(worker_message(exc)) from None


def worker_message(exc: BaseException) -> str:
    """The message ``exc`` was raised with, also when a DataLoader process raised it: torch raises it again
    in the training process as the same class, with the worker's traceback folded into the text
    (``Caught X in DataLoader worker process N. Original Traceback ... module.X: message``)."""
    text = str(exc)
    if not text.startswith("Caught "):
        return text
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else text


def validation_batches(urls: list[str], cfg: DataConfig, *, batch_size: int, seed: int,
                       max_batches: int) -> list[dict]:
    """A fixed validation set: the first ``max_batches`` batches of the shards read once, in order, with
    windows planned by a fixed generator (the same batches and masks at every evaluation)."""
    out: list[dict] = []
    chunk: list[dict] = []

    def flush(window: int):
        rng = np.random.default_rng(_seed("val", seed, window))
        for bucket, group in plan_window(chunk, rng, batch_size, cfg.buckets):
            examples = [e for e in (decode_raw(r, cfg, bucket, seed, -1 - window) for r in group) if e]
            if examples and len(out) < max_batches:
                out.append(collate(examples))
        chunk.clear()

    window = 0
    for url in urls:
        try:
            for raw in iter_raw_samples(url, cfg.s3):
                chunk.append(raw)
                if len(chunk) == cfg.shuffle_buffer:
                    flush(window)
                    window += 1
                if len(out) >= max_batches:
                    return out
        except tarfile.TarError as exc:
            damaged_shard(url, exc, cfg)
    if chunk:
        flush(window)
    return out


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """``(B, T, H, W, 3) uint8`` -> ``(B, 3, T, H, W)`` float32 in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)

