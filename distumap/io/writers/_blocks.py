"""The block loop of the exports that have one writer (loom, h5ad): cells per block, the block
tasks, how many run ahead of the writer, their results in order beside the embed that gives the
embedding, progress lines, and the deflate of the HDF5 chunks they carry."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import dask
import dask.array as da
import numpy as np
import xarray as xr
from isal import isal_zlib

from distumap import _config
from distumap._compute import results_in_order
from distumap.pp import selected_counts

#: deflate level of the HDF5 exports' chunks, in ISA-L's scale (0-3): level 1 compresses
#: counts about as small as zlib's level 1 does, and much faster (benchmarks/RESULTS.md, Export)
DEFLATE_LEVEL = 1

#: the task priority of an export's blocks while the embed runs: below the embed's tasks
#: (priority 0), so that they take the cores the embed leaves idle rather than delay it
BESIDE_THE_EMBED = -1

#: a single writer's progress lines per file, at most (and the last block's)
PROGRESS_LINES = 20


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


def counts_in_blocks(ds: xr.Dataset, gene_index: np.ndarray, block_cells: int) -> da.Array:
    """The counts of the genes ``gene_index`` (cells x genes), in blocks of ``block_cells``."""
    return selected_counts(ds, gene_index).rechunk({0: block_cells, 1: -1})


def blocks_in_flight(client, block_bytes: int, most_bytes: int) -> int:
    """Blocks computed ahead of a single writer: two per worker thread keep the workers busy
    while the writer appends, and ``most_bytes`` of ``block_bytes`` each bounds what finished
    blocks can hold on the client; never fewer than two."""
    threads = sum(client.nthreads().values()) if client is not None else (os.cpu_count() or 1)
    return max(2, min(2 * threads, most_bytes // block_bytes))


def block_tasks(counts: da.Array, function: Callable, name: str, *args) -> list:
    """One delayed task per cell block of ``counts``, ``function(block, i, n_blocks, *args)``,
    keyed ``(name, i)``."""
    pieces = counts.to_delayed().ravel()
    task = dask.delayed(function, pure=True)
    return [
        task(piece, i, len(pieces), *args, dask_key_name=(name, i))
        for i, piece in enumerate(pieces)
    ]


def export_blocks(
    blocks: list, *, stage: str, in_flight: int, client, embedded: Future | None
) -> Iterator:
    """The results of a single writer's block tasks, in order (``results_in_order``).

    While the embed that ``embedded`` waits for runs, the blocks run below its priority (they
    take the cores it leaves idle), and its failure stops them at the next block rather than
    after the last."""

    def stop_if_failed() -> None:
        if embedded is not None and embedded.done() and embedded.exception() is not None:
            raise embedded.exception()

    stop_if_failed()  # an embed that has already failed: no block is computed
    priority = BESIDE_THE_EMBED if embedded is not None else 0
    for result in results_in_order(
        blocks, stage=stage, in_flight=in_flight, client=client, priority=priority
    ):
        stop_if_failed()
        yield result


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


def deflate(values: np.ndarray, *, shuffle: bool = False) -> bytes:
    """One HDF5 chunk as the ``gzip`` filter (with ``shuffle`` first, if asked) stores it.

    A zlib stream from ISA-L, which every zlib inflates, so any HDF5 reader reads the chunk
    written with ``write_direct_chunk``; it releases the GIL, so writer threads overlap."""
    values = np.ascontiguousarray(values)
    if shuffle:  # HDF5's shuffle filter: byte j of every element together, then byte j+1, ...
        values = values.view(np.uint8).reshape(-1, values.dtype.itemsize).T
    return isal_zlib.compress(np.ascontiguousarray(values), DEFLATE_LEVEL)
