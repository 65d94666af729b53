"""The Ray operators' plain helpers: what travels between operators survives exactly, with no pickle."""

from __future__ import annotations

import numpy as np

from dreamstereo.pipeline.actors import pack, pack_members, unpack, unpack_members


def test_members_round_trip_exactly_whatever_their_bytes():
    members = {"clean.mp4": b"\n\x00\xff" * 100, "json": b'{"a": "\\n"}', "empty.npz": b"", "mask.npz": b"\n"}
    data = pack_members(members)
    assert unpack_members(data) == members and list(unpack_members(data)) == list(members)
    assert b"pickle" not in data and not data.startswith(b"\x80")  # a JSON index, not a pickle


def test_arrays_round_trip_as_npy_bytes():
    frames = np.random.default_rng(0).integers(0, 255, (2, 4, 6, 3), np.uint8)
    assert np.array_equal(unpack(pack(frames)), frames) and unpack(pack(None)) is None
