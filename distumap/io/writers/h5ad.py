"""Write a finished store as ``.h5ad``, block by block, in anndata's on-disk format.

HDF5 takes one writer, so the cluster does the expensive part and the client only writes finished
chunks with ``write_direct_chunk``, as the loom writer does. Each cell block's CSR pieces are
built once, on a worker, and stay there; the client learns only the nonzeros of its rows, which
extend ``indptr`` and fix where the block's values go. The 1-D datasets of ``X``, the
``log2p1`` layer and their ``indices`` are cut into fixed-size HDF5 chunks that respect no cell
or block boundary, so once the places of a run of whole chunks are known, one task takes the
pieces of the blocks whose values fall in it and deflates every chunk of the run; no chunk has
two writers or is read back, and the counts are read once. No cell block is ever gathered into
one ``AnnData`` in memory.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections import deque
from collections.abc import Iterator
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
    BESIDE_THE_EMBED,
    DEFLATE_LEVEL,
    block_tasks,
    block_written,
    blocks_in_flight,
    cells_per_block,
    counts_in_blocks,
    deflate,
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


class _Spans:
    """Cuts the 1-D datasets into runs of whole chunks as the blocks' nonzeros arrive in cell
    order: a run is given as soon as the places of its values are known (at least one chunk's
    worth past the previous run), so that a block's pieces wait for no more than the next
    chunk boundary."""

    def __init__(self, chunk: int, n_blocks: int):
        self.chunk, self.n_blocks = chunk, n_blocks
        self.offsets = [0]  # the first value of every block so far, and the end of the last
        self.lo = 0  # the first value not yet in a run
        self.done = 0  # the first block not yet done

    def add(self, nnz: int) -> list[_Span]:
        """The runs that block ``len(offsets) - 1``'s ``nnz`` values complete."""
        self.offsets.append(self.offsets[-1] + int(nnz))
        hi = self.offsets[-1] // self.chunk * self.chunk
        return [self._span(hi)] if hi > self.lo else []

    def finish(self) -> list[_Span]:
        """The last run (its last chunk partly filled), once every block has arrived."""
        return [self._span(self.offsets[-1])] if self.offsets[-1] > self.lo else []

    def _span(self, hi: int) -> _Span:
        offsets = self.offsets
        # the block that holds value lo (blocks without values hold none), to the first block
        # that starts at or past hi
        first = bisect.bisect_right(offsets, self.lo) - 1
        last = bisect.bisect_left(offsets, hi)
        blocks = tuple(b for b in range(first, last) if offsets[b + 1] > offsets[b])
        # the blocks whose every value lies below hi (those without values at the end too)
        until = bisect.bisect_right(offsets, hi) - 1
        span = _Span(self.lo, hi, blocks, offsets[first], offsets[last], range(self.done, until))
        self.lo, self.done = hi, until
        return span


def _block_pieces(counts: np.ndarray, index: int, n_blocks: int) -> tuple[np.ndarray, ...]:
    """A block's CSR pieces (:func:`csr_pieces`), held on its worker until the runs of chunks
    that hold its values have taken them."""
    return csr_pieces(counts)


def _row_nnz(pieces: tuple[np.ndarray, ...]) -> np.ndarray:
    return pieces[3]


def _deflate_span(
    chunk: int, n_blocks: int, x_dtype: np.dtype, span: _Span, *blocks: tuple[np.ndarray, ...]
) -> list[tuple[bytes, bytes, bytes]]:
    """Every chunk of ``span`` as ``(X data, layer data, indices)``, deflated as the HDF5
    datasets' filters would (``X``'s values and the indices byte-shuffled first); the last
    chunk of the datasets padded with zeros. ``blocks`` are the pieces of ``span.blocks``
    (:func:`_block_pieces`)."""
    data, layer, indices = (
        np.concatenate([pieces[which] for pieces in blocks]) for which in range(3)
    )
    if data.size != span.stop - span.start:
        raise RuntimeError(
            f"blocks {span.blocks[0]}-{span.blocks[-1]}: {data.size} nonzeros, "
            f"{span.stop - span.start} expected"
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
        report("export", 1, n_blocks, block=b, step="h5ad")
    return chunks


def _pipeline_local(blocks: list, spans: _Spans, deflate_span, in_flight: int) -> Iterator:
    """:func:`_pipeline` with dask's local scheduler: blocks computed here, a batch at a time,
    runs deflated here."""
    held: dict[int, tuple] = {}
    for start in range(0, len(blocks), in_flight):
        computed = dask.compute(*blocks[start : start + in_flight])
        for i, pieces in enumerate(computed, start):
            held[i] = pieces
            yield "rows", pieces[3]
            for span in spans.add(pieces[0].size):
                yield "span", span, deflate_span(span, *(held[b] for b in span.blocks))
                for b in span.done:
                    held.pop(b, None)
    for span in spans.finish():
        yield "span", span, deflate_span(span, *(held[b] for b in span.blocks))


def _pipeline(
    blocks: list,
    spans: _Spans,
    deflate_span,
    *,
    token: str,
    in_flight: int,
    client,
    priority: int,
    check,
) -> Iterator:
    """Events in cell order: ``("rows", row_nnz)`` for every block, ``("span", span, chunks)``
    for every run of deflated chunks. Every block is read once: its pieces stay on its worker
    until the runs that hold its values have been submitted, at most ``in_flight`` blocks
    being computed ahead; at most ``in_flight`` runs are waiting for this writer. ``check()`` runs
    before every event (it raises to stop)."""
    from distumap._compute import Watchdog, own_graphs, wait_result

    if client is None:
        yield from _pipeline_local(blocks, spans, deflate_span, in_flight)
        return
    blocks = own_graphs(blocks)
    stage = "export: h5ad"
    watchdog = Watchdog(client, stage)
    held: dict = {}  # block -> the future of its pieces, until its runs are submitted
    rows: deque = deque()  # the futures of the blocks' row nonzeros, in order
    runs: deque = deque()  # (span, future of its chunks), in order
    submitted, n_runs = 0, 0
    options = {"priority": priority, "retries": 2, "pure": False}

    def submit_runs(new: list[_Span]) -> None:
        nonlocal n_runs
        for span in new:
            arguments = [held[b] for b in span.blocks]
            key = f"h5ad-chunks-{token}-{n_runs}"
            runs.append((span, client.submit(deflate_span, span, *arguments, key=key, **options)))
            n_runs += 1
            for b in span.done:
                held.pop(b, None)  # its run holds it now, as long as it needs it

    try:
        for _ in range(len(blocks)):
            # the blocks whose nonzeros are not known yet; those known wait in ``held`` for
            # the next chunk boundary (less than a chunk of values), or for their run
            while submitted < len(blocks) and len(rows) < in_flight:
                future = client.compute(blocks[submitted], retries=2, priority=priority)
                held[submitted] = future
                key = f"h5ad-count-{token}-{submitted}"
                rows.append(client.submit(_row_nnz, future, key=key, **options))
                submitted += 1
            row_nnz = wait_result(rows.popleft(), watchdog, stage, client)
            check()
            yield "rows", row_nnz
            submit_runs(spans.add(int(row_nnz.sum())))
            while runs and (len(runs) > in_flight or runs[0][1].done()):
                span, future = runs.popleft()
                yield "span", span, wait_result(future, watchdog, stage, client)
        submit_runs(spans.finish())
        while runs:
            span, future = runs.popleft()
            result = wait_result(future, watchdog, stage, client)
            check()
            yield "span", span, result
    finally:
        for future in [*held.values(), *rows, *(future for _, future in runs)]:
            future.cancel()


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
    This computes, reading the counts of the selected genes once: one task per cell block
    (``h5ad-block``) builds its CSR pieces of ``X`` (int32 counts) and ``layers["log2p1"]``
    (float32, the same sparsity) and keeps them on its worker; a tiny task (``h5ad-count``)
    sends the client the nonzeros of its rows, which it appends to ``indptr`` in cell order.
    The values and ``indices`` go to resizable HDF5 datasets of chunks of 256 Ki elements: as
    soon as the places of a run of whole chunks are known, one task (``h5ad-chunks``) takes the
    pieces of the blocks whose values fall in it and deflates every chunk of the run at ISA-L's
    level 1 (counts and indices byte-shuffled first, as HDF5's filters do); the client writes
    the finished chunks raw with ``write_direct_chunk``. The layer's ``indices`` and
    ``indptr`` are hard links to ``X``'s, its sparsity. At most two blocks per worker thread
    (and 2 GiB of raw block data) are computed ahead of the client, and a block's pieces wait
    on its worker for no more than the next chunk boundary, so memory does not grow with the
    number of cells beyond a few bytes per
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


def _dataset(group, name: str, dtype, shuffle: bool):
    """An empty 1-D dataset in HDF5 chunks of ``H5AD_CHUNK``, deflated, resizable (as anndata
    creates them), for whole chunks written raw."""
    return group.create_dataset(
        name,
        shape=(0,),
        maxshape=(None,),
        dtype=dtype,
        chunks=(H5AD_CHUNK,),
        compression="gzip",
        compression_opts=DEFLATE_LEVEL,
        shuffle=shuffle,
    )


def _write_x_and_layer(
    el: H5Elements, shape, x_dtype, pool, counts, pipeline, path, progress: bool
) -> None:
    """``X`` and ``layers["log2p1"]``: ``indptr`` appended here in cell order as the blocks'
    nonzeros arrive, ``data`` and ``indices`` written raw as the runs of chunks arrive, deflated
    on the workers."""
    f = el.root
    n_cells = shape[0]
    x_group = csr_group(el, f, "X", shape)
    layer_group = csr_group(el, el.group(f, "layers"), ANNDATA_LAYER, shape)
    indptr = _Appendable(x_group, "indptr", np.int64, True, pool)
    # the values' datasets grow as the runs arrive (the last run sets their final size)
    x_data = _dataset(x_group, "data", x_dtype, True)
    layer_data = _dataset(layer_group, "data", np.float32, False)
    indices = _dataset(x_group, "indices", np.int32, True)
    # the layer has X's sparsity: its indices and indptr are the same two datasets (HDF5
    # hard links, which every reader follows), written once, not twice
    layer_group["indices"], layer_group["indptr"] = indices, indptr.dataset
    n_blocks = counts.numblocks[0]
    token = tokenize(counts, H5AD_CHUNK)
    blocks = block_tasks(counts, _block_pieces, f"h5ad-block-{token}")

    deflate_span = functools.partial(_deflate_span, H5AD_CHUNK, n_blocks, x_dtype)
    end, written = 0, 0
    indptr.append(np.zeros(1, dtype=np.int64))
    for event in pipeline(blocks, _Spans(H5AD_CHUNK, n_blocks), deflate_span, token):
        if event[0] == "rows":
            ends = end + np.cumsum(event[1], dtype=np.int64)
            indptr.append(ends)
            end = int(ends[-1]) if ends.size else end
            continue
        _, span, chunks = event
        for dataset in (x_data, layer_data, indices):
            dataset.resize((span.hi,))
        for j, (x_chunk, layer_chunk, index_chunk) in enumerate(chunks):
            offset = (span.lo + j * H5AD_CHUNK,)
            x_data.id.write_direct_chunk(offset, x_chunk)
            layer_data.id.write_direct_chunk(offset, layer_chunk)
            indices.id.write_direct_chunk(offset, index_chunk)
        for i in span.done:
            block_written(path, i, n_blocks, progress)
        written = span.done.stop
    indptr.close()
    if len(indptr.dataset) != n_cells + 1:
        raise RuntimeError(f"indptr: {len(indptr.dataset)} of {n_cells + 1} values")
    # blocks without values after the last run's (every block, in a matrix of zeros)
    for i in range(written, n_blocks):
        report("export", 1, n_blocks, block=i, step="h5ad")
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

        def pipeline(blocks: list, spans: _Spans, deflate_span, token: str) -> Iterator:
            if embedded is not None and embedded.done() and embedded.exception() is not None:
                raise embedded.exception()  # an embed that has already failed: nothing runs

            def check() -> None:  # the embed's failure stops the export at the next event
                if embedded is not None and embedded.done() and embedded.exception() is not None:
                    raise embedded.exception()

            priority = BESIDE_THE_EMBED if embedded is not None else 0
            return _pipeline(
                blocks,
                spans,
                deflate_span,
                token=token,
                in_flight=in_flight,
                client=client,
                priority=priority,
                check=check,
            )

        shape = (ds.sizes["cell"], int(gene_index.size))

        deflating = ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="h5ad-deflate")
        with written_whole(target, progress=progress) as local, deflating as pool:
            with h5py.File(local, "w", libver="earliest") as f:
                el = H5Elements(f)
                x_dtype = matrix_dtype(ds["counts"].dtype)
                _write_x_and_layer(el, shape, x_dtype, pool, counts, pipeline, path, progress)
                # the rest needs the embedding: the embedded store, once the embed has finished
                if small is None:
                    ds = embedded_store(ds, embedded, gene_index)
                    small = anndata_inputs(ds)
                uns = {**uns_record(ds, params), **neighbors_uns(ds)}
                write_annotations(el, small, gene_index, uns)
                _write_graph(el, ds, block_cells, in_flight, client, pool, path, progress)
        return target
