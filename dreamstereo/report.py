"""``dreamstereo report DST --out DIR``: a self-contained HTML report of a ``generate`` output (issue 13, item 3).

``DIR/index.html`` (inline CSS, no script, no external address) and its images in ``DIR/img/`` show the run
summary (inputs, kept / rejected / failed by reason, throughput per stage, config hash), a histogram of every
quality score with its thresholds, the disparity and hole ratio of the sampled samples, a per-source table and
a gallery of kept and of rejected or failed clips.

Memory does not grow with the output: the shards' parquet files are read one at a time in record batches
(:meth:`pyarrow.parquet.ParquetFile.iter_batches`), counts are exact, the values behind each histogram and the
gallery are seeded uniform samples of bounded size (reservoir sampling, Algorithm R: Vitter, "Random Sampling
with a Reservoir", ACM TOMS 1985), and only the tars that hold a gallery sample are opened. The page says how
many values each plot shows out of how many. A shard whose parquet, stats or tar cannot be read is listed with
the reason, and the report goes on. The report appears all at once: it is written into a staging folder inside
``DIR`` and moved into place, ``index.html`` last (``io.media.staged_folder``), so a failed run leaves the
previous report as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import heapq
import html
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np

from dreamstereo import __version__
from dreamstereo.arrays import ArrayFile
from dreamstereo.io import media, preview
from dreamstereo.io.shards import (
    PREVIEW_MEMBER,
    QUALITY_COLUMNS,
    STATUSES,
    iter_raw_samples,
    preview_name,
    sample_members,
    shard_name,
)
from dreamstereo.io.storage import S3Config, StorageError, open_storage
from dreamstereo.stages.quality import QualityConfig
from dreamstereo.types import RejectReason, SampleStatus, UserError

logger = logging.getLogger(__name__)

SCORES = [column[len("quality_"):] for column in QUALITY_COLUMNS]  # frames, short_side, mask_ratio, ...
# Scores measured only once the clip was paired (mask) or had a depth (disparity): a clip rejected before
# pairing records mask_ratio 0.0 as a placeholder, and raw mode measures neither (pipeline/clip.py).
MASK_SCORES = {"mask_ratio"}
DEPTH_SCORES = {"disparity_range", "disparity_finite"}
MASK_REASONS = {RejectReason.MASK_RATIO_LOW.value, RejectReason.MASK_RATIO_HIGH.value}
_COLUMNS = ["key", "source", "status", "reason", "message", "scores"]
_IMG = "img"  # DIR/img/: the report's images, linked relatively from DIR/index.html
_MAX_FRAME_BYTES = 256 * 2**20  # one frame of a sample's mask or disparity, refused beyond (a hostile member)
_MAX_PREVIEW_BYTES = 16 * 2**20  # a rejected clip's contact sheet (a JPEG of a few dozen KB when generate wrote it)
_MAX_MEMBER_BYTES = 2 * 2**30  # a sample's video member, refused beyond (it is held in memory to decode)


class ReportError(UserError, ValueError):
    """``DST`` is no ``generate`` output (missing, or without a readable ``manifest.json``)."""


@dataclasses.dataclass
class ReportConfig:
    """``dreamstereo report``."""

    gallery: int = 8  # kept samples shown, and rejected or failed clips shown (each a seeded uniform sample)
    seed: int = 0  # of every sample the report draws (gallery, histogram values)
    max_hist_values: int = 200_000  # values per quality score a histogram shows; beyond, a seeded uniform sample
    max_sources: int = 50  # rows of the per-source table (the sources with the most clips)
    batch_rows: int = 65_536  # parquet rows read at a time
    max_listed_problems: int = 100  # unreadable shard files listed by name (all are counted)
    tile_width: int = 480  # gallery images are scaled down to at most this many pixels wide (a click opens one)
    s3: S3Config = dataclasses.field(default_factory=S3Config)  # for an s3:// DST (credentials: the standard chain)

    def __post_init__(self):
        for name in ("gallery", "max_listed_problems"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tile_width < 16:
            raise ValueError(f"tile_width must be >= 16, got {self.tile_width}")
        for name in ("max_hist_values", "max_sources", "batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------
# Bounded samples of a stream


class Reservoir:
    """Slots of a seeded uniform sample of at most ``size`` items from a stream of unknown length (Algorithm R).

    :meth:`offer` takes the next ``n`` items of the stream and says which of them go into which slot, in stream
    order (a later item may replace an earlier one of the same call); the caller keeps the items.
    """

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.seen, self.filled = size, rng, 0, 0

    def offer(self, n: int) -> list[tuple[int, int]]:
        """``(slot, index among the n)`` pairs to store, in order."""
        out = []
        free = min(self.size - self.filled, n)
        out += [(self.filled + i, i) for i in range(free)]
        self.filled += free
        if n > free:
            positions = self.seen + np.arange(free, n) + 1  # 1-based stream positions of the rest
            draws = self.rng.integers(0, positions)  # each uniform in [0, position)
            out += [(int(draws[i]), free + int(i)) for i in np.flatnonzero(draws < self.size)]
        self.seen += n
        return out


class ValueSample:
    """A seeded uniform sample of at most ``size`` (value, kept) pairs of one score, and how many were offered."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.reservoir = Reservoir(size, rng)
        self.values = np.empty(size, np.float64)
        self.kept = np.empty(size, bool)

    def add(self, values: np.ndarray, kept: np.ndarray) -> None:
        for slot, i in self.reservoir.offer(len(values)):
            self.values[slot], self.kept[slot] = values[i], kept[i]

    @property
    def seen(self) -> int:
        return self.reservoir.seen

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.reservoir.filled
        return self.values[:n], self.kept[:n]


class ItemSample:
    """A seeded uniform sample of at most ``size`` items (dicts); items are built only when they are taken."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.reservoir = Reservoir(size, rng)
        self.items: list = [None] * size

    def add(self, count: int, make) -> None:
        """Offer ``count`` items; ``make(i)`` builds item ``i`` of them when it is taken."""
        for slot, i in self.reservoir.offer(count):
            self.items[slot] = make(i)

    def taken(self) -> list:
        return self.items[:self.reservoir.filled]


# ----------------------------------------------------------------------------------------------------
# Reading the output


@dataclasses.dataclass
class Problem:
    """A shard file that could not be read, and why."""

    shard: int
    file: str
    reason: str


@dataclasses.dataclass
class Scan:
    """What one pass over the shards found (counts exact, samples bounded)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # clips and per status
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # "status:reason"
    stage_seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stage_clips: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    stats_clips: int = 0  # clips of the shards whose stats file was read
    finite: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (finite, status)
    values: dict = dataclasses.field(default_factory=dict)  # score -> ValueSample
    sources: list = dataclasses.field(default_factory=list)  # min-heap of (clips, not kept, source, counts)
    source_entries: int = 0  # distinct sources per shard, summed (= distinct sources: a source is in one shard)
    problems: list = dataclasses.field(default_factory=list)
    problem_count: int = 0
    shards_read: int = 0
    legacy_shards: int = 0  # version-1 parquet (no typed quality columns): scores read from the JSON
    kept_sample: ItemSample | None = None
    other_sample: ItemSample | None = None


def _problem(scan: Scan, cfg: ReportConfig, shard: int, file: str, exc: BaseException) -> None:
    scan.problem_count += 1
    reason = f"{type(exc).__name__}: {exc}".strip()
    logger.warning("shard %06d: cannot read %s (%s)", shard, file, reason)
    if len(scan.problems) < cfg.max_listed_problems:
        scan.problems.append(Problem(shard, file, reason[:500]))


_READ_ERRORS = (StorageError, OSError, ValueError, KeyError, TypeError, tarfile.TarError, EOFError)


def _scores_of(batch, typed: bool) -> dict[str, np.ndarray]:
    """Each score of a record batch as float64 (NaN where missing): the typed columns, else the JSON."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = {}
    if typed:
        for name in SCORES:
            column = pc.cast(batch.column(f"quality_{name}"), pa.float64())
            out[name] = pc.fill_null(column, float("nan")).to_numpy(zero_copy_only=False)
        return out
    parsed = [json.loads(text) if text else {} for text in batch.column("scores").to_pylist()]
    for name in SCORES:
        values = [row.get(name) if isinstance(row, dict) else None for row in parsed]
        out[name] = np.array([np.nan if v is None else float(v) for v in values], np.float64)
    return out


def _read_parquet(storage, scan: Scan, cfg: ReportConfig, shard: int, mode: str) -> None:
    """One shard's parquet, batch by batch, into ``scan``; its counts join only when the whole file was read."""
    import pyarrow.parquet as pq

    counts, reasons, finite = collections.Counter(), collections.Counter(), collections.Counter()
    per_source: dict[str, list[int]] = {}
    offset = 0
    parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(shard_name(shard, "parquet"))))
    names = parquet.schema_arrow.names
    typed = all(column in names for column in QUALITY_COLUMNS)
    columns = [c for c in _COLUMNS if c in names] + ([*QUALITY_COLUMNS] if typed else [])
    for batch in parquet.iter_batches(batch_size=cfg.batch_rows, columns=columns):
        rows = {name: batch.column(name).to_pylist() for name in _COLUMNS if name in batch.schema.names}
        n = batch.num_rows
        status, reason = rows["status"], rows.get("reason") or [None] * n
        scores = _scores_of(batch, typed)
        kept = np.array([s == SampleStatus.OK.value for s in status], dtype=bool)
        counts["clips"] += n
        counts.update(status)
        reasons.update(f"{s}:{r}" for s, r in zip(status, reason) if r)
        for source, s in zip(rows["source"], status):
            entry = per_source.setdefault(source or "", [0, 0, 0, 0])  # clips, ok, rejected, failed
            entry[0] += 1
            if s in STATUSES:
                entry[1 + STATUSES.index(s)] += 1
        # quality values: scored rows only (failed ones have none); the mask ratio only where it was measured
        for name in SCORES:
            if (mode == "raw" and name in MASK_SCORES | DEPTH_SCORES) or name == "disparity_finite":
                continue
            valid = ~np.isnan(scores[name])
            if name in MASK_SCORES:
                valid &= np.array([s == SampleStatus.OK.value or r in MASK_REASONS for s, r in zip(status, reason)],
                                  dtype=bool)
            scan.values[name].add(scores[name][valid], kept[valid])
        if mode != "raw":
            for value, s in zip(scores["disparity_finite"], status):
                if not np.isnan(value):
                    finite[(bool(value), s == SampleStatus.OK.value)] += 1

        def row(i, base=offset, rows=rows, scores=scores):  # (called within this batch: ItemSample.add)
            item = {name: rows[name][i] for name in rows}
            item.update(shard=shard, row=base + i, scores={k: float(v[i]) for k, v in scores.items()
                                                             if not np.isnan(v[i])})
            unmeasured = MASK_SCORES | DEPTH_SCORES if mode == "raw" else set()
            if item["status"] != SampleStatus.OK.value and item.get("reason") not in MASK_REASONS:
                unmeasured |= MASK_SCORES  # a placeholder 0.0: rejected before the mask was made
            for name in unmeasured:
                item["scores"].pop(name, None)
            return item

        ok_idx = np.flatnonzero(kept)
        other_idx = np.flatnonzero(~kept)
        scan.kept_sample.add(len(ok_idx), lambda i, idx=ok_idx: row(int(idx[i])))
        scan.other_sample.add(len(other_idx), lambda i, idx=other_idx: row(int(idx[i])))
        offset += n
    scan.counts.update(counts)
    scan.reasons.update(reasons)
    scan.finite.update(finite)
    scan.shards_read += 1
    scan.legacy_shards += not typed
    scan.source_entries += len(per_source)
    for source, entry in per_source.items():  # keep the max_sources sources with the most clips
        item = (entry[0], sum(entry[2:]), source, entry)
        if len(scan.sources) < cfg.max_sources:
            heapq.heappush(scan.sources, item)
        elif item > scan.sources[0]:
            heapq.heapreplace(scan.sources, item)


def _read_stats(storage, scan: Scan, shard: int) -> None:
    stats = json.loads(storage.read_bytes(shard_name(shard, "stats.json")))
    clips = int(stats["count"])  # all of a stats file is checked before any of it is counted
    seconds = {stage: float(value) for stage, value in (stats.get("seconds_per_stage") or {}).items()}
    placement = {stage: {device: int(n) for device, n in devices.items()}  # absent in shards before issue 12
                 for stage, devices in (stats.get("stage_placement") or {}).items()}
    scan.stage_seconds.update(seconds)
    for stage, devices in placement.items():
        scan.stage_clips[stage].update(devices)
    scan.stats_clips += clips


def scan_output(storage, manifest: dict, cfg: ReportConfig, mode: str) -> Scan:
    """One pass over the committed shards of ``manifest``: stats and parquet, one shard at a time."""
    rng = np.random.default_rng(cfg.seed)
    scan = Scan(kept_sample=ItemSample(cfg.gallery, rng), other_sample=ItemSample(cfg.gallery, rng))
    scan.values = {name: ValueSample(cfg.max_hist_values, rng) for name in SCORES}
    for entry in manifest.get("shards", []):
        shard = int(entry["shard"])
        try:
            _read_stats(storage, scan, shard)
        except _READ_ERRORS as exc:
            _problem(scan, cfg, shard, shard_name(shard, "stats.json"), exc)
        try:
            _read_parquet(storage, scan, cfg, shard, mode)
        except _READ_ERRORS as exc:  # pyarrow's errors are ValueErrors (ArrowInvalid) or OSErrors (ArrowIOError)
            _problem(scan, cfg, shard, shard_name(shard, "parquet"), exc)
    return scan


# ----------------------------------------------------------------------------------------------------
# Gallery images


def _first_frames(members: dict, key: str) -> dict[str, np.ndarray]:
    """Frame 0 of each member a sample has: ``clean``, ``warped`` (uint8), ``mask`` (bool), ``disparity``."""
    out = {}
    for name, member in (("clean", "rgb.mp4"), ("warped", "warped.mp4")):
        if member in members:
            if len(members[member]) > _MAX_MEMBER_BYTES:
                raise media.MediaError(f"sample {key!r}: {member} is over {_MAX_MEMBER_BYTES >> 20} MiB")
            out[name] = media.decode_first_frame_bytes(members[member])
    if "mask.npz" in members:
        with ArrayFile(members["mask.npz"], member="shape") as shape_file:
            shape = tuple(int(v) for v in shape_file.read(1024))
        bits = ArrayFile(members["mask.npz"], member="bits").read_first(_MAX_FRAME_BYTES)
        out["mask"] = np.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool)  # (H, W)
    if "disp.npz" in members:
        out["disparity"] = ArrayFile(members["disp.npz"]).read_first(_MAX_FRAME_BYTES).astype(np.float32)
    if "mask" in out:  # videos may be padded to even sizes: crop to the mask's (H, W), as read_sample does
        h, w = out["mask"].shape
        out.update({k: out[k][:h, :w] for k in ("clean", "warped") if k in out})
    return out


def _view2(clean: np.ndarray, disparity: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """View 2 of frame 0 and its holes: the sample's first warp (GAPW from view 1 with its disparity, in the
    round trip's direction, with the sample's own warp settings)."""
    import torch

    from dreamstereo.stages.warp import warp

    settings = meta.get("warp") or {}
    frames = torch.from_numpy(clean).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W) in [0, 1]
    result = warp(frames, torch.from_numpy(disparity)[None], meta.get("direction", "left"),
                  method=settings.get("method", "gapw"), delta=settings.get("delta", 2.0),
                  hole_margin=settings.get("hole_margin", 0.25), kernel="torch")
    view = (result.view[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()  # (H, W, 3)
    return view, result.mask[0].numpy()


def _gallery_images(members: dict, key: str, folder: Path, stem: str,
                    tile_width: int) -> tuple[list[tuple[str, str]], dict]:
    """Write the sample's tiles as ``folder/<stem>-<tile>.{jpg,png}``, at most ``tile_width`` pixels wide (a 768x1280
    clip would otherwise add megabytes per sample); return their (caption, file name) and frame 0's full-size
    ``disparity`` and ``mask`` (for the distributions)."""
    meta = json.loads(members["json"]) if "json" in members else {}
    frames = _first_frames(members, key)
    tiles = []
    if "clean" in frames:
        tiles.append(("first frame", f"{stem}-frame.jpg", frames["clean"]))
    if "disparity" in frames:
        tiles.append(("disparity", f"{stem}-disparity.png", preview.colourize_disparity(frames["disparity"])))
        if "clean" in frames:
            view, holes = _view2(frames["clean"], frames["disparity"], meta)
            tiles.append(("view 2 with holes", f"{stem}-view2.png", preview.overlay_mask(view, holes)))
    if "mask" in frames:
        base = frames.get("warped", frames.get("clean"))
        if base is not None:
            tiles.append(("round trip, mask", f"{stem}-mask.png", preview.overlay_mask(base, frames["mask"])))
    for _, name, image in tiles:
        media.write_image(folder / name, preview.fit_width(image, tile_width))
    return [(caption, name) for caption, name, _ in tiles], {k: frames[k] for k in ("disparity", "mask") if k in frames}


def _fill_gallery(storage_uri: str, items: list[dict], cfg: ReportConfig, folder: Path, scan: Scan,
                  prefix: str) -> None:
    """Add images (``item["images"]``) to the sampled kept items, opening each tar that holds one once."""
    by_shard = collections.defaultdict(list)
    for n, item in enumerate(items):
        item["stem"] = f"{prefix}-{n:02d}"
        by_shard[item["shard"]].append(item)
    for shard, wanted in sorted(by_shard.items()):
        todo = {item["key"]: item for item in wanted}
        url = f"{storage_uri.rstrip('/')}/{shard_name(shard, 'tar')}"
        try:
            for raw in iter_raw_samples(url, cfg.s3):
                item = todo.pop(raw.get("__key__"), None)
                if item is not None:
                    try:
                        item["images"], item["arrays"] = _gallery_images(sample_members(raw), item["key"], folder,
                                                                       item["stem"], cfg.tile_width)
                    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as exc:  # one bad sample
                        item["error"] = f"cannot draw: {type(exc).__name__}: {exc}"
                if not todo:
                    break
        except _READ_ERRORS as exc:
            _problem(scan, cfg, shard, shard_name(shard, "tar"), exc)
            for item in todo.values():
                item["error"] = f"its shard's tar is unreadable: {type(exc).__name__}: {exc}"
            continue
        for item in todo.values():
            item["error"] = "not found in its shard's tar"


def _fill_previews(storage, storage_uri: str, items: list[dict], cfg: ReportConfig, folder: Path, scan: Scan,
                   prefix: str) -> None:
    """Add the contact sheet ``generate`` kept of each sampled rejected clip (``previews/<shard>.tar``, absent for
    outputs of earlier versions or ``rejected_previews=false``); each sheet is decoded and written anew, so a
    damaged one is a note on its card and never a broken image on the page."""
    by_shard = collections.defaultdict(list)
    for n, item in enumerate(items):
        item["stem"] = f"{prefix}-{n:02d}"
        if item["status"] == SampleStatus.REJECTED.value:
            by_shard[item["shard"]].append(item)
    for shard, wanted in sorted(by_shard.items()):
        todo = {item["key"]: item for item in wanted}
        name = preview_name(shard)
        try:
            if not storage.exists(name):
                continue
            for raw in iter_raw_samples(f"{storage_uri.rstrip('/')}/{name}", cfg.s3):
                item = todo.pop(raw.get("__key__"), None)
                data = sample_members(raw).get(PREVIEW_MEMBER) if item is not None else None
                if data is not None:
                    image = preview.decode_image(data) if len(data) <= _MAX_PREVIEW_BYTES else None
                    if image is None:
                        item["error"] = "its preview does not decode"
                    else:
                        media.write_image(folder / f"{item['stem']}-preview.jpg",
                                          preview.fit_width(image, cfg.tile_width))
                        item["images"] = [("first frame, as far as it got", f"{item['stem']}-preview.jpg")]
                if not todo:
                    break
        except _READ_ERRORS as exc:
            _problem(scan, cfg, shard, name, exc)


# ----------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display, no global pyplot state)


def _figure(width: float = 4.6, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with media.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def thresholds(quality: QualityConfig) -> dict[str, list[tuple[float, str]]]:
    """Score -> the thresholds the filter applies to it (value, label), from :func:`stages.quality.decide`."""
    lo, hi = quality.mask_ratio
    return {
        "frames": [(quality.min_frames, f"min_frames {quality.min_frames}")],
        "short_side": [(quality.min_short_side, f"min_short_side {quality.min_short_side}")],
        "mask_ratio": [(lo, f"mask_ratio low {lo:g}"), (hi, f"mask_ratio high {hi:g}")],
        "disparity_range": [(quality.min_disparity_range, f"min_disparity_range {quality.min_disparity_range:g}")],
        "max_cut_score": [(quality.scene_cut, f"scene_cut {quality.scene_cut:g}")],
        "motion": [(quality.min_motion, f"min_motion {quality.min_motion:g}")],
        "contrast": [(quality.min_contrast, f"min_contrast {quality.min_contrast:g}")],
    }


def crossed(scores: dict, quality: QualityConfig) -> list[str]:
    """Every threshold the scores fall on the wrong side of (the filter reports the first: ``decide``)."""
    lo, hi = quality.mask_ratio
    rules = [("frames", "<", quality.min_frames, "min_frames"), ("short_side", "<", quality.min_short_side,
             "min_short_side"), ("disparity_range", "<", quality.min_disparity_range, "min_disparity_range"),
             ("contrast", "<", quality.min_contrast, "min_contrast"), ("motion", "<", quality.min_motion, "min_motion"),
             ("max_cut_score", ">", quality.scene_cut, "scene_cut"), ("mask_ratio", "<", lo, "mask_ratio low"),
             ("mask_ratio", ">", hi, "mask_ratio high")]
    out = []
    if scores.get("disparity_finite") == 0.0:
        out.append("disparity not finite")
    for name, op, limit, label in rules:
        value = scores.get(name)
        if value is None or (name == "motion" and scores.get("frames", 2) <= 1):
            continue
        if (value < limit) if op == "<" else (value > limit):
            out.append(f"{name} {value:.4g} {op} {label} {limit:g}")
    return out


def _histogram(name: str, sample: ValueSample, marks: list[tuple[float, str]], path: Path) -> None:
    values, kept = sample.arrays()
    fig = _figure()
    ax = fig.add_subplot()
    lo = min([float(values.min())] + [m for m, _ in marks])
    hi = max([float(values.max())] + [m for m, _ in marks])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.04 * (hi - lo)  # thresholds at the ends of the range stay inside the frame
    ax.set_xlim(lo - pad, hi + pad)
    ax.hist([values[kept], values[~kept]], bins=40, range=(lo, hi), stacked=True, color=["#2b8a3e", "#c92a2a"],
            label=["kept", "rejected"])
    for value, label in marks:
        ax.axvline(value, color="#1c7ed6", linestyle="--", linewidth=1.2)
        right_half = value > (lo + hi) / 2  # the label goes on the side of the line that has room
        ax.annotate(label, xy=(value, 0.98), xycoords=("data", "axes fraction"), xytext=(-2 if right_half else 2, 0),
                    textcoords="offset points", rotation=90, fontsize=7, ha="right" if right_half else "left",
                    va="top", color="#1c7ed6")
    ax.set_xlabel(name)
    ax.set_ylabel("clips")
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def _bar_finite(finite: collections.Counter, path: Path) -> None:
    fig = _figure(3.2, 3.0)
    ax = fig.add_subplot()
    labels = ["finite", "not finite"]
    kept = [finite[(True, True)], finite[(False, True)]]
    other = [finite[(True, False)], finite[(False, False)]]
    ax.bar(labels, kept, color="#2b8a3e", label="kept")
    ax.bar(labels, other, bottom=kept, color="#c92a2a", label="rejected")
    ax.set_ylabel("clips")
    ax.set_title("disparity_finite", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def _distributions(samples: list[dict], path: Path) -> tuple[int, int]:
    """Disparity (px, every pixel of frame 0) and hole ratio (frame 0's round-trip mask) of the drawn kept
    samples; returns (samples, pixels) plotted."""
    disparities = [s["disparity"].ravel() for s in samples if "disparity" in s]
    holes = [float(s["mask"].mean()) for s in samples if "mask" in s]
    fig = _figure(8.0, 3.0)
    left, right = fig.subplots(1, 2)
    if disparities:
        left.hist(np.concatenate(disparities), bins=60, color="#5f3dc4")
    left.set_xlabel("disparity of frame 0 (px)")
    left.set_ylabel("pixels")
    if holes:
        right.hist(holes, bins=min(20, max(len(holes), 1)), color="#e8590c")
    right.set_xlabel("hole ratio of frame 0 (round-trip mask)")
    right.set_ylabel("samples")
    _save(fig, path)
    return len(disparities), int(sum(len(d) for d in disparities))


# ----------------------------------------------------------------------------------------------------
# The page


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#212529;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #dee2e6}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #dee2e6;padding:.2em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.warn{color:#c92a2a;font-weight:600}
.note{color:#495057;font-size:.9em}.plots{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0}figcaption{font-size:.8em;color:#495057;max-width:460px}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #ced4da;border-radius:4px;padding:.5em;
max-width:560px;font-size:.85em;overflow-wrap:anywhere}.card img{width:128px;image-rendering:pixelated}
.card img[src$="-preview.jpg"]{width:300px;image-rendering:auto}
.tiles{display:flex;gap:.3em;flex-wrap:wrap}.tiles figcaption{max-width:128px}code{font-size:.9em}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _count_cell(name: str, origin: str, value) -> str:
    return f'<td class="n" data-count="{_e(name)}" data-of="{_e(origin)}">{_e(value)}</td>'


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _summary_section(dst: str, summary: dict, scan: Scan, mode: str, quality_from: str) -> str:
    parts = [(f"<p>Output <code>{_e(dst)}</code>, mode <code>{_e(mode)}</code>, config hash "
              f"<code id=\"config-hash\">{_e(summary.get('config_hash', ''))}</code>, package "
              f"{_e(summary.get('version', '?'))}, parquet schema version "
              f"{_e(summary.get('parquet_schema_version', 1))}; wall time of the run "
              f"{_e(summary.get('wall_seconds', '?'))} s. Quality thresholds: {_e(quality_from)}.</p>")]
    if summary.get("smoke_test"):
        parts.append(f'<p class="warn" id="smoke-test">SMOKE TEST: {_e(summary["smoke_test"])}</p>')
    shards = f"{summary.get('committed_shards', '?')} of {summary.get('shards', '?')}"
    rows = [f"<tr><td>inputs</td>{_count_cell('inputs', 'manifest', summary.get('inputs', ''))}<td></td></tr>",
            (f"<tr><td>shards committed</td>{_count_cell('committed_shards', 'manifest', shards)}"
             f"{_count_cell('shards_read', 'parquet', scan.shards_read)}</tr>")]
    names = [("clips", "clips"), ("kept (samples)", "ok"), ("rejected", "rejected"), ("failed", "failed")]
    keys = {"clips": "clips", "ok": "samples", "rejected": "rejected", "failed": "failed"}
    for label, name in names:
        rows.append(f"<tr><td>{_e(label)}</td>{_count_cell(name, 'manifest', summary.get(keys[name], ''))}"
                    f"{_count_cell(name, 'parquet', scan.counts.get(name, 0))}</tr>")
    parts.append(_table(["", "manifest.json", "read from the shards' parquet"], rows))
    if scan.legacy_shards:
        parts.append(f"<p class=\"note\">{scan.legacy_shards} shard(s) have parquet schema version 1 (no typed "
                     "quality columns): their scores were read from the JSON <code>scores</code> column.</p>")
    mismatch = [label for label, name in names if summary.get(keys[name]) != scan.counts.get(name, 0)]
    if mismatch:
        parts.append(f'<p class="warn" id="count-mismatch">The parquet files read do not give the manifest\'s '
                     f"counts ({_e(', '.join(mismatch))}): see the unreadable shards below.</p>")
    if summary.get("failed_shards"):
        parts.append(f'<p class="warn">Shards that did not commit (a rerun of generate retries them): '
                     f"{_e(', '.join(str(s) for s in summary['failed_shards']))}</p>")
    reasons = sorted(set(summary.get("reasons", {})) | set(scan.reasons))
    rows = [f"<tr><td>{_e(r.partition(':')[0])}</td><td>{_e(r.partition(':')[2])}</td>"
            f'<td class="n" data-reason="{_e(r)}" data-of="manifest">{_e(summary.get("reasons", {}).get(r, 0))}</td>'
            f'<td class="n" data-reason="{_e(r)}" data-of="parquet">{_e(scan.reasons.get(r, 0))}</td></tr>'
            for r in reasons]
    parts.append("<h3>Rejected and failed clips by reason</h3>")
    parts.append(_table(["status", "reason", "manifest.json", "parquet"], rows) if rows else "<p>None.</p>")
    return "".join(parts)


def _throughput_section(scan: Scan) -> str:
    clips = scan.stats_clips
    rows = []
    for stage, seconds in sorted(scan.stage_seconds.items()):
        rate = f"{clips / seconds:.2f}" if seconds > 0 else "-"
        devices = ", ".join(f"{d}: {n}" for d, n in sorted(scan.stage_clips.get(stage, {}).items()))
        rows.append(f"<tr><td>{_e(stage)}</td><td class=\"n\">{seconds:.2f}</td>"
                    f"<td class=\"n\" data-rate=\"{_e(stage)}\">{_e(rate)}</td><td>{_e(devices)}</td></tr>")
    note = (f"<p class=\"note\">From the stats files of {clips} clips: worker-seconds spent in each stage summed over "
            "the shards, and clips per second one worker sustains in it (all clips over those seconds, as "
            "<code>manifest.json</code> computes <code>stage_clips_per_s</code>); devices: clips per device that "
            "ran the stage.</p>")
    return note + (_table(["stage", "worker-seconds", "clips/s per worker", "clips per device"], rows)
                   if rows else "<p>No stage timings recorded.</p>")


def _problems_section(scan: Scan) -> str:
    if not scan.problem_count:
        return ('<p id="unreadable" data-unreadable="0">Every parquet and stats file, and every tar the gallery '
                "opened, was read.</p>")
    rows = [f"<tr><td class=\"n\">{p.shard:06d}</td><td data-unreadable-file=\"{_e(p.file)}\">{_e(p.file)}</td>"
            f"<td>{_e(p.reason)}</td></tr>" for p in scan.problems]
    more = scan.problem_count - len(scan.problems)
    extra = f"<p>... and {more} more (see the log).</p>" if more > 0 else ""
    return (f'<p class="warn" id="unreadable" data-unreadable="{scan.problem_count}">{scan.problem_count} shard '
            "file(s) could not be read; their clips are missing from the figures read from the parquet (the "
            "manifest's counts include them).</p>" + _table(["shard", "file", "why"], rows) + extra)


def _plots_section(scan: Scan, quality: QualityConfig, folder: Path, mode: str, seed: int) -> str:
    marks = thresholds(quality)
    figures = []
    for name in SCORES:
        if name == "disparity_finite" or name not in scan.values:
            continue
        sample = scan.values[name]
        if mode == "raw" and name in MASK_SCORES | DEPTH_SCORES:
            continue
        shown = sample.reservoir.filled
        if not shown:
            figures.append(f"<figure><figcaption>{_e(name)}: no values.</figcaption></figure>")
            continue
        file = f"hist-{name}.png"
        _histogram(name, sample, marks.get(name, []), folder / _IMG / file)
        how = ("all of them" if shown == sample.seen else f"a seeded uniform sample (seed {seed}) of {sample.seen}")
        where = (" (kept clips and those rejected for their mask ratio; other rejections come before it is "
                 "measured)" if name in MASK_SCORES else " (scored clips; failed clips have no scores)")
        figures.append(f'<figure><img src="{_IMG}/{file}" alt="histogram of {_e(name)}" width="460">'
                       f'<figcaption data-hist="{_e(name)}" data-shown="{shown}" data-of="{sample.seen}">{_e(name)}: '
                       f"{shown} values shown, {how}{_e(where)}. Dashed lines: the thresholds.</figcaption></figure>")
    if mode != "raw" and sum(scan.finite.values()):
        _bar_finite(scan.finite, folder / _IMG / "hist-disparity_finite.png")
        figures.append(f'<figure><img src="{_IMG}/hist-disparity_finite.png" alt="disparity_finite" width="320">'
                       f"<figcaption>disparity_finite: all {sum(scan.finite.values())} scored clips.</figcaption>"
                       "</figure>")
    return f'<div class="plots">{"".join(figures)}</div>'


def _sources_section(scan: Scan) -> str:
    top = sorted(scan.sources, reverse=True)
    rows = [f"<tr><td>{_e(source)}</td><td class=\"n\">{e[0]}</td><td class=\"n\">{e[1]}</td>"
            f"<td class=\"n\">{e[2]}</td><td class=\"n\">{e[3]}</td></tr>" for _, _, source, e in top]
    exact = len(top) == scan.source_entries
    note = (f"All {scan.source_entries} sources." if exact else
            f"The {len(top)} sources with the most clips (ties: the most not kept) of {scan.source_entries}.")
    return (f'<p class="note" data-sources-shown="{len(top)}" data-sources="{scan.source_entries}">{_e(note)} '
            "Counts from the parquet files read; a source is counted per shard that holds it (generate puts each "
            "input in one shard).</p>" + _table(["source", "clips", "kept", "rejected", "failed"], rows))


def _card(item: dict, quality: QualityConfig) -> str:
    parts = [f"<div class=\"card\" data-key=\"{_e(item['key'])}\" data-status=\"{_e(item['status'])}\">",
             f"<div><b>{_e(item['key'])}</b> ({_e(item['status'])}"
             + (f": {_e(item.get('reason'))}" if item.get("reason") else "") + ")</div>",
             f"<div>source <code>{_e(item.get('source'))}</code>, shard {item['shard']:06d} row {item['row']}</div>"]
    if item.get("message"):  # (cut: a message from the data may be any length; the parquet holds it whole)
        message = item["message"] if len(item["message"]) <= 2000 else item["message"][:2000] + " [...]"
        parts.append(f"<div>message: <code>{_e(message)}</code></div>")
    if item.get("images"):
        tiles = "".join(f'<figure><a href="{_IMG}/{_e(name)}"><img src="{_IMG}/{_e(name)}" alt="{_e(caption)}"></a>'
                        f"<figcaption>{_e(caption)}</figcaption></figure>" for caption, name in item["images"])
        parts.append(f'<div class="tiles">{tiles}</div>')
    if item.get("error"):
        parts.append(f'<div class="warn">{_e(item["error"])}</div>')
    scores = item.get("scores") or {}
    if scores:
        parts.append("<div class=\"note\">" + _e(", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))
                     + "</div>")
        if item["status"] != SampleStatus.OK.value:
            beyond = crossed(scores, quality)
            if beyond:
                parts.append(f'<div>beyond the thresholds: {_e("; ".join(beyond))}</div>')
    parts.append("</div>")
    return "".join(parts)


def _gallery_section(kept: list[dict], other: list[dict], scan: Scan, quality: QualityConfig, seed: int,
                     mode: str) -> str:
    n_kept = scan.kept_sample.reservoir.seen
    n_other = scan.other_sample.reservoir.seen
    tiles = ("the clean frame (raw mode: no depth, no pair)" if mode == "raw" else "the clean frame, its "
             "disparity, view 2 with its holes (magenta), and the round trip with the training mask (magenta)")
    return (f'<h3>Kept</h3><p class="note" data-gallery="kept" data-shown="{len(kept)}" data-of="{n_kept}">'
            f"{len(kept)} of {n_kept} kept samples, a seeded uniform sample (seed {seed}); frame 0 of each: {tiles}."
            f'</p><div class="cards">{"".join(_card(i, quality) for i in kept)}</div>'
            f'<h3>Rejected or failed</h3><p class="note" data-gallery="other" data-shown="{len(other)}" '
            f'data-of="{n_other}">{len(other)} of {n_other} rejected or failed clips, a seeded uniform sample '
            f"(seed {seed}). They have no sample in the tar: a rejected clip shows the contact sheet of its first "
            "frame that <code>generate</code> keeps in <code>previews/&lt;shard&gt;.tar</code>, as far as the clip "
            "got (the frame, its disparity, the round trip, the mask); every card gives the reason, the message and "
            "the scores, with the thresholds they fall beyond.</p>"
            f'<div class="cards">{"".join(_card(i, quality) for i in other)}</div>')


# ----------------------------------------------------------------------------------------------------
# Entry point


def _run_settings(storage) -> tuple[str, QualityConfig, str]:
    """Mode and quality thresholds of the run (``_run_config.yaml``), or the defaults, and where they came from."""
    import yaml

    try:
        settings = yaml.safe_load(storage.read_bytes("_run_config.yaml")) or {}
        quality = dict((settings.get("process") or {}).get("quality") or {})
        known = {f.name for f in dataclasses.fields(QualityConfig)}
        return (str(settings.get("mode", "pairs")), QualityConfig(**{k: v for k, v in quality.items() if k in known}),
                "the run's, from _run_config.yaml")
    except (StorageError, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        logger.warning("no usable _run_config.yaml (%s): the default quality thresholds are drawn", exc)
        return "pairs", QualityConfig(), "the defaults (no usable _run_config.yaml)"


def open_output(dst: str, s3: S3Config):
    """The storage and manifest of a ``generate`` output.

    Raises:
        ReportError: ``dst`` is missing, or holds no readable ``manifest.json``.
    """
    if "://" not in dst and not Path(dst).is_dir():
        raise ReportError(f"{dst!r} is not a folder: give a `dreamstereo generate` output (local or s3://)")
    storage = open_storage(dst, s3)
    if not storage.exists("manifest.json"):  # (an unreachable endpoint or a denied read: its own StorageError)
        raise ReportError(f"{dst!r} has no manifest.json: it is not a `dreamstereo generate` output")
    try:
        manifest = json.loads(storage.read_bytes("manifest.json"))
    except ValueError as exc:
        raise ReportError(f"{dst!r}: manifest.json is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("summary"), dict):
        raise ReportError(f"{dst!r}: manifest.json has no run summary: not a `dreamstereo generate` output")
    shards = manifest.get("shards", [])
    if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("shard"), int) and not isinstance(e["shard"], bool)
            and 0 <= e["shard"] < 10**6 for e in shards):
        raise ReportError(f"{dst!r}: manifest.json's \"shards\" is not a list of {{\"shard\": 0..999999, ...}} "
                          f"entries: not a `dreamstereo generate` manifest (damaged?)")
    if not isinstance(manifest["summary"].get("reasons", {}), dict):
        raise ReportError(f"{dst!r}: manifest.json's summary \"reasons\" is not an object of counts (damaged?)")
    return storage, manifest


def build_report(dst: str, out: str | Path, cfg: ReportConfig) -> Path:
    """Write the report of the ``generate`` output ``dst`` into the folder ``out``; return ``out/index.html``."""
    storage, manifest = open_output(dst, cfg.s3)
    summary = manifest["summary"]
    mode, quality, quality_from = _run_settings(storage)
    scan = scan_output(storage, manifest, cfg, mode)
    kept = sorted(scan.kept_sample.taken(), key=lambda i: (i["shard"], i["row"]))
    other = sorted(scan.other_sample.taken(), key=lambda i: (i["shard"], i["row"]))
    out = Path(out)
    with media.staged_folder(out, last=("index.html",)) as stage:
        (stage / _IMG).mkdir()
        _fill_gallery(dst, kept, cfg, stage / _IMG, scan, "kept")
        _fill_previews(storage, dst, other, cfg, stage / _IMG, scan, "other")
        sections = [
            ("Run summary", _summary_section(dst, summary, scan, mode, quality_from)),
            ("Throughput per stage", _throughput_section(scan)),
            ("Unreadable shard files", _problems_section(scan)),
            ("Quality scores", _plots_section(scan, quality, stage, mode, cfg.seed)),
        ]
        if mode != "raw":
            sections.append(("Disparity and holes", _distribution_section(kept, stage)))
        sections += [("Per source", _sources_section(scan)),
                     ("Gallery", _gallery_section(kept, other, scan, quality, cfg.seed, mode))]
        body = "".join(f"<h2>{_e(title)}</h2>{content}" for title, content in sections)
        now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>DreamStereo report: {_e(dst)}</title><link rel=\"icon\" href=\"data:,\">"
                f"<style>{_CSS}</style></head><body><h1>DreamStereo report: <code>{_e(dst)}</code></h1>"
                f"<p class=\"note\">Written {now} by dreamstereo {_e(__version__)} (<code>dreamstereo report</code>)."
                f"</p>{body}</body></html>\n")
        media.write_text(stage / "index.html", page)
    return out / "index.html"


def _distribution_section(kept: list[dict], folder: Path) -> str:
    arrays = [item["arrays"] for item in kept if item.get("arrays")]
    if not arrays:
        return "<p>No kept sample was drawn: nothing to show.</p>"
    count, pixels = _distributions(arrays, folder / _IMG / "distributions.png")
    return (f'<figure><img src="{_IMG}/distributions.png" alt="disparity and hole ratio" width="800">'
            f"<figcaption>Frame 0 of the {count} kept samples of the gallery ({pixels} disparity pixels); the hole "
            "ratio of every scored clip is the mask_ratio histogram above.</figcaption></figure>")
