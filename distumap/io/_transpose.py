"""Ingest of a genes-by-cells CSV or TSV (genes in rows, as most GEO files are), transposed into
the store's cell chunks with bounded memory.

A line holds one gene for every cell, so no cell chunk can be parsed from one byte range: the
matrix goes through an intermediate array on disk, in two passes that each touch every count once.

1. The header gives the cells (an empty first cell, as pandas writes ``df.T.to_csv()``, any
   other, or none, as R's ``write.table`` writes it); the line index (``index-csv-block`` tasks,
   as for cells-by-genes files) finds every gene line and gene name.
2. The skeleton: the store's as for cells-by-genes (coordinates, metadata, an empty ``counts``),
   the line index, the intermediate ``_progress/genes_by_cells`` (genes x cells, one zarr chunk per
   gene block and store chunk of cells) and the markers of both passes.
3. Pass 1: one ``parse-csv-gene-block`` task per block of gene lines parses them with the compiled
   kernel of the cells-by-genes ingest (a gene line is a row with one field per cell) and writes
   its rows of the intermediate. A block holds at most ``distumap.gene-block-bytes`` (64 MiB) of
   values. Gzip input is parsed by one sequential task.
4. Pass 2: one ``transpose-block`` task per store chunk reads its cells' columns of the
   intermediate (every gene) and writes them, transposed, into ``counts``.
5. The intermediate is deleted and the stage recorded complete.

Tasks never share a zarr chunk, and both passes mark their blocks through the one stage runner
(:class:`distumap._stage.Stage`; pass 1 has markers of its own, from ``Stage.pass_``), so an
interrupted ingest resumes where it stopped and never writes a block twice.

Measured on 2 busy cores (2 worker processes, 40,000 cells x 10,000 genes, 803 MB of CSV): the
two passes took 6.6-9.2 s with a peak of 0.64 GB per worker; ``dask.array.rechunk`` of the
parsed gene blocks into cell chunks took 10.7-11.0 s and 1.5 GB per worker with the p2p method
(its memory grows with the matrix; the "tasks" method holds the whole matrix), and pass 1
followed by a dask rechunk of the intermediate was slower than the explicit pass 2 (20,000 x
5,000: 3.4-4.4 s against 2.1-2.7 s). The cells-by-genes file of the same matrix took 2.1-3.9 s.
"""

from __future__ import annotations

import os

import numba
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from distumap import _config
from distumap._errors import InputError
from distumap._format import PROGRESS_GROUP
from distumap._stage import Stage, StagePass, mark_block
from distumap._store import absolute, create_progress, open_store, progress_array, store_url
from distumap.io import _csv
from distumap.io._ingest import (
    _block_buffer,
    _build_index,
    _claim,
    _is_gzip,
    _source_params,
    _stream_ranges,
    _view_range,
    checked_options,
    create_skeleton,
    read_header,
    read_metadata,
    unique_genes,
    warn_rounded,
    write_block,
)

__all__ = ["gene_block", "read_genes_by_cells"]

#: the intermediate genes x cells array, under the group xarray does not show
INTERMEDIATE = f"{PROGRESS_GROUP}/genes_by_cells"

#: the intermediate lives for one ingest, so it is compressed for speed: lz4 level 1 with bit
#: shuffling wrote and read synthetic counts twice as fast as the store's level 5 (1.2 and
#: 1.7 GB/s on one thread), 24 times smaller than raw int32 (level 5: 26)
INTERMEDIATE_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=4)

#: the markers (and progress events) of pass 1, one per gene block
GENE_MARKERS = "ingest_genes"


def gene_block(n_cells: int, dtype: str | np.dtype, n_genes: int) -> int:
    """Genes per pass-1 block: as many as fit in ``distumap.gene-block-bytes`` (at least one).
    A block is parsed in memory, so this bounds a worker's memory whatever the file's size; at
    20,000 cells x 5,000 genes 64 MiB was as fast as 256 MiB (more blocks to share out, fewer
    fresh pages) with 0.3 GB less at the peak per worker."""
    budget = int(_config.get("gene-block-bytes"))
    per_gene = max(1, n_cells) * np.dtype(dtype).itemsize
    return int(max(1, min(n_genes, budget // per_gene)))


def _read_cell_header(source: str) -> tuple[list[str], int, _csv.Dialect]:
    """Cell names, the offset where the gene lines begin, and the file's dialect."""
    cells, data_start, dialect = read_header(source, names="cell")
    first_column: dict[str, int] = {}
    for column, name in enumerate(cells, start=1 if dialect.r_header else 2):
        if name in first_column:
            raise InputError(
                f"{source}: line 1, column {column}: duplicate cell name {name!r} "
                f"(first in column {first_column[name]})"
            )
        first_column[name] = column
    return cells, data_start, dialect


def _check_gene_names(names: list[str], lines: np.ndarray, source: str) -> None:
    for name, line in zip(names, lines, strict=True):
        if not name:
            raise InputError(f"{source}: line {line}, column 1: empty gene name")


# ---------------------------------------------------------------- pass 1: gene blocks


def _parse_genes_into_store(
    buf: np.ndarray,
    rel_starts: np.ndarray,
    *,
    block: int,
    genes: tuple[int, int],
    store: str,
    source: str,
    line_numbers: np.ndarray,
    dialect: _csv.Dialect,
) -> int:
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r+")
    out = _block_buffer((len(rel_starts), intermediate.shape[1]), intermediate.dtype)
    parsed, status, error = _csv.parse_block(
        buf, rel_starts, intermediate.shape[1], out=out, sep=dialect.sep
    )
    if status:
        cells = zarr.open_array(store, path="cell", mode="r")
        _csv.raise_parse_error(
            status,
            error,
            buf,
            source=source,
            line_numbers=line_numbers,
            genes=cells[:],
            integer=intermediate.dtype.kind == "i",
            columns="cell",
            r_header=dialect.r_header,
        )
    intermediate[genes[0] : genes[1]] = parsed
    progress_array(store, "rounded")[block] = error[4]
    return genes[1] - genes[0]


def _parse_genes_task(
    store: str, source: str, block: int, genes_per_block: int, dialect: _csv.Dialect
) -> int:
    """Parse gene block ``block`` from its byte range into the intermediate."""
    line_start = progress_array(store, "line_start", mode="r")
    n_genes = line_start.shape[0] - 1
    first, last = block * genes_per_block, min((block + 1) * genes_per_block, n_genes)
    offsets = line_start[first : last + 1]
    view, offset = _view_range(source, int(offsets[0]), int(offsets[-1]))
    return _parse_genes_into_store(
        np.frombuffer(view, dtype=np.uint8),
        offsets[:-1] - offset,
        block=block,
        genes=(first, last),
        store=store,
        source=source,
        line_numbers=progress_array(store, "line_number", mode="r")[first:last],
        dialect=dialect,
    )


def _parse_genes_stream_task(
    store: str, source: str, genes_per_block: int, dialect: _csv.Dialect
) -> int:
    """Parse every unwritten gene block of a compressed file in one sequential pass."""
    done = progress_array(store, GENE_MARKERS, mode="r")[:]
    line_start = progress_array(store, "line_start", mode="r")[:]
    line_number = progress_array(store, "line_number", mode="r")[:]
    n_genes = line_start.shape[0] - 1
    todo = [int(b) for b in np.flatnonzero(~done)]
    bounds = {b: (b * genes_per_block, min((b + 1) * genes_per_block, n_genes)) for b in todo}
    ranges = [
        (int(line_start[first]), int(line_start[last]) if last < n_genes else -1)
        for first, last in bounds.values()
    ]
    total = 0
    for block, data in zip(todo, _stream_ranges(source, ranges), strict=True):
        first, last = bounds[block]
        genes = _parse_genes_into_store(
            np.frombuffer(data, dtype=np.uint8),
            line_start[first:last] - line_start[first],
            block=block,
            genes=(first, last),
            store=store,
            source=source,
            line_numbers=line_number[first:last],
            dialect=dialect,
        )
        mark_block(store, GENE_MARKERS, block, genes, n_genes)
        total += genes
    return total


# ---------------------------------------------------------------- pass 2: cell chunks


#: side of the square tiles of the transpose kernel: a 64 x 64 tile of int32 (16 KB) and its
#: transpose stay in L1 cache, where numpy's plain ``out[...] = a.T`` strides through memory
#: (measured on a 5,000 x 1,024 block: 7 ms, numpy 89 ms)
_TILE = 64


@numba.njit(nogil=True, cache=True)
def _transpose_into(source, out):  # pragma: no cover - compiled
    """``out[...] = source.T``, tile by tile."""
    n_rows, n_columns = source.shape
    for row0 in range(0, n_rows, _TILE):
        row1 = min(row0 + _TILE, n_rows)
        for column0 in range(0, n_columns, _TILE):
            column1 = min(column0 + _TILE, n_columns)
            for column in range(column0, column1):
                for row in range(row0, row1):
                    out[column, row] = source[row, column]


def _transpose_task(store: str, block: int, chunk_cells: int) -> int:
    """Write store chunk ``block``: its cells' columns of the intermediate, transposed, read one
    intermediate chunk at a time (memory: the store chunk and one intermediate chunk)."""
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    counts = zarr.open_array(store, path="counts", mode="r+")
    n_genes, n_cells = intermediate.shape
    genes_per_block = intermediate.chunks[0]
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, n_cells)
    out = _block_buffer((last - first, n_genes), counts.dtype)
    for start in range(0, n_genes, genes_per_block):
        stop = min(start + genes_per_block, n_genes)
        _transpose_into(intermediate[start:stop, first:last], out[:, start:stop])
    write_block(store, block, first, out)
    return last - first


# ---------------------------------------------------------------- the stage


def _intermediate(store: str) -> zarr.Array | None:
    try:
        return zarr.open_array(store, path=INTERMEDIATE, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return None


def _resumable(stage: Stage) -> bool:
    """Whether an interrupted ingest left a skeleton to trust: the stage's markers (written
    last), and the intermediate with its markers while any store chunk is unwritten."""
    if not stage.resumable():
        return False
    if not stage.pending():
        return True
    return stage.pass_(GENE_MARKERS).has_markers() and _intermediate(stage.store) is not None


def _write_skeleton(
    stage: Stage,
    source: str,
    header: tuple[list[str], int, _csv.Dialect],
    *,
    metadata: str | None,
    chunk_cells: int,
    dtype: str,
    progress: bool,
    stacklevel: int,
) -> None:
    """Index the gene lines and write the skeleton, the intermediate and both passes' markers.
    ``stacklevel``: the warnings' stacklevel as seen from this function."""
    store = stage.store
    cells, data_start, dialect = header
    index = _build_index(
        source, data_start, dialect.sep, progress=progress, stacklevel=stacklevel + 1
    )
    if not index["names"]:
        raise InputError(
            f"{source}: line 2: no gene lines after the header (it names {len(cells)} cells)"
        )
    _check_gene_names(index["names"], index["lines"], source)
    genes = unique_genes(index["names"], source, where="column 1", stacklevel=stacklevel + 1)
    columns = read_metadata(metadata, cells, stacklevel=stacklevel + 1) if metadata else {}
    create_skeleton(
        store,
        cells=cells,
        genes=genes,
        coords={name: ("cell", values) for name, values in columns.items()},
        chunk_cells=chunk_cells,
        params=stage.params,
    )
    n_cells, n_genes = len(cells), len(genes)
    per_block = gene_block(n_cells, dtype, n_genes)
    n_gene_blocks = -(-n_genes // per_block)
    data_end = index["size"] if index["size"] is not None else -1
    create_progress(store, "line_start", np.append(index["starts"], data_end).astype(np.int64))
    create_progress(store, "line_number", index["lines"].astype(np.int64))
    # float-written counts rounded, per gene block (pass 1 parses)
    create_progress(store, "rounded", np.zeros(n_gene_blocks, dtype=np.int64), chunks=1)
    group = zarr.open_group(store, mode="r+", use_consolidated=False).require_group(PROGRESS_GROUP)
    group.create_array(
        INTERMEDIATE.rsplit("/", 1)[1],
        shape=(n_genes, n_cells),
        dtype=dtype,
        chunks=(per_block, min(chunk_cells, n_cells)),
        compressors=[INTERMEDIATE_CODEC],
        fill_value=0,
        overwrite=True,
    )
    stage.pass_(GENE_MARKERS).create_markers(n_gene_blocks)
    # the stage's markers are the last thing the skeleton writes: with them, a resume trusts it
    stage.start(n_blocks=-(-n_cells // chunk_cells))


def read_genes_by_cells(
    matrix: str | os.PathLike,
    store: str | os.PathLike,
    *,
    metadata: str | os.PathLike | None = None,
    chunk_cells: int | None = None,
    dtype: str = "int32",
    overwrite: bool = False,
    progress: bool = False,
    stacklevel: int = 2,
) -> xr.Dataset:
    """Ingest a genes-by-cells CSV or TSV into a zarr store: the store a cells-by-genes file of
    the same matrix gives.

    Called by :func:`distumap.io.read` with ``orientation="genes-by-cells"``, whose parameters
    these are; ``stacklevel`` is :func:`distumap.io.read_csv`'s (``read`` passes 3, so that the
    warnings name its caller's line).

    Notes
    -----
    This computes, in two passes over the matrix (parse gene blocks into an intermediate array
    in the store, then write each cell chunk transposed), with memory bounded by one gene block
    (``distumap.gene-block-bytes``) or one store chunk per task. An interrupted ingest resumes.
    """
    source, store = absolute(matrix), store_url(store)
    chunk_cells = checked_options(chunk_cells, dtype)
    meta_source = absolute(metadata) if metadata is not None else None
    params = {
        **_source_params(source, meta_source, chunk_cells, dtype),
        "orientation": "genes-by-cells",
    }
    stage = _claim(store, params, overwrite=overwrite, progress=progress)
    if stage.finished:
        return open_store(store)
    header = _read_cell_header(source)
    if not _resumable(stage):
        _write_skeleton(
            stage,
            source,
            header,
            metadata=meta_source,
            chunk_cells=chunk_cells,
            dtype=dtype,
            progress=progress,
            stacklevel=stacklevel + 1,
        )
    if stage.pending():
        _parse_genes(stage, source, header[2])
        n_cells = zarr.open_array(store, path="counts", mode="r").shape[0]
        stage.run_blocks(
            _transpose_task,
            {block: ((store, block, chunk_cells), {}) for block in stage.pending()},
            key="transpose-block",
            label="ingest: transpose into cell chunks",
            total=n_cells,
        )
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    if _intermediate(store) is not None:
        del group[INTERMEDIATE]
    stage.complete(
        rounded=warn_rounded(store, source, stacklevel=stacklevel + 1),
        dialect=header[2].describe(),
    )
    return open_store(store)


def _parse_genes(stage: Stage, source: str, dialect: _csv.Dialect) -> None:
    """Pass 1: every gene block not yet marked, parsed into the intermediate."""
    store = stage.store
    intermediate = zarr.open_array(store, path=INTERMEDIATE, mode="r")
    genes_per_block = int(intermediate.chunks[0])
    genes_pass: StagePass = stage.pass_(GENE_MARKERS)
    if _is_gzip(source):
        genes_pass.run_sequential(
            _parse_genes_stream_task,
            store,
            source,
            genes_per_block,
            dialect,
            key="parse-csv-gzip-genes",
            label="ingest: parse gene lines (sequential, gzip)",
        )
        return
    pending = genes_pass.pending()
    genes_pass.run_blocks(
        _parse_genes_task,
        {block: ((store, source, block, genes_per_block, dialect), {}) for block in pending},
        key="parse-csv-gene-block",
        label="ingest: parse gene blocks",
        total=intermediate.shape[0],
    )
