"""loom files of the synthetic counts, written with ``loompy.create``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distumap.testing._synthetic import (
    SyntheticData,
    SyntheticSpec,
    counts_csr,
    synthetic_gene_ids,
    unpack,
)


def write_loom(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    layer: str | None = None,
    cell_attr: str | None = "CellID",
    gene_attr: str | None = "Gene",
    accession: bool = True,
) -> Path:
    """Write the counts as a loom file with ``loompy.create``: ``/matrix`` is genes x cells.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or in-memory data (held in memory as sparse, ~12 bytes per count).
    layer
        None: the counts are ``/matrix``. A name: the counts go to ``/layers/<layer>`` and
        ``/matrix`` holds ``log1p`` of them (float32).
    cell_attr, gene_attr
        The column (row) attribute that holds the cell (gene) names: ``CellID`` and ``Gene`` by
        default, ``Cell`` as loompy's own test file, ``obs_names`` and ``var_names`` as anndata's
        ``write_loom``; None writes no names.
    accession
        Whether to write the gene ids as the row attribute ``Accession``.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    Row attributes ``Gene`` and ``Accession``; column attributes ``CellID``, ``class_label``,
    ``subclass_label``, ``subclass_color`` and ``size_factor`` (names as the options say).

    Examples
    --------
    >>> write_loom(tmp_path / "cells.loom", synthetic_counts(100, 30))  # doctest: +SKIP
    """
    import loompy

    spec, _ = unpack(data)
    path = Path(path)
    matrix = counts_csr(data).T.tocoo()  # genes x cells
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    if layer is None:
        layers = {"": matrix}
    else:
        normalised = matrix.astype(np.float32)
        normalised.data = np.log1p(normalised.data)
        layers = {"": normalised, layer: matrix}
    rows = {}
    if gene_attr is not None:
        rows[gene_attr] = np.asarray(spec.gene_names())
    if accession:
        rows["Accession"] = np.asarray(synthetic_gene_ids(spec.n_genes))
    columns = (
        {} if cell_attr is None else {cell_attr: metadata["sample_name"].astype(str).to_numpy()}
    )
    columns.update(
        {
            "class_label": metadata["class_label"].astype(str).to_numpy(),
            "subclass_label": metadata["subclass_label"].astype(str).to_numpy(),
            "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
            "size_factor": metadata["size_factor"].to_numpy(np.float32),
        }
    )
    loompy.create(str(path), layers, row_attrs=rows, col_attrs=columns)
    return path
