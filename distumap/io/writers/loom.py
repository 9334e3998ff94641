"""Write a finished store as a loom file: blocks computed on the cluster, one HDF5 writer.

HDF5 takes one writer, so the cluster does the expensive part (selecting genes, log2(x+1),
byte-shuffling and deflating every HDF5 chunk) and the client only appends finished chunks with
``write_direct_chunk``, in cell order. The HDF5 chunk grid is aligned with the cell blocks, so a
block always maps to whole chunks and no chunk is ever read back or written twice. The cells' kNN
graph (``/col_graphs/KNN``), when asked for, travels the same way: k edges per cell, one graph
chunk per HDF5 chunk of cells. It is left out by default: loompy 3.0.8 slices a file's graphs
with ``np.in1d``, which NumPy 2.4 removed, so ``view`` and ``scan`` fail on any file that has one.

Every dataset is created extendable along its axis (unlimited ``maxshape``, as loompy creates
them), so loompy's ``add_columns``, ``add_loom`` and ``loompy.combine`` can grow the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from distumap._compute import current_client, results_in_order, run
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import (
    ATTR,
    LOOM_CELL,
    LOOM_COL_ATTRS,
    LOOM_EMBEDDING,
    LOOM_GENE,
    LOOM_KNN_GRAPH,
    LOOM_LANDMARK,
    LOOM_LAYER,
    LOOM_MATRIX,
    LOOM_RECORD,
    LOOM_SPEC_VERSION,
    LOOM_ZERO_FRACTION,
    check_replaceable,
)
from distumap._progress import report
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
from distumap.io.writers._cells import META, NAMES, ColumnWriter, cell_blocks, cell_columns
from distumap.io.writers._inputs import (
    EMBEDDED_VARIABLES,
    REP_PREFIX,
    cell_metadata,
    embedded_store,
    matrix_dtype,
    representation_arrays,
    representation_keys,
    require_variables,
    selected_genes,
    small_arrays,
)
from distumap.io.writers._target import written_whole
from distumap.pp import log2p1_values

#: HDF5 chunk shape (genes, cells): 512 x 256 x 4 bytes is 512 KiB before compression
CHUNK_GENES = 512
CHUNK_CELLS = 256
#: raw bytes (counts and layer) of the blocks computed ahead of the writer, at most
IN_FLIGHT_RAW_BYTES = 4 * 2**30
#: HDF5 chunk length of the row and column attributes (values along genes or cells)
ATTR_CHUNK = 65_536


def _encode_graph(
    knn_landmark: np.ndarray,
    knn_weight: np.ndarray,
    is_landmark: np.ndarray,
    first_cell: int,
    chunk_cells: int,
) -> list[tuple[bytes, bytes, bytes]]:
    """One cell block's kNN edges as compressed chunks of ``a``, ``b`` and ``w``.

    Cell ``c`` (a column index) has its k edges at ``c * k`` to ``c * k + k``, so one HDF5
    chunk of ``chunk_cells * k`` edges holds the edges of one chunk of cells; the last chunk is
    padded with zeros (beyond the dataset's end, never read).
    """
    n_cells, k = knn_landmark.shape
    # the store's graph names cells by their position in the store: in a cell subset of it
    # (``ds.isel(cell=...)``) those positions are no longer the file's columns
    targets = np.asarray(knn_landmark).ravel()
    if targets.size and (
        targets.min() < 0 or targets.max() >= len(is_landmark) or not is_landmark[targets].all()
    ):
        raise InputError(
            f"the kNN graph of cells {first_cell} to {first_cell + n_cells - 1} points at cells "
            "that are not landmarks of this dataset: is it a subset of a store's cells? Drop "
            "knn_landmark and knn_weight to export it without a graph"
        )
    cells = np.arange(first_cell, first_cell + n_cells, dtype=np.int32)
    columns = {
        "a": np.repeat(cells, k),
        "b": np.asarray(knn_landmark, dtype=np.int32).ravel(),
        "w": np.asarray(knn_weight, dtype=np.float32).ravel(),
    }
    size = chunk_cells * k
    chunks = []
    for start in range(0, n_cells * k, size):
        encoded = []
        for values in columns.values():
            piece = values[start : start + size]
            if len(piece) < size:
                piece = np.concatenate([piece, np.zeros(size - len(piece), piece.dtype)])
            encoded.append(deflate(piece, shuffle=True))
        chunks.append(tuple(encoded))
    return chunks


def _encode_block(
    counts: np.ndarray, index: int, n_blocks: int, chunk_shape: tuple[int, int]
) -> tuple[list[bytes], list[bytes]]:
    """One cell block (cells x selected genes, int32) as compressed loom chunks.

    Returns the chunks of ``/matrix`` and of ``/layers/log2p1``, row-major over the block's
    chunk grid. Edge chunks are padded to the full chunk shape, as HDF5 expects of a raw chunk
    write.
    """
    matrix = np.asarray(counts, dtype=matrix_dtype(counts.dtype)).T
    chunk_genes, chunk_cells = chunk_shape
    n_genes, n_cells = matrix.shape
    matrix_chunks, layer_chunks = [], []
    padded = np.zeros(chunk_shape, dtype=matrix.dtype)
    for g0 in range(0, n_genes, chunk_genes):
        for c0 in range(0, n_cells, chunk_cells):
            piece = matrix[g0 : g0 + chunk_genes, c0 : c0 + chunk_cells]
            if piece.shape != chunk_shape:
                padded[...] = 0
                padded[: piece.shape[0], : piece.shape[1]] = piece
                piece = padded
            matrix_chunks.append(deflate(piece, shuffle=True))
            log2p1 = log2p1_values(piece)
            # no shuffle here: log2(k + 1) takes few distinct 4-byte values, which deflate
            # finds whole; shuffled, the layer is half as large again and slower to compress
            layer_chunks.append(deflate(log2p1))
    report("export", 1, n_blocks, block=index, step="loom")
    return matrix_chunks, layer_chunks


def _loom_text(value: Any) -> str:
    """A string as loompy stores it: ASCII, other characters as XML character references.

    loompy reads strings back with ``html.unescape`` after dropping non-ASCII bytes, so UTF-8
    would lose characters; escaping ``&`` first makes the round trip exact.
    """
    text = "" if value is None else str(value)
    if text.isascii() and "&" not in text:
        return text
    return text.replace("&", "&amp;").encode("ascii", "xmlcharrefreplace").decode("ascii")


def _string_array(values: np.ndarray) -> np.ndarray:
    # loom 3.0.0 wants variable-length strings (h5py object dtype), not fixed-length bytes
    return np.array([_loom_text(v) for v in values.tolist()], dtype=object)


def _col_attr(values: np.ndarray) -> np.ndarray:
    """A metadata column as a loom-legal array: numbers stay numbers, the rest become str."""
    values = np.asarray(values)
    if values.dtype.kind == "b":
        return values.astype(np.uint8)
    if values.dtype.kind in "iuf":
        return values
    return _string_array(values)


def _loom_inputs(ds: xr.Dataset) -> dict[str, Any]:
    """The per-gene arrays of the loom file, computed together (they are small), its metadata
    columns and its lazy per-cell ``columns``
    (:func:`~distumap.io.writers._cells.cell_columns`)."""
    require_variables(ds, EMBEDDED_VARIABLES)
    metadata = cell_metadata(ds)
    # ingest renames such columns (distumap._format.metadata_name); a store written otherwise
    # is refused here, before any block is computed
    clashes = sorted({name.replace("/", "_") for name in metadata} & set(LOOM_COL_ATTRS))
    if clashes:
        raise InputError(f"metadata column(s) {clashes} clash with loom's own column attributes")
    # the representation the embed used (--use-rep) is a column attribute of its own name
    extra = representation_arrays(ds)
    taken = {name.replace("/", "_") for name in metadata} | set(LOOM_COL_ATTRS)
    clashes = sorted({name[len(REP_PREFIX) :].replace("/", "_") for name in extra} & taken)
    if clashes:
        raise InputError(f"the representation {clashes} clashes with a loom column attribute")
    small: dict[str, Any] = small_arrays(ds)
    small["metadata"] = metadata
    small["columns"] = cell_columns(ds, metadata, **extra)
    return small


def _block_cells(ds: xr.Dataset, block_cells: int | None) -> tuple[int, int]:
    """Cells per block and per HDF5 chunk; the block is a whole number of chunks."""
    block_cells = cells_per_block(ds, block_cells)
    chunk_cells = min(CHUNK_CELLS, block_cells)
    block_cells = -(-block_cells // chunk_cells) * chunk_cells
    return block_cells, chunk_cells


def _create_matrix(f, shape: tuple[int, int], dtype, chunk_shape: tuple[int, int]):
    """``/matrix`` and ``/layers/log2p1``, left to be filled with raw chunk writes."""
    # extendable along cells, the way loompy creates a matrix (maxshape (genes, None))
    common = dict(
        shape=shape,
        maxshape=(shape[0], None),
        chunks=chunk_shape,
        compression="gzip",
        compression_opts=DEFLATE_LEVEL,
        fillvalue=0,
    )
    matrix = f.create_dataset(LOOM_MATRIX, dtype=dtype, shuffle=True, **common)
    layer = f.create_group("layers").create_dataset(
        LOOM_LAYER, dtype=np.float32, shuffle=False, **common
    )
    return matrix, layer


def _create_annotations(
    f,
    small: dict[str, Any],
    gene_index: np.ndarray,
    chunk_shape: tuple[int, int],
    attrs: dict,
    knn: int,
):
    """Every group and dataset of the file but the matrix and the layer; the graph is left to be
    filled with raw chunk writes, the column attributes with the per-cell blocks. Returns the
    graph, a dict of ``a``, ``b``, ``w`` (or None when ``knn`` is 0), and the column
    attributes' writers by per-cell column."""
    import h5py

    columns = small["columns"]
    n_cells = int(columns[NAMES].shape[0])
    text = h5py.string_dtype("utf-8")

    def put(group, name: str, values: np.ndarray) -> None:
        # chunked and unlimited along the axis, so that loompy (or h5py) can extend it
        group.create_dataset(
            name,
            data=values,
            dtype=text if values.dtype == object else values.dtype,
            maxshape=(None, *values.shape[1:]),
            chunks=(min(max(len(values), 1), ATTR_CHUNK), *values.shape[1:]),
            compression="gzip",
            compression_opts=DEFLATE_LEVEL,
        )

    def per_cell(name: str, column: str, dtype, convert) -> None:
        # as put's, filled from the per-cell blocks by the writer returned
        width = tuple(int(n) for n in columns[column].shape[1:])
        rows = min(max(n_cells, 1), ATTR_CHUNK)
        node = cols.create_dataset(
            name.replace("/", "_"),
            shape=(n_cells, *width),
            dtype=dtype,
            maxshape=(None, *width),
            chunks=(rows, *width),
            compression="gzip",
            compression_opts=DEFLATE_LEVEL,
        )
        writers[column] = ColumnWriter(node, rows, convert)

    rows = f.create_group("row_attrs")
    put(rows, LOOM_GENE, _string_array(small["gene"][gene_index]))
    put(rows, LOOM_ZERO_FRACTION, small["zero_fraction"][gene_index].astype(np.float32))
    cols = f.create_group("col_attrs")
    writers: dict[str, ColumnWriter] = {}
    per_cell(LOOM_CELL, NAMES, text, _string_array)
    per_cell(LOOM_EMBEDDING, "X_umap", np.float32, lambda v: v.astype(np.float32))
    per_cell(LOOM_LANDMARK, "landmark", np.int8, lambda v: v.astype(np.int8))
    for name in small["metadata"]:
        # "/" separates HDF5 path components; a column "area/region" becomes "area_region"
        column = f"{META}{name}"
        kind = np.dtype(columns[column].dtype).kind
        if kind == "b":
            per_cell(name, column, np.uint8, lambda v: v.astype(np.uint8))
        elif kind in "iuf":
            per_cell(name, column, columns[column].dtype, None)
        else:
            per_cell(name, column, text, _string_array)
    for key, column in representation_keys(columns).items():
        per_cell(key, column, np.float32, lambda v: v.astype(np.float32))
    f.create_group("row_graphs")
    graphs = f.create_group("col_graphs")
    graph = None
    if knn:
        group = graphs.create_group(LOOM_KNN_GRAPH)
        graph = {
            name: group.create_dataset(
                name,
                shape=(n_cells * knn,),
                maxshape=(None,),
                chunks=(chunk_shape[1] * knn,),
                dtype=dtype,
                compression="gzip",
                compression_opts=DEFLATE_LEVEL,
                shuffle=True,
                fillvalue=0,
            )
            for name, dtype in (("a", np.int32), ("b", np.int32), ("w", np.float32))
        }
    globals_ = f.create_group("attrs")
    for key, value in attrs.items():
        globals_.create_dataset(key, data=_loom_text(value), dtype=text)
    return graph, writers


def _run_params(ds: xr.Dataset, params: dict[str, Any]) -> dict[str, str]:
    """Global attributes: the spec version, the date and the store's stage records as JSON."""
    record = json.loads(json.dumps(ds.attrs.get(ATTR, {}), default=str))
    record.setdefault("stages", {})["export"] = {"status": "complete", "params": params}
    attrs = {
        "LOOM_SPEC_VERSION": LOOM_SPEC_VERSION,
        "CreationDate": datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"),
        LOOM_RECORD: json.dumps(record, sort_keys=True),
    }
    if "version" in record:
        attrs["distumap_version"] = str(record["version"])
    for stage, content in record["stages"].items():
        attrs[f"distumap_{stage}_params"] = json.dumps(content.get("params", {}), sort_keys=True)
    return attrs


def _knn_arrays(ds: xr.Dataset, block_cells: int) -> tuple[da.Array, da.Array] | None:
    """The store's kNN graph (cell x knn) in blocks of ``block_cells``, or None without one."""
    if "knn_landmark" not in ds or "knn_weight" not in ds:
        return None
    arrays = []
    for name in ("knn_landmark", "knn_weight"):
        values = ds[name].transpose("cell", "knn").data
        if not isinstance(values, da.Array):
            values = da.from_array(np.asarray(values), chunks=(block_cells, -1))
        arrays.append(values.rechunk({0: block_cells, 1: -1}))
    return arrays[0], arrays[1]


def _blocks(ds: xr.Dataset, gene_index: np.ndarray, block_cells: int, chunk_shape):
    """One delayed task per cell block, keyed ``("loom-block-<token>", i)``."""
    counts = counts_in_blocks(ds, gene_index, block_cells)
    name = "loom-block-" + tokenize(counts, chunk_shape)
    return block_tasks(counts, _encode_block, name, chunk_shape)


def _graph_blocks(
    knn: tuple[da.Array, da.Array], is_landmark: np.ndarray, block_cells: int, chunk_cells: int
):
    """One delayed task per cell block of the graph, keyed ``("loom-graph-block-<token>", i)``."""
    neighbours, weights = (array.to_delayed().ravel() for array in knn)
    # every block checks its edges against the landmark mask: one shared key, not a copy
    landmarks = dask.delayed(is_landmark, pure=True)
    name = "loom-graph-block-" + tokenize(knn, is_landmark, chunk_cells)
    encode = dask.delayed(_encode_graph, pure=True)
    return [
        encode(
            neighbours[i],
            weights[i],
            landmarks,
            i * block_cells,
            chunk_cells,
            dask_key_name=(name, i),
        )
        for i in range(len(neighbours))
    ]


def knn_graph(ds: xr.Dataset) -> Any:
    """The store's kNN graph as the loom file holds it: a ``scipy.sparse.coo_matrix``.

    Parameters
    ----------
    ds
        A store after the embed stage, with ``knn_landmark`` and ``knn_weight``.

    Returns
    -------
    scipy.sparse.coo_matrix
        float32, cells x cells: row ``a`` (a cell), column ``b`` (one of its k nearest
        landmarks, as a cell index), value ``w`` (the membership weight), k edges per cell in
        cell order, nearest first; what ``loompy.connect(path).col_graphs["KNN"]`` returns.

    Notes
    -----
    Computes, and holds the whole graph in memory (12 bytes per edge): for tests and small
    stores. The loom writer streams it block by block instead.
    """
    from scipy import sparse

    if "knn_landmark" not in ds or "knn_weight" not in ds:
        raise IncompleteStoreError("the store has no kNN graph: run the embed stage again")
    neighbours, weights = dask.compute(
        ds["knn_landmark"].transpose("cell", "knn").data,
        ds["knn_weight"].transpose("cell", "knn").data,
    )
    n_cells, k = np.shape(neighbours)
    cells = np.repeat(np.arange(n_cells, dtype=np.int32), k)
    return sparse.coo_matrix(
        (
            np.asarray(weights, np.float32).ravel(),
            (cells, np.asarray(neighbours, np.int32).ravel()),
        ),
        shape=(n_cells, n_cells),
    )


def _write_block(
    matrix, layer, encoded, first_cell: int, block_cells: int, chunk_shape: tuple[int, int]
) -> None:
    """Write one block's finished chunks (from :func:`_encode_block`) with raw chunk writes."""
    matrix_chunks, layer_chunks = encoded
    n_genes, n_cells = matrix.shape
    chunk_genes, chunk_cells = chunk_shape
    last = min(first_cell + block_cells, n_cells)
    offsets = [
        (g0, c0)
        for g0 in range(0, n_genes, chunk_genes)
        for c0 in range(first_cell, last, chunk_cells)
    ]
    for offset, matrix_chunk, layer_chunk in zip(offsets, matrix_chunks, layer_chunks, strict=True):
        matrix.id.write_direct_chunk(offset, matrix_chunk)
        layer.id.write_direct_chunk(offset, layer_chunk)


def _write_graph_block(
    graph, encoded, first_cell: int, block_cells: int, chunk_cells: int, k: int
) -> None:
    """Write one block's graph chunks (from :func:`_encode_graph`) with raw chunk writes."""
    n_cells = graph["a"].shape[0] // k
    starts = range(first_cell, min(first_cell + block_cells, n_cells), chunk_cells)
    for c0, chunks in zip(starts, encoded, strict=True):
        for name, chunk in zip("abw", chunks, strict=True):
            graph[name].id.write_direct_chunk((c0 * k,), chunk)


def write_loom(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    block_cells: int | None = None,
    progress: bool = False,
    client=None,
    embedded: Future | None = None,
    graph: bool = False,
) -> str:
    """Write the selected genes' counts, log2(x+1), the embedding and the metadata as loom.

    Parameters
    ----------
    ds
        A store after the embed stage (``xarray.open_zarr`` of ``store.zarr``), with
        ``counts``, ``zero_fraction``, ``selected``, ``X_umap``, ``landmark`` and metadata
        columns as ``cell`` coordinates. Without ``selected`` every gene is written.
    path
        The target file, a local path or an fsspec URL (``s3://bucket/embedding.loom``).
    block_cells
        Cells per task. Defaults to the store's cell chunk; rounded up to a whole number of
        HDF5 chunks (256 cells). The file's contents do not depend on it.
    progress
        Print a line per written block to stderr.
    client
        The ``distributed.Client`` to compute on; defaults to the current client if there is
        one (unless dask's ``scheduler`` setting names another), else dask's configured
        (threaded) scheduler.
    embedded
        A :class:`concurrent.futures.Future` of the embedded store (what
        :func:`distumap.tl.umap` returns), for a caller that embeds while this writes: ``ds``
        then need only be preprocessed, the count layers are written from it first, and the
        rest once ``embedded`` has its result. If it fails instead, so does the export, at the
        next block, leaving nothing at ``path``.
    graph
        Write the cells' kNN graph (``knn_landmark`` and ``knn_weight``, which the embed stage
        writes) to ``/col_graphs/KNN``; a store without them gets no graph. Off by default:
        loompy 3.0.8 slices graphs with ``np.in1d``, which NumPy 2.4 removed, so its ``view``
        and ``scan`` fail on a file that has one. ``/row_graphs`` and ``/col_graphs`` exist
        either way.

    Returns
    -------
    str
        ``path``, as given.

    Notes
    -----
    This computes: every cell block is read, reduced to the selected genes, transformed and
    compressed on the cluster (tasks ``loom-block``), and the client writes the finished
    chunks in cell order with ``write_direct_chunk``, keeping at most two blocks per worker
    thread (and 4 GiB of raw block data) in flight. The HDF5 chunks are 512 genes x 256
    cells, deflated on the workers (ISA-L level 1; the counts byte-shuffled first): filters
    every HDF5 library has. The file is written under a temporary name next to the target (or
    locally, for a URL) and only renamed (or uploaded) once complete, so a failure leaves
    nothing at ``path``. Strings are variable-length, as loom 3.0.0 and
    ``loompy.LoomValidator`` expect, and ASCII with XML character references as loompy writes
    them (``loompy`` and ``anndata`` read them back exactly). The store's stage records go to
    ``/attrs`` as JSON.

    With ``graph``, ``/col_graphs/KNN`` holds k edges per cell in cell order (``a`` the
    cell's column, ``b`` its neighbour landmark's column, ``w`` the membership weight; int32,
    int32, float32), compressed on the cluster in cell blocks after the matrix (tasks
    ``loom-graph-block``).
    The matrix, layer, attributes and graph are all extendable along their axis (as loompy
    creates them), so loompy's ``add_columns``, ``add_loom`` and ``loompy.combine`` work on
    the file.

    Examples
    --------
    >>> ds = xr.open_zarr("out/store.zarr")  # doctest: +SKIP
    >>> distumap.io.write_loom(ds, "out/embedding.loom")  # doctest: +SKIP
    'out/embedding.loom'
    """
    return LoomWriter().write(
        ds,
        path,
        block_cells=block_cells,
        progress=progress,
        client=client,
        embedded=embedded,
        graph=graph,
    )


@dataclass(frozen=True)
class _Layout:
    """How a loom file is cut: the genes it writes, cells per block and per HDF5 chunk."""

    gene_index: np.ndarray
    n_cells: int
    block_cells: int
    chunk_cells: int

    @classmethod
    def of(cls, ds: xr.Dataset, gene_index: np.ndarray, block_cells: int | None) -> _Layout:
        block_cells, chunk_cells = _block_cells(ds, block_cells)
        return cls(gene_index, ds.sizes["cell"], block_cells, chunk_cells)

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return (min(CHUNK_GENES, self.gene_index.size), self.chunk_cells)


def _write_matrix(
    f, dtype, layout: _Layout, results: Iterator, n_blocks: int, path, progress: bool
) -> None:
    """``/matrix`` and ``/layers/log2p1`` from the blocks' encoded chunks, in cell order."""
    shape = (layout.gene_index.size, layout.n_cells)
    matrix, layer = _create_matrix(f, shape, dtype, layout.chunk_shape)
    block_cells, chunk_shape = layout.block_cells, layout.chunk_shape
    for i, encoded in enumerate(results):
        _write_block(matrix, layer, encoded, i * block_cells, block_cells, chunk_shape)
        block_written(path, i, n_blocks, progress)


def _write_the_rest(
    f,
    ds: xr.Dataset,
    small: dict[str, Any],
    layout: _Layout,
    in_flight: int,
    client,
    graph: bool,
) -> None:
    """Everything the embedding gives: the attributes, the groups and, if asked, the kNN
    graph."""
    attrs = _run_params(
        ds,
        {
            "block_cells": layout.block_cells,
            "chunks": list(layout.chunk_shape),
            "compression": f"deflate-{DEFLATE_LEVEL}",
            "shuffle": "matrix",
            "graph": graph,
        },
    )
    knn = _knn_arrays(ds, layout.block_cells) if graph else None
    k = 0 if knn is None else knn[0].shape[1]
    edges, writers = _create_annotations(f, small, layout.gene_index, layout.chunk_shape, attrs, k)
    for block in cell_blocks(small["columns"], client=client):
        for name, writer in writers.items():
            writer.append(block[name])
    for writer in writers.values():
        writer.close()
    if knn is None:
        return
    (is_landmark,) = run([ds["landmark"].data], stage="export: loom graph", client=client)
    is_landmark = np.asarray(is_landmark, dtype=bool)
    block_cells, chunk_cells = layout.block_cells, layout.chunk_cells
    graph_blocks = _graph_blocks(knn, is_landmark, block_cells, chunk_cells)
    for i, encoded in enumerate(
        results_in_order(
            graph_blocks, stage="export: loom graph", in_flight=in_flight, client=client
        )
    ):
        _write_graph_block(edges, encoded, i * block_cells, block_cells, chunk_cells, k)


class LoomWriter(Writer):
    """``*.loom``: :func:`write_loom`; it takes the embedding last."""

    name = "loom"
    suffixes = (".loom",)
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
        graph: bool = False,
    ) -> str:
        """See :func:`write_loom`."""
        import h5py

        target = os.fspath(path)
        check_replaceable(target, "loom")
        self.check_workers(ds, target, client)
        # refused before any block is computed: a store without what the export needs (or, without
        # ``embedded``, with metadata columns loom cannot hold)
        require_variables(ds, ("counts", "zero_fraction"))
        small = None if embedded else _loom_inputs(ds)
        layout = _Layout.of(ds, selected_genes(ds), block_cells)
        client = client if client is not None else current_client()
        # the raw-size cap bounds what finished (compressed) blocks can hold on the client
        block_bytes = 8 * layout.block_cells * layout.gene_index.size
        in_flight = blocks_in_flight(client, block_bytes, IN_FLIGHT_RAW_BYTES)
        blocks = _blocks(ds, layout.gene_index, layout.block_cells, layout.chunk_shape)
        results = export_blocks(
            blocks,
            stage="export: loom blocks",
            in_flight=in_flight,
            client=client,
            embedded=embedded,
        )
        dtype = matrix_dtype(ds["counts"].dtype)

        with written_whole(target, progress=progress) as local:
            with h5py.File(local, "w", libver="earliest") as f:
                _write_matrix(f, dtype, layout, results, len(blocks), path, progress)
                # the rest needs the embedding: the embedded store, once the embed has finished
                if small is None:
                    ds = embedded_store(ds, embedded, layout.gene_index)
                    small = _loom_inputs(ds)
                _write_the_rest(f, ds, small, layout, in_flight, client, graph)
        return target
