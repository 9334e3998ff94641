"""Write a finished store as AnnData zarr, the workers writing their own slices.

The layout is the h5ad's (:mod:`distumap.io.writers._anndata_elements`). A first pass counts the
nonzeros of every row, which fixes where each block's values go; the workers then write their own
slices. Every zarr chunk has exactly one writer: a block writes the chunks that lie wholly inside
its slice and hands the pieces of the (at most two) chunks it shares with its neighbours to one
small task per shared chunk.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from distumap._compute import current_client, run
from distumap._format import ANNDATA_LAYER, check_replaceable
from distumap._paths import is_url
from distumap._progress import report
from distumap.io.writers._anndata_elements import (
    ZARR_CELL_CHUNK,
    ZARR_FORMAT,
    ZarrElements,
    anndata_inputs,
    csr_group,
    csr_pieces,
    export_params,
    uns_record,
    write_annotations,
)
from distumap.io.writers._base import Writer
from distumap.io.writers._blocks import cells_per_block, counts_in_blocks
from distumap.io.writers._graph import (
    graph_rows,
    has_cell_graph,
    neighbors_uns,
    report_no_graph,
    write_obsp,
)
from distumap.io.writers._inputs import matrix_dtype, selected_genes
from distumap.io.writers._target import partial_name, replace_folder, report_written

#: zarr chunk of the graph's 1-D CSR arrays, in elements (appended in order from the client)
ZARR_GRAPH_CHUNK = 2**18
#: bounds of the zarr chunk of the 1-D CSR arrays, in elements; within them a chunk is about a
#: quarter of a block's nonzeros, so most chunks lie inside one block and are written there
ZARR_CHUNK_MIN, ZARR_CHUNK_MAX = 2**14, 2**20


def _row_nnz(counts: np.ndarray) -> np.ndarray:
    return np.count_nonzero(counts, axis=1).astype(np.int64)


#: the four 1-D arrays a block writes: (group, array) -> which of the block's pieces
_ZARR_SLICES = {
    ("X", "data"): 0,
    (f"layers/{ANNDATA_LAYER}", "data"): 1,
    ("X", "indices"): 2,
    (f"layers/{ANNDATA_LAYER}", "indices"): 2,
}


def _open_slices(root: str) -> dict[tuple[str, str], Any]:
    import zarr

    return {
        key: zarr.open_array(root, path=f"{key[0]}/{key[1]}", mode="r+", zarr_format=ZARR_FORMAT)
        for key in _ZARR_SLICES
    }


def _chunk_span(k: int, chunk: int, total: int) -> tuple[int, int]:
    return k * chunk, min((k + 1) * chunk, total)


def _shared_chunks(start: int, stop: int, chunk: int, total: int) -> list[int]:
    """Chunks that hold values of ``[start, stop)`` and of another block too."""
    if stop <= start:
        return []
    shared = []
    for k in sorted({start // chunk, (stop - 1) // chunk}):
        lo, hi = _chunk_span(k, chunk, total)
        if not (start <= lo and hi <= stop):
            shared.append(k)
    return shared


def _zarr_block(
    counts: np.ndarray,
    index: int,
    n_blocks: int,
    root: str,
    start: int,
    stop: int,
    chunk: int,
    total: int,
) -> dict[int, tuple[int, tuple[np.ndarray, ...]]]:
    """Write the chunks that lie inside this block's slice ``[start, stop)``; return the pieces
    of the shared ones as ``{chunk: (offset in chunk, (data, layer, indices))}``."""
    data, layer, indices, _ = csr_pieces(counts)
    if data.size != stop - start:
        raise RuntimeError(
            f"block {index}: {data.size} nonzeros now, {stop - start} when they were counted; "
            "the store changed during the export"
        )
    pieces = (data, layer, indices)
    first = -(-start // chunk) * chunk
    last = (stop // chunk) * chunk if stop < total else total
    if first < last:
        arrays = _open_slices(root)
        for key, which in _ZARR_SLICES.items():
            arrays[key][first:last] = pieces[which][first - start : last - start]
    edges = {}
    for k in _shared_chunks(start, stop, chunk, total):
        lo, hi = _chunk_span(k, chunk, total)
        a, b = max(lo, start), min(hi, stop)
        edges[k] = (a - lo, tuple(piece[a - start : b - start] for piece in pieces))
    report("export", 1, n_blocks, block=index, step="anndata-zarr")
    return edges


def _zarr_shared_chunk(k: int, root: str, chunk: int, total: int, *edges: dict) -> int:
    """Assemble chunk ``k`` from its blocks' pieces and write it whole (its only writer)."""
    lo, hi = _chunk_span(k, chunk, total)
    buffers = [np.empty(0, np.int32), np.empty(hi - lo, np.float32), np.empty(hi - lo, np.int32)]
    filled = 0
    for block_edges in edges:
        offset, pieces = block_edges[k]
        if buffers[0].size == 0:  # X's dtype is the store's: int32 counts or float32 values
            buffers[0] = np.empty(hi - lo, pieces[0].dtype)
        for buffer, piece in zip(buffers, pieces, strict=True):
            buffer[offset : offset + piece.size] = piece
        filled += pieces[0].size
    if filled != hi - lo:
        raise RuntimeError(f"zarr chunk {k}: {filled} of {hi - lo} values arrived")
    arrays = _open_slices(root)
    for key, which in _ZARR_SLICES.items():
        arrays[key][lo:hi] = buffers[which]
    return hi - lo


def _done(_edges: dict) -> int:
    return 1


def _zarr_chunk(total: int, block_nnz: np.ndarray) -> int:
    """A power of two near a quarter of the typical block's nonzeros, within the bounds."""
    typical = float(np.median(block_nnz[block_nnz > 0])) if (block_nnz > 0).any() else 0.0
    chunk = 2 ** int(np.floor(np.log2(max(typical / 4, 1))))
    return int(min(max(chunk, ZARR_CHUNK_MIN), ZARR_CHUNK_MAX, max(total, 1)))


def write_anndata_zarr(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    block_cells: int | None = None,
    progress: bool = False,
    client=None,
) -> str:
    """Write the selected genes' counts, log2(x+1), the embedding and the metadata as AnnData zarr.

    Parameters
    ----------
    ds
        A store after the embed stage (:func:`distumap.io.open_store` with ``require="embed"``);
        see :func:`write_h5ad`.
    path
        The target folder (``embedding.zarr``), on a file system the workers share with the
        client. An existing AnnData zarr there is replaced once the new one is complete; any
        other existing path is an error.
    block_cells
        Cells per task. Defaults to the store's cell chunk. The contents do not depend on it.
    progress
        Print a line per pass to stderr.
    client
        The ``distributed.Client`` to compute on; defaults to the current client if there is
        one, else dask's configured (threaded) scheduler.

    Returns
    -------
    str
        ``path``, as given.

    Notes
    -----
    This computes, in two passes over the counts. First the nonzeros of every cell among the
    selected genes (tasks ``anndata-zarr-nnz``), which fix ``indptr`` and where each block's
    values go. Then one task per block (``anndata-zarr-block``) builds the block's CSR pieces
    of ``X`` (int32) and ``layers["log2p1"]`` (float32) and writes them into the zarr arrays
    directly: the chunks that lie inside its slice itself, the (at most two) chunks it shares
    with a neighbour through one small task per shared chunk (``anndata-zarr-edge``), so every
    chunk has exactly one writer. The graph of all cells (``obsp`` and ``uns["neighbors"]``,
    see :func:`write_h5ad`) is computed on the cluster in cell blocks
    (``anndata-zarr-graph-edges``, ``anndata-zarr-graph-block``) and appended from this
    process in cell order. The
    layout is the one :func:`write_h5ad` writes, in zarr
    format 2 (what anndata 0.12 writes by default; Blosc-zstd compressed, metadata
    consolidated). The folder is written under a temporary name next to the target and renamed
    once complete, so a failure leaves nothing at ``path``. ``anndata.read_zarr`` reads it with
    no arguments.

    Examples
    --------
    >>> ds = distumap.io.open_store("out/store.zarr", require="embed")  # doctest: +SKIP
    >>> distumap.io.write_anndata_zarr(ds, "out/embedding.zarr")  # doctest: +SKIP
    'out/embedding.zarr'
    """
    return AnnDataZarrWriter().write(
        ds, path, block_cells=block_cells, progress=progress, client=client
    )


@dataclass(frozen=True)
class _Slices:
    """Where every block's values go in the 1-D CSR arrays, from the first pass's count."""

    token: str
    indptr: np.ndarray
    #: the first value of every block, and the end of the last
    offsets: np.ndarray
    chunk: int

    @property
    def total(self) -> int:
        return int(self.indptr[-1])

    @property
    def n_blocks(self) -> int:
        return len(self.offsets) - 1


def _slices(counts: da.Array, client, progress: bool) -> _Slices:
    """The first pass: every cell's nonzeros among the selected genes fix ``indptr``, where
    each block's values go and the zarr chunk of the CSR arrays."""
    token = tokenize(counts)
    if progress:
        print("distumap export: counting nonzeros", file=sys.stderr, flush=True)
    row_nnz = counts.map_blocks(
        _row_nnz, drop_axis=1, dtype=np.int64, name=f"anndata-zarr-nnz-{token}"
    )
    row_nnz = np.asarray(
        client.compute(row_nnz).result() if client is not None else row_nnz.compute()
    )
    indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    block_starts = [int(s) for s in np.cumsum((0, *counts.chunks[0]))]
    offsets = indptr[block_starts]
    chunk = _zarr_chunk(int(indptr[-1]), np.diff(offsets))
    return _Slices(token, indptr, offsets, chunk)


def _write_folder(
    local: str,
    small: dict[str, Any],
    gene_index: np.ndarray,
    uns: dict[str, Any],
    x_dtype: np.dtype,
    counts: da.Array,
    slices: _Slices,
    client,
    progress: bool,
) -> None:
    """The AnnData zarr at ``local`` but the graph: the small parts, then X and the layer by
    the workers."""
    import zarr

    root = zarr.open_group(local, mode="w", zarr_format=ZARR_FORMAT)
    el = ZarrElements(root)
    write_annotations(el, small, gene_index, uns, client=client)
    _create_csr(el, (counts.shape[0], int(gene_index.size)), x_dtype, slices)
    tasks = _write_tasks(counts, local, slices)
    if progress:
        print(f"distumap export: writing {slices.n_blocks} blocks", file=sys.stderr, flush=True)
    run(tasks, stage="export: anndata zarr blocks", client=client)


class _ZarrAppendable:
    """A 1-D zarr array that grows block by block, written from this process in order and in
    whole chunks (a small block does not rewrite a partly filled chunk)."""

    def __init__(self, el: ZarrElements, group, name: str, dtype):
        self.array = el.empty(group, name, (0,), dtype, (ZARR_GRAPH_CHUNK,))
        self.tail = np.empty(0, dtype=self.array.dtype)  # values after the last whole chunk

    def append(self, values: np.ndarray) -> None:
        values = np.concatenate([self.tail, np.asarray(values, dtype=self.array.dtype)])
        whole = len(values) - len(values) % ZARR_GRAPH_CHUNK
        self._write(values[:whole])
        self.tail = values[whole:]

    def close(self) -> None:
        self._write(self.tail)
        self.tail = self.tail[:0]

    def _write(self, values: np.ndarray) -> None:
        if len(values):
            start = self.array.shape[0]
            self.array.resize((start + len(values),))
            self.array[start:] = values


def _write_graph(local: str, target: str, ds: xr.Dataset, client, progress: bool) -> None:
    """``obsp["distances"]`` and ``obsp["connectivities"]``: the store's graph of all cells,
    its rows computed on the cluster in cell blocks and appended here in cell order; nothing
    (and one line) without one."""
    import zarr

    if not has_cell_graph(ds):
        report_no_graph(target, progress)
        return
    rows = graph_rows(ds, "anndata-zarr", client=client)
    el = ZarrElements(zarr.open_group(local, mode="r+", zarr_format=ZARR_FORMAT))

    def appendable(group, name: str, dtype) -> _ZarrAppendable:
        return _ZarrAppendable(el, group, name, dtype)

    write_obsp(el, ds.sizes["cell"], ds.sizes["cell_knn"], rows, appendable)


def _create_csr(el: ZarrElements, shape: tuple[int, int], x_dtype, slices: _Slices) -> None:
    """``X`` and ``layers["log2p1"]``: ``indptr`` written, ``data`` and ``indices`` left to the
    block tasks."""
    root = el.root
    n_cells, total, chunk = shape[0], slices.total, slices.chunk
    layers = el.group(root, "layers")
    for group, dtype in (
        (csr_group(el, root, "X", shape), x_dtype),
        (csr_group(el, layers, ANNDATA_LAYER, shape), np.float32),
    ):
        el.empty(group, "data", (total,), dtype, (chunk,))
        el.empty(group, "indices", (total,), np.int32, (chunk,))
        el.empty(group, "indptr", (n_cells + 1,), np.int64, (ZARR_CELL_CHUNK,))[...] = slices.indptr


def _write_tasks(counts: da.Array, local: str, slices: _Slices) -> list:
    """One task per block (``anndata-zarr-block``), one per shared chunk (``anndata-zarr-edge``)
    and a tiny one per block (``anndata-zarr-done``)."""
    pieces = counts.to_delayed().ravel()
    n_blocks, offsets, chunk, total = len(pieces), slices.offsets, slices.chunk, slices.total
    token = slices.token
    write_block = dask.delayed(_zarr_block, pure=True)
    blocks = [
        write_block(
            piece,
            i,
            n_blocks,
            local,
            int(offsets[i]),
            int(offsets[i + 1]),
            chunk,
            total,
            dask_key_name=(f"anndata-zarr-block-{token}", i),
        )
        for i, piece in enumerate(pieces)
    ]
    sharing: dict[int, list[int]] = defaultdict(list)
    for i in range(n_blocks):
        for k in _shared_chunks(int(offsets[i]), int(offsets[i + 1]), chunk, total):
            sharing[k].append(i)
    write_edge = dask.delayed(_zarr_shared_chunk, pure=True)
    done = dask.delayed(_done, pure=True)
    tasks = [
        write_edge(
            k,
            local,
            chunk,
            total,
            *(blocks[i] for i in owners),
            dask_key_name=(f"anndata-zarr-edge-{token}", k),
        )
        for k, owners in sorted(sharing.items())
    ]
    # a tiny result per block, so that no block's pieces are kept as a final result
    tasks += [
        done(block, dask_key_name=(f"anndata-zarr-done-{token}", i))
        for i, block in enumerate(blocks)
    ]
    return tasks


class AnnDataZarrWriter(Writer):
    """``*.zarr`` (AnnData zarr): :func:`write_anndata_zarr`; it needs the embedded store."""

    name = "anndata-zarr"
    suffixes = (".zarr",)
    takes_embedded = False
    workers_write = True  # the blocks of X and the layer

    def write(
        self,
        ds: xr.Dataset,
        path: str | os.PathLike,
        *,
        progress: bool = False,
        embedded: Future | None = None,
        block_cells: int | None = None,
        client=None,
    ) -> str:
        """See :func:`write_anndata_zarr`."""
        import zarr

        self.refuse_embedded(embedded)
        target = os.fspath(path)
        if is_url(target):
            raise ValueError(
                f"{target}: AnnData zarr is written to a file system path that the workers share"
            )
        check_replaceable(target, "anndata-zarr")
        self.check_workers(ds, target, client)
        small = anndata_inputs(ds)
        gene_index = selected_genes(ds)
        block_cells = cells_per_block(ds, block_cells)
        client = client if client is not None else current_client()
        counts = counts_in_blocks(ds, gene_index, block_cells)
        started = time.perf_counter()
        slices = _slices(counts, client, progress)
        params = export_params(
            "anndata-zarr", block_cells, chunk=slices.chunk, compression="blosc-zstd-3"
        )
        uns = {**uns_record(ds, params), **neighbors_uns(ds)}
        x_dtype = matrix_dtype(ds["counts"].dtype)

        local = partial_name(target)
        try:
            _write_folder(local, small, gene_index, uns, x_dtype, counts, slices, client, progress)
            _write_graph(local, target, ds, client, progress)
            zarr.consolidate_metadata(local, zarr_format=ZARR_FORMAT)
            replace_folder(local, target)
        finally:
            if os.path.exists(local):
                shutil.rmtree(local, ignore_errors=True)
        if progress:
            report_written(target, started)
        return target
