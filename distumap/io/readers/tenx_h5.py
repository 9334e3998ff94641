"""10x Cell Ranger HDF5 (``filtered_feature_bc_matrix.h5``, v3 and v2): :class:`TenxH5Reader`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from distumap._errors import InputError
from distumap._paths import (
    isdir,
)
from distumap.io.readers._base import (
    GENE_EXPRESSION,
    Reader,
    dense_rows,
)
from distumap.io.readers._hdf5 import (
    anndata_layout,
    check_indptr,
    check_length,
    child,
    hdf5_root,
    is_group,
    load,
    load_strings,
    loom_layout,
    major_slice,
    node_name,
    open_hdf5,
)


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
    suffixes = (".h5", ".hdf5")
    order = 10

    @classmethod
    def guess_can_open(cls, source: str) -> bool:
        # an HDF5 file that is neither AnnData nor loom is Cell Ranger's, whatever its name
        if isdir(source):
            return False
        root = hdf5_root(source)
        if root is None:
            return super().guess_can_open(source)
        return not anndata_layout(root) and not loom_layout(root)

    def __init__(self, source: str | os.PathLike, *, layer: str | None = None, dtype="int32"):
        super().__init__(source, layer=layer, dtype=dtype)
        self._gene_map: np.ndarray | None = None  # feature index -> kept gene index or -1
        with open_hdf5(self.source) as file:
            self._group, self.version = self._find_group(file)
            group = file[self._group]
            self._validate(group)

    def _find_group(self, file: h5py.File) -> tuple[str, int]:
        if "matrix" in file and is_group(file["matrix"]):
            if self.layer is not None:
                raise InputError(f"{self.source}: a 10x v3 file has no layers (got {self.layer!r})")
            return "/matrix", 3
        genomes = [key for key in file if is_group(file[key]) and "barcodes" in file[key]]
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
            features = child(group, "features", self.source)
            return child(features, "name", self.source), child(features, "id", self.source)
        return child(group, "gene_names", self.source), child(group, "genes", self.source)

    def _validate(self, group: h5py.Group) -> None:
        source = self.source
        shape_node = child(group, "shape", source)
        shape = load(shape_node, source)
        if shape.shape != (2,):
            raise InputError(f"{source}: dataset {node_name(shape_node)} must hold 2 numbers")
        n_features, n_barcodes = (int(v) for v in shape)
        barcodes = child(group, "barcodes", source)
        names, ids = self._feature_nodes(group)
        for node, expected, what in (
            (barcodes, n_barcodes, "barcodes (shape says)"),
            (names, n_features, "features (shape says)"),
            (ids, n_features, "features (shape says)"),
        ):
            check_length(node, expected, what, source)
        data, indices = child(group, "data", source), child(group, "indices", source)
        if data.shape != indices.shape or len(data.shape) != 1:
            raise InputError(
                f"{source}: datasets {node_name(data)} and {node_name(indices)} differ in "
                f"shape ({data.shape} and {indices.shape})"
            )
        indptr_node = child(group, "indptr", source)
        check_length(indptr_node, n_barcodes + 1, "entries (barcodes + 1)", source)
        check_indptr(load(indptr_node, source), data.shape[0], node_name(indptr_node), source)
        self.n_cells, self._n_features = n_barcodes, n_features
        self.n_genes = n_features
        if self.version == 3 and "feature_type" in group["features"]:
            types = load_strings(group["features/feature_type"], source)
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
        with open_hdf5(self.source) as file:
            return load_strings(child(file[self._group], "barcodes", self.source), self.source)

    def cell_blocks(self, size: int) -> Iterator[np.ndarray]:
        with open_hdf5(self.source) as file:
            barcodes = child(file[self._group], "barcodes", self.source)
            for start in range(0, self.n_cells, size):
                yield load_strings(barcodes, self.source, part=slice(start, start + size))

    def _raw_genes(self) -> np.ndarray:
        with open_hdf5(self.source) as file:
            names, _ = self._feature_nodes(file[self._group])
            return self._kept(load_strings(names, self.source))

    def gene_ids(self) -> np.ndarray:
        with open_hdf5(self.source) as file:
            _, ids = self._feature_nodes(file[self._group])
            return self._kept(load_strings(ids, self.source))

    def _read_checked(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        with open_hdf5(self.source) as file:
            group = file[self._group]
            indptr, features, values = major_slice(
                group, start, stop, self._n_features, self.source
            )
            data_name = node_name(group["data"])
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
        return dense_rows(indptr, genes, values, self.n_genes), rounded

    def _read(self, start: int, stop: int, out: np.ndarray) -> int:
        with open_hdf5(self.source) as file:
            indptr, features, values = major_slice(
                file[self._group], start, stop, self._n_features, self.source
            )
        rounded = self._fill_sparse_rows(indptr, features, values, out, self._gene_map)
        if rounded is None:
            self._refused(start, stop)
        return rounded
