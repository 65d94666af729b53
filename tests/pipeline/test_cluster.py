"""Cluster files parse and call the real CLI; a 2-node local cluster survives losing its worker node."""

from __future__ import annotations

import glob
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dreamstereo.cli import build_parser
from dreamstereo.scenes import demo_scene, write_scene
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def _check_command(command: str) -> None:
    """A `dreamstereo ...` command line must parse with the real CLI and name existing config files."""
    argv = shlex.split(command)
    assert argv[0] == "dreamstereo", command
    args, extra = build_parser().parse_known_args(argv[1:])
    assert all("=" in item for item in extra), f"stray arguments in {command!r}: {extra}"
    for config in args.config:
        assert (REPO / config).is_file(), f"{command!r} names a missing config {config}"


def test_rayjob_entrypoint_and_kuberay_specs():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    _check_command(job["spec"]["entrypoint"])
    cluster = yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert "nvidia.com/gpu" in groups["gpu-depth"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (CLUSTER / "Dockerfile").is_file()


def test_aws_launcher_config_and_readme_commands():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install -e ~/dreamstereo" in c for c in cfg["setup_commands"])
    readme = (CLUSTER / "README.md").read_text()
    lines = readme.replace("\\\n", " ").splitlines()
    commands = [line[line.index("dreamstereo generate"):].split("  #")[0] for line in lines
                if "dreamstereo generate" in line and not line.startswith("#") and "`" not in line]
    assert len(commands) == 2  # local cluster and AWS
    for command in commands:
        _check_command(command)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_nodes():
    import shutil
    import tempfile

    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="dsr-", dir="/tmp"))
    env = {**os.environ, "DREAMSTEREO_LOCAL_RAY": str(state), "RAY_BIN": str(Path(sys.executable).parent / "ray"),
           "RAY_PORT": str(_free_port()), "RAY_AUTH_MODE": "disabled"}
    up = subprocess.run(["bash", str(CLUSTER / "local.sh"), "up", "1"], env=env, capture_output=True, text=True,
                        timeout=180)
    assert up.returncode == 0, up.stderr
    try:
        yield up.stdout.strip(), state, env
    finally:
        subprocess.run(["bash", str(CLUSTER / "local.sh"), "down"], env=env, timeout=120)
        assert subprocess.run(["pgrep", "-f", str(state)], capture_output=True).returncode == 1  # all gone
        shutil.rmtree(state, ignore_errors=True)


def _worker_raylet(state: Path) -> int:
    """PID of the raylet of the non-head node of the cluster under ``state``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"raylet") and str(state).encode() in b" ".join(argv) and b"--head" not in argv:
            return int(pid)
    raise AssertionError("no worker raylet found")


@pytest.mark.slow
def test_losing_a_worker_node_mid_job(two_nodes, tmp_path):
    address, state, env = two_nodes
    videos = tmp_path / "videos"
    videos.mkdir()
    for seed in range(8):
        write_scene(demo_scene(width=192, height=128, num_frames=20, seed=seed), videos / f"s{seed}.mp4", fps=24)
    args = ["--depth", "oracle", "process.decode.clip_frames=9", "process.decode.buckets=[[64,96]]",
            "process.decode.min_short_side=32", "shard_size=1", "--address", address]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dreamstereo.cli", "-q", "generate", "--input", str(videos),
                             "--output", str(out), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not glob.glob(str(out / "shards" / "*_stats.json")):
        time.sleep(0.1)
    os.kill(_worker_raylet(state), signal.SIGKILL)  # the worker node dies mid-job
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    rows = [r for p in sorted(glob.glob(str(out / "shards" / "*.parquet"))) for r in pq.read_table(p).to_pylist()]
    keys = sorted(r["key"] for r in rows)
    assert len(keys) == len(set(keys)) == 16 and all(r["status"] == "ok" for r in rows)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "dreamstereo.cli", "-q", "generate", "--input", str(videos), "--output",
                    str(clean), *args], env=env, check=True, capture_output=True, timeout=600)
    clean_rows = [r for p in sorted(glob.glob(str(clean / "shards" / "*.parquet"))) for r in pq.read_table(p).to_pylist()]
    assert keys == sorted(r["key"] for r in clean_rows)
