"""scanpy's standard recipe, distributed: normalise_total, log1p and highly variable genes.

``sc.pp.normalize_total(adata, target_sum=1e4)``, ``sc.pp.log1p(adata)`` and
``sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=N)`` as lazy Dask graphs:

- the per-cell totals over all genes are a per-block map (tasks ``cell-totals``);
- the per-gene moments of ``expm1(log1p(normalised counts))``, which scanpy's "seurat" flavour
  takes its means and dispersions from, are one map per cell block (tasks ``gene-moments``)
  summed over blocks; a block is read once for both;
- the dispersions, their normalisation within bins of mean and the top genes are a small
  per-gene step (task ``seurat-dispersions``).

Each value follows scanpy's arithmetic: counts become float32, the size factor is the float32
total over the target sum (a zero total divides by one), log1p and expm1 run in float32, and the
moments are float64 sums. The embed's features, :func:`normalize_log1p`, normalise any cell block
with the stored totals, so they need no second pass over all genes.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from dask.base import tokenize

from distumap import _config
from distumap._errors import InputError
from distumap._format import stages
from distumap.pp._preprocess import along_cells, gene_index_of, log2p1, selected_counts

#: the recipes the preprocess stage knows: distumap's own (genes with few zeros, log2(x+1) of the
#: counts) and scanpy's standard one
RECIPES = ("log2p1", "scanpy")
#: the store variable of the per-cell totals over all genes (the scanpy recipe's size factors)
TOTALS = "counts_per_cell"
#: scanpy's ``var`` columns that the scanpy recipe writes per gene
HVG_VARIABLES = ("means", "dispersions", "dispersions_norm")
#: scanpy's number of bins of mean expression for flavor="seurat"
N_BINS = 20


def _as_dask(array) -> da.Array:
    if isinstance(array, da.Array):
        return array if array.numblocks[1] == 1 else array.rechunk({1: -1})
    array = np.asarray(array)
    return da.from_array(array, chunks=(max(1, array.shape[0]), -1))


def _cell_totals_block(block: np.ndarray) -> np.ndarray:
    # exact: integers sum in int64, floats in float64
    return block.sum(axis=1, dtype=np.int64 if block.dtype.kind in "iu" else np.float64).astype(
        np.float64
    )


def total_counts(ds: xr.Dataset, *, var: str = "counts") -> xr.DataArray:
    """Per-cell total of ``ds[var]`` over all genes, as float64 (exact for integer counts).

    Parameters
    ----------
    ds
        The store as a Dataset.
    var
        The (cell, gene) count variable.

    Returns
    -------
    xarray.DataArray
        (cell,) float64, one ``cell-totals`` task per cell block. Builds a graph; computes nothing.

    Examples
    --------
    >>> totals = distumap.pp.total_counts(ds)  # doctest: +SKIP
    """
    data = _as_dask(ds[var].transpose("cell", "gene").data)
    totals = data.map_blocks(
        _cell_totals_block,
        drop_axis=1,
        dtype=np.float64,
        name=f"cell-totals-{tokenize(data)}",
    )
    return xr.DataArray(totals, dims=("cell",), name=TOTALS)


def normalize_log1p_values(counts: np.ndarray, totals: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p(counts / (totals / target_sum)) as float32, by scanpy's arithmetic.

    ``normalize_total`` casts integer counts to float32 and divides them by the float32 size
    factor (a zero one by one); ``log1p`` works in float32. Every value the scanpy recipe computes
    (the gene statistics, the embed's features) comes from this one rule."""
    values = np.asarray(counts).astype(np.float32)
    factor = np.asarray(totals).astype(np.float32) / np.float32(target_sum)
    factor = factor + (factor == 0)
    np.true_divide(values, factor[:, None], out=values)
    return np.log1p(values, out=values)


def _moments_block(block: np.ndarray, target_sum: float) -> np.ndarray:
    """Per gene: the sum and sum of squares of expm1(log1p(normalised counts)) and the zero
    count, float64, shaped (1, 3, genes) for the sum over blocks."""
    values = normalize_log1p_values(block, _cell_totals_block(block), target_sum)
    np.expm1(values, out=values)
    out = np.empty((1, 3, block.shape[1]), dtype=np.float64)
    out[0, 0] = values.sum(axis=0, dtype=np.float64)
    # scanpy squares in the data's dtype and averages in float64
    out[0, 1] = np.square(values, out=values).sum(axis=0, dtype=np.float64)
    out[0, 2] = np.equal(block, 0).sum(axis=0)
    return out


def gene_moments(ds: xr.Dataset, *, target_sum: float, var: str = "counts") -> da.Array:
    """(3, gene) float64: the sums over cells of x and x² for x = expm1(log1p(normalised
    counts)) (what scanpy's flavor="seurat" takes means and variances from) and the number of
    zero counts. Builds a graph (tasks ``gene-moments``); computes nothing."""
    data = _as_dask(ds[var].transpose("cell", "gene").data)
    n_genes = data.shape[1]
    per_block = da.map_blocks(
        _moments_block,
        data,
        target_sum,
        new_axis=1,
        chunks=((1,) * data.numblocks[0], (3,), (n_genes,)),
        dtype=np.float64,
        name=f"gene-moments-{tokenize(data, target_sum)}",
    )
    return per_block.sum(axis=0, dtype=np.float64)


def _bin_statistics(dispersions: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, the mean and standard deviation (ddof 1) of the dispersions in its bin, NaN
    skipped; where the deviation is undefined (one gene with a dispersion in the bin) the gene is
    given a normalised dispersion of 1, as scanpy does: deviation = mean, mean = 0."""
    grouped = pd.Series(dispersions).groupby(bins)
    avg = grouped.transform("mean").to_numpy(dtype=np.float64)
    dev = grouped.transform("std").to_numpy(dtype=np.float64)
    single = np.isnan(dev)
    dev[single], avg[single] = avg[single], 0.0
    return avg, dev


def seurat_dispersions(
    mean: np.ndarray, var: np.ndarray, *, n_top_genes: int, n_bins: int = N_BINS
) -> dict[str, np.ndarray]:
    """scanpy's flavor="seurat" from the genes' means and unbiased variances of expm1(log data).

    Parameters
    ----------
    mean, var
        float64 per gene.
    n_top_genes
        How many genes to select, by normalised dispersion (ties at the cut are all kept).
    n_bins
        Bins of equal width over the log means (``pandas.cut``).

    Returns
    -------
    dict
        ``means`` (log1p of the mean), ``dispersions`` (log of var / mean, NaN where that is 0),
        ``dispersions_norm`` (float64 here; z-score within the gene's bin) and
        ``highly_variable`` (bool), all per gene. Computes here, on numpy arrays.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersions = var / mean
        dispersions[dispersions == 0] = np.nan
        dispersions = np.log(dispersions)
    means = np.log1p(mean)
    bins = pd.cut(means, bins=n_bins).codes
    avg, dev = _bin_statistics(dispersions, bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = (dispersions - avg) / dev
    ranked = np.sort(normalised[~np.isnan(normalised)])[::-1]
    if ranked.size == 0:
        raise InputError("no gene has a normalised dispersion: are all genes constant?")
    cut = ranked[min(int(n_top_genes), ranked.size) - 1]
    highly_variable = np.nan_to_num(normalised, nan=-np.inf) >= cut
    return {
        "means": means,
        "dispersions": dispersions,
        "dispersions_norm": normalised,
        "highly_variable": highly_variable,
    }


def _seurat_from_moments(moments: np.ndarray, n_cells: int, n_top_genes: int) -> np.ndarray:
    """The seurat step on the summed moments: (4, gene) float64 rows means, dispersions,
    dispersions_norm and highly_variable (as 0/1)."""
    mean = moments[0] / n_cells
    var = moments[1] / n_cells - mean**2
    if n_cells > 1:
        var *= n_cells / (n_cells - 1)
    result = seurat_dispersions(mean, var, n_top_genes=n_top_genes)
    return np.stack([result[name] for name in (*HVG_VARIABLES, "highly_variable")])


def highly_variable_genes(
    ds: xr.Dataset,
    *,
    n_top_genes: int = 2000,
    target_sum: float = 1e4,
    var: str = "counts",
) -> xr.Dataset:
    """scanpy's normalize_total, log1p and highly_variable_genes(flavor="seurat"), lazily.

    Parameters
    ----------
    ds
        The store as a Dataset (raw counts in ``ds[var]``).
    n_top_genes
        Genes to select by normalised dispersion.
    target_sum
        Every cell's total after normalisation.
    var
        The (cell, gene) count variable.

    Returns
    -------
    xarray.Dataset
        Per gene: ``means``, ``dispersions`` (float64), ``dispersions_norm`` (float32, as scanpy
        stores it), ``highly_variable`` (bool), ``zero_fraction`` (float32); per cell:
        ``counts_per_cell`` (float64 totals over all genes). Builds a graph; computes nothing.

    Notes
    -----
    The selection uses the float64 normalised dispersions, as scanpy's does.

    Examples
    --------
    >>> hvg = distumap.pp.highly_variable_genes(ds, n_top_genes=2000)  # doctest: +SKIP
    >>> hvg["highly_variable"].values  # doctest: +SKIP
    """
    if int(n_top_genes) < 1 or not float(target_sum) > 0:
        raise InputError("n_top_genes must be >= 1 and target_sum > 0")
    n_cells, n_genes = ds.sizes["cell"], ds.sizes["gene"]
    moments = gene_moments(ds, target_sum=float(target_sum), var=var)
    # the summed moments are one block: the per-gene step is one task on them
    seurat = moments.map_blocks(
        _seurat_from_moments,
        n_cells,
        int(n_top_genes),
        chunks=((4,), (n_genes,)),
        dtype=np.float64,
        name=f"seurat-dispersions-{tokenize(moments, n_top_genes)}",
    )
    gene = ("gene",)
    return xr.Dataset(
        {
            "means": (gene, seurat[0]),
            "dispersions": (gene, seurat[1]),
            "dispersions_norm": (gene, seurat[2].astype(np.float32)),
            "highly_variable": (gene, seurat[3] == 1),
            "zero_fraction": (gene, (moments[2] / max(n_cells, 1)).astype(np.float32)),
            TOTALS: (("cell",), total_counts(ds, var=var).data),
        },
        # no cell coordinate: the names are in the store already, and writing them again
        # would read them all
        coords={"gene": ds["gene"]},
    )


def _normalize_log1p_block(counts: np.ndarray, totals: np.ndarray, target_sum: float) -> np.ndarray:
    return normalize_log1p_values(counts, totals[:, 0], target_sum)


def normalize_log1p(
    ds: xr.Dataset,
    *,
    target_sum: float | None = None,
    genes: str | np.ndarray | None = "selected",
) -> xr.DataArray:
    """log1p of the counts normalised to ``target_sum`` per cell, as float32, of some genes.

    Parameters
    ----------
    ds
        The store as a Dataset. The per-cell totals come from ``counts_per_cell`` (written by
        the preprocess stage with the scanpy recipe) where it is present, else from a lazy
        pass over all genes.
    target_sum
        Every cell's total after normalisation (default: the preprocess stage's, else
        ``distumap.target-sum``).
    genes
        Name of a boolean gene variable, a boolean mask or integer indices, or None for all.

    Returns
    -------
    xarray.DataArray
        (cell, gene) float32, one ``normalize-log1p`` task per cell block; equal to scanpy's
        ``normalize_total`` then ``log1p`` restricted to these genes. Builds a graph; computes
        nothing.

    Examples
    --------
    >>> x = distumap.pp.normalize_log1p(ds)  # doctest: +SKIP
    """
    recorded = stages(ds).get("preprocess", {}).get("params", {})
    target_sum = float(_config.get("target-sum", target_sum or recorded.get("target_sum")))
    index = gene_index_of(ds, genes)
    counts = selected_counts(ds, index)
    if TOTALS not in ds:
        totals = total_counts(ds).data.rechunk((counts.chunks[0],))
    elif isinstance(ds[TOTALS].data, da.Array):
        totals = ds[TOTALS].data.rechunk((counts.chunks[0],))
    else:  # as open_store loads it: each task carries its cells' totals
        totals = da.from_array(ds[TOTALS].values, chunks=(counts.chunks[0],))
    if counts.numblocks[1] != 1:
        counts = counts.rechunk({1: -1})
    values = da.map_blocks(
        _normalize_log1p_block,
        counts,
        totals[:, None],
        target_sum,
        dtype=np.float32,
        name=f"normalize-log1p-{tokenize(counts, totals, target_sum)}",
    )
    return along_cells(values, ds, ds["gene"].values[index], "normalize_log1p")


def recipe_of(ds: xr.Dataset) -> str:
    """The recipe the store was preprocessed with (a record without one: ``log2p1``)."""
    return stages(ds).get("preprocess", {}).get("params", {}).get("recipe", "log2p1")


def features(ds: xr.Dataset) -> xr.DataArray:
    """The embed's features: the selected genes' values by the store's recipe.

    Parameters
    ----------
    ds
        A preprocessed store.

    Returns
    -------
    xarray.DataArray
        (cell, selected gene) float32: :func:`log2p1` for the ``log2p1`` recipe,
        :func:`normalize_log1p` for ``scanpy``. Builds a graph; computes nothing.

    Examples
    --------
    >>> x = distumap.pp.features(ds)  # doctest: +SKIP
    """
    recipe = recipe_of(ds)
    if recipe == "scanpy":
        return normalize_log1p(ds)
    if recipe != "log2p1":
        raise InputError(f"unknown recipe {recipe!r} in the preprocess record")
    return log2p1(ds)
