"""Real WebDataset shards for the training tests, laid out as ``dreamstereo generate`` writes them
(``shards/NNNNNN.tar`` + ``manifest.json``), from rendered synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

from dreamstereo.io.sample import encode_raw_sample, encode_sample, make_key
from dreamstereo.scenes import demo_scene


def write_shards(folder, *, shards: int, per_shard: int, pairs: bool = False, height: int = 64, width: int = 64,
                 frames: int = 9, storage=None) -> list[str]:
    """Write ``shards`` tars of ``per_shard`` samples (raw clips, or PBDP pairs with ``pairs``) and a manifest
    into ``folder`` (or into ``storage``, an object from ``io.storage``); return all sample keys."""
    import tempfile

    import webdataset as wds

    from dreamstereo.io.storage import LocalStorage
    from dreamstereo.stages.disparity import normalize_disparity
    from dreamstereo.stages.pairs import PairConfig, make_pair

    storage = storage or LocalStorage(folder)
    entries, keys = [], []
    for shard in range(shards):
        with tempfile.TemporaryDirectory() as tmp:
            tar = Path(tmp) / "shard.tar"
            with wds.TarWriter(str(tar)) as writer:
                for index in range(per_shard):
                    seed = shard * per_shard + index
                    scene = demo_scene(width=width, height=height, num_frames=frames, seed=seed)
                    key = make_key(f"scene{seed}.mp4", 0)
                    meta = {"key": key, "height": height, "width": width, "bucket": [height, width]}
                    if pairs:
                        disparity = normalize_disparity(scene.disparity, width, 0.08, 0.0)
                        pair = make_pair(scene.frames_uint8(), disparity, key, PairConfig())
                        members = encode_sample(pair.clean, pair.warped, pair.mask, pair.disparity, meta, 12.0)
                    else:
                        members = encode_raw_sample(scene.frames_uint8(), meta, 12.0)
                    writer.write({"__key__": key, **members})
                    keys.append(key)
            path = f"shards/{shard:06d}.tar"
            storage.upload_file(path, tar)
            entries.append({"shard": shard, "path": path, "num_samples": per_shard})
    storage.write_bytes("manifest.json", json.dumps({"summary": {}, "shards": entries}).encode())
    return keys


def tar_keys(url: str) -> list[str]:
    from dreamstereo.io.shards import read_keys

    return read_keys(url)
