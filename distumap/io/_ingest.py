"""The ingest: every input the field ships into the store, one stage for every format.

:func:`read` opens a reader per input (:mod:`distumap.io.readers`), checks the store may be
written, and runs the one stage shape of :class:`distumap._stage.Stage`:

1. The index pass, for readers that need one (CSV line starts, MEX cell offsets): byte ranges
   indexed in parallel tasks. A reader that keeps its index in the store (CSV) gets it back on a
   resume instead of indexing again.
2. The skeleton: coordinates (inputs concatenated in order, genes aligned by name), metadata, an
   empty ``counts`` chunked by ``chunk_cells`` cells, the readers' persisted index, a
   transposition's scratch, and the stage's markers last.
3. The blocks: one task per store chunk reads its cells (from one input or across the boundary
   of two), writes the chunk and marks it; a block already marked is skipped, so a re-run never
   writes a block twice. An input that can only be read in order (gzip) is read by one task that
   writes every block. An input whose cells are scattered over the file is transposed first
   (:mod:`distumap.io._transposition`).

With ``use_rep`` an AnnData ``obsm`` array becomes the store's ``rep``, one ``read-obsm-block``
task per store chunk, before the counts (their own pass) or, without counts, as the stage's
blocks: what a reader declares there is :meth:`~distumap.io.readers.Reader.representation`.

What differs between formats is what the readers declare (``needs_index``, ``persists_index``,
``sequential``, ``transposition``, their task names); this module asks, and knows no format.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize

from distumap._compute import release_memory
from distumap._errors import InputError
from distumap._format import REP
from distumap._paths import absolute
from distumap._stage import Stage, StagePass, mark_block
from distumap._store import consolidate, create_progress, open_store, progress_array, store_url
from distumap.io import _transposition as transposition
from distumap.io._ingest_cells import cell_columns, check_cell_names, name_blocks
from distumap.io._ingest_store import (
    CountsDoNotFit,
    MetadataTable,
    block_buffer,
    checked_options,
    claim,
    create_skeleton,
    fitted_chunk_cells,
    warn_rounded,
    widen_counts,
    write_block,
)
from distumap.io.readers import Reader, names, reader_class

__all__ = ["ORIENTATIONS", "read", "read_csv", "read_genes_by_cells", "source_labels"]

ORIENTATIONS = ("cells-by-genes", "genes-by-cells")


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
    use_rep: str | None = None,
    counts: bool | None = None,
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
        A layer instead of the main matrix (AnnData ``layers/NAME``, ``raw`` for AnnData's
        ``raw/X``, loom ``/layers/NAME``). None: the main matrix; for AnnData with int32, X when
        it holds counts, else the first of ``raw``, a ``counts`` layer, the other layers that
        does (one warning says which).
    dtype
        ``"int32"`` (counts; values within 1e-6 of an integer are rounded, one warning counts
        them; the store keeps them as uint16 when every count fits, else as int32) or
        ``"float32"`` (normalised data, stored as it is).
    orientation
        For CSV and TSV: ``"cells-by-genes"`` (a line per cell) or ``"genes-by-cells"`` (a line
        per gene, cells in the header, as most GEO supplementary files are). The store is the
        same either way; a genes-by-cells file is transposed through a temporary array in the
        store, with memory bounded per task. The other formats know their own orientation.
    use_rep
        An AnnData ``obsm`` key (``X_scVI``, ``X_pca``, ...): that dense float array becomes the
        store's ``rep`` (cell, rep_dim; float32, attribute ``obsm_key``), read in one task per
        store chunk (``read-obsm-block``) before any count, for the embed to use as its
        features (:func:`distumap.tl.umap` ``use_rep``). Checked before any work: the key, two
        dimensions, floats, a row per cell; a value that is not finite stops the ingest with
        an InputError naming the cell, and the stage is not marked done.
    counts
        Whether to read the counts too. Default: unless ``use_rep`` is given (the embed of a
        representation needs none; the exports do, as they write the selected genes' counts,
        so :command:`distumap run` reads them). Without counts the store has no ``counts``,
        the preprocess records itself and computes nothing, and an export is refused.
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
        inputs whose genes differ, or cells named twice within one input; an input or a store
        that some worker of the current client's cluster cannot see (a local path without a
        shared file system, ``memory://`` with workers in other processes), refused before
        anything is written.

    Notes
    -----
    This computes: every cell is read once, on the current scheduler, one task per store chunk
    (a genes-by-cells file: one task per block of gene lines, then one per store chunk). No
    matrix is gathered on the client. The gene names are; the cell names and metadata pass
    through it 65,536 cells at a time (with a 64-bit hash per cell kept for the duplicate
    check, and two per metadata row for the join). Re-running with the same inputs resumes an
    interrupted ingest. Warnings name the line that called ``read``.

    Examples
    --------
    >>> ds = distumap.io.read(["s1.h5", "s2.h5"], "store.zarr")  # doctest: +SKIP
    >>> ds.source.values[:2]  # doctest: +SKIP
    array(['s1', 's1'], dtype=object)
    >>> ds = distumap.io.read("atlas.h5ad", "store.zarr", use_rep="X_scVI")  # doctest: +SKIP
    >>> ds.rep.attrs["obsm_key"], "counts" in ds  # doctest: +SKIP
    ('X_scVI', False)
    """
    sources = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    sources = [absolute(source) for source in sources]
    classes = _reader_classes(sources, format, orientation)
    checked_options(chunk_cells, dtype)
    with_counts = use_rep is None if counts is None else bool(counts)
    if use_rep is None and not with_counts:
        raise InputError("nothing to read: counts=False needs use_rep (an obsm key)")
    # without counts, the matrix is never read: float32 spares the search for integer counts
    # (an atlas's X is often normalised) and its warning
    read_as = dtype if with_counts else "float32"
    readers = [
        cls.open(source, layer=layer, dtype=read_as, orientation=orientation)
        for cls, source in zip(classes, sources, strict=True)
    ]
    representation = None if use_rep is None else (use_rep, _representation_width(readers, use_rep))
    meta = absolute(metadata) if metadata is not None else None
    return _ingest(
        readers,
        store_url(store),
        meta,
        chunk_cells,
        overwrite,
        progress,
        representation=representation,
        with_counts=with_counts,
    )


def _representation_width(readers: list[Reader], key: str) -> int:
    """The width of every input's representation ``key``, checked before any work."""
    from distumap._format import ANNDATA_EMBEDDING

    if key == ANNDATA_EMBEDDING:
        raise InputError(
            f"--use-rep {key}: the exports write the new embedding under obsm[{key!r}]; "
            "embed from another representation (X_pca, X_scVI, ...)"
        )
    widths = [reader.representation(key) for reader in readers]
    if len(set(widths)) > 1:
        listing = ", ".join(
            f"{reader.source} ({width})" for reader, width in zip(readers, widths, strict=True)
        )
        raise InputError(f"--use-rep {key}: the inputs' obsm[{key!r}] differ in width: {listing}")
    return widths[0]


def _reader_classes(sources: list[str], format: str, orientation: str) -> list[type[Reader]]:
    """The reader class of each input, after checking the options, that the inputs take
    ``orientation`` and that they can be ingested together."""
    if not sources:
        raise InputError("no input given")
    if format not in ("auto", *names()):
        raise InputError(f"unknown --format {format!r}: auto, {', '.join(names())}")
    if orientation not in ORIENTATIONS:
        raise InputError(f"--orientation must be one of {', '.join(ORIENTATIONS)}")
    classes = [reader_class(source, format) for source in sources]
    for cls, source in zip(classes, sources, strict=True):
        if orientation not in cls.orientations:
            raise InputError(
                f"{source}: --orientation {orientation} is for CSV and TSV files; the other "
                "formats say which way their matrix lies"
            )
    if len(sources) > 1 and not all(cls.concatenates for cls in classes):
        raise InputError(
            "several inputs are concatenated for the binary formats (10x, MEX, AnnData, "
            f"loom) only; ingest CSV files one store at a time ({', '.join(sources)})"
        )
    return classes


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
        ``"int32"`` (counts; a truly fractional value is refused, naming its line and gene;
        stored as uint16 when every count fits) or ``"float32"`` (any finite numbers, e.g.
        normalised data, stored as they are).
    overwrite
        Replace a store that was written from another input or with other parameters.
    progress
        Show progress bars (with a distributed client).
    stacklevel
        Kept for callers that pass it; the warnings name the first line outside distumap that
        led to them (the caller of ``read_csv``, or of :func:`distumap.io.read`).

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
    ingest finished. It is :func:`distumap.io.read` with ``format="csv"``.

    Examples
    --------
    >>> ds = distumap.io.read_csv(
    ...     "matrix.csv", "store.zarr", metadata="metadata.csv"
    ... )  # doctest: +SKIP
    """
    return read(
        matrix,
        store,
        metadata=metadata,
        chunk_cells=chunk_cells,
        format="csv",
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
    )


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

    It is :func:`distumap.io.read` with ``format="csv", orientation="genes-by-cells"``, whose
    parameters these are (``stacklevel`` as in :func:`distumap.io.read_csv`).

    Notes
    -----
    This computes, in two passes over the matrix (parse gene blocks into an intermediate array
    in the store, then write each cell chunk transposed), with memory bounded by one gene block
    (``distumap.gene-block-bytes``) or one store chunk per task. An interrupted ingest resumes.
    """
    return read(
        matrix,
        store,
        metadata=metadata,
        chunk_cells=chunk_cells,
        format="csv",
        dtype=dtype,
        orientation="genes-by-cells",
        overwrite=overwrite,
        progress=progress,
    )


# ---------------------------------------------------------------- the stage


def _ingest(
    readers: list[Reader],
    store: str,
    metadata: str | None,
    chunk_cells: int | None,
    overwrite: bool,
    progress: bool,
    *,
    representation: tuple[str, int] | None = None,
    with_counts: bool = True,
) -> xr.Dataset:
    kind = type(readers[0])
    dtype = readers[0].dtype.name
    params = kind.stage_params(readers, metadata=metadata, dtype=dtype)
    if representation is not None:  # recorded only then: earlier stores keep their record
        params.update(use_rep=representation[0], counts=with_counts)
    aligned = None
    if all(reader.genes_known for reader in readers):
        aligned = _aligned_genes(readers) if len(readers) > 1 else None
        # a block holds a chunk of counts, or without them a chunk of the representation
        width = readers[0].n_genes if with_counts else representation[1]
        chunk_cells = fitted_chunk_cells(store, chunk_cells, width, params)
    else:  # the genes are found by the index pass: the chunk size cannot wait for them
        chunk_cells = checked_options(chunk_cells, dtype)
    params["chunk_cells"] = chunk_cells
    sources = [reader.source for reader in readers]  # the metadata is read here, not there
    stage = claim(store, params, overwrite=overwrite, progress=progress, reads=sources)
    if stage.finished:
        return open_store(store)
    if not _resumable(stage, readers):
        aligned = _skeleton(
            stage, readers, aligned, metadata, chunk_cells, progress, representation, with_counts
        )
        release_memory()  # the skeleton's names and metadata, not kept for the later stages
    else:
        for reader in readers:
            _restore_index(stage, reader, progress)
        aligned = aligned or (None, [None] * len(readers))
    offsets = np.cumsum([0, *(reader.n_cells for reader in readers)])
    if offsets[-1] == 0:
        raise InputError(f"{', '.join(r.source for r in readers)}: no cells")
    if representation is not None:  # first: small, and its refusals come before the counts
        blocks = stage if not with_counts else stage.pass_(REP_MARKERS)
        _run_representation(blocks, readers, offsets, chunk_cells, representation[0])
    if with_counts:
        try:
            _run_blocks(stage, readers, aligned[1], offsets, chunk_cells, progress)
        except CountsDoNotFit as error:
            _widen(stage, readers, str(error))
            _run_blocks(stage, readers, aligned[1], offsets, chunk_cells, progress)
    rounded = warn_rounded(store, ", ".join(reader.source for reader in readers))
    stage.complete(rounded=rounded, **kind.stage_record(readers))
    return open_store(store)


def _resumable(stage: Stage, readers: list[Reader]) -> bool:
    """Whether an interrupted ingest left a skeleton to trust: the stage's markers (written
    last), and what a transposition still needs."""
    if not stage.resumable():
        return False
    if any(reader.transposition == "gene-rows" for reader in readers):
        return transposition.gene_rows_ready(stage)
    return True


def _widen_for(stage: Stage, readers: list[Reader], high: float) -> None:
    """Widen ``counts`` before any block is written when the input's largest count ``high``
    (known after a first pass over it) does not fit a narrow ``counts``."""
    counts = zarr.open_array(stage.store, path="counts", mode="r")
    if counts.dtype.kind in "iu" and high > np.iinfo(counts.dtype).max:
        reason = f"a count ({high:,.0f}) above {np.iinfo(counts.dtype).max:,}"
        _widen(stage, readers, reason, again=False)


def _widen(stage: Stage, readers: list[Reader], reason: str, *, again: bool = True) -> None:
    """Make ``counts`` int32 and every block pending (``again``: after a block found a count
    that the narrow type does not hold); says so in one line. The markers are cleared before
    the array is replaced, so an interruption in between leaves blocks to write, never a
    marked block that is not there."""
    n_blocks = progress_array(stage.store, stage.markers, mode="r").shape[0]
    stage.start(n_blocks=n_blocks)
    wide = widen_counts(stage.store)
    consolidate(stage.store)
    sources = ", ".join(reader.source for reader in readers)
    print(
        f"distumap ingest: {sources}: {reason}; storing counts as {wide}"
        + (" and writing every block again" if again else ""),
        file=sys.stderr,
        flush=True,
    )


def _index(reader: Reader, progress: bool) -> None:
    """The reader's index pass, in parallel byte ranges on the cluster."""
    from distumap._compute import run

    ranges = reader.index_ranges()
    token = tokenize(reader.fingerprint(), ranges)
    index = dask.delayed(reader.index_block, pure=True)
    tasks = [
        index(begin, end, dask_key_name=f"{reader.index_key}-{token}-{i}")
        for i, (begin, end) in enumerate(ranges)
    ]
    reader.set_index(run(tasks, stage=reader.index_label, progress=progress))


def _restore_index(stage: Stage, reader: Reader, progress: bool) -> None:
    """A resumed ingest: the index the store kept, or (not kept, and needed) a new pass."""
    if reader.persists_index:
        arrays = {name: progress_array(stage.store, name, mode="r")[:] for name in _INDEX_NAMES}
        reader.load_index(arrays)
    elif reader.needs_index and stage.pending():
        _index(reader, progress)


#: the names a persisted index is kept under in the store
_INDEX_NAMES = ("line_start", "line_number")


def _skeleton(
    stage: Stage,
    readers: list[Reader],
    aligned: tuple | None,
    metadata: str | None,
    chunk_cells: int,
    progress: bool,
    representation: tuple[str, int] | None = None,
    with_counts: bool = True,
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Index, write the skeleton and start the stage; returns the genes and their alignment."""
    for reader in readers:
        if reader.needs_index:
            _index(reader, progress)
    if aligned is None:
        aligned = _aligned_genes(readers)
    genes = aligned[0]
    offsets = np.cumsum([0, *(reader.n_cells for reader in readers)])
    if offsets[-1] == 0:
        raise InputError(f"{', '.join(r.source for r in readers)}: no cells")
    labels = source_labels([reader.source for reader in readers])
    suffixed = check_cell_names(readers, labels)
    table = None
    if metadata is not None:
        table = MetadataTable(metadata)
        for _, cells in name_blocks(readers, labels, suffixed):
            table.match(cells)
        table.settle()
    create_skeleton(
        stage.store, n_cells=int(offsets[-1]), genes=genes, gene_coords=_gene_coords(readers),
        cell_columns=cell_columns(readers, labels, offsets, suffixed, table),
        chunk_cells=chunk_cells, params=stage.params, counts=with_counts,
        representation=representation,
    )  # fmt: skip
    for reader in readers:
        for name, values in reader.persisted_index().items():
            create_progress(stage.store, name, values)
        if reader.transposition == "gene-rows":
            transposition.create_gene_rows(
                stage, int(offsets[-1]), len(genes), chunk_cells, stage.params["dtype"]
            )
    n_blocks = -(-int(offsets[-1]) // chunk_cells)
    if representation is not None and with_counts:  # the representation's pass: own markers
        stage.pass_(REP_MARKERS).create_markers(n_blocks)
    # the markers are the last thing the skeleton writes: with them, a resume can trust it
    stage.start(n_blocks=n_blocks)
    return aligned


def _gene_coords(readers: list[Reader]) -> dict[str, np.ndarray]:
    """``gene_ids`` where every input has them."""
    gene_ids = [reader.gene_ids() for reader in readers]
    if all(ids is not None for ids in gene_ids):
        return {"gene_ids": np.asarray(gene_ids[0], dtype=object)}
    return {}


def _run_blocks(
    stage: Stage,
    readers: list[Reader],
    permutations: list[np.ndarray | None],
    offsets: np.ndarray,
    chunk_cells: int,
    progress: bool,
) -> None:
    """Every block not yet written: transpositions first, then one task per block (or, for a
    single input read in order, one task for them all)."""
    store = stage.store
    kinds = "+".join(dict.fromkeys(reader.format for reader in readers))
    if len(readers) == 1 and readers[0].sequential and readers[0].transposition is None:
        key, label = (text.format(format=kinds) for text in readers[0].sequential_task)
        stage.run_sequential(_read_sequential, store, readers[0], chunk_cells, key=key, label=label)
        return
    scratch: list[tuple | None] = [None] * len(readers)
    for i, reader in enumerate(readers):
        if reader.transposition == "entries" and stage.pending():
            scratch[i] = transposition.transpose_csc(stage, reader, i, int(offsets[i]), chunk_cells)
        elif reader.transposition == "gene-rows" and stage.pending():
            transposition.run_gene_rows(stage, reader)
            _widen_for(stage, readers, transposition.gene_rows_max(store))
    shared = dask.delayed((readers, permutations, scratch), pure=True, traverse=False)
    key, label = (text.format(format=kinds) for text in readers[0].block_task)
    stage.run_blocks(
        _read_block,
        {b: ((store, shared, offsets, b, chunk_cells), {}) for b in stage.pending()},
        key=key,
        label=label,
        total=int(offsets[-1]),
    )
    for i, reader in enumerate(readers):
        if reader.transposition == "entries":
            transposition.drop_scratch(store, i)
        elif reader.transposition == "gene-rows":
            transposition.drop_gene_rows(store)


#: the markers of the representation's blocks when the counts are read too (without counts
#: they are the stage's own)
REP_MARKERS = "ingest_rep"


def _run_representation(
    blocks: Stage | StagePass,
    readers: list[Reader],
    offsets: np.ndarray,
    chunk_cells: int,
    key: str,
) -> None:
    """Every block of ``rep`` not yet written, one ``read-obsm-block`` task per store chunk."""
    shared = dask.delayed(readers, pure=True, traverse=False)
    blocks.run_blocks(
        _read_representation_block,
        {b: ((blocks.store, shared, offsets, b, chunk_cells, key), {}) for b in blocks.pending()},
        key="read-obsm-block",
        label=f"ingest: read obsm/{key} blocks",
        total=int(offsets[-1]),
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


# ---------------------------------------------------------------- the block tasks


def _read_block(
    store: str, inputs: tuple, offsets: np.ndarray, block: int, chunk_cells: int
) -> int:
    """Read store chunk ``block`` from the input(s) its cells come from, and write it.

    The chunk is put together in the worker's block buffer, reused from task to task: a fresh
    block-sized array per block costs page faults that take as long as reading the block. A
    transposed input's cells come from its scratch.
    """
    readers, permutations, scratch = inputs
    if readers[0].transposition == "gene-rows":  # one input: its intermediate, transposed
        return transposition.transpose_block(store, block, chunk_cells)
    counts = zarr.open_array(store, path="counts", mode="r")
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, counts.shape[0])
    out = block_buffer((last - first, counts.shape[1]), readers[0].dtype)  # write_block narrows
    rounded = 0
    for reader, permutation, entries, begin, end in zip(
        readers, permutations, scratch, offsets[:-1], offsets[1:], strict=True
    ):
        lo, hi = max(first, int(begin)), min(last, int(end))
        if lo >= hi:
            continue
        rows = out[lo - first : hi - first]
        if entries is not None:
            rows[...] = 0
            column_map = None
            if permutation is not None:
                column_map = np.empty_like(permutation)
                column_map[permutation] = np.arange(permutation.size)
            rounded += reader.fill_csc_entries(
                transposition.scratch_entries(store, entries, block),
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


def _read_representation_block(
    store: str, readers: list[Reader], offsets: np.ndarray, block: int, chunk_cells: int, key: str
) -> int:
    """Read store chunk ``block`` of the representation ``key`` from the input(s) its cells come
    from, and write it into ``rep``."""
    rep = zarr.open_array(store, path=REP, mode="r+")
    first, last = block * chunk_cells, min((block + 1) * chunk_cells, rep.shape[0])
    out = np.empty((last - first, rep.shape[1]), dtype=np.float32)
    for reader, begin, end in zip(readers, offsets[:-1], offsets[1:], strict=True):
        lo, hi = max(first, int(begin)), min(last, int(end))
        if lo < hi:
            out[lo - first : hi - first] = reader.read_representation(
                key, lo - int(begin), hi - int(begin)
            )
    rep[first:last] = out
    return last - first


def _read_sequential(store: str, reader: Reader, chunk_cells: int) -> int:
    """Read every unwritten chunk of one input that can only be read in order (gzip).

    This task decompresses and parses; a second thread compresses and writes the block before
    (the codec releases the GIL), so the sequential stage uses the core that would idle.
    """
    counts = zarr.open_array(store, path="counts", mode="r")
    n_cells = counts.shape[0]
    done = progress_array(store, "ingest", mode="r")[:]
    shape = (min(chunk_cells, n_cells), counts.shape[1])
    # two buffers: the writer compresses one while the reader fills the other
    buffers = [block_buffer(shape, reader.dtype), np.empty(shape, dtype=reader.dtype)]
    total = 0
    writing: Any = None  # (future, block, cells, rounded) of the write in flight

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

    skip = {int(b) for b in np.flatnonzero(done)}
    with ThreadPoolExecutor(1, thread_name_prefix="distumap-write") as writer:
        for begin, end, values, moved in reader.iter_blocks(
            chunk_cells, buffers=buffers, skip=skip
        ):
            finish()  # the buffer the next block goes into is free again
            block = begin // chunk_cells
            if done[block]:
                continue
            future = writer.submit(write_block, store, block, begin, values)
            writing = (future, block, end - begin, moved)
        finish()
    return total
