"""The per-cell parts of an export (names, metadata, ``landmark``, the embedding, the PCA
coordinates, the representation), computed on the cluster in cell blocks and handed to the
writer in order, so that the writing process holds a few blocks of them, never a whole column:
what lets a client export ten million cells."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from distumap._compute import as_blocks, results_in_order, run

#: the key of the cell names among the columns
NAMES = "cell"
#: the prefix of a metadata column's key: ``meta:<name>``
META = "meta:"
#: cells per block of the per-cell columns: a few MB per block of what an export writes, and
#: a zarr chunk of the store's names and metadata (distumap.io._ingest_store.CELL_COORD_CHUNK)
CELL_BLOCK = 2**16
#: blocks computed ahead of the writer: their values are all the client holds of a column
CELLS_IN_FLIGHT = 3


def cell_columns(ds: xr.Dataset, metadata: list[str], **extra: da.Array) -> dict[str, da.Array]:
    """The lazy per-cell arrays of an export, cells first: the names, ``landmark``, ``X_umap``,
    every metadata column as ``meta:<name>`` and the arrays in ``extra``."""
    columns = {
        NAMES: ds["cell"].data,
        "landmark": ds["landmark"].data,
        "X_umap": ds["X_umap"].transpose("cell", ...).data,
        **{f"{META}{name}": ds.coords[name].data for name in metadata},
        **extra,
    }
    return {key: as_blocks(values, CELL_BLOCK) for key, values in columns.items()}


def is_text(values: da.Array | np.ndarray) -> bool:
    """Whether a column holds text (strings, or Python objects), not numbers."""
    return np.dtype(values.dtype).kind not in "biuf"


def _missing(values: np.ndarray) -> np.ndarray:
    return pd.isna(pd.Series(values, dtype=object)).to_numpy()


def _block_categories(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    return np.unique(values[~_missing(values)].astype(str))


def categories(columns: dict[str, da.Array], names: list[str], *, client=None) -> dict:
    """The categories of the text columns ``names``, as :class:`pandas.Categorical` orders
    them (sorted, missing values left out), from one small task per block and column
    (``export-categories``): the client holds the categories alone."""
    tasks, owners = [], []
    for name in names:
        values = columns[name]
        key = f"export-categories-{tokenize(values)}"
        for i, block in enumerate(values.to_delayed().ravel()):
            tasks.append(dask.delayed(_block_categories, pure=True)(block, dask_key_name=(key, i)))
            owners.append(name)
    found: dict[str, list] = {name: [] for name in names}
    for name, part in zip(
        owners, run(tasks, stage="export: categories", client=client), strict=True
    ):
        found[name].append(np.asarray(part, dtype=object))
    return {
        name: np.unique(np.concatenate(parts)).astype(object) if parts else np.zeros(0, object)
        for name, parts in found.items()
    }


def codes_dtype(n_categories: int) -> np.dtype:
    """The integer type pandas keeps a categorical's codes in (int8 below 127 categories, ...)."""
    for dtype in (np.int8, np.int16, np.int32):
        if n_categories < np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def category_codes(values: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """``values``' codes among ``categories`` (-1 where missing), as pandas would give them."""
    values = np.asarray(values, dtype=object)
    missing = _missing(values)
    text = values.astype(str)
    codes = np.searchsorted(categories.astype(str), text).astype(codes_dtype(len(categories)))
    codes[missing] = -1
    return codes


def _cell_block(pieces: dict[str, np.ndarray], coded: dict[str, np.ndarray]) -> dict:
    block = {}
    for name, values in pieces.items():
        values = np.asarray(values)
        if name in coded:
            values = category_codes(values, coded[name])
        elif values.dtype.kind in "OT":  # zarr's StringDType: object strings for every writer
            values = np.asarray(values, dtype=object)
        block[name] = values
    return block


def cell_blocks(
    columns: dict[str, da.Array],
    block_cells: int | None = None,
    *,
    coded: dict[str, np.ndarray] | None = None,
    in_flight: int = CELLS_IN_FLIGHT,
    client=None,
    stage: str = "export: cell columns",
) -> Iterator[dict[str, np.ndarray]]:
    """Every column's values for one block of ``block_cells`` cells (default
    :data:`CELL_BLOCK`) at a time, in cell order: one task per block (``export-cells``), at
    most ``in_flight`` ahead of the writer. The text columns in ``coded`` come as their codes
    among those categories (:func:`category_codes`)."""
    coded = coded or {}
    block_cells = block_cells or CELL_BLOCK
    names = list(columns)
    delayed = {
        name: values.rechunk({0: block_cells, **dict.fromkeys(range(1, values.ndim), -1)})
        .to_delayed()
        .reshape(-1)
        for name, values in columns.items()
    }
    n_blocks = len(delayed[names[0]]) if names else 0
    shared = dask.delayed(coded, pure=True)
    task = dask.delayed(_cell_block, pure=True)
    key = "export-cells-" + tokenize(columns, block_cells, list(coded))
    blocks = [
        task({name: delayed[name][i] for name in names}, shared, dask_key_name=(key, i))
        for i in range(n_blocks)
    ]
    yield from results_in_order(blocks, stage=stage, in_flight=in_flight, client=client)


class ColumnWriter:
    """Fills one per-cell dataset (HDF5 or zarr) of known length from blocks in cell order,
    writing whole chunks at a time, so that no compressed chunk is written twice."""

    def __init__(self, node: Any, chunk_cells: int, convert=None):
        self.node = node
        self.chunk = max(1, int(chunk_cells))
        self.convert = convert
        self.start = 0
        self.pending: list[np.ndarray] = []
        self.held = 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.held += len(values)
        if self.held >= self.chunk:
            self._flush(whole_chunks=True)

    def close(self) -> None:
        self._flush(whole_chunks=False)
        if self.start != self.node.shape[0]:
            raise RuntimeError(f"{self.start} of {self.node.shape[0]} cells written")

    def _flush(self, whole_chunks: bool) -> None:
        if not self.pending:
            return
        values = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = (len(values) // self.chunk) * self.chunk if whole_chunks else len(values)
        if n:
            part = values[:n]
            self.node[self.start : self.start + n] = self.convert(part) if self.convert else part
            self.start += n
        rest = values[n:]
        self.pending = [rest] if len(rest) else []
        self.held = len(rest)
