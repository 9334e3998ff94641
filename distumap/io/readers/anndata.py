"""AnnData, ``.h5ad`` and zarr (every encoding anndata reads, the legacy one included):
:class:`AnnDataReader` and :class:`AnnDataZarrReader`."""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
import h5py
import numpy as np

from distumap._errors import InputError, outside_stacklevel
from distumap._paths import (
    exists,
    isdir,
    join,
)
from distumap.io.readers._anndata_layout import (
    INTEGER,
    RAW_NAMES,
    decode_column,
    frame_columns,
    frame_index,
    frame_length,
    is_compound,
    matrices,
    matrix_kind,
    raw_paths,
    sample_values,
)
from distumap.io.readers._base import (
    ACCEPTED,
    NO_MAP,
    Reader,
    as_strings,
    bucket_by_block,
    dense_rows,
    fill_dense,
    fill_entries,
    packed_dtype,
    scatter_entries,
)
from distumap.io.readers._hdf5 import (
    anndata_layout,
    attr,
    check_indptr,
    check_length,
    child,
    damaged,
    hdf5_root,
    is_group,
    load,
    major_slice,
    node_name,
    open_hdf5,
)

#: entries read at once by the CSC reader's pass over the matrix, and per task of the ingest's
#: sort of a CSC matrix by cell block: bounds the memory of both (their values and indices)
CSC_ENTRIES_PER_PASS = 8 << 20


class AnnDataReader(Reader):
    """AnnData's ``.h5ad`` (read with h5py): X (or ``layers/NAME``, or ``.raw``) dense, CSR or CSC.

    Every layout anndata wrote (:mod:`distumap.io.readers._anndata_layout`): the current
    encodings, 0.7's (categoricals pointing to ``__categories``) and the one before 0.7
    (compound ``obs``/``var``, categories in ``uns/<column>_categories``, ``raw.X``). Cell names
    are the obs index, gene names the var index (``raw/var``'s for ``--layer raw``), gene ids
    the var column ``gene_ids`` when present; obs columns (categoricals decoded to strings) are
    the metadata.

    With no ``layer`` and int32, X is read when a sample of its stored values are counts; else
    the counts are looked for in ``raw``, a ``counts`` layer, then the other layers (the one
    found is said in one warning, and is :attr:`layer`); with other matrices and none of them
    counts, an InputError lists them.

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
        Read ``layers/NAME`` instead of X; ``"raw"`` (or ``"raw/X"``) reads ``raw/X`` (``raw.X``
        before 0.7) with ``raw/var``'s gene names.
    dtype
        ``"int32"`` or ``"float32"`` (which reads X, or the layer named, as it is).

    Examples
    --------
    >>> reader = AnnDataReader("pbmc.h5ad", layer="counts")  # doctest: +SKIP
    >>> reader.orientation  # doctest: +SKIP
    'cells'
    """

    format = "h5ad"
    suffixes = (".h5ad",)
    order = 30  # before loom: a .h5ad file is AnnData's whatever else it holds

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        if isdir(source):
            return False
        root = hdf5_root(source)
        if root is not None and anndata_layout(root):
            return True
        return super().guess_can_open(source)

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        with self._open() as root:
            if "obs" not in root or "var" not in root:
                raise InputError(f"{self.source}: not an AnnData file: no obs and var groups")
            if self.layer in RAW_NAMES:
                self.layer = "raw"
            elif self.layer is None and self.dtype == np.int32:
                self.layer = self._counts_matrix(root)
            path, self._var = self._matrix_paths(root)
            self.n_cells = frame_length(root["obs"], self.source)
            self.n_genes = frame_length(child(root, self._var, self.source), self.source)
            matrix = root[path]
            self._path = node_name(matrix)
            self._inspect(matrix)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        with open_hdf5(self.source) as file:
            yield file

    def _matrix_paths(self, root: Any) -> tuple[str, str]:
        """The paths of the matrix read and of the var frame that names its genes."""
        if self.layer is None:
            if "X" not in root:
                raise InputError(f"{self.source}: no X matrix; pick a layer with --layer NAME")
            return "X", "var"
        raw = raw_paths(root)
        if self.layer == "raw" and raw is not None:
            return raw
        layers = root["layers"] if "layers" in root else {}
        if self.layer not in layers:
            raise InputError(
                f"{self.source}: no layer {self.layer!r} (layers: {sorted(layers.keys())}"
                f"{'' if raw is None else '; raw: --layer raw'})"
            )
        return f"layers/{self.layer}", "var"

    def _counts_matrix(self, root: Any) -> str | None:
        """The ``--layer`` value of the matrix that holds the counts: None (X) when X's sampled
        values are integers, else raw, then a ``counts`` layer, then the other layers by name,
        the first whose values are (said in one warning). None of them: an InputError listing
        every matrix and what it holds; X alone: None, and the read names X's first value that
        is no count (its cell and gene)."""
        found = matrices(root)
        kinds: dict[str, str] = {}

        def kind(name: str) -> str:
            if name not in kinds:
                kinds[name] = matrix_kind(sample_values(root[found[name]], self.source))
            return kinds[name]

        if "" not in found or kind("") == INTEGER:
            return None
        for name in self._counts_candidates(found):
            if kind(name) == INTEGER:
                warnings.warn(
                    f"{self.source}: X holds {kind('')}, not counts; read the integer counts in "
                    f"{found[name]} (--layer {name}) instead; --layer NAME picks another "
                    "matrix, --dtype float32 keeps X",
                    UserWarning,
                    stacklevel=outside_stacklevel(),
                )
                return name
        if len(found) == 1:  # X alone: refused at its first value that is no count, named
            return None
        listing = ", ".join(
            f"{'X' if name == '' else found[name]} ({kind(name)})" for name in found
        )
        raise InputError(
            f"{self.source}: X holds {kind('')}, and no matrix of the file holds integer counts: "
            f"{listing}; pick one with --layer NAME (--layer raw for raw counts), or keep X as "
            "it is with --dtype float32"
        )

    @staticmethod
    def _counts_candidates(found: dict[str, str]) -> list[str]:
        """Where the counts are looked for when X holds none: raw, a ``counts`` layer, then the
        other layers by name."""
        others = sorted(name for name in found if name not in ("", "raw", "counts"))
        return [name for name in ("raw", "counts", *others) if name in found]

    def _inspect(self, matrix: Any) -> None:
        source, where = self.source, node_name(matrix)
        expected = (self.n_cells, self.n_genes)
        if not is_group(matrix):
            self._encoding = "dense"
            if tuple(matrix.shape) != expected:
                raise InputError(
                    f"{source}: dataset {where} has shape {tuple(matrix.shape)}, but obs and var "
                    f"say {expected}"
                )
            return
        encoding = attr(matrix, "encoding-type") or {"csr": "csr_matrix", "csc": "csc_matrix"}.get(
            attr(matrix, "h5sparse_format")
        )
        if encoding not in ("csr_matrix", "csc_matrix"):
            raise InputError(f"{source}: {where}: unsupported matrix encoding {encoding!r}")
        self._encoding = encoding
        shape = attr(matrix, "shape")
        if shape is None:
            shape = attr(matrix, "h5sparse_shape")
        shape = tuple(int(v) for v in shape)
        if shape != expected:
            raise InputError(f"{source}: {where} has shape {shape}, but obs and var say {expected}")
        csr = encoding == "csr_matrix"
        self.orientation = "cells" if csr else "genes"
        n_major = self.n_cells if csr else self.n_genes
        data, indices = child(matrix, "data", source), child(matrix, "indices", source)
        if data.shape != indices.shape:
            raise InputError(
                f"{source}: {where}/data and {where}/indices differ in shape ({data.shape} and "
                f"{indices.shape})"
            )
        indptr = child(matrix, "indptr", source)
        check_length(indptr, n_major + 1, "entries (the shape's major axis + 1)", source)
        loaded = load(indptr, source).astype(np.int64)
        check_indptr(loaded, data.shape[0], node_name(indptr), source)
        if not csr:
            self._indptr = loaded  # n_genes + 1 numbers: the CSC passes plan with it
            self._data_dtype = np.dtype(data.dtype)

    # -- names --

    def cells(self) -> np.ndarray:
        with self._open() as root:
            return frame_index(root["obs"], self.source)

    def cell_blocks(self, size: int) -> Iterator[np.ndarray]:
        with self._open() as root:
            if is_compound(root["obs"]):  # before anndata 0.7: one dataset of every column
                yield from super().cell_blocks(size)
                return
            for start in range(0, self.n_cells, size):
                yield frame_index(root["obs"], self.source, part=slice(start, start + size))

    def _raw_genes(self) -> np.ndarray:
        with self._open() as root:
            return frame_index(root[self._var], self.source)

    def gene_ids(self) -> np.ndarray | None:
        with self._open() as root:
            var = root[self._var]
            if is_compound(var):
                column = frame_columns(var, self.source).get("gene_ids")
            elif "gene_ids" in var:
                column = decode_column(var["gene_ids"], var, self.source)
            else:
                column = None
            return None if column is None else as_strings(column)

    def metadata(self) -> dict[str, np.ndarray]:
        with self._open() as root:
            uns = root["uns"] if "uns" in root and is_group(root["uns"]) else None
            return frame_columns(root["obs"], self.source, uns)

    # -- a representation in obsm (--use-rep) --

    def _representation_node(self, root: Any, key: str) -> Any:
        """``obsm/KEY``, or an InputError that lists the keys there are."""
        obsm = root["obsm"] if "obsm" in root else None
        if obsm is not None and not is_group(obsm):  # anndata < 0.7: one compound dataset
            raise InputError(
                f"{self.source}: --use-rep {key}: obsm is a compound dataset (anndata < 0.7), "
                "which --use-rep does not read; write the file again with anndata >= 0.7"
            )
        keys = sorted(obsm.keys()) if obsm is not None else []
        if key not in keys:
            raise InputError(
                f"{self.source}: --use-rep {key}: obsm has no {key!r} (obsm keys: "
                f"{', '.join(keys) if keys else 'none'})"
            )
        return obsm[key]

    def representation(self, key: str) -> int:
        """Check ``obsm/KEY`` (a dense 2-D float array with a row per cell); return its width.

        Parameters
        ----------
        key
            The ``obsm`` key, such as ``X_scVI`` or ``X_pca``.

        Returns
        -------
        int
            The representation's dimensions (its columns).

        Raises
        ------
        InputError
            No such key (the message lists the keys there are), a group (a data frame, a
            sparse matrix), not two dimensions, not floats, or not a row per cell. The values
            are checked (finite) as they are read, by :meth:`read_representation`.
        """
        where = f"dataset obsm/{key}"
        with self._open() as root:
            node = self._representation_node(root, key)
            if is_group(node):
                kind = attr(node, "encoding-type") or "group"
                raise InputError(
                    f"{self.source}: --use-rep {key}: obsm/{key} is a {kind}, not a dense array "
                    "of floats"
                )
            shape, dtype = tuple(int(n) for n in node.shape), np.dtype(node.dtype)
        if len(shape) != 2 or shape[1] == 0:
            raise InputError(
                f"{self.source}: --use-rep {key}: {where} has shape {shape}; a representation "
                "has a row per cell and at least one column"
            )
        if dtype.kind != "f":
            raise InputError(
                f"{self.source}: --use-rep {key}: {where} holds {dtype} values, not floats"
            )
        if shape[0] != self.n_cells:
            raise InputError(
                f"{self.source}: --use-rep {key}: {where} has {shape[0]} rows, but obs has "
                f"{self.n_cells} cells"
            )
        return shape[1]

    def read_representation(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``obsm/KEY`` as float32 (checked by :meth:`representation`).

        Raises
        ------
        InputError
            A value that is not finite (NaN, infinite, or too large for float32), naming the
            file, the key, the cell and the column.
        """
        start, stop = self._check_range(start, stop, self.n_cells, "cells")
        with self._open() as root:
            values = load(self._representation_node(root, key), self.source, slice(start, stop))
        block = values.astype(np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            row, column = (int(i) for i in np.argwhere(bad)[0])
            value = float(values[row, column])
            raise InputError(
                f"{self.source}: --use-rep {key}: dataset obsm/{key}: a value that is not "
                f"finite as float32 ({value:.9g}) for cell {start + row}, column {column}"
            )
        return block

    # -- counts --

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with self._open() as root:
            matrix = root[self._path]
            if self._encoding == "dense":
                block = load(matrix, self.source, slice(start, stop))
                return self._convert_dense(block, start)
            if self._encoding == "csr_matrix":
                indptr, genes, values = major_slice(matrix, start, stop, self.n_genes, self.source)

                def locate(bad: int) -> tuple[str, str, int]:
                    cell = start + int(np.searchsorted(indptr, bad, side="right")) - 1
                    return f"dataset {self._path}/data", str(cell), int(genes[bad])

                values, rounded = self._convert(values, locate)
                return dense_rows(indptr, genes, values, self.n_genes), rounded
            return self._read_csc_cells(matrix, start, stop)

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        with self._open() as root:
            matrix = root[self._path]
            if self._encoding == "dense":
                rounded = self._fill_dense_rows(matrix, start, stop, out)
            elif self._encoding == "csr_matrix":
                indptr, genes, values = major_slice(matrix, start, stop, self.n_genes, self.source)
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
            block = load(matrix, self.source, slice(start, stop))
        if block.dtype.kind == "b":
            block = block.view(np.uint8)
        if block.dtype.kind not in "iuf":
            return None
        status, rounded = fill_dense(block, self.dtype == np.int32, out)
        return None if status != ACCEPTED else int(rounded)

    def _fill_csc_cells(self, matrix: Any, start: int, stop: int, out: np.ndarray) -> int | None:
        """The block from one pass over the whole CSC matrix, in pieces (an ingest transposes
        the matrix once instead: see :meth:`csc_entries`)."""
        out[...] = 0
        rounded = 0
        for rows, genes, values in self._csc_entries_of(matrix, start, stop):
            if values.dtype.kind == "b":
                values = values.view(np.uint8)
            if values.dtype.kind not in "iuf":
                return None
            status, piece = fill_entries(rows, genes, values, NO_MAP, self.dtype == np.int32, out)
            if status != ACCEPTED:
                return None
            rounded += piece
        return int(rounded)

    def _csc_entries_of(
        self, matrix: Any, start: int, stop: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The entries of cells ``[start, stop)`` of a CSC matrix, a piece of it at a time:
        ``(rows in the block, genes, values)``."""
        data, indices = matrix["data"], matrix["indices"]
        for low, high in self._csc_pieces():
            cells = load(indices, self.source, slice(low, high)).astype(np.int64, copy=False)
            self._check_minor(cells, self.n_cells, low, matrix)
            selected = np.flatnonzero((cells >= start) & (cells < stop))
            if selected.size == 0:
                continue
            values = load(data, self.source, slice(low, high))[selected]
            genes = np.searchsorted(self._indptr, low + selected, side="right") - 1
            yield cells[selected] - start, genes, values

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
        if stop == start:
            return out, 0
        for rows, genes, values in self._csc_entries_of(matrix, start, stop):

            def locate(bad: int, rows=rows, genes=genes) -> tuple[str, str, int]:
                return f"dataset {self._path}/data", str(start + rows[bad]), int(genes[bad])

            values, piece_rounded = self._convert(values, locate)
            rounded += piece_rounded
            scatter_entries(rows, genes.astype(np.int64), values, out)
        return out, rounded

    # -- CSC: one transposition pass instead of a pass per block --

    @property
    def nnz(self) -> int:
        """Stored entries of a CSC matrix (0 for others)."""
        return int(self._indptr[-1]) if self._encoding == "csc_matrix" else 0

    @property
    def part_entries(self) -> int:
        """Entries per task of the ingest's sorting pass (:meth:`csc_entries`)."""
        return int(CSC_ENTRIES_PER_PASS)

    @property
    def packed_words(self) -> int:
        """32-bit words per entry of :meth:`csc_entries`: row, gene and the value."""
        return 2 + packed_dtype(self._data_dtype).itemsize // 4

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
            the value's bits (as :func:`packed_dtype` says), block by block, each block's
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
            cells = load(matrix["indices"], self.source, slice(low, high))
            self._check_minor(cells, self.n_cells, low, matrix)
            values = load(matrix["data"], self.source, slice(low, high))
        if values.dtype.kind not in "biuf":

            def locate(bad: int) -> tuple[str, str, int]:
                gene = int(np.searchsorted(self._indptr, low + bad, side="right")) - 1
                return f"dataset {self._path}/data", str(int(cells[bad])), gene

            self._convert(values, locate)  # names the value that is not a number
        values = values.astype(packed_dtype(values.dtype), copy=False)
        words = np.ascontiguousarray(values).view(np.uint32).reshape(values.shape[0], -1)
        packed = np.empty((high - low, 2 + words.shape[1]), dtype=np.uint32)
        offsets = np.empty(n_blocks + 1, dtype=np.int64)
        if high > low:
            bucket_by_block(
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
        dtype = packed_dtype(self._data_dtype)
        rows, genes = packed[:, 0], packed[:, 1]
        values = np.ascontiguousarray(packed[:, 2:]).view(dtype).reshape(-1)
        kernel_values = values.view(np.uint8) if values.dtype.kind == "b" else values
        if kernel_values.dtype.kind in "iuf":
            status, rounded = fill_entries(
                rows,
                genes,
                kernel_values,
                NO_MAP if column_map is None else column_map,
                self.dtype == np.int32,
                out,
            )
            if status == ACCEPTED:
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
            indptr, cells, values = major_slice(matrix, g0, g1, self.n_cells, self.source)

        def locate(bad: int) -> tuple[str, str, int]:
            gene = g0 + int(np.searchsorted(indptr, bad, side="right")) - 1
            return f"dataset {self._path}/data", str(int(cells[bad])), gene

        values, rounded = self._convert(values, locate)
        self.rounded += rounded
        by_gene = dense_rows(indptr, cells, values, self.n_cells)  # genes x cells
        return np.ascontiguousarray(by_gene.T)


class AnnDataZarrReader(AnnDataReader):
    """An AnnData zarr folder (zarr v2 or v3, as ``AnnData.write_zarr`` writes it).

    The same layout and options as :class:`AnnDataReader`; the root group's attribute
    ``encoding-type`` is ``anndata``, or (as anndata 0.7 wrote it, with no attribute) the root
    group holds ``X``, ``obs`` and ``var``.
    """

    format = "anndata-zarr"
    #: a zarr folder is only claimed by its content: most zarr groups are not AnnData
    suffixes = (".zarr",)
    order = 40

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        return isdir(source) and (zarr_encoding(source) == "anndata" or legacy_anndata_zarr(source))

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        import zarr  # only this reader needs it

        try:
            root = zarr.open_group(self.source, mode="r")
        except Exception as exc:  # zarr raises its own errors for a folder that is no group
            raise InputError(f"{self.source}: not a readable zarr group ({exc})") from exc
        with damaged(self.source):
            if attr(root, "encoding-type") != "anndata" and not {"X", "obs", "var"} <= set(root):
                raise InputError(
                    f"{self.source}: a zarr group that is not AnnData's (no encoding-type "
                    "'anndata', no X, obs and var)"
                )
            yield root


def _zarr_document(path: str) -> dict | None:
    import json

    try:
        with fsspec.open(path, "rt") as file:
            document = json.load(file)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def zarr_encoding(source: str) -> str | None:
    """The root group's ``encoding-type`` of a zarr folder (v3 or v2), None when it is not one."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        path = join(source, name)
        if not exists(path):
            continue
        document = _zarr_document(path)
        if document is None:
            return None
        attrs = document.get(key, {}) if key else document
        return attrs.get("encoding-type") if isinstance(attrs, dict) else None
    return None


def legacy_anndata_zarr(source: str) -> bool:
    """Whether a folder is a zarr group holding ``X``, ``obs`` and ``var``, as anndata 0.7 wrote
    an AnnData (with no ``encoding-type`` on the root)."""
    if exists(join(source, ".zgroup")):
        markers = (".zgroup", ".zarray")
    elif exists(join(source, "zarr.json")):
        markers = ("zarr.json",)
    else:
        return False
    return all(
        any(exists(join(join(source, member), marker)) for marker in markers)
        for member in ("X", "obs", "var")
    )
