"""File formats of the command line tools: disparity files, images, videos; clear errors on bad files."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dreamstereo.io import media


@pytest.fixture
def disp():
    return (np.random.default_rng(0).random((3, 6, 9)) * 40).astype(np.float32)


def test_disparity_formats_round_trip(tmp_path, disp):
    np.save(tmp_path / "d.npy", disp)
    np.savez(tmp_path / "d.npz", disparity=disp)
    np.savez(tmp_path / "single.npz", whatever=disp[0])
    media.write_pfm(tmp_path / "d.pfm", disp[0])
    cv2.imwrite(str(tmp_path / "d16.png"), np.round(disp[0] * 256).astype(np.uint16))
    assert np.array_equal(media.read_disparity(tmp_path / "d.npy"), disp)
    assert np.array_equal(media.read_disparity(tmp_path / "d.npz"), disp)
    assert np.array_equal(media.read_disparity(tmp_path / "single.npz"), disp[:1])
    assert np.array_equal(media.read_disparity(tmp_path / "d.pfm"), disp[:1])
    png = media.read_disparity(tmp_path / "d16.png", scale=1 / 256)
    assert png.shape == (1, 6, 9) and np.abs(png - disp[:1]).max() <= 1 / 512 + 1e-6


@pytest.mark.parametrize("name,content,needle", [
    ("missing.npy", None, "no such file"),
    ("bad.npz", b"not a zip", "cannot read"),
    ("nan.npy", "nan", "NaN or inf"),
    ("d.txt", b"1 2 3", "unsupported format"),
    ("rgb.png", "rgb", "channels"),
    ("gray.png", "gray", "give its scale"),
    ("two.npz", "two", "no array named 'disparity'"),
    ("complex.npy", "complex", "numeric"),
    ("bad.pfm", b"Pf\n\n-1.0\n", "PFM header"),
    ("color.pfm", b"PF\n2 2\n-1.0\n" + bytes(48), "grayscale"),
])
def test_bad_disparity_files_are_named(tmp_path, name, content, needle):
    path = tmp_path / name
    if content == "nan":
        np.save(path, np.full((2, 2), np.nan, np.float32))
    elif content == "rgb":
        cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    elif content == "gray":
        cv2.imwrite(str(path), np.zeros((4, 4), np.uint16))
    elif content == "complex":
        np.save(path, np.zeros((2, 2), np.complex64))
    elif content == "two":
        np.savez(path, a=np.zeros(2), b=np.zeros(2))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(media.MediaError, match=needle) as info:
        media.read_disparity(path, scale=1.0 if content == "rgb" else None)
    assert name in str(info.value)


def test_lossless_video_is_bit_exact_and_masks_survive(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (4, 10, 14, 3), dtype=np.uint8)
    media.write_video(tmp_path / "v.mkv", frames, 8, lossless=True)
    back, fps = media.read_video(tmp_path / "v.mkv")
    assert np.array_equal(back, frames) and fps == pytest.approx(8)
    mask = rng.random((4, 10, 14)) > 0.7
    media.write_video(tmp_path / "m.mkv", mask, 8, lossless=True)
    assert np.array_equal(media.read_video(tmp_path / "m.mkv")[0][..., 0] > 127, mask)


def test_unreadable_video_is_a_media_error_and_no_temp_left(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(media.MediaError, match="bad.mp4"):
        media.read_video(bad)
    with pytest.raises(media.MediaError, match="frame rate"):
        media.write_video(tmp_path / "out.mp4", np.zeros((1, 4, 4, 3), np.uint8), fps=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mp4"]


def test_writes_on_a_full_disk_name_the_file_and_the_cause_and_leave_nothing(tiny_disk):
    tiny_disk.fill(leave=8 * 1024)
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # ~200 KB as PNG
    with pytest.raises(media.WriteError, match=r"'.*/image\.png'.*No space left on device") as info:
        media.write_image(tiny_disk.path / "image.png", noise)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    frames = np.random.default_rng(1).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(media.WriteError, match=r"'.*/video\.mkv'.*No space left on device"):
        media.write_video(tiny_disk.path / "video.mkv", frames, 8, lossless=True)
    with pytest.raises(media.WriteError, match=r"'.*/notes\.txt'.*No space left on device"):
        media.write_text(tiny_disk.path / "notes.txt", "x" * 100_000)
    assert tiny_disk.files() == []


def test_writes_on_a_read_only_disk_name_the_file_and_the_cause(tiny_disk):
    tiny_disk.read_only()
    with pytest.raises(media.WriteError) as info:
        media.write_image(tiny_disk.path / "sub" / "image.png", np.zeros((4, 4, 3), np.uint8))
    assert info.value.errno == errno.EROFS
    assert str(info.value) == (f"cannot write {str(tiny_disk.path / 'sub' / 'image.png')!r}: "
                               f"Read-only file system [EROFS]")
    with pytest.raises(media.WriteError, match=r"/out'?: Read-only file system \[EROFS\]"):
        with media.staged_folder(tiny_disk.path / "out"):
            pass
    with pytest.raises(media.WriteError, match=r"'.*/v\.mkv': Read-only file system \[EROFS\]"):
        media.write_video(tiny_disk.path / "v.mkv", np.zeros((2, 8, 8, 3), np.uint8), 8, lossless=True)


def test_the_staging_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    killed = subprocess.run(  # a run killed with -9 half-way through writing its outputs
        [sys.executable, "-c", ("import os, signal, sys\n"
                                "from dreamstereo.io import media\n"
                                "with media.staged_folder(sys.argv[1]) as stage:\n"
                                "    (stage / 'half.bin').write_bytes(b'x')\n"
                                "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(out)], check=False)
    assert killed.returncode == -signal.SIGKILL
    [dead] = [p for p in out.iterdir() if p.name.startswith(".staging-")]
    running = out / ".staging-running"  # a run in progress holds its lock (here: this test)
    running.mkdir()
    (running / ".lock").write_text("")
    held = os.open(running / ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    legacy_recent, legacy_old = out / ".staging-123", out / ".staging-456"  # earlier versions: no lock
    mine = out / ".staging-notes"  # not a stage: no lock file
    for folder in (legacy_recent, legacy_old, mine):
        folder.mkdir()
        (folder / "index.html").write_text("half")
    os.utime(legacy_old, (0, 0))
    try:
        with media.staged_folder(out, last=("index.html",)) as stage:
            media.write_text(stage / "index.html", "whole")
    finally:
        os.close(held)
    assert not dead.exists() and not legacy_old.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([running.name, legacy_recent.name, mine.name, "index.html"])
    assert (out / "index.html").read_text() == "whole"
