"""Preprocess: per-gene zero fractions, the gene filter and log2(x+1), as lazy Dask graphs.

Nothing here gathers the matrix on one process: the statistics are tree reductions over cell
blocks (tasks ``gene-stats``), and log2(x+1) is a per-block map (tasks ``log2p1``). Only
:func:`distumap.pp.preprocess`, the stage (:mod:`distumap.pp._preprocess_stage`), computes.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from distumap import _config
from distumap._errors import InputError
from distumap._format import NONZERO
from distumap._store import cell_coords, stage_record


def _zero_count_chunk(block: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    return np.equal(block, 0).sum(axis=axis, keepdims=keepdims, dtype=np.int64)


def _sum(block: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    return block.sum(axis=axis, keepdims=keepdims, dtype=np.int64)


def zero_counts(ds: xr.Dataset, *, var: str = "counts") -> xr.DataArray:
    """Number of cells with a zero count, per gene (int64).

    A tree reduction over cell blocks whose tasks are named ``gene-stats``. Builds a graph; computes
    nothing (for numpy-backed data it computes at once).
    """
    counts = ds[var]
    if not isinstance(counts.data, da.Array):
        return xr.DataArray(np.equal(counts.values, 0).sum(axis=0), dims=("gene",))
    reduced = _gene_stats(counts.data, _zero_count_chunk, tokenize(counts.data))
    return xr.DataArray(reduced, dims=("gene",))


def _gene_stats(array: da.Array, chunk, token: str) -> da.Array:
    """The int64 per-gene sum over cell blocks of ``chunk(block)``: tasks ``gene-stats``."""
    return da.reduction(
        array,
        chunk=chunk,
        combine=_sum,
        aggregate=_sum,
        axis=0,
        dtype=np.int64,
        name=f"gene-stats-{token}",
        concatenate=True,
    )


def ingested_zero_counts(location: str, ds: xr.Dataset) -> da.Array | None:
    """Zero counts per gene from the per-block non-zero counts the ingest wrote (``NONZERO``),
    as a ``gene-stats`` reduction over those small rows; None for a store without them."""
    import zarr

    try:
        nonzero = zarr.open_array(location, path=NONZERO, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError):
        return None
    if nonzero.shape != (len(ds["counts"].data.chunks[0]), ds.sizes["gene"]):
        return None
    rows = da.from_zarr(nonzero, chunks=(NONZERO_ROWS_PER_TASK, -1))
    token = tokenize(location, NONZERO, stage_record(location, "ingest"))
    return ds.sizes["cell"] - _gene_stats(rows, _sum, token)


#: store blocks' non-zero rows per gene-stats task (each row is 4 bytes x genes)
NONZERO_ROWS_PER_TASK = 64


def zero_fraction(ds: xr.Dataset, *, var: str = "counts") -> xr.DataArray:
    """Fraction of cells with a zero count, per gene, as float32.

    Parameters
    ----------
    ds
        A store as opened by :func:`distumap.io.open_store` (or any Dataset with ``var``).
    var
        The (cell, gene) count variable.

    Returns
    -------
    xarray.DataArray
        Lazy (dask) when ``ds[var]`` is. Builds a graph; computes nothing.

    Examples
    --------
    >>> zf = distumap.pp.zero_fraction(ds)  # doctest: +SKIP
    >>> zf.compute()  # doctest: +SKIP
    """
    n_cells = ds.sizes["cell"]
    return (zero_counts(ds, var=var) / max(n_cells, 1)).astype(np.float32).rename("zero_fraction")


def filter_genes(
    ds: xr.Dataset, *, max_zero_fraction: float | None = None, var: str = "counts"
) -> xr.Dataset:
    """Add ``zero_fraction`` and ``selected`` (genes with fewer zeros than the threshold).

    Parameters
    ----------
    ds
        The store as a Dataset.
    max_zero_fraction
        Keep genes whose fraction of zero counts is strictly below this (default
        ``distumap.max-zero-fraction``, 0.5: the tutorial's filter).
    var
        The (cell, gene) count variable.

    Returns
    -------
    xarray.Dataset
        ``ds`` with the two gene variables added, lazily: builds a graph, computes nothing.

    Examples
    --------
    >>> ds = distumap.pp.filter_genes(ds, max_zero_fraction=0.5)  # doctest: +SKIP
    """
    threshold = max_zero_fraction_of(max_zero_fraction)
    zeros = zero_counts(ds, var=var)
    n_cells = max(ds.sizes["cell"], 1)
    # select on the exact fraction, so the float32 rounding of the stored value never decides
    selected = (zeros / n_cells) < threshold
    return ds.assign(
        zero_fraction=(zeros / n_cells).astype(np.float32),
        selected=selected,
    )


#: the selected genes' counts (cell, selected_gene), written by the preprocess stage: every later
#: reader (the landmark gather, the transform, each export) reads these few hundred genes instead
#: of decompressing every gene of every block
CACHE = "selected_counts"


def _cached(ds: xr.Dataset, index: np.ndarray) -> bool:
    """Whether the store's cache holds exactly the genes ``index``."""
    if CACHE not in ds or "selected" not in ds or isinstance(ds["selected"].data, da.Array):
        return False
    cached = np.flatnonzero(ds["selected"].values)
    return ds[CACHE].shape[1] == len(cached) and np.array_equal(cached, index)


def selected_counts(ds: xr.Dataset, gene_index: np.ndarray | None = None) -> da.Array:
    """Counts of the selected genes as a (cell, gene) dask array, one block per store chunk.

    Parameters
    ----------
    ds
        The store as a Dataset.
    gene_index
        Integer gene indices (default: the ``selected`` genes).

    Returns
    -------
    dask.array.Array
        The preprocess stage's cache (``selected_counts``) when it holds these genes, else a
        selection from ``counts``. Builds a graph; computes nothing.
    """
    if gene_index is None:
        gene_index = np.flatnonzero(ds["selected"].values)
    gene_index = np.asarray(gene_index, dtype=np.int64)
    if _cached(ds, gene_index):
        return ds[CACHE].data
    counts = ds["counts"].transpose("cell", "gene").data
    if not isinstance(counts, da.Array):
        counts = da.from_array(np.asarray(counts), chunks=(max(1, counts.shape[0]), -1))
    return counts[:, gene_index]


def _log2p1_rule(values: np.ndarray) -> np.ndarray:
    return np.log2(values + 1.0).astype(np.float32)


#: log2(k + 1) of the counts k below its length, by the same rule: most counts are small
_LOG2P1_TABLE = _log2p1_rule(np.arange(4096))


def log2p1_values(counts: np.ndarray) -> np.ndarray:
    """log2(counts + 1) as float32, rounded once from float64: the one rule behind every log2p1
    distumap computes (the lazy map here and the exports' layers), so they agree bit for bit.

    Integer counts below 4,096 are looked up in a table of that rule's values (a third of
    the time of computing them); larger or negative ones, and floats, are computed."""
    counts = np.asarray(counts)
    if counts.dtype.kind not in "iu" or counts.size == 0:
        return _log2p1_rule(counts)
    values = _LOG2P1_TABLE.take(counts, mode="clip")
    if counts.min() < 0 or counts.max() >= len(_LOG2P1_TABLE):
        outside = (counts < 0) | (counts >= len(_LOG2P1_TABLE))
        values[outside] = _log2p1_rule(counts[outside])
    return values


def _log2p1_block(block: np.ndarray, genes: np.ndarray) -> np.ndarray:
    return log2p1_values(block[:, genes])


def gene_index_of(ds: xr.Dataset, genes: str | np.ndarray | None) -> np.ndarray:
    """Integer indices of ``genes``: the name of a boolean gene variable (computed), a boolean
    mask or integer indices, or None for all genes."""
    if genes is None:
        return np.arange(ds.sizes["gene"])
    if isinstance(genes, str):
        if genes not in ds:
            raise InputError(f"no gene variable {genes!r}: run the preprocess stage first")
        mask = ds[genes]
        if isinstance(mask.data, da.Array):
            raise InputError(
                f"{genes!r} is lazy; compute it first (distumap.pp.preprocess writes it)"
            )
        return np.flatnonzero(mask.values)
    genes = np.asarray(genes)
    return np.flatnonzero(genes) if genes.dtype == bool else genes.astype(np.int64)


def log2p1(
    ds: xr.Dataset, *, var: str = "counts", genes: str | np.ndarray | None = "selected"
) -> xr.DataArray:
    """log2(x + 1) of ``ds[var]`` as float32, restricted to the selected genes.

    Parameters
    ----------
    ds
        The store as a Dataset, with ``selected`` loaded (as :func:`distumap.io.open_store` does
        after the preprocess stage).
    var
        The (cell, gene) count variable.
    genes
        Name of a boolean gene variable, a boolean mask or integer indices, or None for all genes.

    Returns
    -------
    xarray.DataArray
        (cell, gene) float32, one ``log2p1`` task per cell block. Builds a graph; computes nothing.

    Examples
    --------
    >>> x = distumap.pp.log2p1(ds)  # doctest: +SKIP
    """
    index = gene_index_of(ds, genes)
    genes = ds["gene"].values[index]
    if var == "counts" and _cached(ds, index):
        # the preprocess stage's copy of these genes: a block is read without the other genes
        counts, index = ds[CACHE], np.arange(len(index))
    else:
        counts = ds[var]
    if not isinstance(counts.data, da.Array):
        values = _log2p1_block(np.asarray(counts.values), index)
        return along_cells(values, ds, genes, "log2p1")
    data = counts.data
    if data.numblocks[1] != 1:
        data = data.rechunk({1: -1})
    logged = data.map_blocks(
        _log2p1_block,
        index,
        chunks=(data.chunks[0], (len(index),)),
        dtype=np.float32,
        name=f"log2p1-{tokenize(data, index)}",
    )
    return along_cells(logged, ds, genes, "log2p1")


def along_cells(values, ds: xr.Dataset, genes: np.ndarray, name: str) -> xr.DataArray:
    """A (cell, gene) array of ``genes`` with ``ds``'s cell coordinates, lazy as they are."""
    array = xr.DataArray(values, dims=("cell", "gene"), coords=cell_coords(ds), name=name)
    return array.assign_coords(gene=genes)


def max_zero_fraction_of(max_zero_fraction: float | None) -> float:
    """The zero-fraction threshold: the value given, else ``distumap.max-zero-fraction``."""
    threshold = float(_config.get("max-zero-fraction", max_zero_fraction))
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"max_zero_fraction must be in (0, 1], not {threshold}")
    return threshold
