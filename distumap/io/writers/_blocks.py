"""The block loop of the exports that have one writer (loom, h5ad): cells per block, the block
tasks, how many run ahead of the writer, their results in order beside the embed that gives the
embedding, progress lines, and the deflate of the HDF5 chunks they carry (on the workers, also
for a CSR matrix whose chunks do not align with the blocks: :func:`csr_deflated`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr
from isal import isal_zlib

from distumap import _config
from distumap._compute import groups_in_order, results_in_order
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

    _stop_if_failed(embedded)  # an embed that has already failed: no block is computed
    priority = BESIDE_THE_EMBED if embedded is not None else 0
    for result in results_in_order(
        blocks, stage=stage, in_flight=in_flight, client=client, priority=priority
    ):
        _stop_if_failed(embedded)
        yield result


def _stop_if_failed(embedded: Future | None) -> None:
    if embedded is not None and embedded.done() and embedded.exception() is not None:
        raise embedded.exception()


#: cells of the blocks whose CSR values one ``<format>-deflate`` task deflates: the writer
#: deflates the one chunk that straddles two such groups, so that at ~500 nonzeros per cell
#: (31 of the 256 Ki-element chunks per group) it deflates about one in thirty
DEFLATE_GROUP_CELLS = 16384


def deflate_group(block_cells: int, block_bytes: int, most_bytes: int) -> int:
    """Blocks per ``<format>-deflate`` task: :data:`DEFLATE_GROUP_CELLS` cells, and no more
    than two groups' blocks of ``block_bytes`` each in ``most_bytes`` (they wait on the workers
    for their group's task)."""
    by_cells = DEFLATE_GROUP_CELLS // max(block_cells, 1)
    return max(1, min(by_cells, most_bytes // max(2 * block_bytes, 1)))


@dataclass(frozen=True)
class Stretch:
    """Consecutive values of a 1-D chunked dataset from element ``start``, deflated where they
    fill whole chunks: ``head`` the raw values before the first chunk boundary at or after
    ``start``, ``chunks`` the deflated whole chunks after it, ``tail`` the raw values after the
    last whole chunk (its chunk is finished with the next stretch's head)."""

    head: np.ndarray
    chunks: list[bytes]
    tail: np.ndarray


def deflate_stretch(values: np.ndarray, start: int, chunk: int, *, shuffle: bool) -> Stretch:
    """``values``, which go at element ``start``, as a :class:`Stretch` of ``chunk``-element
    chunks."""
    at = min(len(values), -start % chunk)
    rest = values[at:]
    whole = len(rest) - len(rest) % chunk
    chunks = [deflate(rest[lo : lo + chunk], shuffle=shuffle) for lo in range(0, whole, chunk)]
    return Stretch(values[:at].copy(), chunks, rest[whole:].copy())


def _row_nnz(pieces: tuple) -> np.ndarray:
    return pieces[-1]


def _deflate_csr_group(streams: tuple, start: int, chunk: int, *blocks: tuple) -> list[Stretch]:
    """The CSR arrays ``streams`` ((index in a block's pieces, dtype, shuffle) each) of
    consecutive blocks, from nonzero ``start``, deflated in chunks."""
    return [
        deflate_stretch(
            np.concatenate([np.asarray(pieces[index], dtype=dtype) for pieces in blocks]),
            start,
            chunk,
            shuffle=shuffle,
        )
        for index, dtype, shuffle in streams
    ]


def csr_deflated(
    blocks: list,
    streams: tuple,
    *,
    chunk: int,
    group: int,
    name: str,
    stage: str,
    in_flight: int,
    client,
    embedded: Future | None,
) -> Iterator[tuple[list[np.ndarray], list[Stretch]]]:
    """The CSR pieces of ``blocks`` (tasks giving ``(array, ..., row_nnz)``), their arrays of
    nonzeros deflated on the workers in ``chunk``-element chunks, in order.

    Blocks go in groups of ``group`` (:func:`deflate_group`): once a group's rows' nonzeros
    are here (all this process receives of the blocks), one task (``name``) concatenates each
    of ``streams`` ((index in the pieces, dtype, shuffle) each) over the group and deflates
    its whole chunks where the matrix puts them. Yields, per group, every block's nonzeros per
    row and one :class:`Stretch` per stream. Beside an ``embedded`` embed, as
    :func:`export_blocks`.
    """
    _stop_if_failed(embedded)
    start = 0

    def follow(row_nnz: list[np.ndarray]):
        nonlocal start
        first, start = start, start + int(sum(int(np.sum(rows)) for rows in row_nnz))
        return _deflate_csr_group, (streams, first, chunk)

    for row_nnz, stretches in groups_in_order(
        blocks,
        group=group,
        summarize=_row_nnz,
        follow=follow,
        name=name,
        stage=stage,
        in_flight=in_flight,
        client=client,
        priority=BESIDE_THE_EMBED if embedded is not None else 0,
    ):
        _stop_if_failed(embedded)
        yield row_nnz, stretches


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
