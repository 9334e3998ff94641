"""File plumbing shared by every input: local path or URL, opening (possibly gzipped) streams,
byte ranges and file identity.

A source is a local path or an fsspec URL; ``file://`` URLs count as local. Local files are
opened and memory-mapped directly, everything else goes through fsspec. Names ending in ``.gz``
are gzip streams: they can only be read in order.
"""

from __future__ import annotations

import contextlib
import gzip
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import fsspec

from distumap._errors import InputError

__all__ = [
    "absolute",
    "exists",
    "file_identity",
    "is_gzip",
    "is_local",
    "is_url",
    "isdir",
    "join",
    "local_path",
    "open_raw",
    "open_stream",
    "read_ahead",
    "read_range",
    "read_text_lines",
    "url_to_fs",
    "view_range",
]


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL rather than a local path."""
    return "://" in path


def is_local(source: str) -> bool:
    """Whether ``source`` is on this machine's file system (a path or a ``file://`` URL)."""
    return not is_url(source) or source.startswith("file://")


def local_path(source: str) -> str:
    """The file system path of a local ``source`` (``file://`` removed)."""
    return source[len("file://") :] if source.startswith("file://") else source


def absolute(location: str | os.PathLike) -> str:
    """``location`` as workers anywhere can use it: an absolute local path or an fsspec URL."""
    location = os.fspath(location)
    return location if is_url(location) else os.path.abspath(location)


def url_to_fs(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of ``source`` and the path on it."""
    return fsspec.core.url_to_fs(source)


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder`` (a path or a URL)."""
    return folder.rstrip("/") + "/" + name


def exists(source: str) -> bool:
    """Whether a file or folder is at ``source``."""
    if is_local(source):
        return os.path.exists(local_path(source))
    fs, path = url_to_fs(source)
    return fs.exists(path)


def isdir(source: str) -> bool:
    """Whether ``source`` is a folder."""
    if is_local(source):
        return os.path.isdir(local_path(source))
    fs, path = url_to_fs(source)
    return fs.isdir(path)


def file_identity(source: str) -> dict[str, Any]:
    """Path, size and modification time of one file (or, for a folder, of all its files)."""
    fs, path = url_to_fs(source)
    try:
        if fs.isdir(path):
            infos = list(fs.find(path, detail=True).values())
        else:
            infos = [fs.info(path)]
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from exc
    size = int(sum(int(info.get("size") or 0) for info in infos))
    stamps = [
        info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("updated")
        for info in infos
    ]
    stamps = [stamp.timestamp() if hasattr(stamp, "timestamp") else stamp for stamp in stamps]
    stamps = [stamp for stamp in stamps if stamp is not None]
    mtime = max(stamps, key=str) if stamps else None
    if isinstance(mtime, float | int):
        mtime = float(mtime)
    elif mtime is not None:
        mtime = str(mtime)
    return {"path": source, "size": size, "mtime": mtime, "files": len(infos)}


# ---------------------------------------------------------------- streams


def is_gzip(source: str) -> bool:
    """Whether ``source`` is gzip-compressed (by its name): readable in order only."""
    return source.endswith(".gz")


def open_raw(source: str) -> Any:
    """The file's bytes as they are stored (an open binary file object; close it)."""
    return fsspec.open(source, "rb").open()


@contextlib.contextmanager
def open_stream(source: str) -> Iterator[Any]:
    """A binary file object, decompressed when the name ends in ``.gz``."""
    with fsspec.open(source, "rb") as raw:
        if is_gzip(source):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        else:
            yield raw


def read_text_lines(source: str) -> list[str]:
    """The (decompressed) text lines of a small file, without trailing blank lines."""
    try:
        with open_stream(source) as stream:
            text = stream.read().decode("utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise InputError(f"{source}: no such file") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_ahead(source: str, skip: int, piece: int) -> Iterator[bytes]:
    """The (decompressed) bytes of ``source`` after the first ``skip``, in pieces of ``piece``
    bytes, read one piece ahead in a thread: zlib releases the GIL, so inflating the next piece
    overlaps parsing this one. Errors of the stream are raised here."""
    pieces: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: bytes | BaseException) -> None:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            with open_stream(source) as stream:
                if len(stream.read(skip)) < skip:
                    put(b"")
                    return
                while not stop.is_set():
                    item = stream.read(piece)
                    put(item)
                    if not item:
                        return
        except BaseException as exc:  # handed to the reader, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="distumap-inflate", daemon=True)
    thread.start()
    try:
        while True:
            item = pieces.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------- byte ranges


def read_range(source: str, start: int, stop: int) -> bytearray:
    """Bytes ``[start, stop)`` of an uncompressed file (fewer at its end)."""
    buf = bytearray(max(0, stop - start))
    with open_raw(source) as f:
        f.seek(start)
        view = memoryview(buf)
        filled = 0
        while filled < len(buf):
            n = f.readinto(view[filled:]) if hasattr(f, "readinto") else None
            if n is None:  # file systems without readinto
                chunk = f.read(len(buf) - filled)
                n = len(chunk)
                view[filled : filled + n] = chunk
            if n == 0:
                break
            filled += n
    del view
    return buf[:filled] if filled < len(buf) else buf


def view_range(source: str, start: int, stop: int) -> tuple[mmap.mmap | bytearray, int]:
    """Bytes from at most ``start`` to ``stop`` of an uncompressed file, and the file offset of
    the first one.

    A local file is memory-mapped read-only (from ``start`` rounded down to the mapping
    granularity): the page cache is searched and parsed in place, with no copy and no fresh
    allocation. Other file systems are read.
    """
    if not is_local(source) or stop <= start:
        return read_range(source, start, stop), start
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    with open(local_path(source), "rb") as f:
        view = mmap.mmap(f.fileno(), stop - offset, offset=offset, access=mmap.ACCESS_READ)
    return view, offset
