"""loom (``/matrix`` genes x cells, read with h5py): :class:`LoomReader`."""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterator

import h5py
import numpy as np

from distumap._errors import InputError, outside_stacklevel
from distumap._format import LOOM_ACCESSION, LOOM_CELL_NAMES, LOOM_GENE_NAMES
from distumap._paths import (
    isdir,
)
from distumap.io.readers._base import (
    ACCEPTED,
    REFUSED,
    Reader,
    fill_transposed,
)
from distumap.io.readers._hdf5 import (
    check_length,
    child,
    hdf5_root,
    load,
    load_strings,
    loom_layout,
    node_name,
    open_hdf5,
)


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

    Cell names are the first of the column attributes ``CellID``, ``cell_names``, ``obs_names``,
    ``Cell`` that the file has, gene names the first of the row attributes ``Gene``,
    ``gene_names``, ``var_names``, ``Accession`` (:data:`~distumap._format.LOOM_CELL_NAMES`,
    :data:`~distumap._format.LOOM_GENE_NAMES`); with none, the names are the column (row)
    indices, said in one warning. Gene ids are ``Accession`` when it does not name the genes.
    The other 1-D column attributes are the metadata. :meth:`read` reads
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
    suffixes = (".loom",)
    order = 50

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        root = hdf5_root(source) if not isdir(source) else None
        if root is not None and loom_layout(root):
            return True
        return super().guess_can_open(source) and not isdir(source)

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        with open_hdf5(self.source) as file:
            matrix = self._matrix(file)
            self._path = node_name(matrix)
            if len(matrix.shape) != 2:
                raise InputError(f"{self.source}: dataset {self._path} is not a matrix")
            self.n_genes, self.n_cells = (int(v) for v in matrix.shape)
            rows = child(file, "row_attrs", self.source)
            columns = child(file, "col_attrs", self.source)
            self._gene_attr = self._names_attr(rows, LOOM_GENE_NAMES, self.n_genes, "genes")
            self._cell_attr = self._names_attr(columns, LOOM_CELL_NAMES, self.n_cells, "cells")
            if LOOM_ACCESSION in rows and self._gene_attr != LOOM_ACCESSION:
                check_length(rows[LOOM_ACCESSION], self.n_genes, "genes", self.source)
        missing = [
            f"{what} ({', '.join(names)})"
            for attr, what, names in (
                (self._cell_attr, "cell names: col_attrs", LOOM_CELL_NAMES),
                (self._gene_attr, "gene names: row_attrs", LOOM_GENE_NAMES),
            )
            if attr is None
        ]
        if missing:
            warnings.warn(
                f"{self.source}: no {' and no '.join(missing)}; named them by their index "
                "(0, 1, ...)",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )

    def _names_attr(self, group: h5py.Group, names: tuple[str, ...], n: int, what: str):
        """The first of ``names`` in ``group`` (checked to hold ``n`` names), or None."""
        for name in names:
            if name in group:
                check_length(group[name], n, what, self.source)
                return name
        return None

    def _matrix(self, file: h5py.File) -> h5py.Dataset:
        if self.layer is None:
            return child(file, "matrix", self.source)
        layers = file["layers"] if "layers" in file else {}
        if self.layer not in layers:
            raise InputError(
                f"{self.source}: no layer {self.layer!r} (layers: {sorted(layers.keys())})"
            )
        return layers[self.layer]

    def _names(self, group: str, attr: str | None, n: int) -> np.ndarray:
        if attr is None:
            return np.array([str(i) for i in range(n)], dtype=object)
        with open_hdf5(self.source) as file:
            return load_strings(file[f"{group}/{attr}"], self.source, unescape=True)

    def cells(self) -> np.ndarray:
        return self._names("col_attrs", self._cell_attr, self.n_cells)

    def cell_blocks(self, size: int) -> Iterator[np.ndarray]:
        if self._cell_attr is None:  # numbered cells
            yield from super().cell_blocks(size)
            return
        with open_hdf5(self.source) as file:
            node = file[f"col_attrs/{self._cell_attr}"]
            for start in range(0, self.n_cells, size):
                part = slice(start, start + size)
                yield load_strings(node, self.source, unescape=True, part=part)

    def _raw_genes(self) -> np.ndarray:
        return self._names("row_attrs", self._gene_attr, self.n_genes)

    def gene_ids(self) -> np.ndarray | None:
        if self._gene_attr == LOOM_ACCESSION:
            return None
        with open_hdf5(self.source) as file:
            if LOOM_ACCESSION not in file["row_attrs"]:
                return None
            return load_strings(file[f"row_attrs/{LOOM_ACCESSION}"], self.source, unescape=True)

    def metadata(self) -> dict[str, np.ndarray]:
        columns = {}
        with open_hdf5(self.source) as file:
            for name, node in file["col_attrs"].items():
                if name == self._cell_attr or not isinstance(node, h5py.Dataset):
                    continue
                if len(node.shape) != 1 or node.shape[0] != self.n_cells:
                    continue
                if node.dtype.kind in "SOU":
                    columns[name] = load_strings(node, self.source, unescape=True)
                else:
                    columns[name] = load(node, self.source)
        return columns

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with open_hdf5(self.source) as file:
            block = load(file[self._path], self.source, np.s_[:, start:stop]).T
        n_genes = self.n_genes

        def locate(bad: int) -> tuple[str, str, int]:
            return f"dataset {self._path}", str(start + bad // n_genes), bad % n_genes

        values, rounded = self._convert(np.ascontiguousarray(block), locate)
        return np.ascontiguousarray(values), rounded

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        integer = self.dtype == np.int32
        with open_hdf5(self.source) as file:
            matrix = file[self._path]
            status, rounded = REFUSED, 0
            if _deflated_chunks(matrix):
                status, rounded = self._fill_from_chunks(matrix, start, stop, out)
            if status != ACCEPTED:  # other filters, a missing chunk, or a refused value
                block = load(matrix, self.source, np.s_[:, start:stop])
                if block.dtype.kind == "b":
                    block = block.view(np.uint8)
                if block.dtype.kind in "iuf":
                    status, rounded = fill_transposed(block, 0, 0, integer, out)
        if status != ACCEPTED:
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
                    return REFUSED, 0  # h5py's own read says what is wrong
                if len(data) != expected:
                    return REFUSED, 0
                chunk = np.frombuffer(data, dtype=dtype).reshape(chunk_genes, chunk_cells)
                status, moved = fill_transposed(chunk, g0, c0 - start, integer, out)
                if status != ACCEPTED:
                    return status, 0
                rounded += moved
        return ACCEPTED, rounded
