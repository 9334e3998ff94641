"""AnnData files of the synthetic counts, written with the anndata package: ``.h5ad`` and zarr
groups (v2 or v3), X dense, CSR or CSC, optionally with the counts in a layer."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from distumap.testing._synthetic import (
    SyntheticData,
    SyntheticSpec,
    counts_csr,
    synthetic_gene_ids,
    unpack,
)


@contextlib.contextmanager
def _quiet_anndata():
    """Silence anndata's and zarr's notices about their own future defaults (zarr v3 as the
    default format, autosharding, consolidated metadata in v3): they concern those packages'
    next releases, not the files written here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Writing zarr v2 data will no longer")
        warnings.filterwarnings("ignore", message=r"zarr v3 autosharding will be the default")
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


def _anndata(data: SyntheticSpec | SyntheticData, x: str, layer: str | None, raw: bool = False):
    import anndata

    if x not in ("csr", "csc", "dense"):
        raise ValueError(f"x must be 'csr', 'csc' or 'dense', got {x!r}")
    spec, _ = unpack(data)
    matrix = counts_csr(data)
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    obs = pd.DataFrame(
        {
            "class_label": pd.Categorical(metadata["class_label"]),
            "subclass_label": pd.Categorical(metadata["subclass_label"]),
            "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
            "size_factor": metadata["size_factor"].to_numpy(np.float32),
        },
        index=pd.Index(metadata["sample_name"].astype(str).to_numpy()),
    )
    var = pd.DataFrame(
        {"gene_ids": synthetic_gene_ids(spec.n_genes)},
        index=pd.Index(spec.gene_names()),
    )

    def shaped(matrix):
        if x == "csc":
            return matrix.tocsc()
        if x == "dense":
            return matrix.toarray()
        return matrix

    normalised = matrix.astype(np.float32)
    normalised.data = np.log1p(normalised.data)
    if not raw:
        if layer is None:
            return anndata.AnnData(X=shaped(matrix), obs=obs, var=var)
        layers = {layer: shaped(matrix)}
        return anndata.AnnData(X=shaped(normalised), obs=obs, var=var, layers=layers)
    # the counts of every gene in .raw; X (and the layer) keep all genes but the last, as a
    # selection of genes after normalisation does
    kept = slice(0, max(spec.n_genes - 1, 1))
    adata = anndata.AnnData(X=shaped(matrix), obs=obs, var=var)
    adata.raw = adata
    adata = adata[:, kept].copy()
    adata.X = shaped(normalised[:, kept])
    if layer is not None:
        adata.layers[layer] = shaped(matrix[:, kept])
    return adata


def write_h5ad(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
    raw: bool = False,
) -> Path:
    """Write the counts as an AnnData ``.h5ad`` with the anndata package.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or in-memory data (held in memory as CSR, ~8 bytes per count).
    x
        How X is stored: ``"csr"``, ``"csc"`` or ``"dense"``.
    layer
        None: the counts are X. A name: the counts go to ``layers[layer]`` and X holds
        ``log1p`` of them (float32), the usual layout of processed files.
    raw
        Also set ``.raw`` to the counts of every gene (``raw/X``, ``raw/var``); X then holds
        ``log1p`` of the counts of every gene but the last (and so does ``layer``'s counts).

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    obs: index = cell names; ``class_label`` and ``subclass_label`` categorical,
    ``subclass_color`` strings, ``size_factor`` float32. var: index = gene names, ``gene_ids``.

    Examples
    --------
    >>> write_h5ad(tmp_path / "cells.h5ad", synthetic_counts(100, 30), x="csc")  # doctest: +SKIP
    """
    path = Path(path)
    with _quiet_anndata():
        _anndata(data, x, layer, raw).write_h5ad(path)
    return path


def write_anndata_zarr(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
    zarr_format: Literal[2, 3] = 2,
    raw: bool = False,
) -> Path:
    """Write the counts as an AnnData zarr group with the anndata package (see :func:`write_h5ad`).

    ``zarr_format`` picks zarr v2 (anndata 0.12's default) or v3.

    Examples
    --------
    >>> write_anndata_zarr(tmp_path / "cells.zarr", synthetic_counts(100, 30))  # doctest: +SKIP
    """
    import anndata

    folder = Path(folder)
    with anndata.settings.override(zarr_write_format=zarr_format), _quiet_anndata():
        _anndata(data, x, layer, raw).write_zarr(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# layouts anndata no longer writes, written with h5py and zarr as anndata wrote them


def _legacy_parts(data: SyntheticSpec | SyntheticData, raw: bool):
    """Cell names, obs columns (categoricals as codes and categories), gene names and ids, X
    and (with ``raw``) the raw counts, as CSR."""
    spec, _ = unpack(data)
    counts = counts_csr(data)
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    categoricals = {
        name: pd.Categorical(metadata[name].astype(str))
        for name in ("class_label", "subclass_label")
    }
    columns = {
        "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
        "size_factor": metadata["size_factor"].to_numpy(np.float32),
    }
    x = counts
    if raw:
        x = counts.astype(np.float32)
        x.data = np.log1p(x.data)
    cells = metadata["sample_name"].astype(str).to_numpy()
    genes = np.asarray(spec.gene_names(), dtype=str)
    return cells, categoricals, columns, genes, synthetic_gene_ids(spec.n_genes), x, counts


def _fixed(values: np.ndarray) -> np.ndarray:
    """Strings as fixed-length UTF-8 bytes (what anndata before 0.7 wrote in compound frames)."""
    encoded = [str(v).encode() for v in values]
    return np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}")


def _compound_frame(index: np.ndarray, columns: dict[str, np.ndarray]) -> np.ndarray:
    fields = {"index": _fixed(index), **columns}
    fields = {k: _fixed(v) if v.dtype.kind in "OUS" else v for k, v in fields.items()}
    table = np.empty(len(index), dtype=[(k, v.dtype) for k, v in fields.items()])
    for name, values in fields.items():
        table[name] = values
    return table


def _legacy_sparse(group, name: str, matrix, x: str, shape_attrs: dict) -> None:
    if x == "dense":
        group.create_dataset(name, data=matrix.toarray())
        return
    matrix = matrix.tocsc() if x == "csc" else matrix.tocsr()
    sub = group.create_group(name)
    for key in ("data", "indices", "indptr"):
        sub.create_dataset(key, data=getattr(matrix, key))
    for key, value in shape_attrs.items():
        sub.attrs[key] = value(x, matrix.shape)


def write_legacy_h5ad(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    raw: bool = False,
) -> Path:
    """Write the counts as an ``.h5ad`` in the layout of anndata before 0.7, with h5py.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or in-memory data.
    x
        How X is stored: ``"csr"``, ``"csc"`` (groups with ``h5sparse_format`` and
        ``h5sparse_shape``) or ``"dense"``.
    raw
        None of the counts in X: X holds their ``log1p`` (float32) and the counts are in
        ``raw.X`` (CSR), named by ``raw.var``.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    ``obs`` and ``var`` are compound datasets whose first field ``index`` holds the names;
    ``class_label`` and ``subclass_label`` are int8 codes whose categories are
    ``uns/<column>_categories``; ``var`` has the field ``gene_ids``.

    Examples
    --------
    >>> write_legacy_h5ad(tmp_path / "old.h5ad", synthetic_counts(100, 30))  # doctest: +SKIP
    """
    import h5py

    path = Path(path)
    cells, categoricals, columns, genes, ids, matrix, counts = _legacy_parts(data, raw)
    codes = {name: values.codes.astype(np.int8) for name, values in categoricals.items()}
    attrs = {"h5sparse_format": lambda x, shape: x, "h5sparse_shape": lambda x, shape: shape}
    with h5py.File(path, "w") as file:
        file.create_dataset("obs", data=_compound_frame(cells, {**codes, **columns}))
        file.create_dataset("var", data=_compound_frame(genes, {"gene_ids": ids}))
        for name, values in categoricals.items():
            file.create_dataset(f"uns/{name}_categories", data=_fixed(values.categories))
        _legacy_sparse(file, "X", matrix, x, attrs)
        if raw:
            _legacy_sparse(file, "raw.X", counts, "csr", attrs)
            file.create_dataset("raw.var", data=_compound_frame(genes, {"gene_ids": ids}))
    return path


def _zarr_strings(group, name: str, values):
    values = np.asarray(values, dtype=object)
    array = group.create_array(name, shape=values.shape, dtype=str)
    array[:] = values
    return array


def _zarr_frame(group, name: str, index, columns: dict, categoricals: dict) -> None:
    """A frame as anndata 0.7 wrote it to zarr: a group of columns, categoricals as codes whose
    attribute ``categories`` is the path of ``__categories/<column>``."""
    frame = group.create_group(name)
    order = [*categoricals, *columns]
    frame.attrs.update(
        {"encoding-type": "dataframe", "encoding-version": "0.1.0", "_index": "_index"}
    )
    frame.attrs["column-order"] = order
    _zarr_strings(frame, "_index", index)
    for column, values in categoricals.items():
        stored = _zarr_strings(frame, f"__categories/{column}", values.categories)
        stored.attrs["ordered"] = False
        codes = frame.create_array(column, data=values.codes.astype(np.int8))
        codes.attrs["categories"] = f"__categories/{column}"
    for column, values in columns.items():
        if values.dtype.kind in "OUS":
            _zarr_strings(frame, column, values)
        else:
            frame.create_array(column, data=values)


def _zarr_matrix(group, name: str, matrix, x: str) -> None:
    if x == "dense":
        group.create_array(name, data=matrix.toarray())
        return
    matrix = matrix.tocsc() if x == "csc" else matrix.tocsr()
    sub = group.create_group(name)
    sub.attrs.update({"encoding-type": f"{x}_matrix", "encoding-version": "0.1.0"})
    sub.attrs["shape"] = list(matrix.shape)
    for key in ("data", "indices", "indptr"):
        sub.create_array(key, data=getattr(matrix, key))


def _zarr_compound(root, cells, categoricals, columns, genes, ids, matrix, x) -> None:
    codes = {name: values.codes.astype(np.int8) for name, values in categoricals.items()}
    root.create_array("obs", data=_compound_frame(cells, {**codes, **columns}))
    root.create_array("var", data=_compound_frame(genes, {"gene_ids": ids}))
    for name, values in categoricals.items():
        root.create_array(f"uns/{name}_categories", data=_fixed(values.categories))
    _zarr_matrix(root, "X", matrix, x)


def write_legacy_anndata_zarr(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    raw: bool = False,
    compound: bool = False,
) -> Path:
    """Write the counts as an AnnData zarr group (v2) in the layout of anndata 0.7, with zarr.

    The root group has no ``encoding-type``; it holds ``X``, ``obs`` and ``var`` (and with
    ``raw``, X holds ``log1p`` of the counts and the group ``raw`` holds them, ``raw/X`` and
    ``raw/var``). Categoricals are codes whose ``categories`` attribute is the path of
    ``__categories/<column>`` in their frame. With ``compound``, the frames are written as
    before 0.7 instead: structured arrays, categories in ``uns/<column>_categories``, raw as
    ``raw.X`` and ``raw.var``. See :func:`write_legacy_h5ad` for the rest.

    Examples
    --------
    >>> data = synthetic_counts(100, 30)
    >>> write_legacy_anndata_zarr(tmp_path / "old.zarr", data)  # doctest: +SKIP
    """
    import zarr

    folder = Path(folder)
    cells, categoricals, columns, genes, ids, matrix, counts = _legacy_parts(data, raw)
    with _quiet_anndata():
        root = zarr.open_group(folder, mode="w", zarr_format=2)
        if compound:
            _zarr_compound(root, cells, categoricals, columns, genes, ids, matrix, x)
            if raw:
                _zarr_matrix(root, "raw.X", counts, "csr")
                root.create_array("raw.var", data=_compound_frame(genes, {"gene_ids": ids}))
            return folder
        _zarr_frame(root, "obs", cells, columns, categoricals)
        _zarr_frame(root, "var", genes, {"gene_ids": np.asarray(ids, dtype=object)}, {})
        _zarr_matrix(root, "X", matrix, x)
        if raw:
            group = root.create_group("raw")
            _zarr_matrix(group, "X", counts, "csr")
            _zarr_frame(group, "var", genes, {"gene_ids": np.asarray(ids, dtype=object)}, {})
    return folder
