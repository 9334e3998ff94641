"""What every reader shares: the :class:`Reader` interface and its registry, value checks and the
compiled kernels that fill a block.

A reader knows one format: how many cells and genes it holds, their names, the cells' metadata and
how to turn one cell range into a dense int32 (or float32) block. It does no store I/O and uses no
Dask: the ingest stage plugs readers into its parallel, resumable block tasks. A reader is cheap to
pickle (paths and small arrays; files are opened inside each call), so one reader travels to every
task.

Each format's reader is a subclass that declares its ``format`` (the ``--format`` value), its
``suffixes`` and :meth:`Reader.guess_can_open`; defining the subclass registers it
(``__init_subclass__``), so the formats, their detection and the CLI's choices all come from
:func:`registered`. What differs between formats for the ingest (random or sequential access, an
index pass, a transposition) is a capability the reader declares; the ingest asks for it.

Every reader validates what it reads and raises :class:`~distumap._errors.InputError` with one line
that names the file and the dataset (HDF5, zarr) or the line (MEX, CSV). Values within
:data:`ROUNDING_TOLERANCE` of an integer are rounded and counted: :meth:`Reader.read_counted`
returns the count with the block (what ingest tasks use), :meth:`Reader.read` adds it to
:attr:`Reader.rounded`.

Blocks are filled by compiled kernels that check, convert and place every value in one pass,
straight into a block the caller may reuse (``out=``): no fresh array per block and no Python
per entry. A kernel only accepts or refuses; a refused block is read again on the checked path
(``_read_checked``, numpy), whose message names the file, the place and the gene.
"""

from __future__ import annotations

import abc
import os
import warnings
from collections.abc import Callable, Container, Iterator
from typing import Any, ClassVar

import numba
import numpy as np

from distumap._errors import InputError
from distumap._paths import exists, file_identity

#: values this close to an integer are integer counts written as floats (``2.9999999``)
ROUNDING_TOLERANCE = 1e-6
INT32_MAX = np.iinfo(np.int32).max
#: 10x feature type of the features kept
GENE_EXPRESSION = "Gene Expression"
FIX_DTYPE = "ingest with --dtype float32 to keep non-integer values (e.g. normalised data)"

#: every reader class by its format name, in the order they were defined
_REGISTRY: dict[str, type[Reader]] = {}


def registered(*, standalone: bool | None = None) -> tuple[type[Reader], ...]:
    """The registered reader classes by their :attr:`Reader.order` (the order detection asks
    them and listings show them); with ``standalone``, only those whose
    :attr:`Reader.standalone` is that."""
    return tuple(
        sorted(
            (cls for cls in _REGISTRY.values() if standalone in (None, cls.standalone)),
            key=lambda cls: (cls.order, cls.format),
        )
    )


def unique_gene_names(genes: list[str], source: str) -> tuple[list[str], list[str]]:
    """Make duplicate gene names unique (``name``, ``name-1``, ...), as scanpy's
    ``var_names_make_unique`` does; returns the names and the duplicated originals."""
    seen: dict[str, int] = {}
    taken = set(genes)
    out, duplicated = [], []
    for gene in genes:
        if gene not in seen:
            seen[gene] = 0
            out.append(gene)
            continue
        duplicated.append(gene)
        n = seen[gene]
        while True:
            n += 1
            candidate = f"{gene}-{n}"
            if candidate not in taken:
                break
        seen[gene] = n
        taken.add(candidate)
        out.append(candidate)
    return out, duplicated


def as_strings(values: Any) -> np.ndarray:
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


def parse_dtype(dtype: str | np.dtype) -> np.dtype:
    try:
        parsed = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"dtype must be 'int32' or 'float32', got {dtype!r}") from exc
    if parsed not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise InputError(f"dtype must be 'int32' or 'float32', got {dtype!r}")
    return parsed


def checked_values(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int, int, str]:
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
        if dtype == np.int32 and values.max() > INT32_MAX:
            return values, 0, int(np.argmax(values > INT32_MAX)), "a count too large for int32"
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
    if nearest.max() > INT32_MAX:
        return values, 0, int(np.argmax(nearest > INT32_MAX)), "a count too large for int32"
    return nearest.astype(np.int32), int(np.count_nonzero(distance)), -1, ""


@numba.njit(nogil=True, cache=True, boundscheck=False)
def scatter_rows(indptr, columns, values, out):  # pragma: no cover - compiled
    """``out[row, columns[k]] = values[k]`` for the entries ``indptr[row]:indptr[row + 1]``."""
    for row in range(indptr.shape[0] - 1):
        for k in range(indptr[row], indptr[row + 1]):
            out[row, columns[k]] = values[k]


@numba.njit(nogil=True, cache=True, boundscheck=False)
def scatter_entries(rows, columns, values, out):  # pragma: no cover - compiled
    """``out[rows[k], columns[k]] = values[k]`` (numpy's 2-D fancy assignment is much slower)."""
    for k in range(values.shape[0]):
        out[rows[k], columns[k]] = values[k]


def dense_rows(
    indptr: np.ndarray, columns: np.ndarray, values: np.ndarray, n_columns: int
) -> np.ndarray:
    out = np.zeros((indptr.shape[0] - 1, n_columns), dtype=values.dtype)
    if values.size:
        scatter_rows(indptr.astype(np.int64, copy=False), columns, values, out)
    return out


def buffer_view(buffers: list[np.ndarray] | None, i: int, rows: int, columns: int):
    """The first ``rows`` x ``columns`` values of ``buffers[i % len(buffers)]`` (None without)."""
    if not buffers:
        return None
    buffer = buffers[i % len(buffers)].reshape(-1)
    return buffer[: rows * columns].reshape(rows, columns)


# ---------------------------------------------------------------------------------------------
# compiled fast paths: check, convert and place values in one pass over the output block
#
# Each kernel writes straight into the caller's block (a buffer reused from block to block) and
# accepts exactly what :func:`checked_values` accepts. When a value is not acceptable it stops
# with REFUSED, and the reader re-reads the block on its checked path, whose message names the
# file, the place and the gene: the fast path never has to know how to explain a problem.

ACCEPTED, REFUSED = 0, 1
#: an empty column map: keep every column as it is
NO_MAP = np.zeros(0, dtype=np.int64)


@numba.njit(nogil=True, cache=True, inline="always")
def accept(value, integer):  # pragma: no cover - compiled
    """``(ok, rounded, converted)`` for one value: finite and non-negative, and for an integer
    target within ROUNDING_TOLERANCE of an integer that fits int32."""
    number = float(value)
    if not (number >= 0.0) or number == np.inf:  # NaN fails the comparison
        return False, 0, number
    if not integer:
        return True, 0, number
    nearest = np.rint(number)
    if abs(number - nearest) > ROUNDING_TOLERANCE or nearest > INT32_MAX:
        return False, 0, number
    return True, 1 if nearest != number else 0, nearest


@numba.njit(nogil=True, cache=True, boundscheck=False)
def fill_rows(indptr, columns, values, column_map, integer, out):  # pragma: no cover - compiled
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
            ok, moved, number = accept(values[k], integer)
            if not ok:
                return REFUSED, rounded
            rounded += moved
            out[row, column] = number
    return ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def fill_entries(rows, columns, values, column_map, integer, out):  # pragma: no cover - compiled
    """``out[rows[k], column_map[columns[k]]] = values[k]`` (``out`` already zeroed; an empty map
    keeps the columns). Returns ``(status, rounded)``."""
    mapped = column_map.shape[0] > 0
    rounded = 0
    for k in range(values.shape[0]):
        column = column_map[columns[k]] if mapped else columns[k]
        ok, moved, number = accept(values[k], integer)
        if not ok:
            return REFUSED, rounded
        rounded += moved
        out[rows[k], column] = number
    return ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def fill_dense(block, integer, out):  # pragma: no cover - compiled
    """``out[:] = block``, checked and converted (``block`` may be ``out`` itself)."""
    rounded = 0
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            ok, moved, number = accept(block[i, j], integer)
            if not ok:
                return REFUSED, rounded
            rounded += moved
            out[i, j] = number
    return ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def fill_transposed(block, first_gene, first_cell, integer, out):  # pragma: no cover - compiled
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
                    ok, moved, number = accept(block[g, c], integer)
                    if not ok:
                        return REFUSED, rounded
                    rounded += moved
                    out[first_cell + c, first_gene + g] = number
    return ACCEPTED, rounded


@numba.njit(nogil=True, cache=True, boundscheck=False)
def bucket_by_block(
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


def packed_dtype(dtype: np.dtype) -> np.dtype:
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
        The ``--format`` value that names this reader (a class attribute; defining a subclass
        with its own ``format`` registers it).
    suffixes : tuple of str
        File or folder name endings of the format, what :meth:`guess_can_open` falls back on.
    order : int
        Where detection asks this reader (and listings show its format), lowest first.
    standalone : bool
        Whether :func:`distumap.io.readers.open_reader` hands it out by itself (and it is in
        ``FORMATS``); False for a reader whose cells are known only after the ingest's index
        pass (CSV).
    concatenates : bool
        Whether the ingest reads it together with other inputs into one store.
    orientations : tuple of str
        The ``--orientation`` values it takes; the other formats know which way they lie.
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
    suffixes: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 100
    standalone: ClassVar[bool] = True
    concatenates: ClassVar[bool] = True
    orientations: ClassVar[tuple[str, ...]] = ("cells-by-genes",)
    orientation: str = "cells"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("format")
        if name:
            if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
                raise TypeError(f"two readers for --format {name!r}: {_REGISTRY[name]}, {cls}")
            _REGISTRY[name] = cls

    # -- what the ingest asks --

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        """Whether ``source`` looks like this format: its content first (magic number, layout),
        then its name (:attr:`suffixes`). A missing source is never claimed; a broken file that
        must be read to tell raises the reader's error, naming it."""
        return cls.has_suffix(source) and exists(source)

    @classmethod
    def has_suffix(cls, source: str) -> bool:
        """Whether ``source``'s name ends in one of :attr:`suffixes` (case-insensitively)."""
        name = source.rstrip("/").rsplit("/", 1)[-1].lower()
        return name.endswith(cls.suffixes) if cls.suffixes else False

    @property
    def sequential(self) -> bool:
        """Whether the input can only be read in order (a gzip stream): then one task reads
        every block (:meth:`iter_blocks`) instead of one task per block."""
        return False

    @property
    def needs_index(self) -> bool:
        """Whether an index pass must run before blocks are read: :meth:`index_ranges` gives
        byte ranges, :meth:`index_block` indexes one (a task each), :meth:`set_index` takes the
        results in order."""
        return False

    #: task key prefix and progress label of the index pass (``needs_index`` readers)
    index_key: ClassVar[str] = "index-block"
    index_label: ClassVar[str] = "ingest: index"

    def index_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges for :meth:`index_block` (readers that declare :attr:`needs_index`)."""
        raise NotImplementedError(f"{type(self).__name__} has no index pass")

    def index_block(self, begin: int, end: int) -> Any:
        """Index the byte range ``[begin, end)``; pure, so ranges run in parallel."""
        raise NotImplementedError(f"{type(self).__name__} has no index pass")

    def set_index(self, blocks: Any) -> None:
        """Combine :meth:`index_block` results (in file order) into the reader's index."""
        raise NotImplementedError(f"{type(self).__name__} has no index pass")

    @property
    def persists_index(self) -> bool:
        """Whether the ingest keeps the index in the store (:meth:`persisted_index`), so that a
        resumed ingest gives it back (:meth:`load_index`) instead of indexing again."""
        return False

    def persisted_index(self) -> dict[str, np.ndarray]:
        """The index as named arrays, for readers that declare :attr:`persists_index`."""
        return {}

    def load_index(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back what :meth:`persisted_index` gave."""
        raise NotImplementedError(f"{type(self).__name__} keeps no index in the store")

    @property
    def genes_known(self) -> bool:
        """Whether :attr:`n_genes` and :meth:`genes` are known before the index pass (a
        genes-by-cells CSV finds its genes in the index pass)."""
        return True

    @property
    def transposition(self) -> str | None:
        """How the ingest gets cell blocks when a cell range is scattered over the file:

        - ``None``: :meth:`read_counted` reads a cell range directly.
        - ``"entries"`` (:attr:`orientation` ``"genes"``, CSC): the entries are sorted by store
          block once (:attr:`nnz`, :attr:`packed_words`, :attr:`part_entries`,
          :meth:`csc_entries`), and each block task fills its block from its own entries
          (:meth:`fill_csc_entries`).
        - ``"gene-rows"``: blocks of gene rows (:meth:`read_gene_rows`, or in order
          :meth:`iter_gene_rows`) go to a genes x cells array in the store, which each block
          task reads transposed.
        """
        return "entries" if self.orientation == "genes" else None

    #: task key prefix and progress label of the block tasks; ``{format}`` is the inputs' formats
    block_task: ClassVar[tuple[str, str]] = ("read-{format}-block", "ingest: read {format} blocks")
    #: task key and progress label of the one task that reads a :attr:`sequential` input
    sequential_task: ClassVar[tuple[str, str]] = (
        "read-{format}-gzip",
        "ingest: read {format} (sequential)",
    )

    @classmethod
    def open(
        cls,
        source: str,
        *,
        layer: str | None = None,
        dtype: str = "int32",
        orientation: str = "cells-by-genes",
    ) -> Reader:
        """The reader of ``source`` with the ingest's options (``orientation`` is one of
        :attr:`orientations`; readers of one orientation ignore it)."""
        return cls(source, layer=layer, dtype=dtype)

    @classmethod
    def stage_params(
        cls, readers: list[Reader], *, metadata: str | None, dtype: str
    ) -> dict[str, Any]:
        """What the ingest stage records of its inputs and options (``chunk_cells`` is set by the
        ingest): a re-run with equal parameters resumes or skips the stage."""
        return {
            "inputs": [reader.fingerprint() for reader in readers],
            "metadata": metadata,
            "chunk_cells": 0,
            "dtype": dtype,
        }

    @classmethod
    def stage_record(cls, readers: list[Reader]) -> dict[str, Any]:
        """What the finished ingest records besides its parameters."""
        return {"formats": "+".join(dict.fromkeys(reader.format for reader in readers))}

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        self.source = os.fspath(source)
        self.layer = layer
        self.dtype = parse_dtype(dtype)
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

    def cell_blocks(self, size: int) -> Iterator[np.ndarray]:
        """The cell names in row order, ``size`` at a time (the last block may be shorter).

        What the ingest's skeleton reads, so that no process holds every name at once; formats
        whose names can be read by range override it, the others read them all once."""
        names = self.cells()
        for start in range(0, len(names), size):
            yield names[start : start + size]

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

    # -- a representation the input holds (--use-rep) --

    def representation(self, key: str) -> int:
        """Check the representation ``key`` (an AnnData ``obsm`` array) and return its width.

        Formats without representations refuse; AnnData's readers override this.

        Raises
        ------
        InputError
            The input holds no such representation, or not one distumap can embed.
        """
        raise InputError(
            f"{self.source}: --use-rep {key}: a {self.format} input holds no representations; "
            "--use-rep reads an obsm array of AnnData (.h5ad, AnnData zarr)"
        )

    def read_representation(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the representation ``key`` as float32, checked finite."""
        raise NotImplementedError(f"{type(self).__name__} holds no representations")

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
        status, rounded = fill_rows(
            indptr,
            columns,
            values,
            NO_MAP if column_map is None else column_map,
            self.dtype == np.int32,
            out,
        )
        return None if status != ACCEPTED else int(rounded)

    def iter_blocks(
        self,
        chunk_cells: int,
        start: int = 0,
        stop: int | None = None,
        *,
        buffers: list[np.ndarray] | None = None,
        skip: Container[int] = (),
    ) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """Blocks of ``chunk_cells`` cells in order: ``(start, stop, block, rounded)``; a reader
        may leave out the blocks numbered (from ``start``) in ``skip``.

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
            if i in skip:
                continue
            end = min(begin + chunk_cells, stop)
            out = buffer_view(buffers, i, end - begin, self.n_genes)
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
            "files": [file_identity(path) for path in self._files()],
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
        converted, rounded, bad, problem = checked_values(values, self.dtype)
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
            message += f"; {FIX_DTYPE}"
        raise InputError(message)
