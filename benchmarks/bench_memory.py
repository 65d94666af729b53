"""Peak memory (RSS) of ``dreamstereo process`` on one real 720p clip at the 768x1280 bucket (issue 12, item 5).

Each run is a fresh process (so runs share no heap): the whole ``dreamstereo process`` command (peak RSS of
the command's own process, from ``wait4``; the decode child that ``pipeline/isolate.py`` forks is reported
separately), and a staged run of the same chain in which a sampler thread reads ``VmRSS`` every 2 ms and
keeps the peak of each stage, and a PairActor (called directly, as Ray calls it) on the decode operator's
row in a process of its own ("pair actor": its peak while it pairs, with its input row in memory). Depth is the oracle backend, reading a small synthetic disparity sidecar
(289 x 90 x 160 float32, 17 MB), so the figures are the chain's own memory, not a depth model's.

    python benchmarks/bench_memory.py [--frames 49 81] [--video ../shared/data/videos/01_dog.mp4]

Writes ``benchmarks/results/<date>_cpu_memory.json`` (unless ``--no-write``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = ROOT.parent / "shared" / "data" / "videos" / "01_dog.mp4"
BUCKET = (768, 1280)
SIDECAR_SHAPE = (90, 160)
MB = 2**20


def _overrides(frames: int) -> list[str]:
    return [f"decode.clip_frames={frames}", "decode.max_clips=1", f"decode.buckets=[[{BUCKET[0]},{BUCKET[1]}]]"]


def prepare(video: Path, folder: Path) -> Path:
    """Copy the video into ``folder`` with an oracle sidecar: a near-to-far ramp with a moving disk."""
    from dreamstereo.io.media import probe_video

    target = folder / video.name
    shutil.copyfile(video, target)
    frames = probe_video(target).frames
    h, w = SIDECAR_SHAPE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    maps = np.empty((frames, h, w), np.float32)
    for k in range(frames):
        cx = w * (0.2 + 0.6 * k / max(frames - 1, 1))
        disk = ((xx - cx) ** 2 + (yy - h / 2) ** 2) < (h / 4) ** 2
        maps[k] = 0.2 + 0.5 * yy / h + 0.3 * disk
    np.savez_compressed(folder / f"{target.stem}.disparity.npz", disparity=maps)
    return target


def run_command(video: Path, out: Path, frames: int) -> dict:
    """``dreamstereo process`` in a fresh process: its peak RSS and the decode child's, and wall seconds."""
    code = "import sys; from dreamstereo.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "process", str(video), "--out", str(out), "--depth", "oracle",
            *_overrides(frames)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's own usage; its forked decode child is counted through a staged run instead
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"process failed ({proc.returncode}): {stderr[-2000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start, "output": stdout.strip()}


def run_stages(video: Path, out: Path, frames: int, mode: str = "chain") -> dict:
    """A staged run (``mode``: ``chain`` as ``process`` runs it, or ``actor``: the decode operator's row
    through a PairActor, called directly as Ray calls it), in a fresh process (this script with ``--child``)."""
    argv = [sys.executable, __file__, "--child", str(video), str(out), str(frames), mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"staged run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class StagePeaks:
    """A thread that samples this process's RSS and keeps the peak per named stage."""

    def __init__(self, interval_s: float = 0.002):
        self.stage, self.peaks, self._stop = "start", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(interval_s)

    def _record(self) -> None:
        rss = _rss_mb()
        self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), rss)

    def enter(self, stage: str) -> None:
        self._record()
        self.stage = stage
        self._record()

    def stop(self) -> dict:
        self._record()
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peaks.items()}


def actor_child(video: str, frames: int) -> None:
    """The decode operator's row for the clip, then a PairActor on it, under a sampler; prints JSON."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from dreamstereo.config import load_config
    from dreamstereo.pipeline.actors import INPUT_COLUMNS, PairActor, decode_batch
    from dreamstereo.pipeline.clip import ClipConfig

    cfg = load_config(ClipConfig, [], ["depth.backend=oracle", *_overrides(frames)])
    row = {"shard": 0, "input_index": 0, "uri": video, "problem": ""}
    decoded = decode_batch({k: np.array([row[k]], dtype=object) for k in INPUT_COLUMNS}, cfg=cfg)
    actor = PairActor(cfg)
    peaks = StagePeaks()
    peaks.enter("pair actor (holding its input row)")
    paired = actor(decoded)
    stages = peaks.stop()
    stages.pop("start", None)
    print(json.dumps({"stages_peak_rss_mb": stages, "sample_bytes": len(paired["members"][0])}))


def child(video: str, out: str, frames: int) -> None:
    """The chain of ``process``, stage by stage, under a :class:`StagePeaks` sampler; prints JSON."""
    import resource

    import torch

    torch.set_num_threads(1)
    peaks = StagePeaks()
    from dreamstereo.config import load_config
    from dreamstereo.io.sample import write_sample_files
    from dreamstereo.pipeline.clip import oracle_relatives, pair_clip, read_input
    from dreamstereo.pipeline.process import ProcessConfig

    cfg = load_config(ProcessConfig, [], ["depth.backend=oracle", *_overrides(frames)])
    source = str(Path(video).resolve())
    peaks.enter("decode (parent; the child separately)")
    probe, clips = read_input(video, None, cfg.decode)
    decode_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peaks.enter("depth (oracle sidecar)")
    (relative,) = oracle_relatives(video, None, probe, clips, cfg.depth)
    peaks.enter("pair_clip (disparity, PBDP, quality, encode)")
    result = pair_clip(clips[0], 0, source, probe, relative, cfg, None)
    peaks.enter("write members")
    Path(out).mkdir(parents=True, exist_ok=True)
    write_sample_files(out, result.key, result.members or {})
    stages = peaks.stop()
    stages["decode child"] = round(decode_child, 1)
    print(json.dumps({"stages_peak_rss_mb": stages, "status": result.status.label, "reason": result.reason,
                      "sample_bytes": sum(len(v) for v in (result.members or {}).values())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[49, 81])
    parser.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    parser.add_argument("--label", default="", help="a note stored with the result (e.g. before/after)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[3] == "actor":
            actor_child(args.child[0], int(args.child[2]))
        else:
            child(args.child[0], args.child[1], int(args.child[2]))
        return
    if not args.video.is_file():
        raise SystemExit(f"--video {str(args.video)!r}: no such file (the shared real videos are absent)")
    info = machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        video = prepare(args.video, Path(tmp))
        for frames in args.frames:
            whole = run_command(video, Path(tmp) / f"out-{frames}", frames)
            staged = run_stages(video, Path(tmp) / f"staged-{frames}", frames)
            actor = run_stages(video, Path(tmp) / f"actor-{frames}", frames, "actor")
            staged["stages_peak_rss_mb"].update(actor["stages_peak_rss_mb"])
            runs.append({"frames": frames, "process": whole, **staged})
    print(f"machine: {info['cpu']} ({info['cpu_count']} cores); video {args.video.name} -> "
          f"{BUCKET[0]}x{BUCKET[1]}, one clip, oracle depth")
    stage_names = list(runs[0]["stages_peak_rss_mb"])
    print("| frames | `process` peak RSS (MB) | " + " | ".join(stage_names) + " |")
    print("|---" * (2 + len(stage_names)) + "|")
    for run in runs:
        cells = [f"{run['stages_peak_rss_mb'].get(s, float('nan')):.0f}" for s in stage_names]
        print(f"| {run['frames']} | {run['process']['peak_rss_mb']:.0f} | " + " | ".join(cells) + " |")
    if len(runs) >= 2:
        grow = runs[-1]["process"]["peak_rss_mb"] - runs[0]["process"]["peak_rss_mb"]
        print(f"growth {runs[0]['frames']} -> {runs[-1]['frames']} frames: {grow:.0f} MB "
              f"({grow * MB / ((runs[-1]['frames'] - runs[0]['frames']) * BUCKET[0] * BUCKET[1]):.1f} bytes "
              f"per clip pixel)")
    if not args.no_write:
        path = write_result("memory", {"machine": info, "label": args.label, "video": args.video.name,
                                       "bucket": list(BUCKET), "sidecar_shape": list(SIDECAR_SHAPE), "runs": runs})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
