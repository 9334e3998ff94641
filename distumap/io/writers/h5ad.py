"""Write a finished store as ``.h5ad``, block by block, in anndata's on-disk format.

HDF5 takes one writer, so the cluster does the expensive part and the client only writes finished
chunks with ``write_direct_chunk``, as the loom writer does. A first pass counts every cell's
nonzeros among the selected genes, which fixes ``indptr`` and where each value of ``X``, of the
``log2p1`` layer and of their ``indices`` goes. The 1-D datasets are cut into fixed-size HDF5
chunks that do not respect cell or block boundaries, so each task takes a run of whole chunks,
reads the cells whose values fall in it (the first and last of them shared with its neighbours)
and deflates every chunk of the run; no chunk has two writers or is read back. No cell block is
ever gathered into one ``AnnData`` in memory.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize

from distumap._compute import current_client
from distumap._format import ANNDATA_LAYER, check_replaceable
from distumap._progress import report
from distumap.io.writers._anndata_elements import (
    H5Elements,
    anndata_inputs,
    csr_group,
    csr_pieces,
    export_params,
    uns_record,
    write_annotations,
)
from distumap.io.writers._base import Writer
from distumap.io.writers._blocks import (
    DEFLATE_LEVEL,
    block_tasks,
    block_written,
    blocks_in_flight,
    cells_per_block,
    counts_in_blocks,
    deflate,
    export_blocks,
)
from distumap.io.writers._graph import (
    graph_rows,
    has_cell_graph,
    neighbors_uns,
    report_no_graph,
    write_obsp,
)
from distumap.io.writers._inputs import (
    embedded_store,
    matrix_dtype,
    require_variables,
    selected_genes,
)
from distumap.io.writers._target import written_whole

#: HDF5 chunk of the 1-D CSR datasets, in elements (1 MiB of int32)
H5AD_CHUNK = 2**18
#: threads that deflate the chunks the client still deflates (``indptr``, the graph; ISA-L
#: releases the GIL)
DEFLATE_THREADS = 2
#: raw bytes of the blocks computed ahead of the h5ad writer, at most
IN_FLIGHT_RAW_BYTES = 2 * 2**30
#: a task's run of chunks holds about this many typical blocks' nonzeros: the two blocks it
#: shares with its neighbours (and reads again) are then a small part of what it reads
SPAN_BLOCKS = 8


def _count_block(counts: np.ndarray, index: int, n_blocks: int) -> np.ndarray:
    """The first pass: every cell's nonzeros among the selected genes."""
    return np.count_nonzero(counts, axis=1).astype(np.int64)


@dataclass(frozen=True)
class _Span:
    """A run of whole chunks of the 1-D datasets that one task fills: values ``[lo, hi)``, of
    the cell blocks ``blocks`` (those with values there), which hold values ``[start, stop)``;
    the blocks whose last value it holds are ``done`` (each block is done in one span)."""

    lo: int
    hi: int
    blocks: tuple[int, ...]
    start: int
    stop: int
    done: range


def _spans(offsets: np.ndarray, chunk: int) -> list[_Span]:
    """The tasks of the second pass, from the first value of every block (and the end of the
    last), which the first pass fixes."""
    total, n_blocks = int(offsets[-1]), len(offsets) - 1
    if total == 0:
        return []
    block_nnz = np.diff(offsets)
    typical = float(np.median(block_nnz[block_nnz > 0]))
    step = max(1, round(SPAN_BLOCKS * typical / chunk)) * chunk
    spans, done = [], 0
    for lo in range(0, total, step):
        hi = min(lo + step, total)
        # the block that holds value lo (blocks without values hold none), to the first block
        # that starts at or past hi
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left"))
        blocks = tuple(b for b in range(first, last) if block_nnz[b])
        # a block is done once its last value is written; blocks without values at the end
        until = n_blocks if hi == total else int(np.searchsorted(offsets[1:], hi, "right"))
        start, stop = int(offsets[first]), int(offsets[last])
        spans.append(_Span(lo, hi, blocks, start, stop, range(done, until)))
        done = until
    return spans


def _block_pieces(counts: np.ndarray, index: int, n_blocks: int) -> tuple[np.ndarray, ...]:
    """A block's values of ``X``, of the layer and their indices (what a run of chunks takes:
    its memory then follows its values, not the dense blocks)."""
    return csr_pieces(counts)[:3]


def _deflate_span(
    span: _Span, chunk: int, n_blocks: int, x_dtype: np.dtype, *blocks: tuple[np.ndarray, ...]
) -> list[tuple[bytes, bytes, bytes]]:
    """Every chunk of ``span`` as ``(X data, layer data, indices)``, deflated as the HDF5
    datasets' filters would (``X``'s values and the indices byte-shuffled first); the last
    chunk of the datasets padded with zeros. ``blocks`` are the pieces of ``span.blocks``
    (:func:`_block_pieces`)."""
    data, layer, indices = (np.concatenate(kept) for kept in zip(*blocks, strict=True))
    if data.size != span.stop - span.start:
        raise RuntimeError(
            f"blocks {span.blocks[0]}-{span.blocks[-1]}: {data.size} nonzeros now, "
            f"{span.stop - span.start} when they were counted; the store changed during the "
            "export"
        )
    chunks = []
    for offset in range(span.lo - span.start, span.hi - span.start, chunk):
        parts = []
        for values, shuffle in (
            (data.astype(x_dtype, copy=False), True),
            (layer, False),
            (indices, True),
        ):
            part = values[offset : offset + chunk]
            if part.size < chunk:  # the datasets' last chunk, padded as HDF5 stores it
                part = np.concatenate([part, np.zeros(chunk - part.size, part.dtype)])
            parts.append(deflate(part, shuffle=shuffle))
        chunks.append(tuple(parts))
    for b in span.done:
        report("export", 1, n_blocks, block=b)
    return chunks


class _Appendable:
    """A resizable 1-D HDF5 dataset that takes values block by block and stores them in whole
    chunks, each deflated here (ISA-L releases the GIL, unlike h5py's own filter) and written
    raw; the last, partly filled chunk goes in padded when :meth:`close` is called. For the
    arrays the client builds in order: ``indptr`` and the neighbour graph."""

    def __init__(self, group, name: str, dtype, shuffle: bool, pool: ThreadPoolExecutor):
        self.pool = pool  # deflates a block's chunks side by side
        self.dataset = group.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            dtype=dtype,
            chunks=(H5AD_CHUNK,),
            compression="gzip",
            compression_opts=DEFLATE_LEVEL,
            shuffle=shuffle,
        )
        self.shuffle = shuffle
        self.tail = np.empty(0, dtype=self.dataset.dtype)  # values after the last whole chunk

    def append(self, values: np.ndarray) -> None:
        values = np.concatenate([self.tail, np.asarray(values, dtype=self.dataset.dtype)])
        whole = len(values) - len(values) % H5AD_CHUNK
        self._write(values[:whole])
        self.tail = values[whole:]

    def close(self) -> None:
        padded = np.zeros(-len(self.tail) % H5AD_CHUNK, dtype=self.tail.dtype)
        self._write(np.concatenate([self.tail, padded]), len(self.tail))
        self.tail = self.tail[:0]

    def _write(self, values: np.ndarray, size: int | None = None) -> None:
        start = self.dataset.shape[0]
        if not len(values):
            return
        self.dataset.resize((start + (len(values) if size is None else size),))
        offsets = range(0, len(values), H5AD_CHUNK)
        chunks = self.pool.map(
            lambda offset: deflate(values[offset : offset + H5AD_CHUNK], shuffle=self.shuffle),
            offsets,
        )
        for offset, chunk in zip(offsets, chunks, strict=True):
            self.dataset.id.write_direct_chunk((start + offset,), chunk)


def write_h5ad(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    block_cells: int | None = None,
    progress: bool = False,
    client=None,
    embedded: Future | None = None,
) -> str:
    """Write the selected genes' counts, log2(x+1), the embedding and the metadata as h5ad.

    Parameters
    ----------
    ds
        A store after the embed stage (:func:`distumap.io.open_store` with ``require="embed"``),
        with ``counts``, ``zero_fraction``, ``selected``, ``X_umap``, ``landmark`` and metadata
        columns as ``cell`` coordinates. Without ``selected`` every gene is written.
    path
        The target file, a local path or an fsspec URL (``s3://bucket/embedding.h5ad``).
    block_cells
        Cells per task. Defaults to the store's cell chunk. The file's contents do not depend
        on it.
    progress
        Print a line per written block to stderr.
    client
        The ``distributed.Client`` to compute on; defaults to the current client if there is
        one, else dask's configured (threaded) scheduler.
    embedded
        A :class:`concurrent.futures.Future` of the embedded store (what
        :func:`distumap.tl.umap` returns), for a caller that embeds while this writes: ``ds``
        then need only be preprocessed, ``X`` and the layer are written from it first, and the
        rest once ``embedded`` has its result. If it fails instead, so does the export, at the
        next block, leaving nothing at ``path``.

    Returns
    -------
    str
        ``path``, as given.

    Notes
    -----
    This computes, in two passes over the counts of the selected genes. First every cell's
    nonzeros (one task per block, ``h5ad-count``), which the client appends to ``indptr`` in
    cell order and which fix where each block's values go. Then the values of ``X`` (int32
    counts), ``layers["log2p1"]`` (float32, the same sparsity) and their ``indices``, in
    resizable HDF5 datasets of chunks of 256 Ki elements: one task per run of whole chunks
    (``h5ad-chunks``) takes the CSR pieces of the blocks whose values fall in it (one task per
    block, ``h5ad-block``; the first and last shared with its neighbours) and deflates every
    chunk of the run at ISA-L's level 1 (counts and indices byte-shuffled first,
    as HDF5's filters do); the client writes the finished chunks raw with
    ``write_direct_chunk``. The layer's ``indices`` and ``indptr`` are hard links to ``X``'s,
    its sparsity. At most two tasks per worker thread (and 2 GiB of raw block data) run ahead
    of the client, so its memory does not grow with the number of cells beyond a few bytes per
    block. ``obs`` holds the cell
    names, every metadata column (strings as categoricals) and ``landmark``; ``var`` the
    selected genes with ``zero_fraction`` (and ``gene_ids`` where the store has them);
    ``obsm["X_umap"]`` the embedding; ``uns["umap"]["params"]`` what ``scanpy.tl.umap`` keeps
    (``a``, ``b``, ``random_state``) and ``uns["distumap"]`` the stage records. When the embed
    refined, its graph of all cells goes where ``scanpy.pp.neighbors`` puts one:
    ``obsp["distances"]`` (each cell's nearest other cells, nearest first),
    ``obsp["connectivities"]`` (umap-learn's symmetrised fuzzy weights) and
    ``uns["neighbors"]``, built once on a worker (``h5ad-graph-index``) and appended in cell
    blocks like ``X`` (``h5ad-graph-block``); without it they stay empty, and with
    ``progress`` one line says so. A cell subset of a store with the graph is refused. The
    file is
    written under a temporary name next to the target (or locally, for a URL) and renamed (or
    uploaded) once complete, so a failure leaves nothing at ``path``. ``anndata.read_h5ad``
    reads it with no arguments.

    Examples
    --------
    >>> ds = distumap.io.open_store("out/store.zarr", require="embed")  # doctest: +SKIP
    >>> distumap.io.write_h5ad(ds, "out/embedding.h5ad")  # doctest: +SKIP
    'out/embedding.h5ad'
    """
    return H5adWriter().write(
        ds, path, block_cells=block_cells, progress=progress, client=client, embedded=embedded
    )


def _dataset(group, name: str, size: int, dtype, shuffle: bool):
    """A 1-D dataset of ``size`` values in HDF5 chunks of ``H5AD_CHUNK``, deflated, resizable
    (as anndata creates them), for whole chunks written raw."""
    return group.create_dataset(
        name,
        shape=(size,),
        maxshape=(None,),
        dtype=dtype,
        chunks=(H5AD_CHUNK,),
        compression="gzip",
        compression_opts=DEFLATE_LEVEL,
        shuffle=shuffle,
    )


def _write_x_and_layer(
    el: H5Elements,
    shape,
    x_dtype,
    pool,
    counts,
    export,
    path,
    progress: bool,
) -> None:
    """``X`` and ``layers["log2p1"]``: the first pass's counts give ``indptr`` (appended here
    in cell order) and where every block's values go; then the tasks of the second pass
    deflate whole chunks of ``data`` and ``indices``, written here raw."""
    f = el.root
    x_group = csr_group(el, f, "X", shape)
    layer_group = csr_group(el, el.group(f, "layers"), ANNDATA_LAYER, shape)
    indptr = _Appendable(x_group, "indptr", np.int64, True, pool)
    token = tokenize(counts, H5AD_CHUNK)
    n_blocks = counts.numblocks[0]
    indptr.append(np.zeros(1, dtype=np.int64))
    offsets = np.zeros(n_blocks + 1, dtype=np.int64)
    count_tasks = block_tasks(counts, _count_block, f"h5ad-count-{token}")
    for i, row_nnz in enumerate(export(count_tasks, "export: h5ad nonzeros")):
        ends = offsets[i] + np.cumsum(row_nnz, dtype=np.int64)
        indptr.append(ends)
        offsets[i + 1] = ends[-1] if ends.size else offsets[i]
    indptr.close()
    total = int(offsets[-1])
    x_data = _dataset(x_group, "data", total, x_dtype, True)
    layer_data = _dataset(layer_group, "data", total, np.float32, False)
    indices = _dataset(x_group, "indices", total, np.int32, True)
    # the layer has X's sparsity: its indices and indptr are the same two datasets (HDF5
    # hard links, which every reader follows), written once, not twice
    layer_group["indices"], layer_group["indptr"] = indices, indptr.dataset
    spans = _spans(offsets, H5AD_CHUNK)
    pieces = block_tasks(counts, _block_pieces, f"h5ad-block-{token}")
    deflate_span = dask.delayed(_deflate_span, pure=True)
    tasks = [
        deflate_span(
            span,
            H5AD_CHUNK,
            n_blocks,
            x_dtype,
            *(pieces[b] for b in span.blocks),
            dask_key_name=(f"h5ad-chunks-{token}", u),
        )
        for u, span in enumerate(spans)
    ]
    # a run's values, raw and deflated, bound what runs ahead of this writer
    span_bytes = 16 * max((span.stop - span.start for span in spans), default=0)
    results = export(tasks, "export: h5ad chunks", span_bytes)
    for span, chunks in zip(spans, results, strict=True):
        for j, (x_chunk, layer_chunk, index_chunk) in enumerate(chunks):
            offset = (span.lo + j * H5AD_CHUNK,)
            x_data.id.write_direct_chunk(offset, x_chunk)
            layer_data.id.write_direct_chunk(offset, layer_chunk)
            indices.id.write_direct_chunk(offset, index_chunk)
        for i in span.done:
            block_written(path, i, n_blocks, progress)
    if not spans:  # no values at all: every block is done
        for i in range(n_blocks):
            block_written(path, i, n_blocks, progress)


def _write_graph(
    el: H5Elements, ds, block_cells: int, in_flight: int, client, pool, path, progress: bool
) -> None:
    """``obsp["distances"]`` and ``obsp["connectivities"]``: the store's graph of all cells,
    appended in cell blocks like ``X``; nothing (and one line) without one."""
    if not has_cell_graph(ds):
        report_no_graph(path, progress)
        return
    rows = graph_rows(ds, block_cells, "h5ad", in_flight=in_flight, client=client)

    def appendable(group, name: str, dtype) -> _Appendable:
        # indices and pointers shuffle well; float weights and distances gain little
        return _Appendable(group, name, dtype, name != "data", pool)

    write_obsp(el, ds.sizes["cell"], ds.sizes["cell_knn"], rows, appendable)


class H5adWriter(Writer):
    """``*.h5ad``: :func:`write_h5ad`; it takes the embedding last."""

    name = "h5ad"
    suffixes = (".h5ad",)
    takes_embedded = True

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
        """See :func:`write_h5ad`."""
        import h5py

        target = os.fspath(path)
        check_replaceable(target, "h5ad")
        self.check_workers(ds, target, client)
        # refused before any block is computed: a store without what the export needs (or, without
        # ``embedded``, with clashing metadata columns)
        require_variables(ds, ("counts", "zero_fraction"))
        small = None if embedded else anndata_inputs(ds)
        gene_index = selected_genes(ds)
        block_cells = cells_per_block(ds, block_cells)
        client = client if client is not None else current_client()
        # dense raw size bounds a block's CSR pieces (12 bytes per nonzero at most)
        block_bytes = 12 * block_cells * gene_index.size
        in_flight = blocks_in_flight(client, block_bytes, IN_FLIGHT_RAW_BYTES)
        params = export_params("h5ad", block_cells, chunk=H5AD_CHUNK, compression="deflate-1")
        counts = counts_in_blocks(ds, gene_index, block_cells)

        def export(tasks: list, stage: str, task_bytes: int | None = None):
            ahead = in_flight
            if task_bytes:
                ahead = blocks_in_flight(client, task_bytes, IN_FLIGHT_RAW_BYTES)
            return export_blocks(
                tasks, stage=stage, in_flight=ahead, client=client, embedded=embedded
            )

        shape = (ds.sizes["cell"], int(gene_index.size))

        deflating = ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="h5ad-deflate")
        with written_whole(target, progress=progress) as local, deflating as pool:
            with h5py.File(local, "w", libver="earliest") as f:
                el = H5Elements(f)
                x_dtype = matrix_dtype(ds["counts"].dtype)
                _write_x_and_layer(el, shape, x_dtype, pool, counts, export, path, progress)
                # the rest needs the embedding: the embedded store, once the embed has finished
                if small is None:
                    ds = embedded_store(ds, embedded, gene_index)
                    small = anndata_inputs(ds)
                uns = {**uns_record(ds, params), **neighbors_uns(ds)}
                write_annotations(el, small, gene_index, uns)
                _write_graph(el, ds, block_cells, in_flight, client, pool, path, progress)
        return target
