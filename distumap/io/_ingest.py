"""Ingest: a count-matrix CSV becomes a chunked, compressed zarr store, parsed in parallel.

1. The header gives the genes. Parallel ``index-csv-block`` tasks find every line start and sample
   name in byte ranges of the file (one offset and one name per cell: small).
2. The store's skeleton is written: coordinates, metadata, an empty ``counts`` array chunked by
   ``chunk_cells`` cells, and the line index (so that a resumed ingest never reads the index again).
3. One ``parse-csv-block`` task per store chunk reads exactly that chunk's bytes, parses them with
   a compiled kernel into int32, writes the chunk and sets the chunk's marker. Tasks never share a
   chunk, so there are no write races and any block can be redone alone; a block whose marker is
   set is skipped, so re-running (or a retried task) never writes a block twice.
"""

from __future__ import annotations

import gzip
import itertools
import mmap
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import fsspec
import numba
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec

from distumap import _config
from distumap._compute import run
from distumap._errors import InputError
from distumap._format import ATTR, FORMAT_VERSION, NONZERO, PROGRESS_GROUP, metadata_name
from distumap._stage import Stage, mark_block
from distumap._store import (
    absolute,
    create_progress,
    is_store,
    occupied,
    open_store,
    progress_array,
    stage_record,
    store_url,
)
from distumap.io import _csv

#: count compression: lz4 with bit shuffling suits sparse small integers; measured on 50,281-gene
#: blocks it writes ~870 MB/s of int32 on one thread (zstd-1: ~560 MB/s, 40% smaller files)
COUNTS_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)

_buffers = threading.local()


#: what the store's ``counts`` may hold: counts, or (``--dtype float32``) normalised values
DTYPES = ("int32", "float32")


def _block_buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer for parsed blocks: fresh 200 MB allocations cost page faults that
    make the parse three times slower."""
    buf = getattr(_buffers, "counts", None)
    if buf is None or buf.size < shape[0] * shape[1] or buf.dtype != dtype:
        buf = _buffers.counts = np.empty(shape[0] * shape[1], dtype=dtype)
    return buf[: shape[0] * shape[1]].reshape(shape)


def _is_gzip(source: str) -> bool:
    return source.endswith(".gz")


def _open_raw(source: str):
    return fsspec.open(source, "rb").open()


def _open_text_stream(source: str):
    """A binary stream of the (decompressed) file."""
    raw = _open_raw(source)
    return gzip.GzipFile(fileobj=raw, mode="rb") if _is_gzip(source) else raw


def _read_range(source: str, start: int, stop: int) -> bytearray:
    """Bytes ``[start, stop)`` of an uncompressed file (fewer at its end)."""
    buf = bytearray(max(0, stop - start))
    with _open_raw(source) as f:
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


def _local_path(source: str) -> str | None:
    """The path of ``source`` if it is a local file (which can be memory-mapped), else None."""
    fs, path = fsspec.core.url_to_fs(source)
    return path if isinstance(fs, LocalFileSystem) else None


def _view_range(source: str, start: int, stop: int) -> tuple[mmap.mmap | bytearray, int]:
    """Bytes from at most ``start`` to ``stop`` of an uncompressed file, and the file offset of
    the first one.

    A local file is memory-mapped read-only (from ``start`` rounded down to the mapping
    granularity): the page cache is searched and parsed in place, with no copy and no fresh
    allocation, which more than halves the cost of reading. Other file systems are read.
    """
    path = _local_path(source)
    if path is None or stop <= start:
        return _read_range(source, start, stop), start
    offset = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), stop - offset, offset=offset, access=mmap.ACCESS_READ)
    return view, offset


def first_lines(source: str) -> tuple[bytes, bytes | None]:
    """The header line and the first data line (the first non-blank one after it; None when
    there is none): what the separator and the header's layout are decided from."""
    with _open_text_stream(source) as f:
        line = f.readline()
        while True:
            data = f.readline()
            if not data:
                return line, None
            if data.rstrip(b"\n").rstrip(b"\r"):
                return line, data


def read_header(source: str, *, names: str = "gene") -> tuple[list[str], int, _csv.Dialect]:
    """The names in the header (genes; with ``names="cell"``, the cells of a genes-by-cells
    file), the offset where the data lines begin, and the file's dialect."""
    line, data_line = first_lines(source)
    dialect = _csv.detect_dialect(line, data_line)
    named = _csv.parse_header(line, source, dialect.sep, names=names, r_header=dialect.r_header)
    if not line.endswith(b"\n"):
        what = "cells" if names == "gene" else "genes"
        raise InputError(f"{source}: line 1: the header is the whole file; there are no {what}")
    return named, len(line), dialect


# ---------------------------------------------------------------- the line index


def _index_task(source: str, begin: int, end: int, size: int, sep: int) -> _csv.BlockIndex:
    buf, offset = _view_range(source, begin - 1, min(size, end + _csv.NAME_OVERHANG))
    return _csv.index_block(buf, offset, begin, end, sep)


def _index_stream(
    source: str, data_start: int, sep: int, piece: int = 64 << 20
) -> list[_csv.BlockIndex]:
    """Index a compressed file in one sequential pass (it cannot be split)."""
    blocks = []
    with _open_text_stream(source) as f:
        f.seek(data_start - 1)  # gzip seeks forward by decompressing
        window, begin, eof = b"", data_start, False
        while True:
            while not eof and len(window) < piece + _csv.NAME_OVERHANG + 1:
                more = f.read(piece)
                eof = not more
                window += more
            if eof and len(window) <= piece + 1:  # the rest is the last block
                blocks.append(_csv.index_block(window, begin - 1, begin, begin + len(window), sep))
                return blocks
            end = begin + piece
            blocks.append(_csv.index_block(window, begin - 1, begin, end, sep))
            window, begin = window[end - begin :], end


def _build_index(
    source: str, data_start: int, sep: int, *, progress: bool, stacklevel: int = 3
) -> dict[str, Any]:
    """Line starts, line numbers and names (first fields) of every data line."""
    if _is_gzip(source):
        warnings.warn(
            f"{source} is gzip-compressed: it cannot be split, so it is read sequentially "
            "(twice: index, then parse). Decompress it first for a parallel ingest.",
            UserWarning,
            stacklevel=stacklevel,
        )
        task = dask.delayed(_index_stream, pure=False)(
            source, data_start, sep, dask_key_name=f"index-csv-gzip-{tokenize(source)}"
        )
        blocks = run([task], stage="ingest: index lines", progress=progress)[0]
        size = None
    else:
        size = fsspec.open(source, "rb").fs.size(source)
        block_bytes = int(_config.get("index-block-bytes"))
        bounds = [*range(data_start, size, block_bytes), size + 1]
        token = tokenize(source, size, block_bytes)
        tasks = [
            dask.delayed(_index_task, pure=True)(
                source, begin, end, size, sep, dask_key_name=f"index-csv-block-{token}-{i}"
            )
            for i, (begin, end) in enumerate(itertools.pairwise(bounds))
        ]
        blocks = run(tasks, stage="ingest: index lines", progress=progress)
    starts, lines, names = [], [], []
    newlines_before = 0
    for block in blocks:
        starts.append(block.starts)
        lines.append(block.local_line + newlines_before + 1)
        names.extend(block.names)
        newlines_before += block.newlines
    return {
        "starts": np.concatenate(starts) if starts else np.zeros(0, np.int64),
        "lines": np.concatenate(lines) if lines else np.zeros(0, np.int64),
        "names": names,
        "size": size,
    }


def _check_sample_names(names: list[str], lines: np.ndarray, source: str) -> None:
    first_seen: dict[str, int] = {}
    for name, line in zip(names, lines, strict=True):
        if not name:
            raise InputError(f"{source}: line {line}, column 1: empty sample name")
        if name in first_seen:
            raise InputError(
                f"{source}: line {line}, column 1: duplicate sample name {name!r} "
                f"(first on line {first_seen[name]})"
            )
        first_seen[name] = int(line)


# ---------------------------------------------------------------- metadata


def read_metadata(
    metadata: str, cells: list[str] | np.ndarray, *, stacklevel: int = 3
) -> dict[str, np.ndarray]:
    """Metadata columns aligned to ``cells`` (joined on ``sample_name``, or on the first column
    when there is no ``sample_name``).

    Cells missing from the metadata get empty strings (text columns) or NaN (numbers), and one
    warning counts them. Columns whose names the store uses get a ``_metadata`` suffix.
    """
    import pandas as pd

    source = str(metadata)
    try:
        table = pd.read_csv(source, dtype={"sample_name": str}, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{source}: line 1: the metadata file is empty") from None
    except pd.errors.ParserError as error:
        raise InputError(f"{source}: {error}") from None
    if "sample_name" not in table.columns:
        # the first column names the cells, as pandas writes an index (empty header cell)
        first = table.columns[0]
        table = table.rename(columns={first: "sample_name"})
        table["sample_name"] = table["sample_name"].astype(str)
    duplicated = table["sample_name"].duplicated(keep="first")
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise InputError(
            f"{source}: line {row + 2}, column sample_name: duplicate sample name "
            f"{table['sample_name'].iloc[row]!r}"
        )
    table = table.set_index("sample_name")
    aligned = table.reindex(pd.Index(np.asarray(cells, dtype=object)))
    missing = int((~pd.Index(np.asarray(cells, dtype=object)).isin(table.index)).sum())
    if missing:
        warnings.warn(
            f"{source}: {missing} of {len(cells)} cells have no metadata row; "
            "they get empty labels (and NaN for numeric columns)",
            UserWarning,
            stacklevel=stacklevel,
        )
    columns: dict[str, np.ndarray] = {}
    renamed: list[str] = []
    for name in aligned.columns:
        column = aligned[name]
        key = metadata_name(name, set(columns))
        if key != name:
            renamed.append(f"{name!r} -> {key!r}")
        if pd.api.types.is_bool_dtype(column) and not column.isna().any():
            columns[key] = column.to_numpy(dtype=bool)
        elif pd.api.types.is_numeric_dtype(column):
            columns[key] = column.to_numpy(dtype=np.float64 if column.isna().any() else None)
        else:
            columns[key] = column.fillna("").astype(str).to_numpy(dtype=object)
    if renamed:
        warnings.warn(
            f"{source}: metadata column(s) renamed, since distumap's store or exports use the "
            f"name (or it holds '/'): {', '.join(renamed)}",
            UserWarning,
            stacklevel=stacklevel,
        )
    return columns


# ---------------------------------------------------------------- the store skeleton


def create_skeleton(
    store: str,
    *,
    cells: list[str] | np.ndarray,
    genes: list[str] | np.ndarray,
    coords: dict[str, tuple[str, np.ndarray]],
    chunk_cells: int,
    params: dict[str, Any],
) -> None:
    """Write a store's skeleton: coordinates, an empty ``counts`` array chunked by cell blocks,
    the "started" ingest record and the per-block rounding counts. Every reader's ingest uses it;
    the stage's markers, written next by :meth:`distumap._stage.Stage.start`, come last."""
    n_cells, n_genes = len(cells), len(genes)
    counts = da.zeros((n_cells, n_genes), chunks=(chunk_cells, n_genes), dtype=params["dtype"])
    coords = {
        "cell": np.asarray(cells, dtype=object),
        "gene": np.asarray(genes, dtype=object),
        **coords,
    }
    skeleton = xr.Dataset({"counts": (("cell", "gene"), counts)}, coords=coords)
    # the "started" record goes in with the skeleton, so a store is never unrecognisable
    skeleton.attrs[ATTR] = {
        "format": FORMAT_VERSION,
        "stages": {"ingest": {"status": "started", "params": params}},
    }
    skeleton.to_zarr(
        store,
        mode="w",
        compute=False,
        consolidated=False,
        encoding={"counts": {"chunks": (chunk_cells, n_genes), "compressors": [COUNTS_CODEC]}},
    )
    n_blocks = -(-n_cells // chunk_cells)
    # per block: float-written counts that were rounded (one warning at the end)
    create_progress(store, "rounded", np.zeros(n_blocks, dtype=np.int64), chunks=1)
    # per block and gene: the cells with a non-zero value, what the preprocess's gene
    # statistics need, counted while the block is in memory (see write_block)
    zarr.open_group(store, mode="r+", use_consolidated=False).require_group(
        PROGRESS_GROUP
    ).create_array(
        NONZERO.rsplit("/", 1)[1],
        shape=(n_blocks, n_genes),
        chunks=(1, n_genes),
        dtype=np.int32,
        fill_value=0,
        overwrite=True,
    )


def write_block(store: str, block: int, first: int, values: np.ndarray) -> None:
    """Write store chunk ``block`` (its cells from ``first``) and its non-zero cells per gene.

    Every reader's block task ends here, before its marker: the counts and the statistics of a
    marked block are both written, and a block written again rewrites both.
    """
    zarr.open_array(store, path="counts", mode="r+")[first : first + len(values)] = values
    zarr.open_array(store, path=NONZERO, mode="r+")[block] = nonzero_per_gene(values)


@numba.njit(nogil=True, cache=True)
def _count_nonzero_columns(values, out):  # pragma: no cover
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[j] += values[i, j] != 0


def nonzero_per_gene(values: np.ndarray) -> np.ndarray:
    """The cells with a non-zero value in each column of a (cells, genes) block, int32: what
    ``np.count_nonzero(values, axis=0)`` gives, in one row-major pass (a third of its time on
    a 1,024 x 50,281 block)."""
    values = np.ascontiguousarray(values)
    out = np.zeros(values.shape[1], dtype=np.int32)
    if values.dtype in (np.int32, np.float32) and values.ndim == 2:
        _count_nonzero_columns(values, out)
    else:
        out[:] = np.count_nonzero(values, axis=0)
    return out


def warn_rounded(store: str, source: str, *, stacklevel: int = 3) -> int:
    """One warning with the number of float-written counts the ingest rounded; returns it."""
    rounded = int(progress_array(store, "rounded", mode="r")[:].sum())
    if rounded:
        warnings.warn(
            f"{source}: {rounded:,} counts written as floats (such as 0.999999999999999) were "
            f"rounded to the nearest integer (each within {_csv.ROUNDING_TOLERANCE:g})",
            UserWarning,
            stacklevel=stacklevel,
        )
    return rounded


# ---------------------------------------------------------------- parsing


def _parse_into_store(
    buf: np.ndarray,
    rel_starts: np.ndarray,
    *,
    block: int,
    cells: tuple[int, int],
    store: str,
    source: str,
    line_numbers: np.ndarray,
    dialect: _csv.Dialect,
) -> int:
    counts = zarr.open_array(store, path="counts", mode="r+")
    out = _block_buffer((len(rel_starts), counts.shape[1]), counts.dtype)
    parsed, status, error = _csv.parse_block(
        buf, rel_starts, counts.shape[1], out=out, sep=dialect.sep
    )
    if status:
        genes = zarr.open_array(store, path="gene", mode="r")
        _csv.raise_parse_error(
            status,
            error,
            buf,
            source=source,
            line_numbers=line_numbers,
            genes=genes[:],
            integer=counts.dtype.kind == "i",
            r_header=dialect.r_header,
        )
    write_block(store, block, cells[0], parsed)
    progress_array(store, "rounded")[block] = error[4]
    return cells[1] - cells[0]


def _parse_task(
    store: str, source: str, block: int, chunk_cells: int, dialect: _csv.Dialect
) -> int:
    """Parse store chunk ``block`` from its byte range and write it."""
    line_start = progress_array(store, "line_start", mode="r")
    n_cells = line_start.shape[0] - 1
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, n_cells)
    offsets = line_start[first : last + 1]
    view, offset = _view_range(source, int(offsets[0]), int(offsets[-1]))
    lines = progress_array(store, "line_number", mode="r")[first:last]
    return _parse_into_store(
        np.frombuffer(view, dtype=np.uint8),
        offsets[:-1] - offset,
        block=block,
        cells=(first, last),
        store=store,
        source=source,
        line_numbers=lines,
        dialect=dialect,
    )


def _stream_ranges(source: str, ranges: list[tuple[int, int]]) -> Iterator[bytes]:
    """Successive byte ranges (increasing, non-overlapping) of a decompressed stream."""
    with _open_text_stream(source) as f:
        position = 0
        for start, stop in ranges:
            if start > position:
                f.seek(start)  # gzip seeks forward by decompressing
                position = start
            data = f.read(stop - start) if stop >= 0 else f.read()
            position += len(data)
            yield data


def _parse_stream_task(store: str, source: str, chunk_cells: int, dialect: _csv.Dialect) -> int:
    """Parse every unwritten chunk of a compressed file in one sequential pass, marking each."""
    done = progress_array(store, "ingest", mode="r")[:]
    line_start = progress_array(store, "line_start", mode="r")[:]
    line_number = progress_array(store, "line_number", mode="r")[:]
    n_cells = line_start.shape[0] - 1
    todo = [int(b) for b in np.flatnonzero(~done)]
    ranges = []
    for block in todo:
        first, last = block * chunk_cells, min((block + 1) * chunk_cells, n_cells)
        ranges.append((int(line_start[first]), int(line_start[last]) if last < n_cells else -1))
    total = 0
    for block, data in zip(todo, _stream_ranges(source, ranges), strict=True):
        first, last = block * chunk_cells, min((block + 1) * chunk_cells, n_cells)
        starts = line_start[first:last] - line_start[first]
        cells = _parse_into_store(
            np.frombuffer(data, dtype=np.uint8),
            starts,
            block=block,
            cells=(first, last),
            store=store,
            source=source,
            line_numbers=line_number[first:last],
            dialect=dialect,
        )
        mark_block(store, "ingest", block, cells, n_cells)
        total += cells
    return total


# ---------------------------------------------------------------- the stage


def _source_params(
    source: str, metadata: str | None, chunk_cells: int, dtype: str
) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(source)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    return {
        "matrix": source,
        "size": int(info["size"]),
        "mtime": str(mtime) if mtime is not None else None,
        "metadata": metadata,
        "chunk_cells": int(chunk_cells),
        "dtype": dtype,
    }


def read_csv(
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
    """Ingest a count-matrix CSV or TSV (and its metadata) into a zarr store, in parallel.

    Parameters
    ----------
    matrix
        Path or fsspec URL of ``matrix.csv``: a header ``<cell column>,<gene>,...`` (any first
        cell: ``sample_name``, ``cell``, or empty as pandas writes it), then one line per cell.
        R's ``write.table`` header, with no field above the cell names (one name fewer than
        the fields of the first line after it), is read too. The separator (comma, tab, or
        space as ``write.table`` writes by default) comes from the header line. CRLF line ends,
        quoted names, a missing final newline and gzip (``.gz``, read sequentially) are
        accepted. Counts written as floats (``3.0``, ``0.999999999999999``, ``1e+05``) are
        rounded when within 1e-6 of an integer, with one warning that counts those that moved.
    store
        Path or fsspec URL of the zarr store to write.
    metadata
        Optional ``metadata.csv`` with a ``sample_name`` column; its other columns become cell
        coordinates.
    chunk_cells
        Cells per store chunk and per parse task (default: ``distumap.chunk-cells``).
    dtype
        ``"int32"`` (counts; a truly fractional value is refused, naming its line and gene) or
        ``"float32"`` (any finite numbers, e.g. normalised data, stored as they are).
    overwrite
        Replace a store that was written from another input or with other parameters.
    progress
        Show progress bars (with a distributed client).
    stacklevel
        Whose line the warnings name: 2, the caller of ``read_csv``; a function that wraps it
        passes one more per frame (:func:`distumap.io.read` passes 3).

    Returns
    -------
    xarray.Dataset
        The store, opened with :func:`distumap.io.open_store`.

    Raises
    ------
    InputError
        Malformed input; the message names the file, the line and the column.

    Notes
    -----
    This computes: it reads the whole file on the current Dask scheduler (the distributed
    client if there is one). Re-running with the same input and parameters resumes an
    interrupted ingest without re-parsing the chunks already written, and returns at once if the
    ingest finished.

    Examples
    --------
    >>> ds = distumap.io.read_csv(
    ...     "matrix.csv", "store.zarr", metadata="metadata.csv"
    ... )  # doctest: +SKIP
    """
    source, store = absolute(matrix), store_url(store)
    checked_options(chunk_cells, dtype)
    meta_source = absolute(metadata) if metadata is not None else None
    params = _source_params(source, meta_source, 0, dtype)
    genes, data_start, dialect = read_header(source)
    params["chunk_cells"] = chunk_cells = fitted_chunk_cells(store, chunk_cells, len(genes), params)
    stage = _claim(store, params, overwrite=overwrite, progress=progress)
    if stage.finished:
        return open_store(store)
    if not stage.resumable():
        genes = unique_genes(genes, source, where="line 1", stacklevel=stacklevel + 1)
        index = _build_index(
            source, data_start, dialect.sep, progress=progress, stacklevel=stacklevel + 1
        )
        if not index["names"]:
            raise InputError(
                f"{source}: line 2: no cell lines after the header (it names {len(genes)} genes)"
            )
        _check_sample_names(index["names"], index["lines"], source)
        columns = (
            read_metadata(meta_source, index["names"], stacklevel=stacklevel + 1)
            if meta_source
            else {}
        )
        create_skeleton(
            store,
            cells=index["names"],
            genes=genes,
            coords={name: ("cell", values) for name, values in columns.items()},
            chunk_cells=chunk_cells,
            params=params,
        )
        data_end = index["size"] if index["size"] is not None else -1
        create_progress(store, "line_start", np.append(index["starts"], data_end).astype(np.int64))
        create_progress(store, "line_number", index["lines"].astype(np.int64))
        # the markers are the last thing the skeleton writes: with them, a resume can trust it
        stage.start(n_blocks=-(-len(index["names"]) // chunk_cells))

    n_cells = progress_array(store, "line_start", mode="r").shape[0] - 1
    if _is_gzip(source):
        stage.run_sequential(
            _parse_stream_task,
            store,
            source,
            chunk_cells,
            dialect,
            key="parse-csv-gzip",
            label="ingest: parse (sequential, gzip)",
        )
    else:
        stage.run_blocks(
            _parse_task,
            {
                block: ((store, source, block, chunk_cells, dialect), {})
                for block in stage.pending()
            },
            key="parse-csv-block",
            label="ingest: parse blocks",
            total=n_cells,
        )
    stage.complete(
        rounded=warn_rounded(store, source, stacklevel=stacklevel + 1), dialect=dialect.describe()
    )
    return open_store(store)


def checked_options(chunk_cells: int | None, dtype: str) -> int:
    """The chunk size to use (``distumap.chunk-cells`` unless given), after checking it and
    ``dtype``."""
    chunk_cells = int(_config.get("chunk-cells", chunk_cells))
    if chunk_cells < 1:
        raise InputError(f"chunk_cells must be positive, not {chunk_cells}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return chunk_cells


def fitted_chunk_cells(
    store: str, chunk_cells: int | None, n_genes: int, params: dict[str, Any]
) -> int:
    """Cells per store chunk for an ingest of ``n_genes`` genes into ``store`` with ``params``
    (the stage's parameters but the chunk size), fitted to the workers' memory before any
    block is read.

    A given ``chunk_cells`` is kept, or refused (exit 2, naming the flag) when its blocks
    cannot fit. Without one, a store already ingested (or begun) from the same input keeps its
    chunks, and a new ingest takes ``distumap.chunk-cells``, made smaller (with one warning)
    until a block fits every worker (:func:`distumap._memory.ingest_chunk_cells`).
    """
    from distumap import _memory
    from distumap._compute import current_client

    if chunk_cells is None and is_store(store):
        before = dict((stage_record(store, "ingest") or {}).get("params") or {})
        begun = before.pop("chunk_cells", None)
        if begun and before == {k: v for k, v in params.items() if k != "chunk_cells"}:
            return int(begun)  # resuming or re-running: the store's own chunks
    itemsize = np.dtype(params["dtype"]).itemsize
    return _memory.ingest_chunk_cells(current_client(), chunk_cells, n_genes, itemsize)


def unique_genes(genes: list[str], source: str, *, where: str, stacklevel: int) -> list[str]:
    """``genes`` with duplicates made unique (``A``, ``A-1``, ...), and one warning naming them
    (``where`` they are in the file: ``line 1``, or ``column 1`` of a genes-by-cells file)."""
    genes, duplicated = _csv.unique_gene_names(genes, source)
    if duplicated:
        shown = ", ".join(sorted(set(duplicated))[:5])
        warnings.warn(
            f"{source}: {where}: {len(duplicated)} duplicate gene names ({shown}"
            f"{', ...' if len(set(duplicated)) > 5 else ''}) were made unique "
            "by appending -1, -2, ...",
            UserWarning,
            stacklevel=stacklevel,
        )
    return genes


def _claim(store: str, params: dict[str, Any], *, overwrite: bool, progress: bool) -> Stage:
    """The ingest stage on ``store``, after making sure that writing there destroys nothing.

    Only a distumap store (recognised by its attribute) is ever replaced, and only with
    ``overwrite`` when it holds other input; anything else at ``store`` is refused.
    """
    if not is_store(store):
        if occupied(store):
            raise InputError(
                f"{store}: something that is not a distumap store is already there; "
                "distumap replaces only its own stores (even with --overwrite): choose another path"
            )
        return Stage(store, "ingest", params, progress=progress)
    stage = Stage(store, "ingest", params, progress=progress)
    if stage.record is not None and stage.record.get("params") != params and not overwrite:
        raise InputError(
            f"{store}: this store was ingested from other input or with other parameters "
            f"({stage.record.get('params')}); choose another store or pass --overwrite"
        )
    return stage
