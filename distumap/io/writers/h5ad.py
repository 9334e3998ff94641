"""Write a finished store as ``.h5ad``, block by block, in anndata's on-disk format.

The cluster turns each cell block into the CSR pieces of ``X`` and of the ``log2p1`` layer and,
a group of blocks at a time, deflates their HDF5 chunks where the file puts them (the client
learns each block's nonzeros per row, which place the group); HDF5 takes one writer, so the
client appends the deflated chunks in cell order to resizable, chunked datasets, with a bounded
number of blocks in flight. No cell block is ever gathered into one ``AnnData`` in memory.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

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
    Stretch,
    block_tasks,
    block_written,
    blocks_in_flight,
    cells_per_block,
    counts_in_blocks,
    csr_deflated,
    deflate,
    deflate_group,
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
#: threads that deflate the rest of the h5ad's chunks on the client (ISA-L releases the GIL):
#: the graph's, ``indptr``'s and the chunks that straddle two groups of blocks
DEFLATE_THREADS = 2
#: raw bytes of the blocks computed ahead of the h5ad writer, at most (held on the workers
#: until their group's chunks are deflated)
IN_FLIGHT_RAW_BYTES = 2 * 2**30


def _h5ad_block(counts: np.ndarray, index: int, n_blocks: int):
    pieces = csr_pieces(counts)
    report("export", 1, n_blocks, block=index, step="h5ad")
    return pieces


class _Appendable:
    """A resizable 1-D HDF5 dataset that takes values block by block and stores them in whole
    chunks written raw: chunks deflated on the workers (:meth:`extend`), or here (:meth:`append`;
    ISA-L releases the GIL, unlike h5py's own filter); the last, partly filled chunk goes in
    padded when :meth:`close` is called."""

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

    def extend(self, stretch: Stretch) -> None:
        """Values that follow, their whole chunks deflated already (:func:`deflate_stretch` from
        where this dataset's values end), or none of them (raw values only: deflated here)."""
        if not stretch.chunks and not len(stretch.tail):
            self.append(stretch.head)
            return
        values = np.concatenate([self.tail, stretch.head])
        if len(values) not in (0, H5AD_CHUNK):
            raise ValueError("a stretch that does not start where the dataset's values end")
        self._write(values)  # the head finished the open chunk (or there was none)
        self._put(stretch.chunks, len(stretch.chunks) * H5AD_CHUNK)
        self.tail = stretch.tail

    def close(self) -> None:
        padded = np.zeros(-len(self.tail) % H5AD_CHUNK, dtype=self.tail.dtype)
        self._write(np.concatenate([self.tail, padded]), len(self.tail))
        self.tail = self.tail[:0]

    def _write(self, values: np.ndarray, size: int | None = None) -> None:
        offsets = range(0, len(values), H5AD_CHUNK)
        chunks = self.pool.map(
            lambda offset: deflate(values[offset : offset + H5AD_CHUNK], shuffle=self.shuffle),
            offsets,
        )
        self._put(chunks, len(values) if size is None else size)

    def _put(self, chunks, size: int) -> None:
        """Deflated whole chunks after the dataset's last, holding ``size`` values."""
        start = self.dataset.shape[0]
        if not size:
            return
        self.dataset.resize((start + size,))
        for i, chunk in enumerate(chunks):
            self.dataset.id.write_direct_chunk((start + i * H5AD_CHUNK,), chunk)


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
    This computes: the cluster reads every cell block, keeps the selected genes and turns them
    into CSR pieces of ``X`` (int32 counts) and ``layers["log2p1"]`` (float32, the same
    sparsity), one task per block (``h5ad-block``), and one task per group of blocks
    (``h5ad-deflate``, 16,384 cells) deflates their chunks of 256 Ki elements (ISA-L's level 1,
    counts and indices byte-shuffled) where the file puts them, once the client has each
    block's nonzeros per row; the client writes the chunks raw in cell order to resizable HDF5
    datasets, deflating only the chunks that straddle two groups, ``indptr`` and the graph
    (two threads). The layer's ``indices`` and ``indptr`` are hard links to ``X``'s, its
    sparsity. At most two groups' blocks (and 2 GiB of raw block data) are in flight, so no
    process's memory grows with the number of cells. ``obs`` holds the cell
    names, every metadata column (strings as categoricals) and ``landmark``; ``var`` the
    selected genes with ``zero_fraction`` (and ``gene_ids`` where the store has them);
    ``obsm["X_umap"]`` the embedding; ``uns["umap"]["params"]`` what ``scanpy.tl.umap`` keeps
    (``a``, ``b``, ``random_state``) and ``uns["distumap"]`` the stage records. When the embed
    refined, its graph of all cells goes where ``scanpy.pp.neighbors`` puts one:
    ``obsp["distances"]`` (each cell's nearest other cells, nearest first),
    ``obsp["connectivities"]`` (umap-learn's symmetrised fuzzy weights) and
    ``uns["neighbors"]``, their rows built on the cluster a block of cells at a time
    (``h5ad-graph-edges``, ``h5ad-graph-block``: no process holds the graph of all cells) and
    appended like ``X``; without it they stay empty, and with
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


def _x_streams(x_dtype) -> tuple:
    """X's and the layer's arrays of nonzeros in a block's CSR pieces
    (:func:`~distumap.io.writers._anndata_elements.csr_pieces`): index, dtype, byte shuffle."""
    return ((0, x_dtype, True), (1, np.float32, False), (2, np.int32, True))


def _here(results, streams: tuple):
    """Blocks' CSR pieces as :func:`csr_deflated` gives groups, their values raw (for
    :meth:`_Appendable.extend` to deflate here)."""
    empty = np.empty(0)
    for pieces in results:
        stretches = [
            Stretch(np.asarray(pieces[index], dtype=dtype), [], empty)
            for index, dtype, _ in streams
        ]
        yield [pieces[-1]], stretches


def _write_x_and_layer(
    el: H5Elements, shape, x_dtype, pool, groups, n_blocks: int, path, progress: bool
) -> None:
    """``X`` and ``layers["log2p1"]`` from the blocks' CSR pieces, appended in cell order
    (``groups`` from :func:`csr_deflated`, their whole chunks deflated on the workers, or from
    :func:`_here`, raw values deflated here)."""
    f = el.root
    x_group = csr_group(el, f, "X", shape)
    layer_group = csr_group(el, el.group(f, "layers"), ANNDATA_LAYER, shape)
    x_data = _Appendable(x_group, "data", x_dtype, True, pool)
    layer_data = _Appendable(layer_group, "data", np.float32, False, pool)
    indices = _Appendable(x_group, "indices", np.int32, True, pool)
    indptr = _Appendable(x_group, "indptr", np.int64, True, pool)
    # the layer has X's sparsity: its indices and indptr are the same two datasets (HDF5
    # hard links, which every reader follows), deflated once, not twice
    layer_group["indices"], layer_group["indptr"] = indices.dataset, indptr.dataset
    offset = np.zeros(1, dtype=np.int64)
    indptr.append(offset)
    i = 0
    for row_nnz, stretches in groups:
        for dataset, stretch in zip((x_data, layer_data, indices), stretches, strict=True):
            dataset.extend(stretch)
        for rows in row_nnz:
            ends = offset[-1] + np.cumsum(rows, dtype=np.int64)
            indptr.append(ends)
            if ends.size:
                offset = ends[-1:]
            block_written(path, i, n_blocks, progress)
            i += 1
    for dataset in (x_data, layer_data, indices, indptr):
        dataset.close()


def _write_graph(el: H5Elements, ds, client, pool, path, progress: bool) -> None:
    """``obsp["distances"]`` and ``obsp["connectivities"]``: the store's graph of all cells,
    appended in cell blocks like ``X``; nothing (and one line) without one."""
    if not has_cell_graph(ds):
        report_no_graph(path, progress)
        return
    rows = graph_rows(ds, "h5ad", client=client)

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
        blocks = block_tasks(counts, _h5ad_block, "h5ad-block-" + tokenize(counts))
        x_dtype = matrix_dtype(ds["counts"].dtype)
        streams = _x_streams(x_dtype)
        group = deflate_group(block_cells, block_bytes, IN_FLIGHT_RAW_BYTES)
        stage = "export: h5ad blocks"
        if client is None or len(blocks) <= 2 * group:
            # a few groups would leave the workers waiting on each other: this process
            # deflates the blocks' values as they come (two threads), while the workers compute
            groups = _here(
                export_blocks(
                    blocks, stage=stage, in_flight=in_flight, client=client, embedded=embedded
                ),
                streams,
            )
        else:
            groups = csr_deflated(
                blocks,
                streams,
                chunk=H5AD_CHUNK,
                group=group,
                name="h5ad-deflate-" + tokenize(counts),
                stage=stage,
                in_flight=in_flight,
                client=client,
                embedded=embedded,
            )
        shape = (ds.sizes["cell"], int(gene_index.size))

        deflating = ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="h5ad-deflate")
        with written_whole(target, progress=progress) as local, deflating as pool:
            with h5py.File(local, "w", libver="earliest") as f:
                el = H5Elements(f)
                _write_x_and_layer(el, shape, x_dtype, pool, groups, len(blocks), path, progress)
                # the rest needs the embedding: the embedded store, once the embed has finished
                if small is None:
                    ds = embedded_store(ds, embedded, gene_index)
                    small = anndata_inputs(ds)
                uns = {**uns_record(ds, params), **neighbors_uns(ds)}
                write_annotations(el, small, gene_index, uns, client=client)
                _write_graph(el, ds, client, pool, path, progress)
        return target
