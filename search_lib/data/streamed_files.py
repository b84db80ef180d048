"""Data files written as a stream, class after class, so that a file of any size needs one class in memory and a
killed run resumes where it stopped.

A file here is ``prefix + payload + suffix``: the payload is the images' bytes (N x H x W x 3 uint8, row
major), appended one class at a time; prefix and suffix are known before the first image (their sizes and
contents depend only on the array's shape and the labels). Two layouts:

* `rfs_pickle_layout`: the RFS release's pickles, written as Python 2 wrote them (protocol 2, the array's
  bytes as one Python-2 string, numpy's ``numpy.core`` names): read back by ``pickle.load(f,
  encoding="latin1")``, by the loaders here and by RFS's code.
* `npz_layout`: an ``.npz`` (a zip archive holding ``images.npy``, stored uncompressed as ``numpy.savez``
  stores it), in the zip64 format so that members over 4 GiB are valid; the CRC and the sizes go into a data
  descriptor after the array and into the central directory, so nothing written earlier is ever rewritten.

`StreamedFile` writes one such file under ``.<name>.partial`` beside a progress record ``.<name>.partial.json``
(the classes written, the bytes, the running CRC), saved after each class once the bytes are on disk; it
appears under its final name only complete (``os.replace``). A re-run truncates the partial file to the last
recorded class and goes on; a partial file made for other contents (another key) is started again.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from search_lib.core.errors import RunFailure, UsageError
from search_lib.core.utils import atomic_write_json

PY2_STRING_MAX = 2**31 - 1  # a Python-2 string's length is a signed 32-bit count


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: ``str`` and ``bytes`` both as Python-2 byte strings (BINSTRING)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        self._string_header(len(raw))
        self.write(raw)
        self.memoize(obj)

    def _string_header(self, length: int) -> None:
        if length < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([length]))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", length))

    def save_payload(self, obj):
        """The header of the array's byte string; the bytes themselves are the stream's, written later."""
        self._string_header(obj.nbytes)
        self.payload_at = self._file.tell()

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def __init__(self, file, protocol=2):
        super().__init__(file, protocol)
        self._file = file
        self.payload_at: int | None = None


@dataclass(frozen=True)
class _Payload:
    nbytes: int


_Python2Pickler.dispatch[_Payload] = _Python2Pickler.save_payload
_RECONSTRUCT = np.zeros(0, np.uint8).__reduce__()[0]  # numpy's array rebuilder, whatever its module


class _StreamedArray:
    """Stands for a uint8 array of ``shape`` whose bytes are streamed in: pickled as numpy pickles an array."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)

    def __reduce__(self):
        nbytes = int(np.prod(self.shape))
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, self.shape, np.dtype(np.uint8), False, _Payload(nbytes))


def _py2_names(raw: bytes) -> bytes:
    return raw.replace(b"numpy._core.", b"numpy.core.")  # numpy 2 pickles name numpy._core; numpy 1 cannot load it


def python2_pickle(obj) -> bytes:
    """``obj`` pickled the way Python 2 and numpy 1.x did (numpy.core names, byte strings)."""
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(obj)
    return _py2_names(buf.getvalue())


def rfs_pickle_layout(shape: tuple[int, ...], labels: list[int], extras: dict | None = None) -> tuple[bytes, bytes]:
    """(prefix, suffix) of an RFS pickle ``{'data': uint8 array of shape, 'labels': labels, **extras}``."""
    nbytes = int(np.prod(shape))
    if nbytes > PY2_STRING_MAX:
        raise UsageError(f"a pickle of {shape[0]} images of {shape[1]} x {shape[2]} would hold {nbytes} bytes, more "
                         f"than a Python-2 pickle string can (2 GiB); list fewer classes in --splits")
    buf = io.BytesIO()
    pickler = _Python2Pickler(buf, protocol=2)
    pickler.dump({"data": _StreamedArray(shape), "labels": [int(v) for v in labels], **(extras or {})})
    raw, at = buf.getvalue(), pickler.payload_at
    assert at is not None, "the array was not pickled"
    return _py2_names(raw[:at]), _py2_names(raw[at:])


# ---- .npz: one stored zip64 member, sizes and CRC after the data ----

_MEMBER = b"images.npy"
_ZIP64_VERSION = 45
_MADE_BY_UNIX = (3 << 8) | _ZIP64_VERSION  # the external attributes are Unix permissions
_DESCRIPTOR_FLAG = 0x08  # the CRC and sizes follow the data
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00: a fixed time, so equal contents give equal files
_MAX32 = 0xFFFFFFFF


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def npz_layout(shape: tuple[int, ...]) -> tuple[bytes, int, Callable[[int, int], bytes]]:
    """(prefix, where the member's CRC starts in it, suffix(member bytes, crc)) of an ``.npz`` with the array
    ``images`` of ``shape`` (uint8)."""
    extra = struct.pack("<HHQQ", 1, 16, 0, 0)  # zip64 sizes: in the data descriptor (flag 0x08)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, _ZIP64_VERSION, _DESCRIPTOR_FLAG, 0, 0, _DOS_DATE, 0, _MAX32,
                        _MAX32, len(_MEMBER), len(extra)) + _MEMBER + extra

    def suffix(size: int, crc: int) -> bytes:
        descriptor = struct.pack("<IIQQ", 0x08074B50, crc, size, size)
        extra64 = struct.pack("<HHQQ", 1, 16, size, size)
        central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _MADE_BY_UNIX, _ZIP64_VERSION, _DESCRIPTOR_FLAG, 0,
                              0, _DOS_DATE, crc, _MAX32, _MAX32, len(_MEMBER), len(extra64), 0, 0, 0,
                              0o100644 << 16, 0) + _MEMBER + extra64
        cd_start = len(local) + size + len(descriptor)
        end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0, 1, 1, len(central),
                            cd_start)
        locator = struct.pack("<IIQI", 0x07064B50, 0, cd_start + len(central), 1)
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), min(cd_start, _MAX32), 0)
        return descriptor + central + end64 + locator + end

    return local + _npy_header(shape), len(local), suffix


# ---- a resumable file ----


@dataclass
class StreamedFile:
    """One output file: ``prefix``, then `add` per unit (a class's images), then `finish` writes ``suffix``
    (``suffix(payload bytes, crc)`` for an .npz) and renames it into place. ``key`` names what the file will
    hold; a partial file recorded under another key is started again."""

    final: Path
    prefix: bytes
    suffix: bytes | Callable[[int, int], bytes]
    units: int
    key: str
    crc_from: int | None = None  # the offset in prefix where the CRC starts; None: no CRC (a pickle)
    done: int = field(default=0, init=False)  # units written
    _fh: object = field(default=None, init=False, repr=False)
    _size: int = field(default=0, init=False, repr=False)  # bytes written
    _crc: int = field(default=0, init=False, repr=False)  # CRC-32 of the bytes from crc_from on

    @property
    def partial(self) -> Path:
        return self.final.with_name(f".{self.final.name}.partial")

    @property
    def record(self) -> Path:
        return self.final.with_name(f".{self.final.name}.partial.json")

    def open(self) -> StreamedFile:
        """Find where a previous run stopped (the final file, or the recorded progress of the partial one), or
        start the file."""
        if self.final.is_file():
            self.done = self.units
            return self
        try:
            state = json.loads(self.record.read_text()) if self.record.is_file() and self.partial.is_file() else None
        except (OSError, ValueError):
            state = None  # an unreadable record: the partial file cannot be trusted
        try:
            if state is not None and state.get("key") == self.key and state["size"] <= self.partial.stat().st_size:
                self._fh = open(self.partial, "r+b")
                self._fh.truncate(state["size"])
                self._fh.seek(state["size"])
                self.done, self._size, self._crc = state["done"], state["size"], state["crc"]
            else:
                self._fh = open(self.partial, "wb")
                self.done, self._size, self._crc = 0, 0, 0
                self._write(self.prefix)
                self._commit()
        except OSError as exc:
            raise RunFailure(f"cannot write {self.partial}: {exc.strerror}; check the disk space and "
                             f"permissions of --out") from exc
        return self

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._fh.write(view)
        start = self._size
        self._size += len(view)
        if self.crc_from is not None:
            skip = max(0, self.crc_from - start)
            self._crc = zlib.crc32(view[skip:], self._crc) if skip < len(view) else self._crc

    def _commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())  # the bytes are on disk before the record says so
        atomic_write_json(self.record, {"key": self.key, "done": self.done, "size": self._size, "crc": self._crc})

    def add(self, images: np.ndarray) -> None:
        """Append the next unit's images (uint8, C order) and record the progress."""
        assert self._fh is not None and self.done < self.units, f"{self.final.name}: no unit left to write"
        try:
            self._write(np.ascontiguousarray(images, dtype=np.uint8))
            self.done += 1
            self._commit()
        except OSError as exc:
            raise RunFailure(f"cannot write {self.partial}: {exc.strerror}; check the disk space of --out") from exc

    def finish(self) -> None:
        """Write the suffix and move the complete file under its final name."""
        assert self._fh is not None and self.done == self.units, f"{self.final.name}: units missing"
        payload = self._size - (self.crc_from or 0)
        suffix = self.suffix(payload, self._crc) if callable(self.suffix) else self.suffix
        try:
            self._write(suffix)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.replace(self.partial, self.final)
            self.record.unlink()
        except OSError as exc:
            raise RunFailure(f"cannot write {self.final}: {exc.strerror}; check the disk space and permissions "
                             f"of --out") from exc

    def close(self) -> None:
        """Close an unfinished file (its progress is on disk already)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
