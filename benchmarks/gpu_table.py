"""The GPU figures of one ``benchmarks/gpu_suite.sh`` run as one markdown table, and one JSON beside them.

Reads the result files the suite's scripts wrote in this run (``bench_warp.py``, ``bench_stages.py``,
``bench_sasi.py``, ``bench_train.py``; each names its kind in its file name, ``<date>_<device>_<kind>.json``),
picks the figures each one took on an accelerator (rows of a CPU run are listed too, with their device,
so the table of a CPU run at toy sizes shows what it measured), prints the table and writes
``<date>_<gpu>_gpu-suite.json`` under ``benchmarks/results/`` with the rows, the seconds each script took
and the files they come from.

    python benchmarks/gpu_table.py RESULT.json ... [--seconds warp=41.2 --seconds sasi=180.0] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

KINDS = ("warp", "stages", "sasi", "train")


def kind_of(path: Path) -> str:
    """``warp``, ``stages``, ``sasi`` or ``train``, from a result file's name.

    Raises:
        ValueError: a file name that names none of them.
    """
    found = re.search(r"_(" + "|".join(KINDS) + r")\.json$", path.name)
    if not found:
        raise ValueError(f"{path}: not a result of bench_warp/bench_stages/bench_sasi/bench_train "
                         f"(expected a name ending in _warp.json, _stages.json, _sasi.json or _train.json)")
    return found.group(1)


def _row(figure: str, setting: str, value: str, device: str) -> dict:
    return {"figure": figure, "setting": setting, "value": value, "device": device}


def rows_of(kind: str, payload: dict) -> list[dict]:
    """The table rows of one result file (every figure it holds that the suite reports)."""
    gpu = payload.get("machine", {}).get("gpu")
    rows = []
    if kind == "warp":
        shape = "x".join(str(n) for n in payload.get("shape", [])[-2:])
        for r in payload.get("rows", []):
            device = gpu if r["device"] == "cuda" and gpu else r["device"]
            where = f"{r['threads']} thread(s)" if r.get("threads") else "GPU"
            ratios = ", ".join(f"{v:.2f}x {k.replace('speedup_', '').replace('_', ' ')}" for k, v in r.items()
                               if k.startswith(("speedup_vs_", "ratio_vs_")))
            rows.append(_row(f"PBDP double projection, {r['method']}", f"{shape}, {where}",
                             f"{r['ms_per_frame_median']:.2f} ms/frame" + (f" ({ratios})" if ratios else ""), device))
    elif kind == "stages":
        size = f"{payload.get('height')}x{payload.get('width')}, {payload.get('frames')} frames"
        for name, r in payload.get("model_depth", {}).items():
            device = gpu if r["device"].startswith("cuda") and gpu else r["device"]
            rows.append(_row(f"depth: {name}", size, f"{r['ms_per_frame']:.1f} ms/frame "
                             f"({r['frames_per_s']:.1f} frames/s)", device))
    elif kind == "sasi":
        device = gpu if payload.get("device") == "cuda" and gpu else payload.get("device", "cpu")
        frames, height, width = payload["pixels"]
        setting = f"{payload['layers']} blocks, {payload['dtype']}, {frames}x{height}x{width}"
        rows.append(_row("SASI DiT forward, dense", setting, f"{payload['dense_ms']:.1f} ms "
                         f"({payload['dense_ms'] / frames:.2f} ms/frame)", device))
        rows.append(_row(f"SASI DiT forward, sparse at {payload['retention']:.1%} kept", setting,
                         f"{payload['sparse_ms']:.1f} ms ({payload['speedup']:.2f}x dense)", device))
        vae = payload.get("vae")
        if vae:
            rows.append(_row("SASI end to end (VAE encode + sparse DiT + VAE decode)", setting,
                             f"{vae['end_to_end_ms_per_frame']:.2f} ms/frame (dense: "
                             f"{vae['end_to_end_dense_ms_per_frame']:.2f})", device))
    elif kind == "train":
        g = payload.get("gpu")
        if g:
            rows.append(_row("training step, Wan2.1-1.3B LoRA", g["setting"],
                             f"{g['s_per_step']:.2f} s/step, peak {g['peak_memory_gb']:.1f} GB", gpu or "cuda"))
        for name, r in payload.get("cpu", {}).get("rows", {}).items():
            rows.append(_row(f"training step, toy Wan ({name})", payload["cpu"]["setting"],
                             f"{r['steps_per_s']:.2f} steps/s", "cpu"))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| figure | setting | value | device |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['figure']} | {r['setting']} | {r['value']} | {r['device']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="result JSON files of this run")
    parser.add_argument("--seconds", action="append", default=[], metavar="SCRIPT=S",
                        help="wall seconds a script took (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rows, machine, sources = [], {}, []
    for path in args.files:
        try:
            kind, payload = kind_of(path), json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        rows += rows_of(kind, payload)
        machine = machine or payload.get("machine", {})
        sources.append(path.name)
    seconds = {}
    for item in args.seconds:
        name, _, value = item.partition("=")
        try:
            seconds[name] = float(value)
        except ValueError:
            parser.error(f"--seconds {item!r}: expected SCRIPT=SECONDS")
    print(f"GPU figures on {machine.get('gpu', 'no GPU')} ({machine.get('cpu')}, {machine.get('cpu_count')} CPUs, "
          f"torch {machine.get('torch')})" + (f"; {sum(seconds.values()):.0f} s in all" if seconds else ""))
    print()
    print(markdown(rows))
    if not args.no_write:
        path = write_result("gpu-suite", {"machine": machine, "rows": rows, "seconds": seconds,
                                          "total_seconds": sum(seconds.values()), "sources": sources})
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
