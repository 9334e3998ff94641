"""anndata's on-disk elements, written with h5py or zarr directly: the ``encoding-type`` and
``encoding-version`` of every element, dataframes, nested mappings, the CSR groups and the CSR
pieces of a block, and the small parts every AnnData export holds (``obs``, ``var``, ``obsm``,
``uns``), so that ``.h5ad`` and AnnData zarr share one layout above two backends."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from distumap._format import (
    ANNDATA_EMBEDDING,
    ANNDATA_GENE_IDS,
    ANNDATA_HVG_COLUMNS,
    ANNDATA_LANDMARK,
    ANNDATA_LOADINGS,
    ANNDATA_PCA,
    ANNDATA_REQUIRED,
    ANNDATA_UNS_PCA,
    ANNDATA_UNS_RECORD,
    ANNDATA_UNS_UMAP,
    ANNDATA_ZERO_FRACTION,
    ATTR,
    ENCODINGS,
    PCA_VARIABLES,
)
from distumap.io.writers._blocks import DEFLATE_LEVEL
from distumap.io.writers._cells import (
    META,
    NAMES,
    ColumnWriter,
    categories,
    cell_blocks,
    cell_columns,
    codes_dtype,
    is_text,
)
from distumap.io.writers._inputs import (
    cell_metadata,
    representation_arrays,
    representation_keys,
    require_variables,
    small_arrays,
)
from distumap.pp import log2p1_values

#: umap-learn's default spread; with ``min_dist`` it fixes the curve parameters a and b
UMAP_SPREAD = 1.0
#: zarr format of the AnnData zarr: v2 is what anndata 0.12 writes by default and what every
#: anndata since 0.7 (zarr-python 2 or 3) reads
ZARR_FORMAT = 2
#: zarr chunk of the per-cell arrays (indptr, obs columns, obsm), in cells
ZARR_CELL_CHUNK = 2**18
#: values per HDF5 chunk of a per-cell array (its rows: this over the row's width)
H5_CHUNK_VALUES = 2**18
#: cells per HDF5 chunk of a per-cell string array
H5_STRING_CHUNK = 2**16


def zarr_compressor():
    """The compressor of every zarr array of an AnnData zarr export."""
    import numcodecs

    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


def csr_pieces(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A block of counts (cells x selected genes) as CSR: X's data, the layer's data, indices
    and the nonzeros of every row."""
    # counts are exported as int32 (a store keeps them as uint16 or int32); a float32 store
    # (--dtype float32) keeps its values as they are
    counts = np.ascontiguousarray(counts)
    if counts.dtype.kind not in "f":
        counts = counts.astype(np.int32, copy=False)
    flat = np.flatnonzero(counts)
    data = counts.reshape(-1)[flat]
    indices = (flat % max(counts.shape[1], 1)).astype(np.int32)
    row_nnz = np.count_nonzero(counts, axis=1).astype(np.int64)
    return data, log2p1_values(data), indices, row_nnz


# -- the small parts: obs, var, obsm, uns -----------------------------------------------------


def _key(name: Any) -> str:
    # "/" separates path components in HDF5 and zarr; a column "area/region" is "area_region"
    return str(name).replace("/", "_")


def anndata_inputs(ds: xr.Dataset) -> dict[str, Any]:
    """The per-gene arrays of the file, computed together (they are small), its metadata
    columns (``{obs key: coordinate}``) and its lazy per-cell ``columns``
    (:func:`~distumap.io.writers._cells.cell_columns`)."""
    require_variables(ds, ANNDATA_REQUIRED)
    metadata = cell_metadata(ds)
    keys = [_key(name) for name in metadata]
    clashes = sorted(
        {key for key in keys if keys.count(key) > 1 or key in (ANNDATA_LANDMARK, "_index")}
    )
    if clashes:
        raise ValueError(f"metadata column(s) {clashes} clash with other obs columns")
    extra = {}
    if ANNDATA_GENE_IDS in ds.coords and ds.coords[ANNDATA_GENE_IDS].dims == ("gene",):
        extra["gene_ids"] = ds.coords[ANNDATA_GENE_IDS].data
    # the scanpy recipe's per-gene statistics, under scanpy's var names
    extra.update({name: ds[name].data for name in ANNDATA_HVG_COLUMNS if name in ds})
    # the embed's principal components, as scanpy.pp.pca keeps them (X_pca per cell, below)
    extra.update({name: ds[name].data for name in PCA_VARIABLES if name in ds and name != "X_pca"})
    small: dict[str, Any] = small_arrays(ds, **extra)
    small["metadata"] = dict(zip(keys, metadata, strict=True))
    # the representation the embed used (--use-rep), back under its own obsm key
    per_cell = representation_arrays(ds)
    if "X_pca" in ds:
        per_cell["X_pca"] = ds["X_pca"].transpose("cell", ...).data
    small["columns"] = cell_columns(ds, metadata, **per_cell)
    return small


def _text(values: np.ndarray) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values.tolist()], dtype=object)


def _ab_params(min_dist: float, spread: float = UMAP_SPREAD) -> tuple[float, float]:
    """umap-learn's ``find_ab_params``: the curve 1 / (1 + a d^2b) fitted to the target
    membership (1 below ``min_dist``, exponential decay above). Same inputs, same fit; here to
    spare the export umap-learn's import (numba compiles for seconds)."""
    from scipy.optimize import curve_fit

    def curve(x, a, b):
        return 1.0 / (1.0 + a * x ** (2 * b))

    xv = np.linspace(0, spread * 3, 300)
    yv = np.zeros(xv.shape)
    yv[xv < min_dist] = 1.0
    yv[xv >= min_dist] = np.exp(-(xv[xv >= min_dist] - min_dist) / spread)
    params, _ = curve_fit(curve, xv, yv)
    return float(params[0]), float(params[1])


def uns_record(ds: xr.Dataset, export_params: dict[str, Any]) -> dict[str, Any]:
    """``uns``: scanpy's UMAP record and the store's stage records with this export added."""
    record = json.loads(json.dumps(ds.attrs.get(ATTR, {}), default=str))
    if isinstance(record, str):
        record = json.loads(record)
    record.setdefault("stages", {})["export"] = {"status": "complete", "params": export_params}
    embed = record["stages"].get("embed", {}).get("params", {}) or {}
    # what scanpy.tl.umap keeps: the curve parameters and the seed
    umap_params: dict[str, Any] = {}
    if embed.get("min_dist") is not None:
        a, b = _ab_params(float(embed["min_dist"]))
        umap_params.update(a=a, b=b)
    if embed.get("seed") is not None:
        umap_params["random_state"] = int(embed["seed"])
    return {ANNDATA_UNS_UMAP: {"params": umap_params}, ANNDATA_UNS_RECORD: record}


# -- one writer per backend, one layout above them ----------------------------------------------


def _encode(node, kind: str) -> None:
    node.attrs["encoding-type"] = kind
    node.attrs["encoding-version"] = ENCODINGS[kind]


class _Elements:
    """What an HDF5 file and a zarr group share: the root and groups with their encoding."""

    def __init__(self, root):
        self.root = root

    def group(self, parent, name: str, kind: str = "dict"):
        node = parent.create_group(name)
        _encode(node, kind)
        return node


class H5Elements(_Elements):
    """anndata elements in an HDF5 file."""

    def array(self, parent, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        options = {}
        if values.size > 4096:
            options = dict(compression="gzip", compression_opts=DEFLATE_LEVEL, chunks=True)
        _encode(parent.create_dataset(name, data=values, **options), "array")

    def strings(self, parent, name: str, values: np.ndarray) -> None:
        import h5py

        node = parent.create_dataset(name, data=_text(values), dtype=h5py.string_dtype("utf-8"))
        _encode(node, "string-array")

    def cell_array(self, parent, name: str, shape: tuple[int, ...], dtype, convert=None):
        """An empty per-cell dataset of ``shape``, and the writer that fills it in order."""
        width = int(np.prod(shape[1:], dtype=np.int64))
        rows = max(1, min(shape[0], H5_CHUNK_VALUES // max(width, 1)))
        node = parent.create_dataset(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(rows, *shape[1:]),
            compression="gzip",
            compression_opts=DEFLATE_LEVEL,
        )
        _encode(node, "array")
        return ColumnWriter(node, rows, convert)

    def cell_strings(self, parent, name: str, n: int):
        """An empty per-cell string dataset, and the writer that fills it in order."""
        import h5py

        rows = max(1, min(n, H5_STRING_CHUNK))
        node = parent.create_dataset(
            name, shape=(n,), dtype=h5py.string_dtype("utf-8"), chunks=(rows,)
        )
        _encode(node, "string-array")
        return ColumnWriter(node, rows, _text)

    def scalar(self, parent, name: str, value) -> None:
        import h5py

        if isinstance(value, str):
            node = parent.create_dataset(name, data=value, dtype=h5py.string_dtype("utf-8"))
            _encode(node, "string")
        else:
            _encode(parent.create_dataset(name, data=np.array(value)), "numeric-scalar")

    def string_list_attr(self, node, name: str, values: list[str]) -> None:
        import h5py

        node.attrs.create(name, values, dtype=h5py.string_dtype("utf-8"))


class ZarrElements(_Elements):
    """anndata elements in a zarr (format 2) group."""

    def empty(self, parent, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]):
        return parent.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, compressors=zarr_compressor()
        )

    def array(self, parent, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        writer = self.cell_array(parent, name, values.shape, values.dtype)
        writer.append(values)
        writer.close()

    def strings(self, parent, name: str, values: np.ndarray) -> None:
        writer = self.cell_strings(parent, name, len(values))
        writer.append(values)
        writer.close()

    def cell_array(self, parent, name: str, shape: tuple[int, ...], dtype, convert=None):
        """An empty (per-cell) array of ``shape``, and the writer that fills it in order."""
        rows = max(1, min(shape[0], ZARR_CELL_CHUNK))
        node = self.empty(parent, name, shape, dtype, (rows, *shape[1:]))
        _encode(node, "array")
        return ColumnWriter(node, rows, convert)

    def cell_strings(self, parent, name: str, n: int):
        """An empty (per-cell) string array, and the writer that fills it in order."""
        import numcodecs
        from zarr.core.dtype import VariableLengthUTF8

        rows = max(1, min(n, ZARR_CELL_CHUNK))
        node = parent.create_array(
            name,
            shape=(n,),
            chunks=(rows,),
            dtype=VariableLengthUTF8(),
            filters=[numcodecs.VLenUTF8()],
            fill_value="",
            compressors=zarr_compressor(),
        )
        _encode(node, "string-array")
        return ColumnWriter(node, rows, _text)

    def scalar(self, parent, name: str, value) -> None:
        import numcodecs
        from zarr.core.dtype import VariableLengthUTF8

        if isinstance(value, str):
            node = parent.create_array(
                name,
                shape=(),
                dtype=VariableLengthUTF8(),
                filters=[numcodecs.VLenUTF8()],
                fill_value="",
                compressors=None,
            )
            node[...] = np.array(value, dtype=object)
            _encode(node, "string")
        else:
            value = np.array(value)
            node = parent.create_array(name, shape=(), dtype=value.dtype, compressors=None)
            node[...] = value
            _encode(node, "numeric-scalar")

    def string_list_attr(self, node, name: str, values: list[str]) -> None:
        node.attrs[name] = list(values)


def _dataframe(el, parent, name: str, index: np.ndarray, columns: dict[str, Any]) -> None:
    """A pandas DataFrame as anndata writes it: ``_index`` plus one element per column."""
    group = el.group(parent, name, "dataframe")
    group.attrs["_index"] = "_index"
    el.string_list_attr(group, "column-order", list(columns))
    el.strings(group, "_index", index)
    for key, values in columns.items():
        if np.asarray(values).dtype.kind in "OUST":
            el.strings(group, key, np.asarray(values))
        else:
            el.array(group, key, np.asarray(values))


def _mapping(el, parent, name: str, content: dict[str, Any]) -> None:
    """A nested dict as anndata's ``dict`` encoding; values other than numbers, bools and
    strings (lists, None) as JSON strings."""
    group = el.group(parent, name, "dict")
    for key, value in content.items():
        key = _key(key)
        if isinstance(value, dict):
            _mapping(el, group, key, value)
        elif isinstance(value, np.ndarray):
            el.array(group, key, value)
        elif isinstance(value, str | bool | int | float | np.number | np.bool_):
            el.scalar(group, key, value)
        else:
            el.scalar(group, key, json.dumps(value, sort_keys=True, default=str))


def _var_columns(small: dict[str, Any], gene_index: np.ndarray) -> dict[str, Any]:
    columns: dict[str, Any] = {
        ANNDATA_ZERO_FRACTION: small["zero_fraction"][gene_index].astype(np.float32)
    }
    if "gene_ids" in small:
        columns[ANNDATA_GENE_IDS] = _text(small["gene_ids"][gene_index])
    if all(name in small for name in ANNDATA_HVG_COLUMNS):
        # the exported genes are the selected ones: with the scanpy recipe, the highly variable
        columns["highly_variable"] = np.ones(len(gene_index), dtype=bool)
        columns.update({name: small[name][gene_index] for name in ANNDATA_HVG_COLUMNS})
    return columns


def _obs(el, root, small: dict[str, Any], n_cells: int, client) -> tuple[dict, dict]:
    """``obs``, its datasets empty: the cell names, every metadata column (text as a
    categorical) and ``landmark``; the writers that fill them, by per-cell column, and the
    text columns' categories."""
    columns = small["columns"]
    text = [
        f"{META}{name}" for name in small["metadata"].values() if is_text(columns[f"{META}{name}"])
    ]
    coded = categories(columns, text, client=client)
    group = el.group(root, "obs", "dataframe")
    group.attrs["_index"] = "_index"
    el.string_list_attr(group, "column-order", [*small["metadata"], ANNDATA_LANDMARK])
    writers = {NAMES: el.cell_strings(group, "_index", n_cells)}
    for key, name in small["metadata"].items():
        column = f"{META}{name}"
        if column in coded:
            node = el.group(group, key, "categorical")
            node.attrs["ordered"] = False
            writers[column] = el.cell_array(
                node, "codes", (n_cells,), codes_dtype(len(coded[column]))
            )
            el.strings(node, "categories", coded[column])
        else:
            writers[column] = el.cell_array(group, key, (n_cells,), columns[column].dtype)
    writers["landmark"] = el.cell_array(
        group, ANNDATA_LANDMARK, (n_cells,), bool, lambda values: values.astype(bool)
    )
    return writers, coded


def write_annotations(
    el, small: dict[str, Any], gene_index: np.ndarray, uns: dict, *, client=None
) -> None:
    """Everything but X and the layer: obs, var, obsm, uns and the empty groups. The per-cell
    parts are written in cell blocks computed on the cluster (``export-cells``), so that this
    process holds a few blocks of them, never a whole column."""
    root = el.root
    _encode(root, "anndata")
    columns = small["columns"]
    n_cells = int(columns[NAMES].shape[0])
    writers, coded = _obs(el, root, small, n_cells, client)
    _dataframe(el, root, "var", small["gene"][gene_index], _var_columns(small, gene_index))
    obsm = el.group(root, "obsm")

    def per_cell(parent, name: str, column: str) -> None:
        shape = tuple(int(n) for n in columns[column].shape)
        writers[column] = el.cell_array(
            parent, name, shape, np.float32, lambda values: values.astype(np.float32)
        )

    per_cell(obsm, ANNDATA_EMBEDDING, "X_umap")
    for key, column in representation_keys(columns).items():
        per_cell(obsm, _key(key), column)
    varm = el.group(root, "varm")
    if "X_pca" in columns:
        per_cell(obsm, ANNDATA_PCA, "X_pca")
        el.array(varm, ANNDATA_LOADINGS, small["PCs"][gene_index])
        uns = {**uns, ANNDATA_UNS_PCA: _pca_record(small)}
    for name in ("obsp", "varp"):
        el.group(root, name)
    _mapping(el, root, "uns", uns)
    blocks = cell_blocks({name: columns[name] for name in writers}, coded=coded, client=client)
    for block in blocks:
        for name, writer in writers.items():
            writer.append(block[name])
    for writer in writers.values():
        writer.close()


def _pca_record(small: dict[str, Any]) -> dict[str, Any]:
    """``uns["pca"]`` as scanpy.pp.pca writes it: its parameters, and the variance along each
    component and its share of the total where the store has them (the fitted cells')."""
    record: dict[str, Any] = {"params": {"zero_center": True, "use_highly_variable": False}}
    for key, name in (("variance", "pca_variance"), ("variance_ratio", "pca_variance_ratio")):
        if name in small:
            record[key] = small[name]
    return record


def csr_group(el, parent, name: str, shape: tuple[int, int]):
    """An empty ``csr_matrix`` group of ``shape``, for the caller to fill."""
    group = el.group(parent, name, "csr_matrix")
    group.attrs["shape"] = [int(n) for n in shape]
    return group


def export_params(fmt: str, block_cells: int, **extra: Any) -> dict[str, Any]:
    """The export's record in ``uns["distumap"]``: the format, cells per block and ``extra``."""
    return {"format": fmt, "block_cells": int(block_cells), **extra}
