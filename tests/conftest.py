"""Shared fixtures: paths to the real data beside the repository, determinism."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a model hub: fail fast on any hub id instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The built-in toy models (`toy`) are built once per test session in a folder of its own, set before any Ray
# worker starts so that workers build and read the same ones; removed at the end (`_toy_cache`).
TOY_CACHE = tempfile.mkdtemp(prefix="dreamstereo-toy-tests-")
os.environ["DREAMSTEREO_TOY_CACHE"] = TOY_CACHE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DREAMSTEREO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _toy_cache():
    yield TOY_CACHE
    shutil.rmtree(TOY_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def middlebury_dir() -> Path:
    folder = SHARED_DATA / "middlebury-2005-2006"
    if not folder.is_dir():
        pytest.skip(f"real stereo data not found at {folder} (set DREAMSTEREO_SHARED_DATA)")
    return folder


@pytest.fixture(scope="session")
def tiny_dav2(tmp_path_factory) -> str:
    """A randomly initialised Depth Anything V2 of the real architecture, saved like a checkpoint."""
    from dreamstereo.toy_models import save_depth_anything_v2

    return save_depth_anything_v2(tmp_path_factory.mktemp("weights") / "tiny-depth-anything-v2")


@pytest.fixture(scope="session")
def tiny_depthcrafter(tmp_path_factory) -> tuple[str, str]:
    """DepthCrafter's components at toy size (real diffusers/transformers classes, random weights):
    returns (UNet folder, SVD base folder with vae/, image_encoder/, scheduler/)."""
    from dreamstereo.toy_models import save_depthcrafter

    return save_depthcrafter(tmp_path_factory.mktemp("depthcrafter"))


def run_with_file_size_limit(code: str, *args: str, limit: int, env: dict | None = None):
    """Run ``code`` (Python, ``sys.argv[1:]`` = ``args``) in a subprocess whose writes past ``limit`` bytes per
    file the kernel refuses (RLIMIT_FSIZE: EFBIG, as a full disk refuses them with ENOSPC): a real write fault
    without root or a small tmpfs. Returns the ``subprocess.CompletedProcess`` (text output captured)."""
    prelude = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test (instead of hanging CI) when the block runs past ``seconds`` (SIGALRM, main thread;
    pytest-timeout is not installed). What used to hang (a FIFO, an endless retry) fails here instead."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


S3_SECRET = "SECRET-must-never-be-written-0123456789"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1 over HTTP (boto3 speaks the wire protocol to it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


# The fake credentials of the test server (it accepts any while authentication is off): in the environment
# of S3 tests (`s3_env`), and in the environment of every Ray worker of the session (`ray_session`).
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key-id", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials in the environment (the standard chain), the endpoint of the test server."""
    for name, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray of the test session (Ray's own rule: one shared cluster fixture), started on first
    use and shut down at the end; every test that runs Ray in this process takes it. The code under test
    uses a Ray that is already initialised (pipeline/job.py, training/ray_train.py) and leaves it running.

    Settings that fit every Ray test (the ones each of them used to start): 2 CPUs, a 300 MB object store, no
    dashboard, worker logs not copied to the driver. Workers stage
    samples in S3 themselves, with their own credential chain (as on a cluster): the test server's fake
    credentials are in the environment while Ray starts, so its raylet and every worker it spawns inherit
    them and S3 tests need no Ray restart; the driver's own environment is restored right after (S3 tests
    set it with ``s3_env``). The endpoint travels in each job's config (``s3.endpoint_url``)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # started outside this fixture (a test that ran Ray without it): not ours to keep
        ray.shutdown()
    saved = {name: os.environ.get(name) for name in S3_TEST_CREDENTIALS}
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 1024 * 1024)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh bucket on the test server; returns its name."""
    import uuid

    import boto3

    name = f"bucket-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_auth(s3_server, monkeypatch):
    """The test server with authentication on: an IAM user with an S3 policy and its key in the
    environment, a bucket; returns (bucket, key id, secret). Authentication is switched off afterwards."""
    import json
    import urllib.request
    import uuid

    import boto3

    def enforce_after(count: str) -> None:  # moto's switch: requests beyond `count` must be signed by IAM users
        urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset-auth", data=count.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST"),
                               timeout=10).read()

    setup = dict(endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    user = f"user-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = f"auth-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", **setup).create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    enforce_after("0")
    try:
        yield bucket, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        enforce_after("inf")


@pytest.fixture(scope="session")
def toy_wan_model(tmp_path_factory) -> str:
    """A Wan2.1-T2V folder at toy size (transformer/ with 16 input channels, vae/; no text encoder: the
    prompt embedding is then zeros), the real diffusers classes with random weights."""
    from dreamstereo.toy_models import save_toy_wan

    return save_toy_wan(tmp_path_factory.mktemp("wan-model") / "toy-wan", text_encoder=False)


class TinyDisk:
    """A small tmpfs mounted for one test: ``path`` is its root; ``fill(leave)`` leaves about ``leave``
    bytes free (a filler file takes the rest), ``free()`` deletes the filler."""

    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int) -> None:
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(self.available() - leave, 0))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        """Remount read-only (writes then fail with EROFS, even for root)."""
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, capture_output=True)

    def files(self) -> list[str]:
        """Every file and folder under the disk except the filler, relative and sorted."""
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p != self.filler)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs in ``tmp_path/disk`` (a full disk on demand: ``tiny_disk.fill(leave)``), unmounted
    afterwards. Mounting needs root (as here and in CI); elsewhere the test is skipped."""
    import shutil
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: cannot make a small tmpfs for a full-disk test")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full-disk test (needs root): {done.stderr.strip()}")
    try:
        yield TinyDisk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
