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


def _anndata(data: SyntheticSpec | SyntheticData, x: str, layer: str | None):
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

    if layer is None:
        return anndata.AnnData(X=shaped(matrix), obs=obs, var=var)
    normalised = matrix.astype(np.float32)
    normalised.data = np.log1p(normalised.data)
    return anndata.AnnData(X=shaped(normalised), obs=obs, var=var, layers={layer: shaped(matrix)})


def write_h5ad(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
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
        _anndata(data, x, layer).write_h5ad(path)
    return path


def write_anndata_zarr(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
    zarr_format: Literal[2, 3] = 2,
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
        _anndata(data, x, layer).write_zarr(folder)
    return folder
