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

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    Row attributes ``Gene`` and ``Accession``; column attributes ``CellID``, ``class_label``,
    ``subclass_label``, ``subclass_color`` and ``size_factor``.

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
    loompy.create(
        str(path),
        layers,
        row_attrs={"Gene": spec.gene_names(), "Accession": synthetic_gene_ids(spec.n_genes)},
        col_attrs={
            "CellID": metadata["sample_name"].astype(str).to_numpy(),
            "class_label": metadata["class_label"].astype(str).to_numpy(),
            "subclass_label": metadata["subclass_label"].astype(str).to_numpy(),
            "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
            "size_factor": metadata["size_factor"].to_numpy(np.float32),
        },
    )
    return path
