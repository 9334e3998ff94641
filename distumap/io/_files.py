"""What every single-writer export shares: a file that appears at its target only when whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator

import numpy as np
import xarray as xr
from isal import isal_zlib

from distumap import _config

#: deflate level of the HDF5 exports' chunks, in ISA-L's scale (0-3): level 1 compresses
#: counts as small as zlib's level 1 does at ~5x its speed (benchmarks/RESULTS.md, Export)
DEFLATE_LEVEL = 1


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL rather than a local path."""
    return "://" in path


def cells_per_block(ds: xr.Dataset, block_cells: int | None) -> int:
    """Cells per export task: ``block_cells``, else the store's own cell chunk (the variable's
    chunks: coordinates read from zarr may be chunked differently), else the setting."""
    if block_cells is None:
        counts = ds["counts"]
        chunks = counts.variable.chunks
        if chunks is not None:
            block_cells = int(chunks[counts.dims.index("cell")][0])
        else:
            block_cells = int(_config.get("chunk-cells"))
    if block_cells < 1:
        raise ValueError(f"block_cells must be positive, not {block_cells}")
    return int(block_cells)


def deflate(values: np.ndarray, *, shuffle: bool = False) -> bytes:
    """One HDF5 chunk as the ``gzip`` filter (with ``shuffle`` first, if asked) stores it.

    A zlib stream from ISA-L, which every zlib inflates, so any HDF5 reader reads the chunk
    written with ``write_direct_chunk``; it releases the GIL, so writer threads overlap."""
    values = np.ascontiguousarray(values)
    if shuffle:  # HDF5's shuffle filter: byte j of every element together, then byte j+1, ...
        values = values.view(np.uint8).reshape(-1, values.dtype.itemsize).T
    return isal_zlib.compress(np.ascontiguousarray(values), DEFLATE_LEVEL)


def partial_name(target: str) -> str:
    """A hidden temporary name next to ``target`` (same file system, so renaming is atomic)."""
    directory, name = os.path.split(os.path.abspath(target))
    return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def written_whole(target: str, *, progress: bool = False) -> Iterator[str]:
    """Yield a local path to write; on success it becomes ``target`` (renamed next to it, or
    uploaded once for an fsspec URL), on failure it is removed, so a failure never leaves a
    file at ``target`` and an older file there stays as it was."""
    url = is_url(target)
    workdir = tempfile.mkdtemp(prefix="distumap-export-") if url else None
    local = os.path.join(workdir, os.path.basename(target)) if url else partial_name(target)
    started = time.perf_counter()
    try:
        yield local
        if url:
            import fsspec

            # one upload of the finished file (a multipart upload on object stores)
            fs, remote = fsspec.core.url_to_fs(target)
            fs.put_file(local, remote)
        else:
            os.replace(local, target)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif os.path.exists(local):
            os.unlink(local)
    if progress:
        seconds = time.perf_counter() - started
        print(f"distumap export: {target} written in {seconds:.1f} s", file=sys.stderr, flush=True)


#: a single writer's progress lines per file, at most (and the last block's)
PROGRESS_LINES = 20


def block_written(path: str, i: int, n_blocks: int, progress: bool) -> None:
    """The progress line of a single writer that appended block ``i`` of ``n_blocks`` to
    ``path``: one every 5% of the blocks, so that a million cells print 20 lines, not 977."""
    step = max(1, n_blocks // PROGRESS_LINES)
    if progress and ((i + 1) % step == 0 or i + 1 == n_blocks):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        print(
            f"distumap export: {name}: block {i + 1}/{n_blocks} written",
            file=sys.stderr,
            flush=True,
        )
