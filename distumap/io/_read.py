"""Ingest of every input the field ships, behind one entry point: :func:`read`.

CSV and TSV go through the byte-level CSV ingest (:func:`distumap.io.read_csv`). The binary
formats (10x HDF5, 10x MEX, AnnData, loom) each have a reader (:mod:`distumap.io._readers`) that
lists its cells and genes and turns one cell range into a dense block; this module is the one
stage above them: several inputs are concatenated in order with genes aligned by name, one
``read-<format>-block`` task per store chunk reads its cells (from one input or across the
boundary of two) and writes the chunk, and resume, progress and errors come from
:class:`distumap._stage.Stage` as for every stage.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec

from distumap._errors import InputError
from distumap._format import PROGRESS_GROUP, metadata_name
from distumap._stage import mark_block
from distumap._store import absolute, open_store, progress_array, store_url
from distumap.io import _readers
from distumap.io._ingest import (
    _block_buffer,
    _claim,
    checked_options,
    create_skeleton,
    fitted_chunk_cells,
    read_csv,
    read_metadata,
    warn_rounded,
    write_block,
)
from distumap.io._readers import FORMATS, MexReader, Reader, open_reader
from distumap.io._transpose import read_genes_by_cells

__all__ = ["ORIENTATIONS", "read", "source_labels"]

#: names that say "CSV": the byte-level CSV ingest reads them
_CSV_NAME = re.compile(r"\.(csv|tsv|txt)(\.gz)?$", re.IGNORECASE)
ORIENTATIONS = ("cells-by-genes", "genes-by-cells")


def _is_csv(source: str, format: str) -> bool:
    return format == "csv" or (format == "auto" and bool(_CSV_NAME.search(source.rstrip("/"))))


def read(
    inputs: str | os.PathLike | list[str | os.PathLike],
    store: str | os.PathLike,
    *,
    metadata: str | os.PathLike | None = None,
    chunk_cells: int | None = None,
    format: str = "auto",
    layer: str | None = None,
    dtype: str = "int32",
    orientation: str = "cells-by-genes",
    overwrite: bool = False,
    progress: bool = False,
) -> xr.Dataset:
    """Ingest one or several inputs, in any format distumap reads, into one zarr store.

    Parameters
    ----------
    inputs
        Paths or fsspec URLs: CSV/TSV files, 10x Cell Ranger ``.h5`` files, 10x MEX folders,
        ``.h5ad`` files, AnnData zarr folders, ``.loom`` files. Several inputs are concatenated
        in order (cells), with a ``source`` cell coordinate; their gene sets must agree by name.
    store
        Path or fsspec URL of the zarr store to write.
    metadata
        Optional CSV of cell metadata, joined on the (final) cell names.
    chunk_cells
        Cells per store chunk and per task (default ``distumap.chunk-cells``).
    format
        ``"auto"`` (from the name and content) or one of ``csv``, ``10x-h5``, ``mex``, ``h5ad``,
        ``anndata-zarr``, ``loom``.
    layer
        A layer instead of the main matrix (AnnData ``layers/NAME``, loom ``/layers/NAME``).
    dtype
        ``"int32"`` (counts; values within 1e-6 of an integer are rounded, one warning counts
        them) or ``"float32"`` (normalised data, stored as it is).
    orientation
        For CSV and TSV: ``"cells-by-genes"`` (a line per cell) or ``"genes-by-cells"`` (a line
        per gene, cells in the header, as most GEO supplementary files are). The store is the
        same either way; a genes-by-cells file is transposed through a temporary array in the
        store, with memory bounded per task. The other formats know their own orientation.
    overwrite
        Replace a distumap store made from other input (anything else is never replaced).
    progress
        Show progress lines.

    Returns
    -------
    xarray.Dataset
        The store, opened with :func:`distumap.io.open_store`.

    Raises
    ------
    InputError
        Unreadable or malformed input (the message names the file and the dataset or line),
        inputs whose genes differ, or cells named twice within one input.

    Notes
    -----
    This computes: every cell is read once, on the current scheduler, one task per store chunk
    (a genes-by-cells file: one task per block of gene lines, then one per store chunk). No
    matrix is gathered on the client; cell and gene names and metadata are. Re-running with
    the same inputs resumes an interrupted ingest.

    Examples
    --------
    >>> ds = distumap.io.read(["s1.h5", "s2.h5"], "store.zarr")  # doctest: +SKIP
    >>> ds.source.values[:2]  # doctest: +SKIP
    array(['s1', 's1'], dtype=object)
    """
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    sources = [absolute(source) for source in sources]
    if not sources:
        raise InputError("no input given")
    if format not in ("auto", "csv", *FORMATS):
        raise InputError(f"unknown --format {format!r}: auto, csv, {', '.join(FORMATS)}")
    if orientation not in ORIENTATIONS:
        raise InputError(f"--orientation must be one of {', '.join(ORIENTATIONS)}")
    csv = [_is_csv(source, format) for source in sources]
    if orientation == "genes-by-cells" and not all(csv):
        other = sources[csv.index(False)]
        raise InputError(
            f"{other}: --orientation genes-by-cells is for CSV and TSV files; the other formats "
            "say which way their matrix lies"
        )
    if any(csv):
        if len(sources) > 1:
            raise InputError(
                "several inputs are concatenated for the binary formats (10x, MEX, AnnData, "
                f"loom) only; ingest CSV files one store at a time ({', '.join(sources)})"
            )
        ingest = read_genes_by_cells if orientation == "genes-by-cells" else read_csv
        return ingest(
            sources[0],
            store,
            metadata=metadata,
            chunk_cells=chunk_cells,
            dtype=dtype,
            overwrite=overwrite,
            progress=progress,
            stacklevel=3,  # the warnings name the line that called read
        )
    return _read_files(
        sources,
        store_url(store),
        metadata=absolute(metadata) if metadata is not None else None,
        chunk_cells=chunk_cells,
        format=format,
        layer=layer,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )


# ---------------------------------------------------------------- several inputs, one store


def source_labels(sources: list[str]) -> list[str]:
    """Short unique labels for ``sources``: the file or folder name without its suffixes, with
    the parent folder (and then a number) added where names repeat (10x folders all have the
    same name)."""

    def stem(path: str, parts: int) -> str:
        pieces = path.rstrip("/").split("/")
        pieces[-1] = re.sub(r"(\.(h5ad|h5|hdf5|loom|zarr|mtx|gz))+$", "", pieces[-1])
        return "/".join(pieces[-parts:])

    labels = [stem(source, 1) for source in sources]
    if len(set(labels)) < len(labels):
        labels = [stem(source, 2) for source in sources]
    if len(set(labels)) < len(labels):
        labels = [f"{label}-{i}" for i, label in enumerate(labels)]
    return labels


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _aligned_genes(readers: list[Reader]) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """The first input's genes, and for each input the columns that put its genes in that order
    (None when they already are)."""
    genes = readers[0].genes()
    position = {name: i for i, name in enumerate(genes)}
    permutations: list[np.ndarray | None] = [None]
    for reader in readers[1:]:
        theirs = reader.genes()
        if list(theirs) == list(genes):
            permutations.append(None)
            continue
        missing = sorted(set(genes) - set(theirs))
        extra = sorted(set(theirs) - set(genes))
        if missing or extra:
            raise InputError(
                f"{reader.source}: its genes differ from {readers[0].source}'s: "
                f"{len(missing)} missing ({_some(missing)}), {len(extra)} extra ({_some(extra)}); "
                "inputs ingested together must measure the same genes"
            )
        order = np.empty(len(genes), dtype=np.int64)
        order[[position[name] for name in theirs]] = np.arange(len(theirs))
        permutations.append(order)
    return genes, permutations


def _cell_names(readers: list[Reader], labels: list[str]) -> np.ndarray:
    names = []
    for reader in readers:
        cells = reader.cells()
        seen: dict[str, int] = {}
        for i, name in enumerate(cells):
            if name in seen:
                raise InputError(
                    f"{reader.source}: cell {name!r} is named twice (cells {seen[name]} and {i})"
                )
            seen[name] = i
        names.append(cells)
    every = np.concatenate(names) if names else np.zeros(0, dtype=object)
    if len(readers) > 1 and len(set(every)) < len(every):
        warnings.warn(
            f"cell names repeat across the inputs ({len(every) - len(set(every)):,} of them); "
            "every cell name gets '-<source>' appended, as anndata.concat(index_unique='-') does",
            UserWarning,
            stacklevel=4,
        )
        every = np.concatenate(
            [
                np.array([f"{name}-{label}" for name in cells], dtype=object)
                for cells, label in zip(names, labels, strict=True)
            ]
        )
    return every.astype(object)


def _metadata(readers: list[Reader]) -> dict[str, np.ndarray]:
    """The inputs' own cell columns, concatenated; an input without a column gets empty values."""
    tables = [reader.metadata() for reader in readers]
    columns: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(name for table in tables for name in table):
        parts = [table.get(name) for table in tables]
        numeric = all(p is not None and np.asarray(p).dtype.kind in "iufb" for p in parts)
        if numeric:
            columns[name] = np.concatenate([np.asarray(p) for p in parts])
            continue
        pieces = []
        for part, reader in zip(parts, readers, strict=True):
            if part is None:
                part = np.full(reader.n_cells, "", dtype=object)
            pieces.append(np.array(["" if v is None else str(v) for v in part], dtype=object))
        columns[name] = np.concatenate(pieces)
    return columns


def _read_block(
    store: str, inputs: tuple, offsets: np.ndarray, block: int, chunk_cells: int
) -> int:
    """Read store chunk ``block`` from the input(s) its cells come from, and write it.

    The chunk is put together in the worker's block buffer, reused from task to task as the CSV
    parse tasks do: a fresh 80-200 MB array per block costs page faults that take as long as
    reading the block. A CSC input's cells come from its transposition scratch.
    """
    readers, permutations, transposed = inputs
    counts = zarr.open_array(store, path="counts", mode="r")
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, counts.shape[0])
    out = _block_buffer((last - first, counts.shape[1]), counts.dtype)
    rounded = 0
    for reader, permutation, scratch, begin, end in zip(
        readers, permutations, transposed, offsets[:-1], offsets[1:], strict=True
    ):
        lo, hi = max(first, int(begin)), min(last, int(end))
        if lo >= hi:
            continue
        rows = out[lo - first : hi - first]
        if scratch is not None:
            rows[...] = 0
            column_map = None
            if permutation is not None:
                column_map = np.empty_like(permutation)
                column_map[permutation] = np.arange(permutation.size)
            rounded += reader.fill_csc_entries(
                _scratch_entries(store, scratch, block),
                out,
                first_cell=first - int(begin),
                column_map=column_map,
            )
        elif permutation is None:
            rounded += reader.read_counted(lo - int(begin), hi - int(begin), out=rows)[1]
        else:
            values, moved = reader.read_counted(lo - int(begin), hi - int(begin))
            np.take(values, permutation, axis=1, out=rows)
            rounded += moved
    write_block(store, block, first, out)
    progress_array(store, "rounded")[block] = rounded
    return last - first


def _read_sequential(store: str, reader: Reader, chunk_cells: int) -> int:
    """Read every unwritten chunk of one input that can only be read in order (gzip MEX).

    This task decompresses and parses; a second thread compresses and writes the block before
    (the codec releases the GIL), so the sequential stage uses the core that would idle.
    """
    counts = zarr.open_array(store, path="counts", mode="r")
    n_cells = counts.shape[0]
    done = progress_array(store, "ingest", mode="r")[:]
    shape = (min(chunk_cells, n_cells), counts.shape[1])
    # two buffers: the writer compresses one while the reader fills the other
    buffers = [_block_buffer(shape, counts.dtype), np.empty(shape, dtype=counts.dtype)]
    total = 0
    writing = None  # (future, block, cells, rounded) of the write in flight

    def finish() -> None:
        nonlocal total, writing
        if writing is None:
            return
        future, block, cells, moved = writing
        writing = None
        future.result()
        progress_array(store, "rounded")[block] = moved
        mark_block(store, "ingest", block, cells, n_cells)
        total += cells

    with ThreadPoolExecutor(1, thread_name_prefix="distumap-write") as writer:
        for begin, end, values, moved in reader.iter_blocks(chunk_cells, buffers=buffers):
            finish()  # the buffer the next block goes into is free again
            block = begin // chunk_cells
            if done[block]:
                continue
            future = writer.submit(write_block, store, block, begin, values)
            writing = (future, block, end - begin, moved)
        finish()
    return total


# ---------------------------------------------------------------- CSC inputs: one transposition

#: scratch of the transposition: small integers, compressed fast (it is read once, then deleted)
_SCRATCH_CODEC = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=4)
#: scratch entries per zarr chunk inside a part's shard: a block reads a few of them per part
_SCRATCH_CHUNK = 1 << 17


def _scratch_names(index: int) -> tuple[str, str, str]:
    """The scratch arrays of CSC input ``index`` (entries, block offsets) and its markers."""
    return (
        f"{PROGRESS_GROUP}/csc{index}_entries",
        f"{PROGRESS_GROUP}/csc{index}_offsets",
        f"ingest_csc{index}",
    )


def _transpose_part(
    store: str, reader: Reader, index: int, part: int, first_cell: int, chunk_cells: int
) -> int:
    """Transposition part ``part``: its CSC entries sorted by store block, into the scratch."""
    entries_path, offsets_path, _ = _scratch_names(index)
    entries = zarr.open_array(store, path=entries_path, mode="r+")
    table = zarr.open_array(store, path=offsets_path, mode="r+")
    size = int(entries.attrs["part_entries"])
    low, high = part * size, min((part + 1) * size, entries.shape[0])
    packed, offsets = reader.csc_entries(
        low, high, first_cell=first_cell, chunk_cells=chunk_cells, n_blocks=table.shape[1] - 1
    )
    entries[low:high] = packed
    table[part] = offsets
    return high - low


def _transpose_csc(
    stage, reader: Reader, index: int, first_cell: int, chunk_cells: int
) -> tuple[str, int, np.ndarray]:
    """One pass over a CSC input (genes in columns) that sorts its entries by store block into
    a scratch array, so that each block task then reads only its own entries, instead of a pass
    over the whole matrix per block.

    Parts of ``CSC_ENTRIES_PER_PASS`` entries are transposed in parallel tasks (one zarr shard
    of the scratch each) with their own markers, so an interrupted ingest resumes here too.
    Returns what :func:`_scratch_entries` needs: the scratch's path, the part size and the
    table of where each part's entries of each block start.
    """
    store = stage.store
    entries_path, offsets_path, markers = _scratch_names(index)
    n_blocks = -(-zarr.open_array(store, path="counts", mode="r").shape[0] // chunk_cells)
    nnz, words, size = reader.nnz, reader.packed_words, int(_readers.CSC_ENTRIES_PER_PASS)
    n_parts = -(-nnz // size)
    try:
        fresh = int(zarr.open_array(store, path=entries_path, mode="r").attrs["part_entries"])
        fresh = fresh != size or progress_array(store, markers, mode="r").shape[0] != n_parts
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        fresh = True
    if fresh and nnz:
        inner = _SCRATCH_CHUNK if size % _SCRATCH_CHUNK == 0 else size
        group = zarr.open_group(store, mode="r+", use_consolidated=False)
        group = group.require_group(PROGRESS_GROUP)
        entries = group.create_array(
            entries_path.rsplit("/", 1)[1],
            shape=(nnz, words),
            dtype=np.uint32,
            chunks=(inner, words),
            shards=(size, words) if inner < size else None,
            compressors=[_SCRATCH_CODEC],
            fill_value=0,
            overwrite=True,
        )
        entries.attrs["part_entries"] = size
        group.create_array(
            offsets_path.rsplit("/", 1)[1],
            shape=(n_parts, n_blocks + 1),
            dtype=np.int64,
            chunks=(1, n_blocks + 1),
            fill_value=0,
            overwrite=True,
        )
        stage.pass_(markers).create_markers(n_parts)  # last
    if not nnz:
        return entries_path, size, np.zeros((0, n_blocks + 1), dtype=np.int64)
    parts = stage.pass_(markers)  # the parts' own markers; the stage's record is untouched
    parts.run_blocks(
        _transpose_part,
        {p: ((store, reader, index, p, first_cell, chunk_cells), {}) for p in parts.pending()},
        key="transpose-csc-part",
        label="ingest: sort the CSC matrix by cell block",
        total=nnz,
    )
    return entries_path, size, zarr.open_array(store, path=offsets_path, mode="r")[:]


def _scratch_entries(store: str, scratch: tuple[str, int, np.ndarray], block: int) -> np.ndarray:
    """Every entry of store block ``block`` in a CSC input's scratch, in the file's order."""
    path, size, table = scratch
    pieces = [
        (part * size + int(table[part, block]), part * size + int(table[part, block + 1]))
        for part in range(table.shape[0])
        if table[part, block] < table[part, block + 1]
    ]
    if not pieces:
        return np.zeros((0, 3), dtype=np.uint32)
    entries = zarr.open_array(store, path=path, mode="r")
    return np.concatenate([entries[low:high] for low, high in pieces])


def _drop_scratch(store: str, index: int) -> None:
    entries, offsets, markers = _scratch_names(index)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    for name in (entries, offsets, f"{PROGRESS_GROUP}/{markers}"):
        try:
            del group[name]
        except (KeyError, FileNotFoundError, zarr.errors.NodeNotFoundError):
            pass


def _index_mex(reader: MexReader, *, progress: bool) -> None:
    """Find where each cell's entries start, in parallel byte blocks on the cluster."""
    from distumap._compute import run

    ranges = reader.index_ranges()
    token = tokenize(reader.fingerprint())
    index = dask.delayed(reader.index_block, pure=True)
    tasks = [
        index(begin, end, dask_key_name=f"index-mtx-block-{token}-{i}")
        for i, (begin, end) in enumerate(ranges)
    ]
    reader.set_index(run(tasks, stage="ingest: index matrix.mtx", progress=progress))


def _read_files(
    sources: list[str],
    store: str,
    *,
    metadata: str | None,
    chunk_cells: int | None,
    format: str,
    layer: str | None,
    dtype: str,
    overwrite: bool,
    progress: bool,
) -> xr.Dataset:
    checked_options(chunk_cells, dtype)
    readers = [open_reader(source, format=format, layer=layer, dtype=dtype) for source in sources]
    params = {
        "inputs": [reader.fingerprint() for reader in readers],
        "metadata": metadata,
        "chunk_cells": 0,
        "dtype": dtype,
    }
    genes, permutations = _aligned_genes(readers)
    params["chunk_cells"] = chunk_cells = fitted_chunk_cells(store, chunk_cells, len(genes), params)
    stage = _claim(store, params, overwrite=overwrite, progress=progress)
    if stage.finished:
        return open_store(store)
    labels = source_labels(sources)
    offsets = np.cumsum([0, *(reader.n_cells for reader in readers)])
    if offsets[-1] == 0:
        raise InputError(f"{', '.join(sources)}: no cells")
    if not stage.resumable():
        cells = _cell_names(readers, labels)
        columns = _metadata(readers)
        if metadata is not None:
            columns.update(read_metadata(metadata, cells))
        coords: dict[str, tuple[str, np.ndarray]] = {}
        taken: set[str] = set()
        for name, values in columns.items():
            key = metadata_name(name, taken)
            taken.add(key)
            coords[key] = ("cell", values)
        gene_ids = [reader.gene_ids() for reader in readers]
        if all(ids is not None for ids in gene_ids):
            coords["gene_ids"] = ("gene", np.asarray(gene_ids[0], dtype=object))
        if len(readers) > 1:
            coords["source"] = ("cell", np.repeat(np.array(labels, dtype=object), np.diff(offsets)))
        create_skeleton(
            store, cells=cells, genes=genes, coords=coords, chunk_cells=chunk_cells, params=params
        )
        stage.start(n_blocks=-(-int(offsets[-1]) // chunk_cells))

    kinds = "+".join(dict.fromkeys(reader.format for reader in readers))
    sequential = [isinstance(r, MexReader) and r.compressed for r in readers]
    if sequential == [True]:
        stage.run_sequential(
            _read_sequential,
            store,
            readers[0],
            chunk_cells,
            key="read-mex-gzip",
            label="ingest: read matrix.mtx.gz (sequential)",
        )
    else:
        transposed: list[tuple | None] = [None] * len(readers)
        for i, reader in enumerate(readers):
            if isinstance(reader, MexReader) and not reader.compressed:
                _index_mex(reader, progress=progress)
            if reader.orientation == "genes" and stage.pending():
                transposed[i] = _transpose_csc(stage, reader, i, int(offsets[i]), chunk_cells)
        shared = dask.delayed((readers, permutations, transposed), pure=True, traverse=False)
        stage.run_blocks(
            _read_block,
            {b: ((store, shared, offsets, b, chunk_cells), {}) for b in stage.pending()},
            key=f"read-{kinds}-block",
            label=f"ingest: read {kinds} blocks",
            total=int(offsets[-1]),
        )
        for i, reader in enumerate(readers):
            if reader.orientation == "genes":
                _drop_scratch(store, i)
    stage.complete(rounded=warn_rounded(store, ", ".join(sources)), formats=kinds)
    return open_store(store)
