"""What every ingest writes into the store, whatever the input: the skeleton (coordinates,
metadata, an empty ``counts``), one block with its per-gene statistics, the rounding count, and
the checks that come before (options, chunk size, whether the store may be written).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from typing import Any

import dask.array as da
import numba
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from distumap import _config
from distumap._errors import InputError, outside_stacklevel
from distumap._format import (
    ATTR,
    FORMAT_VERSION,
    NARROW_COUNTS,
    NONZERO,
    PROGRESS_GROUP,
    REP,
    REP_KEY,
    metadata_name,
)
from distumap._stage import Stage
from distumap._store import create_progress, is_store, occupied, progress_array, stage_record
from distumap.io.readers._base import ROUNDING_TOLERANCE

__all__ = [
    "COUNTS_CODEC",
    "DTYPES",
    "CountsDoNotFit",
    "MetadataTable",
    "block_buffer",
    "checked_options",
    "claim",
    "counts_codec",
    "create_skeleton",
    "fitted_chunk_cells",
    "name_hash",
    "narrowed",
    "nonzero_per_gene",
    "read_metadata",
    "stored_dtype",
    "warn_rounded",
    "widen_counts",
    "write_block",
]

#: count compression: lz4 with bit shuffling suits sparse small integers and writes fast enough
#: to keep up with the parse (zstd compresses smaller but slower; see benchmarks/RESULTS.md)
COUNTS_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)

_buffers = threading.local()


#: what the store's ``counts`` may hold: counts, or (``--dtype float32``) normalised values
DTYPES = ("int32", "float32")


class CountsDoNotFit(InputError):
    """A block holds a count too large for the narrow type ``counts`` was created with.

    Raised by :func:`write_block` before it writes anything; the ingest then widens ``counts``
    (:func:`widen_counts`) and writes every block again. An InputError, so that the stage's block
    tasks return it as a result instead of failing on the worker; the ingest never lets it out.
    """

    def __init__(self, cell: int, count: int):
        super().__init__(f"cell {cell} holds a count ({count:,}) outside 0..{_NARROW_MAX:,}")
        self.cell, self.count = cell, count

    def __reduce__(self):  # it travels from the worker as a task's result
        return type(self), (self.cell, self.count)


_NARROW_MAX = int(np.iinfo(NARROW_COUNTS).max)


def stored_dtype(dtype: str) -> np.dtype:
    """The type a new store's ``counts`` is created with for the ingest option ``dtype``: counts
    (``"int32"``) start narrow, as :data:`~distumap._format.NARROW_COUNTS`; float32 stays."""
    return NARROW_COUNTS if np.dtype(dtype).kind in "iu" else np.dtype(np.float32)


def counts_codec(dtype: np.dtype) -> BloscCodec:
    """:data:`COUNTS_CODEC`, with the byte shuffle of ``dtype``'s width."""
    codec = COUNTS_CODEC
    return BloscCodec(
        cname=codec.cname,
        clevel=codec.clevel,
        shuffle=codec.shuffle,
        typesize=np.dtype(dtype).itemsize,
    )


def block_buffer(shape: tuple[int, int], dtype: np.dtype, *, name: str = "counts") -> np.ndarray:
    """A per-thread buffer for parsed blocks, reused from task to task: a fresh block-sized
    allocation costs page faults that take longer than the parse itself. ``name`` tells apart
    the buffers a thread keeps at once (the parsed block and its narrowed copy)."""
    buf = getattr(_buffers, name, None)
    if buf is None or buf.size < shape[0] * shape[1] or buf.dtype != dtype:
        buf = np.empty(shape[0] * shape[1], dtype=dtype)
        setattr(_buffers, name, buf)
    return buf[: shape[0] * shape[1]].reshape(shape)


def read_metadata(
    metadata: str, cells: list[str] | np.ndarray, *, stacklevel: int | None = None
) -> dict[str, np.ndarray]:
    """Metadata columns aligned to ``cells`` (joined on ``sample_name``, or on the first column
    when there is no ``sample_name``).

    Cells missing from the metadata get empty strings (text columns) or NaN (numbers), and one
    warning counts them. Columns whose names the store uses get a ``_metadata`` suffix.
    """
    table = MetadataTable(metadata)
    cells = np.asarray(cells, dtype=object)
    table.match(cells)
    table.settle(stacklevel=stacklevel + 1 if stacklevel else None)
    return table.aligned(cells)


class MetadataTable:
    """A metadata CSV joined on cell names a block at a time: the ingest's skeleton matches
    every block of names (:meth:`match`), settles each column's type once (:meth:`settle`,
    which warns), then takes the aligned columns block by block (:meth:`aligned`).

    The file is read once, :data:`METADATA_ROWS` rows at a time. Its names are kept as two
    64-bit hashes per row, not as strings, and cells are joined on equal pairs (names that
    differ share both with odds of about 2**-128 a pair): 24 bytes a row, no name kept."""

    def __init__(self, metadata: str):
        import pandas as pd

        self.source = source = str(metadata)
        try:
            header = pd.read_csv(source, nrows=0).columns
            # the first column names the cells when none is called sample_name, as pandas
            # writes an index (empty header cell)
            self.key = key = "sample_name" if "sample_name" in header else header[0]
            parts, hashes, named = [], [], []
            for part in pd.read_csv(
                source, dtype={key: str}, keep_default_na=True, chunksize=METADATA_ROWS
            ):
                names = part.pop(key)
                named.append(names.notna().to_numpy())  # a row without a name joins no cell
                hashes.append(_name_hashes(names.fillna("").to_numpy(dtype=object)))
                parts.append(part.copy())  # the parsed block kept the names alive
        except pd.errors.EmptyDataError:
            raise InputError(f"{source}: line 1: the metadata file is empty") from None
        except pd.errors.ParserError as error:
            raise InputError(f"{source}: {error}") from None
        if not parts:  # a header alone
            parts = [pd.DataFrame(columns=[column for column in header if column != key])]
            hashes, named = [_name_hashes(np.zeros(0, dtype=object))], [np.zeros(0, dtype=bool)]
        self.table = pd.concat(parts, ignore_index=True)
        del parts
        first, second = (np.concatenate(column) for column in zip(*hashes, strict=True))
        named = np.concatenate(named)
        del hashes
        order = np.lexsort((second, first))
        self.order = order[named[order]]
        del order, named
        self.first, self.second = first[self.order], second[self.order]
        repeated = (self.first[1:] == self.first[:-1]) & (self.second[1:] == self.second[:-1])
        if repeated.any():
            row = int(self.order[1:][repeated].min())  # the first row that repeats a name
            name = pd.read_csv(source, dtype=str, skiprows=range(1, row + 1), nrows=1)[key][0]
            raise InputError(
                f"{source}: line {row + 2}, column {key}: duplicate sample name {name!r}"
            )
        self.used = np.zeros(len(self.table), dtype=bool)  # rows some cell joins
        self.cells = self.missing = 0
        self.kinds: dict[str, tuple[str, np.dtype | None]] = {}  # key -> (column, dtype)

    def rows(self, names: np.ndarray) -> np.ndarray:
        """The table's row of each name, -1 where it has none."""
        first, second = _name_hashes(names)
        left = np.searchsorted(self.first, first, "left")
        right = np.searchsorted(self.first, first, "right")
        rows = np.full(len(names), -1, dtype=np.int64)
        one = np.flatnonzero(right - left == 1)  # nearly always: the second hash decides
        hit = one[self.second[left[one]] == second[one]]
        rows[hit] = self.order[left[hit]]
        for cell in np.flatnonzero(right - left > 1).tolist():  # a first hash shared
            span = np.flatnonzero(self.second[left[cell] : right[cell]] == second[cell])
            if len(span):
                rows[cell] = self.order[left[cell] + span[0]]
        return rows

    def match(self, names: np.ndarray) -> None:
        """Join one block of cell names (every block, before :meth:`settle`)."""
        rows = self.rows(names)
        self.used[rows[rows >= 0]] = True
        self.missing += int((rows < 0).sum())
        self.cells += len(names)

    def settle(self, *, stacklevel: int | None = None) -> dict[str, tuple[str, np.dtype | None]]:
        """Each column's store name and type, as the whole aligned column would have them:
        bool, a number (float64 where a joined cell lacks a value), or text (``None``)."""
        import pandas as pd

        stacklevel = stacklevel or outside_stacklevel()
        if self.missing:
            warnings.warn(
                f"{self.source}: {self.missing} of {self.cells} cells have no metadata row; "
                "they get empty labels (and NaN for numeric columns)",
                UserWarning,
                stacklevel=stacklevel,
            )
        renamed: list[str] = []
        for name in self.table.columns:
            column = self.table[name]
            key = metadata_name(name, set(self.kinds))
            if key != name:
                renamed.append(f"{name!r} -> {key!r}")
            if pd.api.types.is_bool_dtype(column):
                dtype = np.dtype(bool) if not self.missing else None
            elif pd.api.types.is_numeric_dtype(column):
                gaps = bool(self.missing) or bool(column[self.used].isna().any())
                dtype = np.dtype(np.float64) if gaps else np.dtype(column.dtype)
            else:
                dtype = None
            self.kinds[key] = (name, dtype)
        if renamed:
            warnings.warn(
                f"{self.source}: metadata column(s) renamed, since distumap's store or exports "
                f"use the name (or it holds '/'): {', '.join(renamed)}",
                UserWarning,
                stacklevel=stacklevel,
            )
        return self.kinds

    def aligned(self, names: np.ndarray) -> dict[str, np.ndarray]:
        """The settled columns for one block of cell names."""
        block = self.table.reindex(self.rows(names))  # row -1: none, NaN in every column
        columns: dict[str, np.ndarray] = {}
        for key, (name, dtype) in self.kinds.items():
            column = block[name]
            if dtype is None:
                columns[key] = column.fillna("").astype(str).to_numpy(dtype=object)
            else:
                columns[key] = column.to_numpy(dtype=dtype)
        return columns


def name_hash(names: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each name (this process's own: never stored)."""
    return np.fromiter(map(hash, names), np.int64, len(names))


def _name_hashes(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of each name."""
    second = np.fromiter((hash(name + "\0") for name in names), np.int64, len(names))
    return name_hash(names), second


#: rows of a metadata file parsed at a time
METADATA_ROWS = 2**16

#: cells per zarr chunk of the names and metadata columns
CELL_COORD_CHUNK = 2**16


def create_skeleton(
    store: str,
    *,
    n_cells: int,
    cell_columns: Iterable[dict[str, np.ndarray]],
    genes: list[str] | np.ndarray,
    gene_coords: dict[str, np.ndarray],
    chunk_cells: int,
    params: dict[str, Any],
    counts: bool = True,
    representation: tuple[str, int] | None = None,
) -> None:
    """Write a store's skeleton: coordinates, an empty ``counts`` array chunked by cell blocks
    (narrow for counts: :func:`stored_dtype`), the "started" ingest record and the per-block
    rounding counts. Every reader's ingest uses it; the stage's markers, written next by
    :meth:`distumap._stage.Stage.start`, come last.

    ``cell_columns`` gives the per-cell coordinates (``cell``, the names, first) in blocks of
    :data:`CELL_COORD_CHUNK` cells (the last may be shorter), each written as it comes: no
    array of every cell is made. ``counts=False`` leaves ``counts`` (and its per-gene
    statistics) out; ``representation``, ``(obsm key, width)``, adds an empty float32 ``rep``
    (cell, rep_dim) with the same cell chunks, whose attribute names the key."""
    n_genes = len(genes)
    # the "started" record goes in with the first block, so a store is never unrecognisable
    attrs = {
        ATTR: {
            "format": FORMAT_VERSION,
            "stages": {"ingest": {"status": "started", "params": params}},
        }
    }
    for number, columns in enumerate(cell_columns):
        names = columns.pop("cell")
        part = xr.Dataset(
            coords={"cell": names, **{key: ("cell", values) for key, values in columns.items()}}
        )
        if number == 0:
            # the names and metadata in chunks of a few MB, which the exports and pictures
            # read a block at a time (zarr's own choice for strings is a few chunks for all)
            chunk = (max(1, min(n_cells, CELL_COORD_CHUNK)),)
            part.attrs.update(attrs)
            encoding = {key: {"chunks": chunk} for key in part.coords}
            part.to_zarr(store, mode="w", consolidated=False, encoding=encoding)
        else:
            part.to_zarr(store, append_dim="cell", consolidated=False)
    dtype = stored_dtype(params["dtype"])
    variables: dict[str, Any] = {}
    encoding: dict[str, Any] = {}
    if counts:
        values = da.zeros((n_cells, n_genes), chunks=(chunk_cells, n_genes), dtype=dtype)
        variables["counts"] = (("cell", "gene"), values)
        encoding["counts"] = {
            "chunks": (chunk_cells, n_genes),
            "compressors": [counts_codec(dtype)],
        }
    if representation is not None:
        key, width = representation
        values = da.zeros((n_cells, width), chunks=(chunk_cells, width), dtype=np.float32)
        variables[REP] = (("cell", "rep_dim"), values, {REP_KEY: key})
        encoding[REP] = {"chunks": (chunk_cells, width)}
    coords = {"gene": np.asarray(genes, dtype=object)}
    coords.update({key: ("gene", values) for key, values in gene_coords.items()})
    # xarray keeps the names of coordinates no variable uses in the group's "coordinates"
    # attribute, which a second write replaces: without it they would open as data variables
    cell_coords = zarr.open_group(store, mode="r", use_consolidated=False).attrs.get("coordinates")
    template = xr.Dataset(variables, coords=coords, attrs=attrs)
    template.to_zarr(store, mode="a", compute=False, consolidated=False, encoding=encoding)
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    if cell_coords:
        group.attrs.update({"coordinates": cell_coords})
    n_blocks = -(-n_cells // chunk_cells)
    # per block: float-written counts that were rounded (one warning at the end)
    create_progress(store, "rounded", np.zeros(n_blocks, dtype=np.int64), chunks=1)
    if not counts:
        return
    # per block and gene: the cells with a non-zero value, what the preprocess's gene
    # statistics need, counted while the block is in memory (see write_block)
    group.require_group(PROGRESS_GROUP).create_array(
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
    marked block are both written, and a block written again rewrites both. ``values`` (int32
    or float32, as the readers make them) are stored in ``counts``' own type: int32 counts go
    into a narrow ``counts`` through one pass that also counts the non-zero cells and checks
    that every count fits; a block whose counts do not raises :class:`CountsDoNotFit` and
    writes nothing.
    """
    counts = zarr.open_array(store, path="counts", mode="r+")
    if counts.dtype == values.dtype:
        stored, nonzero = values, nonzero_per_gene(values)
    else:
        stored, nonzero = narrowed(values, counts.dtype, first)
    # zarr's check for an all-zero chunk (skipped when writing) costs a comparison pass over
    # the block, slower on uint16 than the narrowing itself; an all-zero block is rare and
    # compresses to almost nothing, so it is written like any other
    counts = counts.with_config({"write_empty_chunks": True})
    counts[first : first + len(values)] = stored
    zarr.open_array(store, path=NONZERO, mode="r+")[block] = nonzero


def narrowed(values: np.ndarray, dtype: np.dtype, first: int) -> tuple[np.ndarray, np.ndarray]:
    """A block of int32 counts in the narrow type, with its non-zero cells per gene.

    Parameters
    ----------
    values
        A (cells, genes) int32 block, as the readers make it.
    dtype
        The narrow type (:data:`~distumap._format.NARROW_COUNTS`).
    first
        The block's first cell in the store (for the error's message).

    Returns
    -------
    tuple of numpy.ndarray
        The block as ``dtype``, in this thread's narrow buffer (valid until the thread's next
        call), and the cells with a non-zero count per gene (int32), counted in the same pass.

    Raises
    ------
    CountsDoNotFit
        When a count is outside ``dtype``'s range, naming the first cell that holds one.
    """
    if values.dtype != np.int32 or np.dtype(dtype) != NARROW_COUNTS:
        raise TypeError(f"cannot store {values.dtype} blocks in a {dtype} counts array")
    values = np.ascontiguousarray(values)
    out = block_buffer(values.shape, NARROW_COUNTS, name="narrow")
    nonzero = np.zeros(values.shape[1], dtype=np.int32)
    row = _narrow_counting(values, out, nonzero, _NARROW_MAX)
    if row >= 0:
        outside = values[row][(values[row] < 0) | (values[row] > _NARROW_MAX)]
        raise CountsDoNotFit(first + int(row), int(outside[0]))
    return out, nonzero


@numba.njit(nogil=True, cache=True)
def _narrow_counting(values, out, nonzero, limit):  # pragma: no cover - compiled
    """Copy ``values`` into ``out`` and count each column's non-zero values, row by row, until
    a row holds a value outside 0..``limit``: returns that row, or -1 when none does."""
    for i in range(values.shape[0]):
        row = values[i]
        high = low = 0
        for j in range(row.shape[0]):
            value = row[j]
            high = max(high, value)
            low = min(low, value)
            out[i, j] = value
            nonzero[j] += value != 0
        if high > limit or low < 0:
            return i
    return -1


@numba.njit(nogil=True, cache=True)
def _count_nonzero_columns(values, out):  # pragma: no cover
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            out[j] += values[i, j] != 0


def nonzero_per_gene(values: np.ndarray) -> np.ndarray:
    """The cells with a non-zero value in each column of a (cells, genes) block, int32: what
    ``np.count_nonzero(values, axis=0)`` gives, in one row-major pass (numpy's strides through
    the block column by column)."""
    values = np.ascontiguousarray(values)
    out = np.zeros(values.shape[1], dtype=np.int32)
    if values.dtype in (np.int32, np.float32) and values.ndim == 2:
        _count_nonzero_columns(values, out)
    else:
        out[:] = np.count_nonzero(values, axis=0)
    return out


def widen_counts(store: str) -> np.dtype:
    """Create ``counts`` again, empty, as int32 (shape, chunks, dimensions and attributes as
    before, every value 0), for an ingest whose counts do not all fit the narrow type; returns
    the new type. The caller clears the block markers first: a marker must never outlive the
    block it stands for."""
    group = zarr.open_group(store, mode="r+", use_consolidated=False)
    old = group["counts"]
    wide = np.dtype(np.int32)
    group.create_array(
        "counts",
        shape=old.shape,
        chunks=old.chunks,
        dtype=wide,
        fill_value=0,
        compressors=[counts_codec(wide)],
        dimension_names=getattr(old.metadata, "dimension_names", None),
        attributes=dict(old.attrs),
        overwrite=True,
    )
    return wide


def warn_rounded(store: str, source: str, *, stacklevel: int | None = None) -> int:
    """One warning with the number of float-written counts the ingest rounded; returns it."""
    rounded = int(progress_array(store, "rounded", mode="r")[:].sum())
    if rounded:
        warnings.warn(
            f"{source}: {rounded:,} counts written as floats (such as 0.999999999999999) were "
            f"rounded to the nearest integer (each within {ROUNDING_TOLERANCE:g})",
            UserWarning,
            stacklevel=stacklevel or outside_stacklevel(),
        )
    return rounded


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


def claim(
    store: str,
    params: dict[str, Any],
    *,
    overwrite: bool,
    progress: bool,
    reads: list[str] | tuple[str, ...] = (),
) -> Stage:
    """The ingest stage on ``store``, after making sure that writing there destroys nothing and
    that every worker sees the store and the inputs ``reads`` (by :class:`Stage`).

    Only a distumap store (recognised by its attribute) is ever replaced, and only with
    ``overwrite`` when it holds other input; anything else at ``store`` is refused.
    """
    if not is_store(store):
        if occupied(store):
            raise InputError(
                f"{store}: something that is not a distumap store is already there; "
                "distumap replaces only its own stores (even with --overwrite): choose another path"
            )
        return Stage(store, "ingest", params, reads=reads, progress=progress)
    stage = Stage(store, "ingest", params, reads=reads, progress=progress)
    if stage.record is not None and stage.record.get("params") != params and not overwrite:
        raise InputError(
            f"{store}: this store was ingested from other input or with other parameters "
            f"({stage.record.get('params')}); choose another store or pass --overwrite"
        )
    return stage
