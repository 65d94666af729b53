"""Header-first reading of one numeric array from ``.npy`` or ``.npz`` bytes or files.

Disparity sidecars come from the corpus, so they are untrusted: partial uploads, random bytes, an ``.npy``
under an ``.npz`` name, structured or object dtypes, and decompression bombs (a 0.9 MB npz that inflates to
1.7 GB). ``np.load`` inflates a member before anyone sees its shape; :class:`ArrayFile` reads the member's
npy header first (shape, dtype, order), lets the caller refuse what does not fit, and only then reads the
data, in bounded pieces, into one preallocated buffer. Nothing here unpickles.

Every problem is an :class:`ArrayFileError` whose message says what is wrong (the caller names the file).
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from typing import BinaryIO

import numpy as np

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_PIECE = 1 << 24  # bytes read at a time (16 MiB)
_MAX_HEADER = 10_000  # numpy's own limit on an npy header's length
_KINDS = "biuf"  # bool, signed, unsigned, float: what a disparity map can be


class ArrayFileError(ValueError):
    """Bytes that are not one plain numeric array; the message says why (without the file name)."""


class ArrayFile:
    """One array of ``.npy`` or ``.npz`` content: ``shape`` and ``dtype`` right away, the data on :meth:`read`.

    Args:
        source: the file's bytes, or a binary file object open for reading.
        member: in an npz, the array to read (``<member>.npy``); an npz with exactly one array is read
            whatever its name. The content decides the format, not the file name.
    """

    def __init__(self, source: bytes | BinaryIO, *, member: str = "disparity"):
        fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        self._zip = None
        try:
            magic = fh.read(6)
            fh.seek(0)
            if magic.startswith(NPY_MAGIC):
                self._stream = fh
            elif magic[:4] in ZIP_MAGICS:
                self._zip = zipfile.ZipFile(fh)
                self._stream = self._zip.open(_pick_member(self._zip, member))
            else:
                raise ArrayFileError(f"not an .npy or .npz file (starts with {magic[:6]!r})")
            self.shape, self.fortran_order, self.dtype = _read_header(self._stream)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            self.close()
            raise ArrayFileError(f"damaged archive ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self.close()
            raise
        if self.dtype.hasobject or self.dtype.names is not None or self.dtype.subdtype is not None \
                or self.dtype.kind not in _KINDS:
            self.close()
            raise ArrayFileError(f"holds dtype {self.dtype.str!r}, need a plain numeric array (bool, int or float)")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, max_bytes: int) -> np.ndarray:
        """The whole array (native byte order), refusing more than ``max_bytes`` of data before reading any."""
        buffer = self._read_bytes(self.nbytes, max_bytes, whole=True)
        order = "F" if self.fortran_order else "C"
        array = buffer.view(self.dtype).reshape(self.shape, order=order)
        return array if self.dtype.isnative else array.astype(self.dtype.newbyteorder("="))

    def read_first(self, max_bytes: int) -> np.ndarray:
        """The first entry along axis 0 (e.g. frame 0 of a ``(T, H, W)`` clip), reading only its bytes; the whole
        array when it is stored in Fortran order (then the first entry is not contiguous). Same checks as
        :meth:`read` for the bytes it reads."""
        if self.fortran_order or not self.shape:
            return self.read(max_bytes)[0] if self.shape else self.read(max_bytes)
        shape = self.shape[1:]
        buffer = self._read_bytes(math.prod(shape) * self.dtype.itemsize if self.shape[0] else 0, max_bytes,
                                  whole=False)
        if not self.shape[0]:
            raise ArrayFileError(f"holds no entry along its first axis ({self.shape})")
        array = buffer.view(self.dtype).reshape(shape)
        return array if self.dtype.isnative else array.astype(self.dtype.newbyteorder("="))

    def _read_bytes(self, nbytes: int, max_bytes: int, *, whole: bool) -> np.ndarray:
        """The first ``nbytes`` data bytes as ``uint8``; with ``whole``, also check that nothing follows."""
        try:
            if nbytes > max_bytes:
                raise ArrayFileError(f"declares {self.shape} {self.dtype} = {nbytes / 2**20:.0f} MiB, more "
                                     f"than the limit of {max_bytes / 2**20:.0f} MiB")
            buffer = np.empty(nbytes, np.uint8)
            view, done = memoryview(buffer), 0
            while done < nbytes:
                got = self._stream.readinto(view[done:done + _PIECE])
                if not got:
                    raise ArrayFileError(f"truncated: {done} of {nbytes} data bytes for {self.shape} {self.dtype}")
                done += got
            if whole and self._zip is not None and self._stream.read(1):  # reading to the end also checks the CRC
                raise ArrayFileError(f"holds more data than its header's {self.shape} {self.dtype}")
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ArrayFileError(f"damaged archive ({type(exc).__name__}: {exc})") from None
        finally:
            self.close()
        return buffer

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> "ArrayFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pick_member(archive: zipfile.ZipFile, member: str) -> str:
    names = archive.namelist()
    if f"{member}.npy" in names:
        return f"{member}.npy"
    arrays = [n for n in names if n.endswith(".npy")]
    if len(arrays) == 1 and len(names) == 1:
        return arrays[0]
    raise ArrayFileError(f"npz has no array named {member!r} (holds {names[:8]}{' ...' if len(names) > 8 else ''})")


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an npy header (versions 1 and 2; 3 only adds UTF-8 field names,
    which a plain numeric array never has)."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_MAX_HEADER)
        else:
            raise ArrayFileError(f"npy format version {version} is not supported (need 1.0 or 2.0)")
    except ArrayFileError:
        raise
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ArrayFileError(f"unreadable npy header ({exc})") from None
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ArrayFileError(f"npy header declares shape {shape}")
    return tuple(shape), bool(fortran), np.dtype(dtype)
