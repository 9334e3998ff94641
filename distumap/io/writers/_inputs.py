"""What an export reads from the store besides the count blocks: the variables it needs, the
genes it writes, the small per-cell and per-gene arrays, and the embedded store that a writer
started before the embed takes them from."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import dask
import numpy as np
import xarray as xr

from distumap._errors import IncompleteStoreError
from distumap._format import REP, REP_KEY

#: what an export needs of the store once the embed has finished
EMBEDDED_VARIABLES = ("counts", "zero_fraction", "X_umap", "landmark")


def require_variables(ds: xr.Dataset, names: tuple[str, ...]) -> None:
    """Refuse a dataset without ``names`` (a store before the stages that write them)."""
    missing = [name for name in names if name not in ds]
    if "counts" in missing and REP in ds:
        key = ds[REP].attrs.get(REP_KEY)
        raise IncompleteStoreError(
            f"the store holds the representation {key} and no counts (ingested with --use-rep "
            "alone), and every export writes the selected genes' counts: ingest with "
            f"--use-rep {key} --with-counts (as distumap run does)"
        )
    if missing:
        raise IncompleteStoreError(
            f"the dataset lacks {', '.join(missing)}: run the preprocess and embed stages first"
        )


def selected_genes(ds: xr.Dataset) -> np.ndarray:
    """The indices of the genes an export writes: the selected ones, or every gene."""
    if "selected" not in ds:
        return np.arange(ds.sizes["gene"])
    gene_index = np.flatnonzero(np.asarray(ds["selected"].values, dtype=bool))
    if gene_index.size == 0:
        raise ValueError("no gene is selected: there is nothing to write")
    return gene_index


def matrix_dtype(dtype: np.dtype) -> np.dtype:
    """The exported matrix holds the store's values: int32 counts (whether the store keeps them
    as uint16 or int32), or float32 (``--dtype float32``)."""
    return np.dtype(np.float32 if np.dtype(dtype).kind == "f" else np.int32)


def cell_metadata(ds: xr.Dataset) -> list[str]:
    """The names of the metadata columns: the ``cell`` coordinates other than ``cell``."""
    return [name for name, coord in ds.coords.items() if coord.dims == ("cell",) and name != "cell"]


#: the prefix of the representation's entry among an export's per-cell columns: ``rep:<key>``
REP_PREFIX = "rep:"


def representation_arrays(ds: xr.Dataset) -> dict[str, Any]:
    """The store's representation (``--use-rep``) as a per-cell column of an export:
    ``{"rep:<obsm key>": lazy (cell, rep_dim) float32}``; empty for a store without one."""
    if REP not in ds:
        return {}
    return {f"{REP_PREFIX}{ds[REP].attrs[REP_KEY]}": ds[REP].transpose("cell", ...).data}


def representation_keys(columns: dict[str, Any]) -> dict[str, str]:
    """The representations among an export's per-cell ``columns``: ``{obsm key: column}``."""
    return {name[len(REP_PREFIX) :]: name for name in columns if name.startswith(REP_PREFIX)}


def small_arrays(ds: xr.Dataset, **extra: Any) -> dict[str, np.ndarray]:
    """The per-gene arrays of an export, computed together (a few values per gene): genes,
    ``zero_fraction`` and the arrays in ``extra``. The per-cell ones come in blocks
    (:mod:`distumap.io.writers._cells`)."""
    small = {"gene": ds["gene"].data, "zero_fraction": ds["zero_fraction"].data, **extra}
    (small,) = dask.compute(small)
    return {key: np.asarray(value) for key, value in small.items()}


def embedded_store(ds: xr.Dataset, embedded: Future | None, gene_index: np.ndarray) -> xr.Dataset:
    """The store an export takes its embedding from: ``ds``, or ``embedded``'s result once the
    embed has finished; that must be the same cells and genes the export wrote from ``ds``."""
    if embedded is None:
        return ds
    final = embedded.result()
    require_variables(final, EMBEDDED_VARIABLES)
    if final.sizes["cell"] != ds.sizes["cell"] or (
        "selected" in final
        and not np.array_equal(np.flatnonzero(final["selected"].values), gene_index)
    ):
        raise ValueError("the embedded store has other cells or genes than the one exported")
    return final
