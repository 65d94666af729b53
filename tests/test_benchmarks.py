"""benchmarks/gpu_suite.sh and its table (benchmarks/gpu_table.py), as far as a machine without a GPU can
check them: the suite refuses to start without CUDA, and the table lists what the benchmark scripts wrote
(run here for real at toy sizes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env(results: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "DREAMSTEREO_BENCH_RESULTS": str(results),
            "DREAMSTEREO_SHARED_DATA": str(results / "no-shared-data")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_the_gpu_suite_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], env={**_env(tmp_path),
                          "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("gpu_suite.sh: no CUDA GPU is visible to PyTorch (")
    assert "Nothing was run." in done.stderr and done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no result file


def _bench(script: str, *args: str, results: Path) -> Path:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=_env(results),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    wrote = [line[len("wrote "):] for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and Path(wrote[0]).parent == results
    return Path(wrote[0])


@pytest.mark.slow
def test_the_table_lists_every_figure_the_scripts_wrote(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    files = [_bench("bench_warp.py", "--height", "32", "--width", "48", "--frames", "2", "--repeats", "1",
                    results=tmp_path),
             _bench("bench_sasi.py", "--preset", "tiny", "--device", "cpu", "--threads", "1", "--no-e2e",
                    results=tmp_path),
             _bench("bench_train.py", "--steps", "1", "--warmup", "0", results=tmp_path)]
    warp, sasi, train = (json.loads(f.read_text()) for f in files)
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)  # (common reads DREAMSTEREO_BENCH_RESULTS at import)
    assert gpu_table.main([*map(str, files), "--seconds", "warp=3", "--seconds", "sasi=40"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| figure", "| ---"))]
    assert len(table) == len(warp["rows"]) + 2 + len(train["cpu"]["rows"])  # dense + sparse; no VAE row
    for r in warp["rows"]:
        assert f"| PBDP double projection, {r['method']} | 32x48, {r['threads']} thread(s) | " \
               f"{r['ms_per_frame_median']:.2f} ms/frame ({r['speedup_vs_soft_splat']:.2f}x vs soft splat) | cpu |" in table
    assert f"{sasi['dense_ms']:.1f} ms" in out and f"{sasi['speedup']:.2f}x dense" in out
    assert all(f"{r['steps_per_s']:.2f} steps/s" in out for r in train["cpu"]["rows"].values())
    suite = json.loads(next(tmp_path.glob("*_gpu-suite.json")).read_text())
    assert suite["seconds"] == {"warp": 3.0, "sasi": 40.0} and suite["total_seconds"] == 43.0
    assert suite["sources"] == [f.name for f in files] and len(suite["rows"]) == len(table)
    assert "43 s in all" in out.splitlines()[0]


def test_the_table_refuses_a_file_that_is_no_benchmark_result(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    other = tmp_path / "2026-12-02_cpu_pipeline.json"
    other.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        gpu_table.main([str(other), "--no-write"])
    assert exc.value.code == 2
    assert f"{other}: not a result of bench_warp/bench_stages/bench_sasi/bench_train" in capsys.readouterr().err
