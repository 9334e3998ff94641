"""Pure readers for the binary formats atlases ship in, one class per format behind one interface.

A reader knows one format: how many cells and genes it holds, their names, the cells' metadata and
how to turn one cell range into a dense int32 (or float32) block. It does no store I/O and uses no
Dask: the ingest stage plugs readers into its parallel, resumable block tasks. A reader is cheap to
pickle (paths and small arrays; files are opened inside each call), so one reader travels to every
task.

Formats: 10x Cell Ranger HDF5 (v2 and v3), 10x MEX folders, AnnData (``.h5ad`` and zarr) and loom.
:func:`open_reader` picks the reader from the source, as ``design.md``'s input table says.

Every reader validates what it reads and raises :class:`~distumap._errors.InputError` with one line
that names the file and the dataset (HDF5, zarr) or the line (MEX): unreadable files, ``indptr``
that is not monotone or does not run from 0 to nnz, indices out of range, shapes that disagree with
the names, negative counts, and fractional counts when the dtype is int32. Values within 1e-6 of an
integer are rounded and counted: :meth:`Reader.read_counted` returns the count with the block (what
ingest tasks use), :meth:`Reader.read` adds it to :attr:`Reader.rounded`.

Blocks are filled by compiled kernels that check, convert and place every value in one pass,
straight into a block the caller may reuse (``out=``): no fresh array per block and no Python
per entry. A kernel only accepts or refuses; a refused block is read again on the checked path
(``_read_checked``, numpy), whose message names the file, the place and the gene.

Examples
--------
>>> reader = open_reader("pbmc_10k_v3.h5")  # doctest: +SKIP
>>> reader.format, reader.n_cells, reader.n_genes  # doctest: +SKIP
('10x-h5', 11769, 33538)
>>> block = reader.read(0, 1000)  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import contextlib
import gzip
import html
import itertools
import mmap
import os
import queue
import re
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
import h5py
import numba
import numpy as np

from distumap._errors import InputError
from distumap.io._csv import unique_gene_names

__all__ = [
    "FORMATS",
    "AnnDataReader",
    "AnnDataZarrReader",
    "LoomReader",
    "MexIndexBlock",
    "MexReader",
    "Reader",
    "TenxH5Reader",
    "detect_format",
    "open_reader",
]

#: the formats :func:`open_reader` knows, by the name ``--format`` takes
FORMATS = ("10x-h5", "mex", "h5ad", "anndata-zarr", "loom")

#: values this close to an integer are integer counts written as floats (``2.9999999``)
ROUNDING_TOLERANCE = 1e-6
_INT32_MAX = np.iinfo(np.int32).max
#: 10x feature type of the features kept
GENE_EXPRESSION = "Gene Expression"
#: entries read at once by the CSC reader's pass over the matrix (values and indices: ~100 MB)
CSC_ENTRIES_PER_PASS = 8 << 20
_FIX_DTYPE = "ingest with --dtype float32 to keep non-integer values (e.g. normalised data)"


# ---------------------------------------------------------------------------------------------
# small helpers: files, strings, values


def _fs_path(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(source)


def _is_local(source: str) -> bool:
    return "://" not in source or source.startswith("file://")


def _local(source: str) -> str:
    return source[len("file://") :] if source.startswith("file://") else source


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def _exists(source: str) -> bool:
    if _is_local(source):
        return os.path.exists(_local(source))
    fs, path = _fs_path(source)
    return fs.exists(path)


def _isdir(source: str) -> bool:
    if _is_local(source):
        return os.path.isdir(_local(source))
    fs, path = _fs_path(source)
    return fs.isdir(path)


def _file_identity(source: str) -> dict[str, Any]:
    """Path, size and modification time of one file (or, for a folder, of all its files)."""
    fs, path = _fs_path(source)
    try:
        if fs.isdir(path):
            infos = list(fs.find(path, detail=True).values())
        else:
            infos = [fs.info(path)]
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from exc
    size = int(sum(int(info.get("size") or 0) for info in infos))
    stamps = [
        info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("updated")
        for info in infos
    ]
    stamps = [stamp.timestamp() if hasattr(stamp, "timestamp") else stamp for stamp in stamps]
    stamps = [stamp for stamp in stamps if stamp is not None]
    mtime = max(stamps, key=str) if stamps else None
    if isinstance(mtime, float | int):
        mtime = float(mtime)
    elif mtime is not None:
        mtime = str(mtime)
    return {"path": source, "size": size, "mtime": mtime, "files": len(infos)}


def _as_strings(values: Any) -> np.ndarray:
    """An object array of ``str`` from bytes, str, numpy StringDType or object arrays."""
    array = np.asarray(values)
    out = np.empty(array.shape, dtype=object)
    flat = array.reshape(-1)
    target = out.reshape(-1)
    for i, value in enumerate(flat):
        if isinstance(value, bytes | np.bytes_):
            target[i] = bytes(value).decode("utf-8", errors="replace")
        else:
            target[i] = "" if value is None else str(value)
    return out


def _parse_dtype(dtype: str | np.dtype) -> np.dtype:
    try:
        parsed = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"dtype must be 'int32' or 'float32', got {dtype!r}") from exc
    if parsed not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise InputError(f"dtype must be 'int32' or 'float32', got {dtype!r}")
    return parsed


def _checked_values(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int, int, str]:
    """Convert count values to ``dtype``; returns ``(values, rounded, bad, problem)``.

    ``bad`` is the flat position of the first unacceptable value (-1 when all are fine) and
    ``problem`` says what is wrong with it; ``rounded`` counts the values within
    :data:`ROUNDING_TOLERANCE` of an integer that were rounded (int32 only).
    """
    kind = values.dtype.kind
    if values.size == 0:
        return values.astype(dtype, copy=False), 0, -1, ""
    if kind == "b":
        return values.astype(dtype), 0, -1, ""
    if kind in "iu":
        if kind == "i" and values.min() < 0:
            return values, 0, int(np.argmax(values < 0)), "a negative count"
        if dtype == np.int32 and values.max() > _INT32_MAX:
            return values, 0, int(np.argmax(values > _INT32_MAX)), "a count too large for int32"
        return values.astype(dtype, copy=False), 0, -1, ""
    if kind != "f":
        return values, 0, 0, f"a value of unsupported type {values.dtype}"
    finite = np.isfinite(values)
    if not finite.all():
        return values, 0, int(np.argmin(finite)), "a value that is not a finite number"
    if values.min() < 0:
        return values, 0, int(np.argmax(values < 0)), "a negative count"
    if dtype == np.float32:
        return values.astype(np.float32, copy=False), 0, -1, ""
    nearest = np.rint(values)
    distance = np.abs(values - nearest)
    if distance.max() > ROUNDING_TOLERANCE:
        return values, 0, int(np.argmax(distance > ROUNDING_TOLERANCE)), "a fractional count"
    if nearest.max() > _INT32_MAX:
        return values, 0, int(np.argmax(nearest > _INT32_MAX)), "a count too large for int32"
    return nearest.astype(np.int32), int(np.count_nonzero(distance)), -1, ""


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _scatter_rows(indptr, columns, values, out):  # pragma: no cover - compiled
    """``out[row, columns[k]] = values[k]`` for the entries ``indptr[row]:indptr[row + 1]``."""
    for row in range(indptr.shape[0] - 1):
        for k in range(indptr[row], indptr[row + 1]):
            out[row, columns[k]] = values[k]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _scatter_entries(rows, columns, values, out):  # pragma: no cover - compiled
    """``out[rows[k], columns[k]] = values[k]`` (numpy's 2-D fancy assignment is 10x slower)."""
    for k in range(values.shape[0]):
        out[rows[k], columns[k]] = values[k]


def _dense_rows(
    indptr: np.ndarray, columns: np.ndarray, values: np.ndarray, n_columns: int
) -> np.ndarray:
    out = np.zeros((indptr.shape[0] - 1, n_columns), dtype=values.dtype)
    if values.size:
        _scatter_rows(indptr.astype(np.int64, copy=False), columns, values, out)
    return out


def _buffer_view(buffers: list[np.ndarray] | None, i: int, rows: int, columns: int):
    """The first ``rows`` x ``columns`` values of ``buffers[i % len(buffers)]`` (None without)."""
    if not buffers:
        return None
    buffer = buffers[i % len(buffers)].reshape(-1)
    return buffer[: rows * columns].reshape(rows, columns)


# ---------------------------------------------------------------------------------------------
# compiled fast paths: check, convert and place values in one pass over the output block
#
# Each kernel writes straight into the caller's block (a buffer reused from block to block) and
# accepts exactly what :func:`_checked_values` accepts. When a value is not acceptable it stops
# with _REFUSED, and the reader re-reads the block on its checked path, whose message names the
# file, the place and the gene: the fast path never has to know how to explain a problem.

_ACCEPTED, _REFUSED = 0, 1
#: an empty column map: keep every column as it is
_NO_MAP = np.zeros(0, dtype=np.int64)


@numba.njit(nogil=True, cache=True, inline="always")
def _accept(value, integer):  # pragma: no cover - compiled
    """``(ok, rounded, converted)`` for one value: finite and non-negative, and for an integer
    target within ROUNDING_TOLERANCE of an integer that fits int32."""
    number = float(value)
    if not (number >= 0.0) or number == np.inf:  # NaN fails the comparison
        return False, 0, number
    if not integer:
        return True, 0, number
    nearest = np.rint(number)
    if abs(number - nearest) > ROUNDING_TOLERANCE or nearest > _INT32_MAX:
        return False, 0, number
    return True, 1 if nearest != number else 0, nearest


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill_rows(indptr, columns, values, column_map, integer, out):  # pragma: no cover - compiled
    """Row ``r`` of ``out``: zeros, then ``values[k]`` at ``columns[k]`` (mapped through
    ``column_map`` when it is not empty; -1 drops the entry) for ``k`` in
    ``indptr[r]:indptr[r + 1]``. Returns ``(status, rounded)``."""
    mapped = column_map.shape[0] > 0
    rounded = 0
    for row in range(out.shape[0]):
        out[row, :] = 0
        for k in range(indptr[row], indptr[row + 1]):
            column = columns[k]
            if mapped:
                column = column_map[column]
                if column < 0:
                    continue
            ok, moved, number = _accept(values[k], integer)
            if not ok:
                return _REFUSED, rounded
            rounded += moved
            out[row, column] = number
    return _ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill_entries(rows, columns, values, column_map, integer, out):  # pragma: no cover - compiled
    """``out[rows[k], column_map[columns[k]]] = values[k]`` (``out`` already zeroed; an empty map
    keeps the columns). Returns ``(status, rounded)``."""
    mapped = column_map.shape[0] > 0
    rounded = 0
    for k in range(values.shape[0]):
        column = column_map[columns[k]] if mapped else columns[k]
        ok, moved, number = _accept(values[k], integer)
        if not ok:
            return _REFUSED, rounded
        rounded += moved
        out[rows[k], column] = number
    return _ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill_dense(block, integer, out):  # pragma: no cover - compiled
    """``out[:] = block``, checked and converted (``block`` may be ``out`` itself)."""
    rounded = 0
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            ok, moved, number = _accept(block[i, j], integer)
            if not ok:
                return _REFUSED, rounded
            rounded += moved
            out[i, j] = number
    return _ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill_transposed(block, first_gene, first_cell, integer, out):  # pragma: no cover - compiled
    """``out[first_cell + c, first_gene + g] = block[g, c]`` for the part of the genes x cells
    ``block`` that falls inside ``out`` (cells x genes), checked and converted; tiled so that
    both sides stay in cache."""
    genes = min(block.shape[0], out.shape[1] - first_gene)
    cell_lo, cell_hi = max(0, -first_cell), min(block.shape[1], out.shape[0] - first_cell)
    rounded = 0
    tile = 64
    for g0 in range(0, genes, tile):
        g1 = min(g0 + tile, genes)
        for c0 in range(cell_lo, cell_hi, tile):
            c1 = min(c0 + tile, cell_hi)
            for c in range(c0, c1):
                for g in range(g0, g1):
                    ok, moved, number = _accept(block[g, c], integer)
                    if not ok:
                        return _REFUSED, rounded
                    rounded += moved
                    out[first_cell + c, first_gene + g] = number
    return _ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _bucket_by_block(
    indptr, first_entry, cells, value_words, first_cell, chunk_cells, packed, offsets
):  # pragma: no cover - compiled
    """Sort CSC entries ``first_entry + k`` (cell ``cells[k]`` of gene column ``g``, where
    ``indptr[g] <= first_entry + k < indptr[g + 1]``) by store block, stably.

    The store cell is ``first_cell + cells[k]``, its block ``// chunk_cells``. Entry ``k`` goes to
    ``packed[p] = (row in its block, gene, *value_words[k])``; ``offsets`` (one more than the
    blocks) receives where each block's entries start.
    """
    n = cells.shape[0]
    offsets[:] = 0
    for k in range(n):
        offsets[(first_cell + cells[k]) // chunk_cells + 1] += 1
    for b in range(1, offsets.shape[0]):
        offsets[b] += offsets[b - 1]
    cursor = offsets[:-1].copy()
    gene = 0
    while indptr[gene + 1] <= first_entry:
        gene += 1
    words = value_words.shape[1]
    for k in range(n):
        while indptr[gene + 1] <= first_entry + k:
            gene += 1
        cell = first_cell + cells[k]
        block = cell // chunk_cells
        p = cursor[block]
        cursor[block] = p + 1
        packed[p, 0] = cell - block * chunk_cells
        packed[p, 1] = gene
        for w in range(words):
            packed[p, 2 + w] = value_words[k, w]


def _packed_dtype(dtype: np.dtype) -> np.dtype:
    """How values travel in 32-bit words: narrower numbers are widened, losslessly."""
    dtype = np.dtype(dtype)
    if dtype.itemsize >= 4:
        return dtype.newbyteorder("=")
    return np.dtype(np.float32) if dtype.kind == "f" else np.dtype(np.int32)


# ---------------------------------------------------------------------------------------------
# the interface


class Reader(abc.ABC):
    """One input file (or folder) in one format: its cells, genes, metadata and count blocks.

    Parameters
    ----------
    source
        Local path or fsspec URL.
    layer
        A named layer instead of the main matrix (AnnData ``layers/NAME``, loom ``/layers/NAME``).
    dtype
        ``"int32"`` for counts (fractional values are refused) or ``"float32"`` (any
        non-negative values, e.g. normalised data).

    Attributes
    ----------
    format : str
        ``"10x-h5"``, ``"mex"``, ``"h5ad"``, ``"anndata-zarr"`` or ``"loom"``.
    source : str
    n_cells, n_genes : int
        Shape of the blocks: cells x the genes kept (10x: Gene Expression features only).
    dtype : numpy.dtype
        int32 or float32.
    orientation : str
        ``"cells"`` when a cell range is contiguous on disk (10x, MEX, CSR and dense AnnData,
        loom); ``"genes"`` for CSC AnnData, where :meth:`read` passes over the whole matrix (an
        ingest transposes it once instead) and :meth:`read_genes` is the cheap direction.
    rounded : int
        Values rounded to integers by :meth:`read` calls on this object (near-integer floats).
    dropped_features : int
        Features that are not genes and were left out (10x feature types other than Gene
        Expression).

    Notes
    -----
    Readers hold paths and small arrays only and open their files inside each call, so they
    pickle in a few kilobytes (a MEX reader's cell index adds 16 bytes per cell). Nothing here
    computes with Dask.
    """

    format: ClassVar[str] = ""
    orientation: str = "cells"

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        self.source = os.fspath(source)
        self.layer = layer
        self.dtype = _parse_dtype(dtype)
        self.n_cells = 0
        self.n_genes = 0
        self.rounded = 0
        self.dropped_features = 0

    def __repr__(self) -> str:
        layer = f", layer={self.layer!r}" if self.layer else ""
        return (
            f"{type(self).__name__}({self.source!r}{layer}, dtype={self.dtype.name!r}: "
            f"{self.n_cells} cells x {self.n_genes} genes)"
        )

    # -- names and metadata --

    @abc.abstractmethod
    def cells(self) -> np.ndarray:
        """Cell names (barcodes) in row order, as an object array of ``str``."""

    @abc.abstractmethod
    def _raw_genes(self) -> np.ndarray:
        """Gene names as written (kept genes only), object array of ``str``."""

    def genes(self) -> np.ndarray:
        """Gene names in column order, made unique as scanpy's ``var_names_make_unique`` does.

        Returns
        -------
        numpy.ndarray
            Object array of ``str``: the second ``"A"`` becomes ``"A-1"``, the third ``"A-2"``.

        Warns
        -----
        UserWarning
            One line saying how many names were renamed, and one saying how many non-gene
            features were left out (10x), when any were.
        """
        if self.dropped_features:
            warnings.warn(
                f"{self.source}: kept the {self.n_genes} {GENE_EXPRESSION} features, left out "
                f"{self.dropped_features} features of other types (antibodies, CRISPR guides, "
                "peaks...)",
                UserWarning,
                stacklevel=2,
            )
        unique, duplicated = unique_gene_names(list(self._raw_genes()), self.source)
        if duplicated:
            examples = ", ".join(repr(name) for name in list(dict.fromkeys(duplicated))[:3])
            warnings.warn(
                f"{self.source}: {len(duplicated)} gene names repeat ({examples}...): renamed "
                "them name-1, name-2, ... as scanpy's var_names_make_unique does",
                UserWarning,
                stacklevel=2,
            )
        out = np.empty(len(unique), dtype=object)
        out[:] = unique
        return out

    def gene_ids(self) -> np.ndarray | None:
        """Feature ids (Ensembl ids) in column order, or None when the format has none."""
        return None

    def metadata(self) -> dict[str, np.ndarray]:
        """Per-cell columns other than the cell name (one array of ``n_cells`` per column)."""
        return {}

    # -- counts --

    def read(self, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """The dense ``(stop - start, n_genes)`` block of cells ``[start, stop)``.

        Parameters
        ----------
        start, stop
            Cell range, ``0 <= start <= stop <= n_cells``.
        out
            Where to put the block: a C-contiguous array of that shape and :attr:`dtype`, whose
            contents are replaced (a buffer reused from block to block saves a fresh allocation
            per block, whose page faults cost as much as reading it). None: a new array.

        Returns
        -------
        numpy.ndarray
            C-contiguous, :attr:`dtype`: ``out`` when given.

        Raises
        ------
        InputError
            The file is unreadable or its values are not counts; the message names the file and
            the dataset or line.

        Notes
        -----
        Memory is bounded by the block (plus, for CSC AnnData, one pass's entries). Values
        rounded to integers are added to :attr:`rounded`; use :meth:`read_counted` in tasks that
        run elsewhere.
        """
        block, rounded = self.read_counted(start, stop, out=out)
        self.rounded += rounded
        return block

    def read_counted(
        self, start: int, stop: int, *, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Like :meth:`read`, and also return how many near-integer values were rounded."""
        start, stop = self._check_range(start, stop, self.n_cells, "cells")
        out = self._output(stop - start, out)
        if stop == start:
            return out, 0
        return out, self._read(start, stop, out)

    def _output(self, n_cells: int, out: np.ndarray | None) -> np.ndarray:
        shape = (n_cells, self.n_genes)
        if out is None:
            return np.empty(shape, dtype=self.dtype)
        if out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"out must be a C-contiguous {self.dtype.name} array of shape {shape}, not "
                f"{out.dtype.name} {out.shape}"
            )
        return out

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        """Put the block of cells ``[start, stop)`` (checked, not empty) into ``out`` and return
        the number of rounded values. Readers override it with a compiled fast path; this one
        copies the checked path's block."""
        block, rounded = self._read_checked(start, stop)
        out[...] = block
        return rounded

    @abc.abstractmethod
    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        """The block and the number of rounded values, read on the path whose errors name the
        place of a bad value: the reference that the fast paths fall back on."""

    def _refused(self, start: int, stop: int) -> None:
        """A fast path refused a value of cells ``[start, stop)``: the checked path names it."""
        self._read_checked(start, stop)
        raise RuntimeError(
            f"{self.source}: cells {start}:{stop}: the compiled reader refused a value that the "
            "checked reader accepts (a distumap bug; please report it)"
        )

    def _fill_sparse_rows(
        self,
        indptr: np.ndarray,
        columns: np.ndarray,
        values: np.ndarray,
        out: np.ndarray,
        column_map: np.ndarray | None = None,
    ) -> int | None:
        """Compiled: the rows of a CSR slice into ``out``; the rounded values, or None when a
        value was refused (the checked path then names it)."""
        if values.dtype.kind == "b":
            values = values.view(np.uint8)
        if values.dtype.kind not in "iuf":
            return None
        status, rounded = _fill_rows(
            indptr,
            columns,
            values,
            _NO_MAP if column_map is None else column_map,
            self.dtype == np.int32,
            out,
        )
        return None if status != _ACCEPTED else int(rounded)

    def iter_blocks(
        self,
        chunk_cells: int,
        start: int = 0,
        stop: int | None = None,
        *,
        buffers: list[np.ndarray] | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``chunk_cells`` cells in order: ``(start, stop, block, rounded)``.

        Readers of sequential-only files (gzip MEX) read the file once for all blocks. With
        ``buffers`` (C-contiguous, :attr:`dtype`, at least ``chunk_cells`` x :attr:`n_genes`
        values each), block ``i`` is a view of ``buffers[i % len(buffers)]``: it stays valid
        until that buffer comes round again.
        """
        if chunk_cells < 1:
            raise ValueError("chunk_cells must be positive")
        start, stop = self._check_range(
            start, self.n_cells if stop is None else stop, self.n_cells, "cells"
        )
        for i, begin in enumerate(range(start, stop, chunk_cells)):
            end = min(begin + chunk_cells, stop)
            out = _buffer_view(buffers, i, end - begin, self.n_genes)
            block, rounded = self.read_counted(begin, end, out=out)
            yield begin, end, block, rounded

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able identity of the input: format, options and each file's path, size, mtime.

        Two fingerprints are equal when the input has not changed (as far as sizes and
        modification times tell); ingest stores it and compares it when resuming.
        """
        return {
            "format": self.format,
            "source": self.source,
            "layer": self.layer,
            "dtype": self.dtype.name,
            "files": [_file_identity(path) for path in self._files()],
        }

    def _files(self) -> list[str]:
        return [self.source]

    @property
    def _data_file(self) -> str:
        """The file that value errors name."""
        return self.source

    # -- shared checks --

    @staticmethod
    def _check_range(start: int, stop: int, size: int, what: str) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= size:
            raise IndexError(f"{what} {start}:{stop} outside 0:{size}")
        return start, stop

    def _convert(
        self, values: np.ndarray, locate: Callable[[int], tuple[str, str, int]]
    ) -> tuple[np.ndarray, int]:
        """Checked conversion; ``locate(bad)`` gives (where, cell, gene index) of a bad value."""
        converted, rounded, bad, problem = _checked_values(values, self.dtype)
        if bad >= 0:
            where, cell, gene = locate(bad)
            self._value_error(problem, values.reshape(-1)[bad], where, cell, gene)
        return converted, rounded

    def _value_error(self, problem: str, value: Any, where: str, cell: str, gene: int) -> None:
        try:
            name = repr(str(self._raw_genes()[gene]))
        except (InputError, IndexError):
            name = f"#{gene}"
        value = value.item() if isinstance(value, np.generic) else value
        shown = f"{value:.9g}" if isinstance(value, float) else repr(value)
        message = f"{self._data_file}: {where}: {problem} ({shown}) for cell {cell}, gene {name}"
        if problem == "a fractional count":
            message += f"; {_FIX_DTYPE}"
        raise InputError(message)


# ---------------------------------------------------------------------------------------------
# HDF5 and zarr access with errors that name the file and the dataset


@contextlib.contextmanager
def _hdf5(source: str) -> Iterator[h5py.File]:
    """The HDF5 file, read-only (a local path through h5py's own driver, a URL through fsspec)."""
    handle = None
    try:
        if _is_local(source):
            file = h5py.File(_local(source), "r")
        else:
            handle = fsspec.open(source, "rb").open()
            file = h5py.File(handle, "r")
    except FileNotFoundError as exc:
        raise InputError(f"{source}: no such file") from exc
    except (OSError, ValueError) as exc:
        if handle is not None:
            handle.close()
        raise InputError(
            f"{source}: not a readable HDF5 file (truncated or corrupt?): {exc}"
        ) from exc
    try:
        yield file
    finally:
        file.close()
        if handle is not None:
            handle.close()


def _node_name(node: Any) -> str:
    name = getattr(node, "name", None) or getattr(node, "path", "") or ""
    return name if name.startswith("/") else "/" + name


def _is_group(node: Any) -> bool:
    return hasattr(node, "keys") and not hasattr(node, "shape")


def _child(group: Any, key: str, source: str) -> Any:
    try:
        if key in group:
            return group[key]
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: {_node_name(group)}/{key}: cannot read ({exc})") from exc
    where = _node_name(group).rstrip("/")
    raise InputError(f"{source}: missing dataset {where}/{key}")


def _load(node: Any, source: str, selection: Any = ()) -> np.ndarray:
    """``node[selection]`` as numpy; unreadable data (a truncated file) is an InputError."""
    try:
        return np.asarray(node[selection])
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{source}: dataset {_node_name(node)}: cannot read ({exc})") from exc


def _load_strings(node: Any, source: str, *, unescape: bool = False) -> np.ndarray:
    if isinstance(node, h5py.Dataset) and h5py.check_string_dtype(node.dtype) is not None:
        try:
            values = node.asstr(errors="replace")[()]
        except (OSError, ValueError) as exc:
            raise InputError(f"{source}: dataset {_node_name(node)}: cannot read ({exc})") from exc
    else:
        values = _load(node, source)
    strings = _as_strings(values)
    if unescape:  # loompy writes non-ASCII characters as XML character references
        for i, value in enumerate(strings):
            if "&#" in value:
                strings[i] = html.unescape(value)
    return strings


def _attr(node: Any, key: str, default: Any = None) -> Any:
    value = node.attrs.get(key, default)
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value[()]
    return value


def _check_length(node: Any, expected: int, what: str, source: str) -> None:
    if len(node.shape) != 1 or node.shape[0] != expected:
        raise InputError(
            f"{source}: dataset {_node_name(node)} has shape {tuple(node.shape)}, expected "
            f"{expected} {what}"
        )


def _check_indptr(indptr: np.ndarray, nnz: int, where: str, source: str) -> None:
    if indptr.size == 0 or indptr[0] != 0:
        raise InputError(f"{source}: dataset {where}: indptr must start at 0")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        position = int(np.argmax(steps < 0)) + 1
        raise InputError(
            f"{source}: dataset {where}: indptr is not monotone at position {position} "
            f"({int(indptr[position - 1])} then {int(indptr[position])})"
        )
    if indptr[-1] != nnz:
        raise InputError(
            f"{source}: dataset {where}: indptr ends at {int(indptr[-1])}, but data holds "
            f"{nnz} values"
        )


def _major_slice(
    group: Any, start: int, stop: int, n_minor: int, source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``indptr`` (from 0), minor indices and values of majors ``[start, stop)``; only that
    slice of ``data`` and ``indices`` is read."""
    indptr_node = _child(group, "indptr", source)
    indptr = _load(indptr_node, source, slice(start, stop + 1)).astype(np.int64)
    where = _node_name(indptr_node)
    if indptr.size != stop - start + 1:
        raise InputError(f"{source}: dataset {where}: shorter than the matrix's shape says")
    steps = np.diff(indptr)
    if steps.size and steps.min() < 0:
        position = start + int(np.argmax(steps < 0)) + 1
        raise InputError(
            f"{source}: dataset {where}: indptr is not monotone at position {position}"
        )
    low, high = int(indptr[0]), int(indptr[-1])
    data_node = _child(group, "data", source)
    indices_node = _child(group, "indices", source)
    if low < 0 or high > data_node.shape[0] or high > indices_node.shape[0]:
        raise InputError(
            f"{source}: dataset {where}: indptr points to [{low}, {high}), outside the "
            f"{data_node.shape[0]} stored values"
        )
    indices = _load(indices_node, source, slice(low, high))
    values = _load(data_node, source, slice(low, high))
    if indices.size and (indices.min() < 0 or indices.max() >= n_minor):
        bad = int(np.argmax((indices < 0) | (indices >= n_minor)))
        raise InputError(
            f"{source}: dataset {_node_name(indices_node)}: index {int(indices[bad])} at "
            f"position {low + bad} is out of range (0 to {n_minor - 1})"
        )
    return indptr - low, indices.astype(np.int64, copy=False), values


# ---------------------------------------------------------------------------------------------
# 10x Cell Ranger HDF5


class TenxH5Reader(Reader):
    """10x Cell Ranger's ``filtered_feature_bc_matrix.h5``: v3 (``/matrix``) and v2 (genomes).

    The matrix is CSC genes x barcodes, so one barcode's entries are contiguous: :meth:`read`
    reads ``indptr[start:stop + 1]`` and only that slice of ``data`` and ``indices``. Gene
    Expression features only (v3 ``features/feature_type``); the others are counted in
    :attr:`dropped_features` and announced by :meth:`genes`.

    Parameters
    ----------
    source
        Path or fsspec URL of the ``.h5`` file.
    layer
        v2 files with several genome groups: the genome to read (no layers otherwise).
    dtype
        ``"int32"`` or ``"float32"``.

    Examples
    --------
    >>> reader = TenxH5Reader("filtered_feature_bc_matrix.h5")  # doctest: +SKIP
    >>> reader.read(0, 100).shape  # doctest: +SKIP
    (100, 33538)
    """

    format = "10x-h5"

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        self._gene_map: np.ndarray | None = None  # feature index -> kept gene index or -1
        with _hdf5(self.source) as file:
            self._group, self.version = self._find_group(file)
            group = file[self._group]
            self._validate(group)

    def _find_group(self, file: h5py.File) -> tuple[str, int]:
        if "matrix" in file and _is_group(file["matrix"]):
            if self.layer is not None:
                raise InputError(f"{self.source}: a 10x v3 file has no layers (got {self.layer!r})")
            return "/matrix", 3
        genomes = [key for key in file if _is_group(file[key]) and "barcodes" in file[key]]
        if not genomes:
            raise InputError(
                f"{self.source}: not a 10x Cell Ranger HDF5 file: no /matrix group (v3) and no "
                "genome group with barcodes (v2)"
            )
        if self.layer is not None:
            if self.layer not in genomes:
                raise InputError(
                    f"{self.source}: no genome group {self.layer!r}; the file has {genomes}"
                )
            return "/" + self.layer, 2
        if len(genomes) > 1:
            raise InputError(
                f"{self.source}: a 10x v2 file with several genomes {genomes}: pick one with "
                "--layer GENOME"
            )
        return "/" + genomes[0], 2

    def _feature_nodes(self, group: h5py.Group) -> tuple[Any, Any]:
        """(names, ids) datasets."""
        if self.version == 3:
            features = _child(group, "features", self.source)
            return _child(features, "name", self.source), _child(features, "id", self.source)
        return _child(group, "gene_names", self.source), _child(group, "genes", self.source)

    def _validate(self, group: h5py.Group) -> None:
        source = self.source
        shape_node = _child(group, "shape", source)
        shape = _load(shape_node, source)
        if shape.shape != (2,):
            raise InputError(f"{source}: dataset {_node_name(shape_node)} must hold 2 numbers")
        n_features, n_barcodes = (int(v) for v in shape)
        barcodes = _child(group, "barcodes", source)
        names, ids = self._feature_nodes(group)
        for node, expected, what in (
            (barcodes, n_barcodes, "barcodes (shape says)"),
            (names, n_features, "features (shape says)"),
            (ids, n_features, "features (shape says)"),
        ):
            _check_length(node, expected, what, source)
        data, indices = _child(group, "data", source), _child(group, "indices", source)
        if data.shape != indices.shape or len(data.shape) != 1:
            raise InputError(
                f"{source}: datasets {_node_name(data)} and {_node_name(indices)} differ in "
                f"shape ({data.shape} and {indices.shape})"
            )
        indptr_node = _child(group, "indptr", source)
        _check_length(indptr_node, n_barcodes + 1, "entries (barcodes + 1)", source)
        _check_indptr(_load(indptr_node, source), data.shape[0], _node_name(indptr_node), source)
        self.n_cells, self._n_features = n_barcodes, n_features
        self.n_genes = n_features
        if self.version == 3 and "feature_type" in group["features"]:
            types = _load_strings(group["features/feature_type"], source)
            keep = types == GENE_EXPRESSION
            if not keep.all():
                self.n_genes = int(keep.sum())
                self.dropped_features = n_features - self.n_genes
                self._gene_map = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        if self.n_genes == 0:
            raise InputError(f"{source}: no {GENE_EXPRESSION} features")

    def _kept(self, values: np.ndarray) -> np.ndarray:
        return values if self._gene_map is None else values[self._gene_map >= 0]

    def cells(self) -> np.ndarray:
        with _hdf5(self.source) as file:
            return _load_strings(_child(file[self._group], "barcodes", self.source), self.source)

    def _raw_genes(self) -> np.ndarray:
        with _hdf5(self.source) as file:
            names, _ = self._feature_nodes(file[self._group])
            return self._kept(_load_strings(names, self.source))

    def gene_ids(self) -> np.ndarray:
        with _hdf5(self.source) as file:
            _, ids = self._feature_nodes(file[self._group])
            return self._kept(_load_strings(ids, self.source))

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with _hdf5(self.source) as file:
            group = file[self._group]
            indptr, features, values = _major_slice(
                group, start, stop, self._n_features, self.source
            )
            data_name = _node_name(group["data"])
        if self._gene_map is not None:
            genes = self._gene_map[features]
            keep = genes >= 0
            if not keep.all():
                kept_before = np.concatenate([[0], np.cumsum(keep)])
                indptr = kept_before[indptr]
                genes, values = genes[keep], values[keep]
        else:
            genes = features

        def locate(bad: int) -> tuple[str, str, int]:
            cell = start + int(np.searchsorted(indptr, bad, side="right")) - 1
            return f"dataset {data_name}", str(cell), int(genes[bad])

        values, rounded = self._convert(values, locate)
        return _dense_rows(indptr, genes, values, self.n_genes), rounded

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        with _hdf5(self.source) as file:
            indptr, features, values = _major_slice(
                file[self._group], start, stop, self._n_features, self.source
            )
        rounded = self._fill_sparse_rows(indptr, features, values, out, self._gene_map)
        if rounded is None:
            self._refused(start, stop)
        return rounded


# ---------------------------------------------------------------------------------------------
# AnnData: .h5ad and zarr


def _decode_column(node: Any, parent: Any, source: str) -> np.ndarray | None:
    """One obs/var column as a numpy array (categoricals decoded to strings), or None when it is
    not a 1-D column."""
    encoding = _attr(node, "encoding-type")
    if _is_group(node):
        if encoding == "categorical":
            codes = _load(_child(node, "codes", source), source).astype(np.int64)
            categories = _decode_column(_child(node, "categories", source), node, source)
            return _categorical(codes, categories)
        if encoding in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
            values = _decode_column(_child(node, "values", source), node, source)
            mask = _load(_child(node, "mask", source), source).astype(bool)
            if encoding == "nullable-integer":
                values = values.astype(np.float64)
                values[mask] = np.nan
            else:
                values = values.astype(object)
                values[mask] = "" if encoding == "nullable-string-array" else None
            return values
        return None
    if len(node.shape) != 1:
        return None
    kind = node.dtype.kind
    if kind in "SOUT" or h5py.check_string_dtype(node.dtype) is not None:
        values = _load_strings(node, source)
    else:
        values = _load(node, source)
    # anndata 0.7's layout: integer codes with a reference to obs/__categories/<name>
    reference = node.attrs.get("categories") if isinstance(node, h5py.Dataset) else None
    if reference is not None and isinstance(reference, h5py.Reference):
        categories = _load_strings(node.file[reference], source)
        return _categorical(values.astype(np.int64), categories)
    return values


def _categorical(codes: np.ndarray, categories: np.ndarray) -> np.ndarray:
    out = np.empty(codes.shape, dtype=object)
    valid = codes >= 0
    out[valid] = _as_strings(categories)[codes[valid]]
    out[~valid] = ""
    return out


def _dataframe_index(frame: Any, source: str) -> np.ndarray:
    key = _attr(frame, "_index", "_index")
    return _load_strings(_child(frame, key, source), source)


def _dataframe_length(frame: Any, source: str) -> int:
    """Rows of an obs/var frame, from its index's shape (loading 100,000 names to count them
    took a tenth of a second)."""
    node = _child(frame, _attr(frame, "_index", "_index"), source)
    shape = getattr(node, "shape", None)
    if shape is not None and len(shape) == 1:
        return int(shape[0])
    return len(_dataframe_index(frame, source))


def _dataframe_columns(frame: Any, source: str) -> dict[str, np.ndarray]:
    index_key = _attr(frame, "_index", "_index")
    order = _attr(frame, "column-order")
    names = (
        list(order)
        if order is not None and len(order)
        else [key for key in frame.keys() if key not in (index_key, "__categories")]
    )
    columns = {}
    for name in names:
        name = str(name)
        if name == index_key or name not in frame:
            continue
        values = _decode_column(frame[name], frame, source)
        if values is not None:
            columns[name] = values
    return columns


class AnnDataReader(Reader):
    """AnnData's ``.h5ad`` (read with h5py): X (or ``layers/NAME``) dense, CSR or CSC.

    Cell names are the obs index, gene names the var index, gene ids the var column ``gene_ids``
    when present; obs columns (categoricals decoded to strings, anndata 0.7's ``__categories``
    layout too) are the metadata.

    For CSR and dense matrices a cell range is contiguous (:attr:`orientation` ``"cells"``). For
    CSC (``"genes"``) :meth:`read` makes one pass over the whole matrix per block, in pieces of
    :data:`CSC_ENTRIES_PER_PASS` entries, keeping the entries of the block's cells: memory stays
    bounded, time grows with the number of blocks. An ingest instead sorts the entries by store
    block once (:meth:`csc_entries`, in parallel parts) and builds each block from its own
    entries (:meth:`fill_csc_entries`). :meth:`read_genes` reads gene columns directly.

    Parameters
    ----------
    source
        Path or fsspec URL.
    layer
        Read ``layers/NAME`` instead of X.
    dtype
        ``"int32"`` or ``"float32"``.

    Examples
    --------
    >>> reader = AnnDataReader("pbmc.h5ad", layer="counts")  # doctest: +SKIP
    >>> reader.orientation  # doctest: +SKIP
    'cells'
    """

    format = "h5ad"

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        with self._open() as root:
            if "obs" not in root or "var" not in root:
                raise InputError(f"{self.source}: not an AnnData file: no obs and var groups")
            self.n_cells = _dataframe_length(root["obs"], self.source)
            self.n_genes = _dataframe_length(root["var"], self.source)
            matrix = self._matrix(root)
            self._path = _node_name(matrix)
            self._inspect(matrix)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        with _hdf5(self.source) as file:
            yield file

    def _matrix(self, root: Any) -> Any:
        if self.layer is None:
            if "X" not in root:
                raise InputError(f"{self.source}: no X matrix; pick a layer with --layer NAME")
            return root["X"]
        layers = root["layers"] if "layers" in root else {}
        if self.layer not in layers:
            raise InputError(
                f"{self.source}: no layer {self.layer!r} (layers: {sorted(layers.keys())})"
            )
        return layers[self.layer]

    def _inspect(self, matrix: Any) -> None:
        source, where = self.source, _node_name(matrix)
        expected = (self.n_cells, self.n_genes)
        if not _is_group(matrix):
            self._encoding = "dense"
            if tuple(matrix.shape) != expected:
                raise InputError(
                    f"{source}: dataset {where} has shape {tuple(matrix.shape)}, but obs and var "
                    f"say {expected}"
                )
            return
        encoding = _attr(matrix, "encoding-type") or {"csr": "csr_matrix", "csc": "csc_matrix"}.get(
            _attr(matrix, "h5sparse_format")
        )
        if encoding not in ("csr_matrix", "csc_matrix"):
            raise InputError(f"{source}: {where}: unsupported matrix encoding {encoding!r}")
        self._encoding = encoding
        shape = _attr(matrix, "shape")
        if shape is None:
            shape = _attr(matrix, "h5sparse_shape")
        shape = tuple(int(v) for v in shape)
        if shape != expected:
            raise InputError(f"{source}: {where} has shape {shape}, but obs and var say {expected}")
        csr = encoding == "csr_matrix"
        self.orientation = "cells" if csr else "genes"
        n_major = self.n_cells if csr else self.n_genes
        data, indices = _child(matrix, "data", source), _child(matrix, "indices", source)
        if data.shape != indices.shape:
            raise InputError(
                f"{source}: {where}/data and {where}/indices differ in shape ({data.shape} and "
                f"{indices.shape})"
            )
        indptr = _child(matrix, "indptr", source)
        _check_length(indptr, n_major + 1, "entries (the shape's major axis + 1)", source)
        loaded = _load(indptr, source).astype(np.int64)
        _check_indptr(loaded, data.shape[0], _node_name(indptr), source)
        if not csr:
            self._indptr = loaded  # n_genes + 1 numbers: the CSC passes plan with it
            self._data_dtype = np.dtype(data.dtype)

    # -- names --

    def cells(self) -> np.ndarray:
        with self._open() as root:
            return _dataframe_index(root["obs"], self.source)

    def _raw_genes(self) -> np.ndarray:
        with self._open() as root:
            return _dataframe_index(root["var"], self.source)

    def gene_ids(self) -> np.ndarray | None:
        with self._open() as root:
            var = root["var"]
            if "gene_ids" not in var:
                return None
            values = _decode_column(var["gene_ids"], var, self.source)
            return None if values is None else _as_strings(values)

    def metadata(self) -> dict[str, np.ndarray]:
        with self._open() as root:
            return _dataframe_columns(root["obs"], self.source)

    # -- counts --

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with self._open() as root:
            matrix = root[self._path]
            if self._encoding == "dense":
                block = _load(matrix, self.source, slice(start, stop))
                return self._convert_dense(block, start)
            if self._encoding == "csr_matrix":
                indptr, genes, values = _major_slice(matrix, start, stop, self.n_genes, self.source)

                def locate(bad: int) -> tuple[str, str, int]:
                    cell = start + int(np.searchsorted(indptr, bad, side="right")) - 1
                    return f"dataset {self._path}/data", str(cell), int(genes[bad])

                values, rounded = self._convert(values, locate)
                return _dense_rows(indptr, genes, values, self.n_genes), rounded
            return self._read_csc_cells(matrix, start, stop)

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        with self._open() as root:
            matrix = root[self._path]
            if self._encoding == "dense":
                rounded = self._fill_dense_rows(matrix, start, stop, out)
            elif self._encoding == "csr_matrix":
                indptr, genes, values = _major_slice(matrix, start, stop, self.n_genes, self.source)
                rounded = self._fill_sparse_rows(indptr, genes, values, out)
            else:
                rounded = self._fill_csc_cells(matrix, start, stop, out)
        if rounded is None:
            self._refused(start, stop)
        return rounded

    def _fill_dense_rows(self, matrix: Any, start: int, stop: int, out: np.ndarray) -> int | None:
        if isinstance(matrix, h5py.Dataset) and matrix.dtype == out.dtype:
            try:  # straight into the block: no fresh array
                matrix.read_direct(out, np.s_[start:stop])
            except (OSError, ValueError, RuntimeError) as exc:
                raise InputError(
                    f"{self.source}: dataset {self._path}: cannot read ({exc})"
                ) from exc
            block = out
        else:
            block = _load(matrix, self.source, slice(start, stop))
        if block.dtype.kind == "b":
            block = block.view(np.uint8)
        if block.dtype.kind not in "iuf":
            return None
        status, rounded = _fill_dense(block, self.dtype == np.int32, out)
        return None if status != _ACCEPTED else int(rounded)

    def _fill_csc_cells(self, matrix: Any, start: int, stop: int, out: np.ndarray) -> int | None:
        """The block from one pass over the whole CSC matrix, in pieces (an ingest transposes
        the matrix once instead: see :meth:`csc_entries`)."""
        out[...] = 0
        rounded = 0
        data, indices = matrix["data"], matrix["indices"]
        for low, high in self._csc_pieces():
            cells = _load(indices, self.source, slice(low, high)).astype(np.int64, copy=False)
            self._check_minor(cells, self.n_cells, low, matrix)
            selected = np.flatnonzero((cells >= start) & (cells < stop))
            if selected.size == 0:
                continue
            values = _load(data, self.source, slice(low, high))[selected]
            if values.dtype.kind == "b":
                values = values.view(np.uint8)
            if values.dtype.kind not in "iuf":
                return None
            genes = np.searchsorted(self._indptr, low + selected, side="right") - 1
            status, piece = _fill_entries(
                cells[selected] - start, genes, values, _NO_MAP, self.dtype == np.int32, out
            )
            if status != _ACCEPTED:
                return None
            rounded += piece
        return int(rounded)

    def _csc_pieces(self) -> list[tuple[int, int]]:
        """Entry ranges of whole gene columns holding about CSC_ENTRIES_PER_PASS entries each."""
        indptr = self._indptr
        bounds = np.unique(
            np.concatenate(
                [
                    np.searchsorted(
                        indptr, np.arange(0, indptr[-1], CSC_ENTRIES_PER_PASS), side="right"
                    )
                    - 1,
                    [self.n_genes],
                ]
            )
        )
        pieces = [(int(indptr[g0]), int(indptr[g1])) for g0, g1 in itertools.pairwise(bounds)]
        return [(low, high) for low, high in pieces if low < high]

    def _convert_dense(self, block: np.ndarray, start: int) -> tuple[np.ndarray, int]:
        n_columns = block.shape[1]

        def locate(bad: int) -> tuple[str, str, int]:
            return f"dataset {self._path}", str(start + bad // n_columns), bad % n_columns

        values, rounded = self._convert(block, locate)
        return np.ascontiguousarray(values), rounded

    def _read_csc_cells(self, matrix: Any, start: int, stop: int) -> tuple[np.ndarray, int]:
        out = np.zeros((stop - start, self.n_genes), dtype=self.dtype)
        rounded = 0
        indptr = self._indptr
        if stop == start:
            return out, 0
        data, indices = matrix["data"], matrix["indices"]
        for low, high in self._csc_pieces():
            cells = _load(indices, self.source, slice(low, high)).astype(np.int64, copy=False)
            self._check_minor(cells, self.n_cells, low, matrix)
            selected = np.flatnonzero((cells >= start) & (cells < stop))
            if selected.size == 0:
                continue
            values = _load(data, self.source, slice(low, high))[selected]
            genes = np.searchsorted(indptr, low + selected, side="right") - 1
            rows = cells[selected] - start

            def locate(bad: int, rows=rows, genes=genes) -> tuple[str, str, int]:
                return f"dataset {self._path}/data", str(start + rows[bad]), int(genes[bad])

            values, piece_rounded = self._convert(values, locate)
            rounded += piece_rounded
            _scatter_entries(rows, genes.astype(np.int64), values, out)
        return out, rounded

    # -- CSC: one transposition pass instead of a pass per block --

    @property
    def nnz(self) -> int:
        """Stored entries of a CSC matrix (0 for others)."""
        return int(self._indptr[-1]) if self._encoding == "csc_matrix" else 0

    @property
    def packed_words(self) -> int:
        """32-bit words per entry of :meth:`csc_entries`: row, gene and the value."""
        return 2 + _packed_dtype(self._data_dtype).itemsize // 4

    def csc_entries(
        self, low: int, high: int, *, first_cell: int, chunk_cells: int, n_blocks: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Entries ``[low, high)`` of the CSC matrix, sorted by the store block of their cell.

        Parameters
        ----------
        low, high
            Entry range (any, not only whole genes).
        first_cell
            The store's index of this input's first cell.
        chunk_cells, n_blocks
            The store's chunking: cell ``c`` of this input is in block
            ``(first_cell + c) // chunk_cells``.

        Returns
        -------
        packed : numpy.ndarray
            uint32, ``(high - low, packed_words)``: the cell's row in its block, the gene, and
            the value's bits (as :func:`_packed_dtype` says), block by block, each block's
            entries in the file's order.
        offsets : numpy.ndarray
            int64, ``n_blocks + 1``: where each block's entries start in ``packed``.

        Notes
        -----
        Reads the range once (memory: ~4 words per entry). Cell indices are checked here;
        values are checked by :meth:`fill_csc_entries`, which knows their block.
        """
        with self._open() as root:
            matrix = root[self._path]
            cells = _load(matrix["indices"], self.source, slice(low, high))
            self._check_minor(cells, self.n_cells, low, matrix)
            values = _load(matrix["data"], self.source, slice(low, high))
        if values.dtype.kind not in "biuf":

            def locate(bad: int) -> tuple[str, str, int]:
                gene = int(np.searchsorted(self._indptr, low + bad, side="right")) - 1
                return f"dataset {self._path}/data", str(int(cells[bad])), gene

            self._convert(values, locate)  # names the value that is not a number
        values = values.astype(_packed_dtype(values.dtype), copy=False)
        words = np.ascontiguousarray(values).view(np.uint32).reshape(values.shape[0], -1)
        packed = np.empty((high - low, 2 + words.shape[1]), dtype=np.uint32)
        offsets = np.empty(n_blocks + 1, dtype=np.int64)
        if high > low:
            _bucket_by_block(
                self._indptr, low, cells, words, first_cell, chunk_cells, packed, offsets
            )
        else:
            offsets[:] = 0
        return packed, offsets

    def fill_csc_entries(
        self,
        packed: np.ndarray,
        out: np.ndarray,
        *,
        first_cell: int,
        column_map: np.ndarray | None = None,
    ) -> int:
        """Put entries of :meth:`csc_entries` (of one store block) into that block ``out``,
        whose rows they fall in are already zero; returns the values rounded.

        ``first_cell`` is this input's cell in ``out``'s first row (for error messages);
        ``column_map`` (optional) gives each gene's column in ``out``.
        """
        if packed.shape[0] == 0:
            return 0
        dtype = _packed_dtype(self._data_dtype)
        rows, genes = packed[:, 0], packed[:, 1]
        values = np.ascontiguousarray(packed[:, 2:]).view(dtype).reshape(-1)
        kernel_values = values.view(np.uint8) if values.dtype.kind == "b" else values
        if kernel_values.dtype.kind in "iuf":
            status, rounded = _fill_entries(
                rows,
                genes,
                kernel_values,
                _NO_MAP if column_map is None else column_map,
                self.dtype == np.int32,
                out,
            )
            if status == _ACCEPTED:
                return int(rounded)

        def locate(bad: int) -> tuple[str, str, int]:
            return f"dataset {self._path}/data", str(first_cell + int(rows[bad])), int(genes[bad])

        self._convert(values, locate)
        raise RuntimeError(
            f"{self.source}: the compiled reader refused a value that the checked reader "
            "accepts (a distumap bug; please report it)"
        )

    def _check_minor(self, indices: np.ndarray, size: int, low: int, matrix: Any) -> None:
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            bad = int(np.argmax((indices < 0) | (indices >= size)))
            raise InputError(
                f"{self.source}: dataset {self._path}/indices: index {int(indices[bad])} at "
                f"position {low + bad} is out of range (0 to {size - 1})"
            )

    def read_genes(self, g0: int, g1: int) -> np.ndarray:
        """The dense ``(n_cells, g1 - g0)`` block of genes ``[g0, g1)``, all cells.

        Cheap for CSC (reads those columns' entries only); CSR and dense matrices read
        everything in cell blocks.

        Parameters
        ----------
        g0, g1
            Gene range, ``0 <= g0 <= g1 <= n_genes``.

        Returns
        -------
        numpy.ndarray
            :attr:`dtype`, C-contiguous; rounded values are added to :attr:`rounded`.
        """
        g0, g1 = self._check_range(g0, g1, self.n_genes, "genes")
        if self._encoding != "csc_matrix":
            out = np.empty((self.n_cells, g1 - g0), dtype=self.dtype)
            for begin, end, block, rounded in self.iter_blocks(4096):
                out[begin:end] = block[:, g0:g1]
                self.rounded += rounded
            return out
        with self._open() as root:
            matrix = root[self._path]
            indptr, cells, values = _major_slice(matrix, g0, g1, self.n_cells, self.source)

        def locate(bad: int) -> tuple[str, str, int]:
            gene = g0 + int(np.searchsorted(indptr, bad, side="right")) - 1
            return f"dataset {self._path}/data", str(int(cells[bad])), gene

        values, rounded = self._convert(values, locate)
        self.rounded += rounded
        by_gene = _dense_rows(indptr, cells, values, self.n_cells)  # genes x cells
        return np.ascontiguousarray(by_gene.T)


class AnnDataZarrReader(AnnDataReader):
    """An AnnData zarr folder (zarr v2 or v3, as ``AnnData.write_zarr`` writes it).

    The same layout and options as :class:`AnnDataReader`; the root group's attribute
    ``encoding-type`` is ``anndata``.
    """

    format = "anndata-zarr"

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        import zarr  # only this reader needs it

        try:
            root = zarr.open_group(self.source, mode="r")
        except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
            raise InputError(f"{self.source}: not a readable zarr group ({exc})") from exc
        except Exception as exc:  # zarr raises its own errors for a folder that is no group
            raise InputError(f"{self.source}: not a readable zarr group ({exc})") from exc
        if _attr(root, "encoding-type") != "anndata":
            raise InputError(f"{self.source}: a zarr group without encoding-type 'anndata'")
        yield root


# ---------------------------------------------------------------------------------------------
# loom


def _filters(dataset: h5py.Dataset) -> list[int]:
    plist = dataset.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def _deflated_chunks(dataset: h5py.Dataset) -> bool:
    """Whether the dataset is 2-D, chunked, of native numbers, and stored raw or deflated only
    (loompy's gzip): then its chunks can be read and inflated directly."""
    return (
        len(dataset.shape) == 2
        and dataset.chunks is not None
        and dataset.dtype.kind in "iuf"
        and dataset.dtype.isnative
        and _filters(dataset) in ([], [h5py.h5z.FILTER_DEFLATE])
    )


class LoomReader(Reader):
    """A loom file (read with h5py): ``/matrix`` is genes x cells.

    Gene names are ``row_attrs/Gene``, gene ids ``row_attrs/Accession`` (optional), cell names
    ``col_attrs/CellID``; the other 1-D column attributes are the metadata. :meth:`read` reads
    ``matrix[:, start:stop]`` (loom files are chunked in both directions, so this reads the
    block's chunks only) and transposes it.

    Parameters
    ----------
    source
        Path or fsspec URL.
    layer
        Read ``/layers/NAME`` instead of ``/matrix``.
    dtype
        ``"int32"`` or ``"float32"``.
    """

    format = "loom"

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        with _hdf5(self.source) as file:
            matrix = self._matrix(file)
            self._path = _node_name(matrix)
            if len(matrix.shape) != 2:
                raise InputError(f"{self.source}: dataset {self._path} is not a matrix")
            self.n_genes, self.n_cells = (int(v) for v in matrix.shape)
            rows = _child(file, "row_attrs", self.source)
            columns = _child(file, "col_attrs", self.source)
            _check_length(_child(rows, "Gene", self.source), self.n_genes, "genes", self.source)
            if "Accession" in rows:
                _check_length(rows["Accession"], self.n_genes, "genes", self.source)
            _check_length(
                _child(columns, "CellID", self.source), self.n_cells, "cells", self.source
            )

    def _matrix(self, file: h5py.File) -> h5py.Dataset:
        if self.layer is None:
            return _child(file, "matrix", self.source)
        layers = file["layers"] if "layers" in file else {}
        if self.layer not in layers:
            raise InputError(
                f"{self.source}: no layer {self.layer!r} (layers: {sorted(layers.keys())})"
            )
        return layers[self.layer]

    def cells(self) -> np.ndarray:
        with _hdf5(self.source) as file:
            return _load_strings(file["col_attrs/CellID"], self.source, unescape=True)

    def _raw_genes(self) -> np.ndarray:
        with _hdf5(self.source) as file:
            return _load_strings(file["row_attrs/Gene"], self.source, unescape=True)

    def gene_ids(self) -> np.ndarray | None:
        with _hdf5(self.source) as file:
            if "Accession" not in file["row_attrs"]:
                return None
            return _load_strings(file["row_attrs/Accession"], self.source, unescape=True)

    def metadata(self) -> dict[str, np.ndarray]:
        columns = {}
        with _hdf5(self.source) as file:
            for name, node in file["col_attrs"].items():
                if name == "CellID" or not isinstance(node, h5py.Dataset):
                    continue
                if len(node.shape) != 1 or node.shape[0] != self.n_cells:
                    continue
                if node.dtype.kind in "SOU":
                    columns[name] = _load_strings(node, self.source, unescape=True)
                else:
                    columns[name] = _load(node, self.source)
        return columns

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with _hdf5(self.source) as file:
            block = _load(file[self._path], self.source, np.s_[:, start:stop]).T
        n_genes = self.n_genes

        def locate(bad: int) -> tuple[str, str, int]:
            return f"dataset {self._path}", str(start + bad // n_genes), bad % n_genes

        values, rounded = self._convert(np.ascontiguousarray(block), locate)
        return np.ascontiguousarray(values), rounded

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        integer = self.dtype == np.int32
        with _hdf5(self.source) as file:
            matrix = file[self._path]
            status, rounded = _REFUSED, 0
            if _deflated_chunks(matrix):
                status, rounded = self._fill_from_chunks(matrix, start, stop, out)
            if status != _ACCEPTED:  # other filters, a missing chunk, or a refused value
                block = _load(matrix, self.source, np.s_[:, start:stop])
                if block.dtype.kind == "b":
                    block = block.view(np.uint8)
                if block.dtype.kind in "iuf":
                    status, rounded = _fill_transposed(block, 0, 0, integer, out)
        if status != _ACCEPTED:
            self._refused(start, stop)
        return int(rounded)

    def _fill_from_chunks(
        self, matrix: h5py.Dataset, start: int, stop: int, out: np.ndarray
    ) -> tuple[int, int]:
        """The block from the raw chunks that hold it, inflated here and transposed into
        ``out`` chunk by chunk: h5py would assemble a genes x cells block first (a fresh array),
        and transposing that costs more than inflating it."""
        chunk_genes, chunk_cells = matrix.chunks
        deflated = bool(_filters(matrix))
        integer = self.dtype == np.int32
        dtype = matrix.dtype
        expected = chunk_genes * chunk_cells * dtype.itemsize
        rounded = 0
        for c0 in range(start - start % chunk_cells, stop, chunk_cells):
            for g0 in range(0, self.n_genes, chunk_genes):
                try:
                    mask, raw = matrix.id.read_direct_chunk((g0, c0))
                    data = zlib.decompress(raw) if deflated and not mask & 1 else raw
                except (OSError, ValueError, KeyError, RuntimeError, zlib.error):
                    return _REFUSED, 0  # h5py's own read says what is wrong
                if len(data) != expected:
                    return _REFUSED, 0
                chunk = np.frombuffer(data, dtype=dtype).reshape(chunk_genes, chunk_cells)
                status, moved = _fill_transposed(chunk, g0, c0 - start, integer, out)
                if status != _ACCEPTED:
                    return status, 0
                rounded += moved
        return _ACCEPTED, rounded


# ---------------------------------------------------------------------------------------------
# 10x MEX: Matrix Market coordinate files


_BANNER = re.compile(
    rb"%%MatrixMarket\s+matrix\s+coordinate\s+(integer|real)\s+general\s*$", re.IGNORECASE
)
_EXPECTED_BANNER = "%%MatrixMarket matrix coordinate integer|real general"
#: bytes read past an index block's end so that its last line's column number is complete
_MTX_OVERHANG = 4096
#: decompressed bytes parsed at once when a MEX file is read sequentially
_MTX_STREAM_PIECE = 16 << 20

# kernel status codes
_MTX_OK, _MTX_BAD_LINE, _MTX_UNSORTED, _MTX_OUT_OF_RANGE = range(4)


@numba.njit(nogil=True, cache=True, inline="always")
def _skip_blanks(buf, pos, size):  # pragma: no cover - compiled
    while pos < size and (buf[pos] == 32 or buf[pos] == 9):
        pos += 1
    return pos


@numba.njit(nogil=True, cache=True, inline="always")
def _parse_index(buf, pos, size):  # pragma: no cover - compiled
    """A 1-based index of at most 18 digits: (value, end), value -1 when there are none."""
    value = 0
    begin = pos
    while pos < size and 48 <= buf[pos] <= 57 and pos - begin < 18:
        value = value * 10 + (buf[pos] - 48)
        pos += 1
    if pos == begin:
        return -1, pos
    return value, pos


@numba.njit(nogil=True, cache=True, inline="always")
def _parse_value(buf, pos, size):  # pragma: no cover - compiled
    """A decimal number (sign, digits, fraction, exponent): (value, end, ok)."""
    negative = False
    if pos < size and (buf[pos] == 45 or buf[pos] == 43):
        negative = buf[pos] == 45
        pos += 1
    mantissa = 0
    exponent = 0
    digits = 0
    while pos < size and 48 <= buf[pos] <= 57:
        if mantissa < 100_000_000_000_000_000:
            mantissa = mantissa * 10 + (buf[pos] - 48)
        else:
            exponent += 1
        digits += 1
        pos += 1
    if pos < size and buf[pos] == 46:  # "."
        pos += 1
        while pos < size and 48 <= buf[pos] <= 57:
            if mantissa < 100_000_000_000_000_000:
                mantissa = mantissa * 10 + (buf[pos] - 48)
                exponent -= 1
            digits += 1
            pos += 1
    if digits == 0:
        return 0.0, pos, False
    if pos < size and (buf[pos] == 101 or buf[pos] == 69):  # "e", "E"
        pos += 1
        sign = 1
        if pos < size and (buf[pos] == 45 or buf[pos] == 43):
            sign = -1 if buf[pos] == 45 else 1
            pos += 1
        power = 0
        begin = pos
        while pos < size and 48 <= buf[pos] <= 57:
            if power < 10_000:
                power = power * 10 + (buf[pos] - 48)
            pos += 1
        if pos == begin:
            return 0.0, pos, False
        exponent += sign * power
    value = float(mantissa)
    if exponent > 0:
        value *= 10.0 ** min(exponent, 400)
    elif exponent < 0:
        value /= 10.0 ** min(-exponent, 400)
    return (-value if negative else value), pos, True


@numba.njit(nogil=True, cache=True, inline="always")
def _line_end(buf, pos, size):  # pragma: no cover - compiled
    """After the last field: blanks, an optional CR, then a newline or the end. (-1 if not.)"""
    pos = _skip_blanks(buf, pos, size)
    if pos < size and buf[pos] == 13:
        pos += 1
    if pos < size and buf[pos] != 10:
        return -1
    return pos + 1


@numba.njit(nogil=True, cache=True, inline="always")
def _blank_line(buf, pos, size):  # pragma: no cover - compiled
    """The start of the next line when the line at ``pos`` is blank, else -1."""
    p = _skip_blanks(buf, pos, size)
    if p < size and buf[p] == 13:
        p += 1
    if p >= size:
        return size
    if buf[p] == 10:
        return p + 1
    return -1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _mtx_parse_kernel(buf, rows, cols, values, lines, error):  # pragma: no cover - compiled
    """Parse every ``row col value`` line of ``buf``; returns (entries, status).

    ``lines[k]`` is the line (counted from 0 at the start of ``buf``) of entry ``k``; on error
    ``error`` holds (line, byte offset of the line).
    """
    size = buf.shape[0]
    pos = 0
    n = 0
    line = 0
    while pos < size:
        begin = pos
        # fast path for Cell Ranger's lines, "<digits> <digits> <digits>\n"; anything else
        # (blanks, CR, signs, fractions, exponents, errors) goes through the general path below
        row, p = _parse_index(buf, pos, size)
        if row >= 0 and p < size and buf[p] == 32:
            col, p = _parse_index(buf, p + 1, size)
            if col >= 0 and p < size and buf[p] == 32:
                whole, p = _parse_index(buf, p + 1, size)
                if whole >= 0 and p < size and buf[p] == 10:
                    rows[n] = row
                    cols[n] = col
                    values[n] = whole
                    lines[n] = line
                    n += 1
                    line += 1
                    pos = p + 1
                    continue
        after = _blank_line(buf, pos, size)
        if after >= 0:
            pos = after
            line += 1
            continue
        pos = _skip_blanks(buf, pos, size)
        row, pos = _parse_index(buf, pos, size)
        ok = row >= 0 and pos < size and (buf[pos] == 32 or buf[pos] == 9)
        col = -1
        value = 0.0
        if ok:
            pos = _skip_blanks(buf, pos, size)
            col, pos = _parse_index(buf, pos, size)
            ok = col >= 0 and pos < size and (buf[pos] == 32 or buf[pos] == 9)
        if ok:
            pos = _skip_blanks(buf, pos, size)
            value, pos, ok = _parse_value(buf, pos, size)
        if ok:
            pos = _line_end(buf, pos, size)
            ok = pos >= 0
        if not ok:
            error[0] = line
            error[1] = begin
            return n, _MTX_BAD_LINE
        rows[n] = row
        cols[n] = col
        values[n] = value
        lines[n] = line
        n += 1
        line += 1
    return n, _MTX_OK


#: kernel status: stopped before a line whose column lies past the block (the block is complete)
_MTX_PAST = 2


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _mtx_fill(
    buf, pos, first_column, last_column, n_rows, n_cells, gene_map, integer_field, integer, strict,
    out, state,
):  # fmt: skip  # pragma: no cover - compiled
    """Parse the ``row col value`` lines of ``buf`` from ``pos`` straight into the block ``out``:
    an entry whose 1-based column ``c`` has ``first_column < c <= last_column`` goes to
    ``out[c - first_column - 1, gene]``. ``state`` holds (last column seen, entries, rounded
    values, rows of ``out`` zeroed so far) across calls: the lines are sorted by column, so a row
    is zeroed just before its first entry (in cache), and the caller zeroes the rows after the
    last one.

    Returns ``(pos, status)``: _ACCEPTED at the end of ``buf``; _MTX_PAST at the start of a line
    whose column is past ``last_column`` (not consumed); _REFUSED at a line that the checked
    path must explain (malformed, out of range, not sorted, not a count). With ``strict`` every
    column must lie in the block (an indexed read); otherwise lines before it are checked and
    skipped (a sequential read).
    """
    size = buf.shape[0]
    mapped = gene_map.shape[0] > 0
    while pos < size:
        begin = pos
        # fast path for Cell Ranger's lines, "<digits> <digits> <digits>\n", written out here:
        # numba compiles the helpers' (value, position) returns into a loop 4x slower
        row = col = -1
        value = 0.0
        parsed = True
        p = pos
        for field in range(3):
            number = 0
            digits = 0
            while p < size:
                c = buf[p]
                if c < 48 or c > 57:
                    break
                number = number * 10 + (c - 48)
                p += 1
                digits += 1
            if digits == 0 or digits > 18 or p >= size or buf[p] != (10 if field == 2 else 32):
                parsed = False
                break
            if field == 0:
                row = number
            elif field == 1:
                col = number
            else:
                value = float(number)
            p += 1
        if parsed:
            pos = p
        else:
            after = _blank_line(buf, begin, size)
            if after >= 0:
                pos = after
                continue
            p = _skip_blanks(buf, begin, size)
            row, p = _parse_index(buf, p, size)
            ok = row >= 0 and p < size and (buf[p] == 32 or buf[p] == 9)
            col = -1
            if ok:
                p = _skip_blanks(buf, p, size)
                col, p = _parse_index(buf, p, size)
                ok = col >= 0 and p < size and (buf[p] == 32 or buf[p] == 9)
            if ok:
                p = _skip_blanks(buf, p, size)
                value, p, ok = _parse_value(buf, p, size)
            if ok:
                p = _line_end(buf, p, size)
                ok = p >= 0
            if not ok:
                return begin, _REFUSED
            pos = p
        if col < 1 or col > n_cells or col < state[0]:
            return begin, _REFUSED
        if col > last_column:
            return begin, (_REFUSED if strict else _MTX_PAST)
        state[0] = col
        state[1] += 1
        if col <= first_column:
            if strict:
                return begin, _REFUSED
            continue
        if row < 1 or row > n_rows:
            return begin, _REFUSED
        gene = row - 1
        if mapped:
            gene = gene_map[gene]
            if gene < 0:
                continue
        if integer_field and value != np.rint(value):
            return begin, _REFUSED
        ok, moved, number = _accept(value, integer)
        if not ok:
            return begin, _REFUSED
        state[2] += moved
        row = col - first_column - 1
        while state[3] <= row:
            out[state[3], :] = 0
            state[3] += 1
        out[row, gene] = number
    return pos, _ACCEPTED


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _mtx_index_kernel(
    buf, first, end, n_cells, rec_cols, rec_offsets, rec_lines, out
):  # pragma: no cover - compiled
    """Find where each column's entries start among the lines that start in ``[first, end)``.

    Records (column, offset in ``buf``, line) whenever the column changes. ``out`` receives
    (records, lines, entries, status, error line, error offset, column before the error); lines
    count from 0 at ``first``.
    """
    size = buf.shape[0]
    pos = first
    previous = -1
    n = 0
    line = 0
    entries = 0
    status = _MTX_OK
    while pos < end:
        begin = pos
        # fast path: "<digits> <digits> " (see _mtx_fill on why it is written out)
        p = pos
        row = col = -1
        for field in range(2):
            number = 0
            digits = 0
            while p < size:
                c = buf[p]
                if c < 48 or c > 57:
                    break
                number = number * 10 + (c - 48)
                p += 1
                digits += 1
            if digits == 0 or digits > 18 or p >= size or buf[p] != 32:
                row = col = -1
                break
            if field == 0:
                row = number
            else:
                col = number
            p += 1
        if col < 0:
            after = _blank_line(buf, pos, size)
            if after >= 0:
                pos = after
                line += 1
                continue
            p = _skip_blanks(buf, pos, size)
            row, p = _parse_index(buf, p, size)
            col = -1
            if row >= 0 and p < size and (buf[p] == 32 or buf[p] == 9):
                p = _skip_blanks(buf, p, size)
                col, p = _parse_index(buf, p, size)
        if col < 0:
            status = _MTX_BAD_LINE
        elif col < 1 or col > n_cells:
            status = _MTX_OUT_OF_RANGE
        elif col < previous:
            status = _MTX_UNSORTED
        if status != _MTX_OK:
            out[4] = line
            out[5] = begin
            out[6] = previous
            break
        if col != previous:
            rec_cols[n] = col
            rec_offsets[n] = begin
            rec_lines[n] = line
            n += 1
            previous = col
        entries += 1
        while p < size and buf[p] != 10:
            p += 1
        pos = p + 1
        line += 1
    out[0] = n
    out[1] = line
    out[2] = entries
    out[3] = status


@dataclass
class MexIndexBlock:
    """Where the columns (cells) change among the lines that start in one byte range.

    Attributes
    ----------
    begin, end
        The byte range of ``matrix.mtx``.
    columns, offsets, lines
        1-based column, absolute byte offset and line (counted from 0 at the range's first line)
        of each line whose column differs from the previous line's.
    n_lines, n_entries
        Lines (blank ones included) and entries that start in the range.
    error
        ``(status, line, text, previous column)`` of the first bad line, or None; raised by
        :meth:`MexReader.set_index`, which knows the line numbers.
    """

    begin: int
    end: int
    columns: np.ndarray
    offsets: np.ndarray
    lines: np.ndarray
    n_lines: int
    n_entries: int
    error: tuple[int, int, str, int] | None = None


@contextlib.contextmanager
def _open_stream(source: str) -> Iterator[Any]:
    """A binary file object, decompressed when the name ends in ``.gz``."""
    with fsspec.open(source, "rb") as raw:
        if source.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        else:
            yield raw


def _read_ahead(source: str, skip: int, piece: int) -> Iterator[bytes]:
    """The (decompressed) bytes of ``source`` after the first ``skip``, in pieces of ``piece``
    bytes, read one piece ahead in a thread: zlib releases the GIL, so inflating the next piece
    overlaps parsing this one. Errors of the stream are raised here."""
    pieces: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: bytes | BaseException) -> None:
        while not stop.is_set():
            try:
                pieces.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            with _open_stream(source) as stream:
                if len(stream.read(skip)) < skip:
                    put(b"")
                    return
                while not stop.is_set():
                    item = stream.read(piece)
                    put(item)
                    if not item:
                        return
        except BaseException as exc:  # handed to the reader, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="distumap-inflate", daemon=True)
    thread.start()
    try:
        while True:
            item = pieces.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _read_text_lines(source: str) -> list[str]:
    try:
        with _open_stream(source) as stream:
            text = stream.read().decode("utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise InputError(f"{source}: no such file") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"{source}: cannot read ({exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


class MexReader(Reader):
    """A 10x MEX folder: ``matrix.mtx[.gz]``, ``features.tsv[.gz]`` (or ``genes.tsv[.gz]``) and
    ``barcodes.tsv[.gz]``.

    ``matrix.mtx`` is Matrix Market coordinate (``%%MatrixMarket matrix coordinate integer|real
    general``), 1-based, genes x barcodes, one ``gene barcode value`` line per entry, sorted by
    barcode as Cell Ranger writes it.

    - Uncompressed: :meth:`build_index` finds, in byte blocks that can be indexed in parallel
      (:meth:`index_ranges`, :meth:`index_block`, :meth:`set_index`), the byte offset where each
      cell's entries start; :meth:`read` then reads exactly the block's bytes and parses them
      with a compiled kernel. The index is built on first use when nobody built it.
    - gzip: read sequentially; :meth:`iter_blocks` makes one pass for all blocks, :meth:`read`
      decompresses from the start up to the block (and stops there).

    A file not sorted by barcode is an InputError that names the line.

    Parameters
    ----------
    source
        The folder (or its ``matrix.mtx[.gz]``), path or fsspec URL.
    layer
        MEX has none; must be None.
    dtype
        ``"int32"`` or ``"float32"``.

    Examples
    --------
    >>> reader = MexReader("filtered_feature_bc_matrix")  # doctest: +SKIP
    >>> reader.build_index()  # doctest: +SKIP
    >>> reader.read(0, 500).shape  # doctest: +SKIP
    (500, 33538)
    """

    format = "mex"

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        source = os.fspath(source)
        if re.search(r"matrix\.mtx(\.gz)?$", source) and not _isdir(source):
            source = source.rsplit("/", 1)[0] if "/" in source else "."
        super().__init__(source, layer=layer, dtype=dtype)
        if layer is not None:
            raise InputError(f"{self.source}: a MEX folder has no layers (got {layer!r})")
        if not _isdir(self.source):
            raise InputError(f"{self.source}: no such folder")
        self.matrix_file = self._find(("matrix.mtx", "matrix.mtx.gz"), "matrix.mtx[.gz]")
        self.features_file = self._find(
            ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
            "features.tsv[.gz] or genes.tsv[.gz]",
        )
        self.barcodes_file = self._find(("barcodes.tsv.gz", "barcodes.tsv"), "barcodes.tsv[.gz]")
        self.compressed = self.matrix_file.endswith(".gz")
        self._read_header()
        self._check_names()
        self._offsets: np.ndarray | None = None
        self._lines: np.ndarray | None = None

    def _find(self, names: tuple[str, ...], what: str) -> str:
        for name in names:
            path = _join(self.source, name)
            if _exists(path):
                return path
        raise InputError(f"{self.source}: missing {what} in the MEX folder")

    def _files(self) -> list[str]:
        return [self.matrix_file, self.features_file, self.barcodes_file]

    @property
    def _data_file(self) -> str:
        return self.matrix_file

    # -- header and names --

    def _read_header(self) -> None:
        matrix = self.matrix_file
        try:
            with _open_stream(matrix) as stream:
                head = stream.read(4096)  # a truncated gzip file fails later, at its line
                while True:
                    lines = head.split(b"\n")
                    size_line = next(
                        (
                            i
                            for i, line in enumerate(lines[:-1])
                            if line.strip() and not line.startswith(b"%")
                        ),
                        None,
                    )
                    more = b"" if size_line is not None else stream.read(1 << 16)
                    if not more:
                        break
                    head += more
        except FileNotFoundError as exc:
            raise InputError(f"{matrix}: no such file") from exc
        except (OSError, EOFError) as exc:
            raise InputError(f"{matrix}: cannot read ({exc})") from exc
        if not lines or not _BANNER.match(lines[0].rstrip(b"\r")):
            found = lines[0][:80].decode("utf-8", "replace") if lines else ""
            raise InputError(
                f"{matrix}: line 1: expected the header '{_EXPECTED_BANNER}', found {found!r}"
            )
        self.field = _BANNER.match(lines[0].rstrip(b"\r")).group(1).decode().lower()
        if size_line is None:
            raise InputError(f"{matrix}: the file ends before the size line (genes, cells, nnz)")
        fields = lines[size_line].split()
        try:
            n_rows, n_cols, nnz = (int(v) for v in fields)
        except ValueError:
            raise InputError(
                f"{matrix}: line {size_line + 1}: expected the size line '<genes> <cells> "
                f"<entries>', found {lines[size_line][:80].decode('utf-8', 'replace')!r}"
            ) from None
        self.header_lines = size_line + 1
        self.data_start = sum(len(line) + 1 for line in lines[: size_line + 1])
        self._n_rows, self.n_cells, self.nnz = n_rows, n_cols, nnz

    def _check_names(self) -> None:
        features = [line.split("\t") for line in _read_text_lines(self.features_file)]
        if any(len(fields) < 2 for fields in features):
            bad = next(i for i, fields in enumerate(features) if len(fields) < 2)
            raise InputError(
                f"{self.features_file}: line {bad + 1}: expected '<id>\\t<name>[\\t<type>]'"
            )
        n_barcodes = len(_read_text_lines(self.barcodes_file))
        where = f"{self.matrix_file}: line {self.header_lines}"
        if self._n_rows != len(features):
            raise InputError(
                f"{where}: the size line says {self._n_rows} genes, "
                f"{self.features_file} lists {len(features)}"
            )
        if self.n_cells != n_barcodes:
            raise InputError(
                f"{where}: the size line says {self.n_cells} cells, "
                f"{self.barcodes_file} lists {n_barcodes}"
            )
        keep = np.array(
            [len(fields) < 3 or fields[2] == GENE_EXPRESSION for fields in features], dtype=bool
        )
        self.n_genes = int(keep.sum())
        self._gene_map: np.ndarray | None = None
        if not keep.all():
            self.dropped_features = len(features) - self.n_genes
            self._gene_map = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        if self.n_genes == 0:
            raise InputError(f"{self.features_file}: no {GENE_EXPRESSION} features")

    def _features(self, column: int) -> np.ndarray:
        features = [line.split("\t") for line in _read_text_lines(self.features_file)]
        values = _as_strings([fields[column] for fields in features])
        return values if self._gene_map is None else values[self._gene_map >= 0]

    def cells(self) -> np.ndarray:
        return _as_strings([line.split("\t")[0] for line in _read_text_lines(self.barcodes_file)])

    def _raw_genes(self) -> np.ndarray:
        return self._features(1)

    def gene_ids(self) -> np.ndarray:
        return self._features(0)

    # -- the cell index (uncompressed files) --

    def _size(self) -> int:
        fs, path = _fs_path(self.matrix_file)
        return int(fs.size(path))

    def index_ranges(self, block_bytes: int = 64 << 20) -> list[tuple[int, int]]:
        """Byte ranges tiling the data region, for :meth:`index_block` (one task each)."""
        if self.compressed:
            raise InputError(f"{self.matrix_file}: a gzip file has no byte index; read it in order")
        size = self._size()
        edges = [*range(self.data_start, size, max(1, int(block_bytes))), size]
        if len(edges) == 1:
            edges = [self.data_start, size]
        return list(itertools.pairwise(edges))

    def index_block(self, begin: int, end: int) -> MexIndexBlock:
        """Index the lines that start in ``[begin, end)``: where each column's entries start.

        Pure and independent of the other ranges, so ranges can be indexed in parallel; give the
        results, in order, to :meth:`set_index`.
        """
        offset = begin - 1 if begin > self.data_start else begin
        raw, shift = self._raw(offset, end + _MTX_OVERHANG)
        buf = np.frombuffer(raw, dtype=np.uint8)[shift:] if len(raw) else np.zeros(0, np.uint8)
        if begin > self.data_start:
            newline = raw.find(b"\n", shift, shift + end - offset) - shift
            first = end - offset if newline < 0 else newline + 1
        else:
            first = 0
        stop = min(end - offset, buf.size)
        # a line with an entry takes at least 5 bytes ("1 1 1", the last one without "\n")
        capacity = min(self.n_cells, max(0, stop - first) // 5 + 1) + 1
        columns = np.empty(capacity, dtype=np.int64)
        offsets = np.empty(capacity, dtype=np.int64)
        lines = np.empty(capacity, dtype=np.int64)
        out = np.zeros(7, dtype=np.int64)
        _mtx_index_kernel(buf, first, stop, self.n_cells, columns, offsets, lines, out)
        n, n_lines, n_entries, status = (int(v) for v in out[:4])
        error = None
        if status != _MTX_OK:
            at = shift + int(out[5])
            text = bytes(raw[at : at + 200]).split(b"\n")[0]
            text = text[:80].decode("utf-8", "replace").rstrip("\r")
            error = (status, int(out[4]), text, int(out[6]))
        return MexIndexBlock(
            begin=begin,
            end=end,
            columns=columns[:n].copy(),
            offsets=offsets[:n] + offset,
            lines=lines[:n].copy(),
            n_lines=n_lines,
            n_entries=n_entries,
            error=error,
        )

    def set_index(self, blocks: Iterable[MexIndexBlock]) -> None:
        """Combine :meth:`index_block` results (in file order) into the cell index.

        Raises
        ------
        InputError
            A bad line, a column out of range, entries not sorted by column, or an entry count
            that disagrees with the size line; the message names the line.
        """
        blocks = list(blocks)
        first_line = self.header_lines + 1
        columns, offsets, lines = [], [], []
        previous, previous_line = 0, 0
        entries = 0
        for block in blocks:
            # a block's first line against the previous block's last, then the block's own error:
            # the earlier line in the file is the one reported
            if block.columns.size and block.columns[0] < previous:
                self._unsorted(
                    first_line + int(block.lines[0]), block.columns[0], previous, previous_line
                )
            if block.error is not None:
                status, line, text, before = block.error
                self._line_error(status, first_line + line, text, max(before, previous))
            if block.columns.size:
                previous = int(block.columns[-1])
                previous_line = first_line + int(block.lines[-1])
            columns.append(block.columns)
            offsets.append(block.offsets)
            lines.append(block.lines + first_line)
            first_line += block.n_lines
            entries += block.n_entries
        if entries != self.nnz:
            raise InputError(
                f"{self.matrix_file}: line {self.header_lines}: the size line says {self.nnz} "
                f"entries, the file holds {entries} (truncated?)"
            )
        columns = np.concatenate(columns) if columns else np.zeros(0, np.int64)
        offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        lines = np.concatenate(lines) if lines else np.zeros(0, np.int64)
        keep = np.concatenate([[True], columns[1:] != columns[:-1]]) if columns.size else []
        columns, offsets, lines = columns[keep] - 1, offsets[keep], lines[keep]
        end = blocks[-1].end if blocks else self.data_start
        # cell c starts at the first record whose column is >= c (empty cells: the next one's)
        where = np.searchsorted(columns, np.arange(self.n_cells + 1), side="left")
        self._offsets = np.append(offsets, end)[where]
        self._lines = np.append(lines, first_line)[where]

    def build_index(self, *, block_bytes: int = 64 << 20, map: Callable = map) -> None:
        """Index the whole file: :meth:`index_block` over :meth:`index_ranges`, then
        :meth:`set_index`. ``map`` may run the blocks in parallel (e.g. a thread pool's map).

        Notes
        -----
        Reads the whole file once. The index holds 16 bytes per cell and travels with the
        reader when it is pickled.
        """
        ranges = self.index_ranges(block_bytes)
        blocks = map(self.index_block, [r[0] for r in ranges], [r[1] for r in ranges])
        self.set_index(blocks)

    @property
    def indexed(self) -> bool:
        """Whether :meth:`read` knows each cell's byte range."""
        return self._offsets is not None

    def byte_range(self, start: int, stop: int) -> tuple[int, int]:
        """Bytes of ``matrix.mtx`` holding cells ``[start, stop)`` (builds the index if need be)."""
        if self._offsets is None:
            self.build_index()
        return int(self._offsets[start]), int(self._offsets[stop])

    # -- errors --

    def _line_error(self, status: int, line: int, text: str, previous: int) -> None:
        if status == _MTX_UNSORTED:
            self._unsorted(line, None, previous, None, text=text)
        if status == _MTX_OUT_OF_RANGE:
            raise InputError(
                f"{self.matrix_file}: line {line}: column (barcode) out of range 1 to "
                f"{self.n_cells}: {text!r}"
            )
        raise InputError(
            f"{self.matrix_file}: line {line}: expected '<gene> <barcode> <value>', found {text!r}"
        )

    def _unsorted(
        self, line: int, column: Any, previous: int, previous_line: Any, text: str | None = None
    ) -> None:
        what = f"{text!r}" if text is not None else f"column {int(column)}"
        raise InputError(
            f"{self.matrix_file}: line {line}: entries are not sorted by barcode (column): {what} "
            f"comes after column {int(previous)}; distumap reads MEX files in Cell Ranger's order "
            "(sort the entries by column, e.g. re-save with scipy.io.mmwrite of the CSC matrix)"
        )

    # -- parsing --

    def _parse(self, raw: bytes | np.ndarray, first_line: int) -> tuple[np.ndarray, ...]:
        """(rows, columns, values, lines) of the entries in ``raw``; lines are absolute."""
        buf = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes | bytearray) else raw
        capacity = int(np.count_nonzero(buf == 10)) + 1
        rows = np.empty(capacity, dtype=np.int64)
        cols = np.empty(capacity, dtype=np.int64)
        values = np.empty(capacity, dtype=np.float64)
        lines = np.empty(capacity, dtype=np.int64)
        error = np.zeros(2, dtype=np.int64)
        n, status = _mtx_parse_kernel(buf, rows, cols, values, lines, error)
        if status != _MTX_OK:
            at = int(error[1])
            tail = bytes(buf[at : at + 80]).split(b"\n")[0]
            self._line_error(
                _MTX_BAD_LINE, first_line + int(error[0]), tail.decode("utf-8", "replace"), 0
            )
        return rows[:n], cols[:n], values[:n], lines[:n] + first_line

    def _dense(
        self,
        start: int,
        stop: int,
        rows: np.ndarray,
        cols: np.ndarray,
        values: np.ndarray,
        lines: np.ndarray,
    ) -> tuple[np.ndarray, int]:
        """The block of cells ``[start, stop)`` from entries whose columns lie in it."""
        n_rows = self._n_rows
        if rows.size and (rows.min() < 1 or rows.max() > n_rows):
            bad = int(np.argmax((rows < 1) | (rows > n_rows)))
            raise InputError(
                f"{self.matrix_file}: line {int(lines[bad])}: gene (row) {int(rows[bad])} out of "
                f"range 1 to {n_rows}"
            )
        genes = rows - 1
        if self._gene_map is not None:
            genes = self._gene_map[genes]
            keep = genes >= 0
            genes, cols, values, lines = genes[keep], cols[keep], values[keep], lines[keep]
        if self.field == "integer":
            # the header promises integers: a fractional value is a broken file, not data
            fractional = values != np.rint(values)
            if fractional.any():
                bad = int(np.argmax(fractional))
                raise InputError(
                    f"{self.matrix_file}: line {int(lines[bad])}: {values[bad]:.9g} in a file "
                    "whose header says 'integer'"
                )

        def locate(bad: int) -> tuple[str, str, int]:
            return f"line {int(lines[bad])}", str(int(cols[bad]) - 1), int(genes[bad])

        values, rounded = self._convert(values, locate)
        out = np.zeros((stop - start, self.n_genes), dtype=self.dtype)
        if values.size:
            _scatter_entries(cols - (1 + start), genes, values, out)
        return out, rounded

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        if start == stop:
            return np.zeros((0, self.n_genes), dtype=self.dtype), 0
        if self.compressed:
            with contextlib.closing(self._stream_blocks(stop - start, start, stop)) as blocks:
                _, _, block, rounded = next(blocks)
            return block, rounded
        begin, end = self.byte_range(start, stop)
        with fsspec.open(self.matrix_file, "rb") as file:
            file.seek(begin)
            raw = file.read(end - begin)
        if len(raw) != end - begin:
            raise InputError(f"{self.matrix_file}: the file is shorter than its index (changed?)")
        rows, cols, values, lines = self._parse(raw, int(self._lines[start]))
        if cols.size and (cols.min() <= start or cols.max() > stop):
            bad = int(np.argmax((cols <= start) | (cols > stop)))
            raise InputError(
                f"{self.matrix_file}: line {int(lines[bad])}: column {int(cols[bad])} where the "
                "index expected another (the file changed since it was indexed?)"
            )
        return self._dense(start, stop, rows, cols, values, lines)

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        if self.compressed:
            blocks = self._stream_fill(stop - start, start, stop, [out])
            with contextlib.closing(blocks):
                _, _, _, rounded = next(blocks)
            return rounded
        begin, end = self.byte_range(start, stop)
        buf = self._bytes(begin, end)
        state = np.zeros(4, dtype=np.int64)
        _, status = self._fill(buf, 0, start, stop, out, state, strict=True)
        del buf
        if status != _ACCEPTED:
            self._refused(start, stop)
        out[state[3] :] = 0
        return int(state[2])

    def _fill(
        self,
        buf: np.ndarray,
        pos: int,
        start: int,
        stop: int,
        out: np.ndarray,
        state: np.ndarray,
        *,
        strict: bool,
    ) -> tuple[int, int]:
        return _mtx_fill(
            buf,
            pos,
            start,
            stop,
            self._n_rows,
            self.n_cells,
            _NO_MAP if self._gene_map is None else self._gene_map,
            self.field == "integer",
            self.dtype == np.int32,
            strict,
            out,
            state,
        )

    def _bytes(self, begin: int, end: int) -> np.ndarray:
        """Bytes ``[begin, end)`` of ``matrix.mtx`` (see :meth:`_raw`)."""
        raw, shift = self._raw(begin, end)
        if len(raw) - shift != max(0, end - begin):
            raise InputError(f"{self.matrix_file}: the file is shorter than its index (changed?)")
        return np.frombuffer(raw, dtype=np.uint8)[shift:] if end > begin else np.zeros(0, np.uint8)

    def _raw(self, begin: int, end: int) -> tuple[Any, int]:
        """Bytes ``[begin, end)`` of ``matrix.mtx`` (fewer at its end) as ``(raw, shift)``: they
        are ``raw[shift:]``. A local file is memory-mapped (the page cache is parsed in place,
        with no copy and no fresh allocation), others are read."""
        if end <= begin:
            return b"", 0
        if _is_local(self.matrix_file):
            with open(_local(self.matrix_file), "rb") as file:
                end = min(end, os.fstat(file.fileno()).st_size)
                if end <= begin:
                    return b"", 0
                offset = begin - begin % mmap.ALLOCATIONGRANULARITY
                view = mmap.mmap(
                    file.fileno(), end - offset, offset=offset, access=mmap.ACCESS_READ
                )
                return view, begin - offset
        with fsspec.open(self.matrix_file, "rb") as file:
            file.seek(begin)
            return file.read(end - begin), 0

    def iter_blocks(
        self,
        chunk_cells: int,
        start: int = 0,
        stop: int | None = None,
        *,
        buffers: list[np.ndarray] | None = None,
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``chunk_cells`` cells in order; a gzip file is decompressed once."""
        if chunk_cells < 1:
            raise ValueError("chunk_cells must be positive")
        stop = self.n_cells if stop is None else stop
        start, stop = self._check_range(start, stop, self.n_cells, "cells")
        if self.compressed:
            yield from self._stream_fill(chunk_cells, start, stop, buffers)
        else:
            yield from super().iter_blocks(chunk_cells, start, stop, buffers=buffers)

    def _stream_fill(
        self, chunk_cells: int, start: int, stop: int, buffers: list[np.ndarray] | None
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """One sequential pass: blocks of cells ``[start, stop)`` in order, parsed by the
        compiled kernel straight into the blocks (``buffers`` in turn, or new arrays). Whatever
        the kernel refuses, the checked pass (:meth:`_stream_blocks`) explains."""
        # last column seen, entries, rounded values, rows of the block zeroed
        state = np.zeros(4, dtype=np.int64)
        index = 0

        def block(begin: int) -> tuple[int, np.ndarray]:
            end = min(begin + chunk_cells, stop)
            view = _buffer_view(buffers, index, end - begin, self.n_genes)
            state[3] = 0
            return end, self._output(end - begin, view)

        if start == stop:
            return
        block_start = start
        block_stop, out = block(block_start)
        try:
            for buf in self._pieces():
                pos = 0
                while True:
                    pos, status = self._fill(
                        buf, pos, block_start, block_stop, out, state, strict=False
                    )
                    if status == _ACCEPTED:
                        break
                    if status == _REFUSED:
                        self._refused_stream(chunk_cells, start, stop)
                    # a column past the block: the block is complete
                    out[state[3] :] = 0
                    yield block_start, block_stop, out, int(state[2])
                    state[2] = 0
                    if block_stop == stop:
                        return
                    index += 1
                    block_start = block_stop
                    block_stop, out = block(block_start)
        except (OSError, EOFError, gzip.BadGzipFile):
            self._refused_stream(chunk_cells, start, stop)
        if state[1] != self.nnz:
            self._refused_stream(chunk_cells, start, stop)
        while True:
            out[state[3] :] = 0
            yield block_start, block_stop, out, int(state[2])
            state[2] = 0
            if block_stop == stop:
                return
            index += 1
            block_start = block_stop
            block_stop, out = block(block_start)

    def _pieces(self) -> Iterator[np.ndarray]:
        """The data region, decompressed, in pieces of whole lines (the last one may lack its
        newline), as uint8 arrays."""
        carry = b""
        for chunk in _read_ahead(self.matrix_file, self.data_start, _MTX_STREAM_PIECE):
            data = carry + chunk
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield np.frombuffer(data, dtype=np.uint8, count=cut)
        if carry:
            yield np.frombuffer(carry, dtype=np.uint8)

    def _refused_stream(self, chunk_cells: int, start: int, stop: int) -> None:
        """The kernel refused a line of the gzip stream: the checked pass names it."""
        for _ in self._stream_blocks(chunk_cells, start, stop):
            pass
        raise RuntimeError(
            f"{self.matrix_file}: the compiled reader refused a line that the checked reader "
            "accepts (a distumap bug; please report it)"
        )

    def _stream(self) -> Iterator[tuple[np.ndarray, ...]]:
        """The entries of the data region in file order, in pieces: (rows, cols, values, lines)."""
        line = self.header_lines + 1
        try:
            with _open_stream(self.matrix_file) as stream:
                skipped = stream.read(self.data_start)
                if len(skipped) < self.data_start:
                    return
                carry = b""
                while True:
                    piece = stream.read(_MTX_STREAM_PIECE)
                    data = carry + piece
                    if piece:
                        cut = data.rfind(b"\n") + 1
                        if cut == 0:
                            carry = data
                            continue
                        data, carry = data[:cut], data[cut:]
                    if data:
                        yield self._parse(data, line)
                        line += data.count(b"\n")
                    if not piece:
                        return
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(f"{self.matrix_file}: cannot read past line {line} ({exc})") from exc

    def _stream_blocks(
        self, chunk_cells: int, start: int, stop: int
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """One sequential pass: blocks of cells ``[start, stop)`` in order."""
        block_start = start
        pending: list[tuple[np.ndarray, ...]] = []
        previous = 0  # last column seen (1-based)
        previous_line = 0
        entries = 0

        def emit(block_stop: int) -> tuple[int, int, np.ndarray, int]:
            nonlocal pending
            parts = (
                [np.concatenate(column) for column in zip(*pending, strict=True)]
                if pending
                else [np.zeros(0, np.int64)] * 2 + [np.zeros(0)] + [np.zeros(0, np.int64)]
            )
            rows, cols, values, lines = parts
            inside = cols <= block_stop
            rest = ~inside
            pending = [tuple(part[rest] for part in parts)] if rest.any() else []
            block, rounded = self._dense(
                block_start, block_stop, rows[inside], cols[inside], values[inside], lines[inside]
            )
            return block_start, block_stop, block, rounded

        for rows, cols, values, lines in self._stream():
            entries += cols.size
            if cols.size:
                if cols.min() < 1 or cols.max() > self.n_cells:
                    bad = int(np.argmax((cols < 1) | (cols > self.n_cells)))
                    raise InputError(
                        f"{self.matrix_file}: line {int(lines[bad])}: column (barcode) "
                        f"{int(cols[bad])} out of range 1 to {self.n_cells}"
                    )
                steps = np.diff(cols, prepend=previous)
                if steps.min() < 0:
                    bad = int(np.argmax(steps < 0))
                    before = previous if bad == 0 else int(cols[bad - 1])
                    self._unsorted(int(lines[bad]), cols[bad], before, previous_line)
                previous, previous_line = int(cols[-1]), int(lines[-1])
                selected = (cols > start) & (cols <= stop)
                if selected.any():
                    pending.append(
                        (rows[selected], cols[selected], values[selected], lines[selected])
                    )
            # every cell before the last column seen is complete
            while block_start < stop and min(block_start + chunk_cells, stop) < previous:
                block_stop = min(block_start + chunk_cells, stop)
                yield emit(block_stop)
                block_start = block_stop
            if previous > stop:
                break
        else:
            if entries != self.nnz:
                raise InputError(
                    f"{self.matrix_file}: line {self.header_lines}: the size line says "
                    f"{self.nnz} entries, the file holds {entries} (truncated?)"
                )
        while block_start < stop:
            block_stop = min(block_start + chunk_cells, stop)
            yield emit(block_stop)
            block_start = block_stop


# ---------------------------------------------------------------------------------------------
# detection


_READERS: dict[str, type[Reader]] = {
    "10x-h5": TenxH5Reader,
    "mex": MexReader,
    "h5ad": AnnDataReader,
    "anndata-zarr": AnnDataZarrReader,
    "loom": LoomReader,
}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _zarr_encoding(source: str) -> str | None:
    """The root group's ``encoding-type`` of a zarr folder (v3 or v2), None when it is not one."""
    import json

    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        path = _join(source, name)
        if not _exists(path):
            continue
        try:
            with fsspec.open(path, "rt") as file:
                document = json.load(file)
        except (OSError, ValueError):
            return None
        attrs = document.get(key, {}) if key else document
        return attrs.get("encoding-type") if isinstance(attrs, dict) else None
    return None


def _sniff_hdf5(source: str) -> str | None:
    try:
        with fsspec.open(source, "rb") as file:
            if file.read(8) != _HDF5_MAGIC:
                return None
    except OSError:
        return None
    with _hdf5(source) as file:
        if _attr(file, "encoding-type") == "anndata" or ("obs" in file and "var" in file):
            return "h5ad"
        if "row_attrs" in file and "col_attrs" in file:
            return "loom"
        return "10x-h5"


def detect_format(source: str) -> str:
    """The reader format for ``source`` (see :func:`open_reader`)."""
    source = os.fspath(source)
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    if _isdir(source):
        if _exists(_join(source, "matrix.mtx")) or _exists(_join(source, "matrix.mtx.gz")):
            return "mex"
        if _zarr_encoding(source) == "anndata":
            return "anndata-zarr"
        raise InputError(
            f"{source}: a folder that is neither a 10x MEX folder (matrix.mtx[.gz]) nor an "
            "AnnData zarr group (encoding-type 'anndata')"
        )
    if not _exists(source):
        raise InputError(f"{source}: no such file or folder")
    if re.search(r"\.mtx(\.gz)?$", name):
        return "mex"
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".loom"):
        return "loom"
    if name.endswith((".h5", ".hdf5")):
        return _sniff_hdf5(source) or "10x-h5"
    sniffed = _sniff_hdf5(source)
    if sniffed is not None:
        return sniffed
    raise InputError(
        f"{source}: cannot tell the format from the name; pass --format with one of "
        f"{', '.join(FORMATS)} (CSV and TSV go through the CSV ingest)"
    )


def open_reader(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    layer: str | None = None,
    dtype: str = "int32",
) -> Reader:
    """The reader for one input.

    Parameters
    ----------
    source
        File or folder, path or fsspec URL.
    format
        ``"auto"`` detects it: a folder with ``matrix.mtx[.gz]`` is MEX, a zarr folder whose root
        says ``encoding-type: anndata`` is AnnData zarr, ``.h5ad`` AnnData, ``.loom`` loom,
        ``.h5`` 10x Cell Ranger (an ``.h5`` or unnamed HDF5 file that holds obs/var or loom's
        attributes goes to those readers). Or one of :data:`FORMATS`.
    layer
        A layer instead of the main matrix (AnnData, loom; a genome for 10x v2 files).
    dtype
        ``"int32"`` (counts) or ``"float32"``.

    Returns
    -------
    Reader

    Raises
    ------
    InputError
        The source is missing, its format unknown, or the file is broken.

    Examples
    --------
    >>> reader = open_reader("filtered_feature_bc_matrix")  # doctest: +SKIP
    >>> reader.format
    'mex'
    """
    source = os.fspath(source)
    if format == "auto":
        format = detect_format(source)
    if format not in _READERS:
        raise InputError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    return _READERS[format](source, layer=layer, dtype=dtype)
