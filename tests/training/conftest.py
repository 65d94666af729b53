"""Fixtures of the training tests: a toy Wan2.1 folder and small real shards (built once per session)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tests.training.shards import write_shards


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster than two fighting
    # (module scope, so it is in force before module fixtures such as the tiny run)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_wan(tmp_path_factory) -> str:
    """Wan2.1-T2V layout at toy size (transformer/ with 16 input channels, vae/, umT5 text_encoder/, tokenizer/)."""
    from dreamstereo.toy_models import save_toy_wan

    return save_toy_wan(tmp_path_factory.mktemp("wan") / "toy-wan")


@pytest.fixture(scope="session")
def raw_shards(tmp_path_factory) -> tuple[str, list[str]]:
    """A `generate mode=raw`-like output: 4 shards of 2 clean 9-frame 64x64 clips, manifest.json."""
    folder = tmp_path_factory.mktemp("raw-shards")
    return str(folder), write_shards(folder, shards=4, per_shard=2)


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory) -> tuple[str, list[str]]:
    """A `generate`-like output of PBDP pairs: 2 shards of 2 samples."""
    folder = tmp_path_factory.mktemp("pair-shards")
    return str(folder), write_shards(folder, shards=2, per_shard=2, pairs=True)


TINY = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny.yaml"


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(toy_wan, raw_shards, tmp_path_factory):
    """The tiny preset through the CLI: 60 steps on 6 clips (1 of 4 shards held out for validation).
    (Session scope: training tests and export tests read the same run.)"""
    from dreamstereo.cli import main

    out = tmp_path_factory.mktemp("tiny-run")
    base_files = _digest(toy_wan)
    code = main(["-q", "train", str(TINY), f"model.base={toy_wan}", f"data.shards={raw_shards[0]}",
                 f"output_dir={out}", "data.holdout_shards=1"])
    assert code == 0
    return out, base_files
