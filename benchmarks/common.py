"""Helpers shared by the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

# Where result files go; DREAMSTEREO_BENCH_RESULTS points them elsewhere (the tests run the scripts at toy sizes).
RESULTS = Path(os.environ.get("DREAMSTEREO_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    """CPU model and cores, torch version, and the GPU name when CUDA is available."""
    cpu = platform.processor() or "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def time_ms(fn, *, repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; min / median milliseconds per call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"min_ms": min(times), "median_ms": statistics.median(times)}


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/results/<date>_<device>_<name>.json`` and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = payload.get("machine", {}).get("gpu") or "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = RESULTS / f"{_dt.date.today().isoformat()}_{slug}_{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
