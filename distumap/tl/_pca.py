"""PCA of every cell, distributed: the covariance of the features is a sum over cell blocks.

Each ``pca-all-gram`` task reduces its cell block to the column sums and the Gram matrix
``X.T @ X`` (float64, genes x genes: affordable for the few thousand selected genes); their
sum over blocks gives the exact covariance, whose eigendecomposition on one process is the
PCA. The result depends on the chunks only through float64 rounding, and on no seed.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array import chunk
from dask.array.reductions import reduction
from dask.base import tokenize

#: where the PCA is fitted: on the landmarks (umap-learn's fit set) or on every cell
PCA_FITS = ("landmarks", "all")

#: the name of the tasks that reduce cell blocks to their Gram matrices (and of their sums)
GRAM_TASKS = "pca-all-gram"


def _moments_block(block: np.ndarray) -> np.ndarray:
    """(1, 1 + genes, genes) float64: the column sums, then ``X.T @ X``."""
    values = np.asarray(block, dtype=np.float64)
    out = np.empty((1, 1 + values.shape[1], values.shape[1]), dtype=np.float64)
    out[0, 0] = values.sum(axis=0)
    out[0, 1:] = values.T @ values
    return out


def covariance_moments(features: da.Array) -> da.Array:
    """(1 + genes, genes) float64: the column sums and the Gram matrix of ``features``, summed
    over cell blocks (tasks ``pca-all-gram``). Builds a graph; computes nothing."""
    if features.numblocks[1] != 1:
        features = features.rechunk({1: -1})
    n_genes = features.shape[1]
    per_block = da.map_blocks(
        _moments_block,
        features,
        new_axis=1,
        chunks=((1,) * features.numblocks[0], (1 + n_genes,), (n_genes,)),
        dtype=np.float64,
        name=f"pca-moments-{tokenize(features)}",
    )
    # ``per_block.sum(axis=0)``, named: the graph fuses each block's moments into the sum's
    # first tasks, which then carry this name (``pca-all-gram-<token>``, then ``-partial`` and
    # ``-aggregate``) and so show the PCA of all cells as such on the dashboard
    return reduction(per_block, chunk.sum, chunk.sum, axis=0, dtype=np.float64, name=GRAM_TASKS)


def pca_from_moments(
    moments: np.ndarray, n_cells: int, n_components: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The PCA of all cells from :func:`covariance_moments`.

    Parameters
    ----------
    moments
        The summed column sums and Gram matrix, ``(1 + genes, genes)`` float64.
    n_cells
        The cells summed.
    n_components
        Components to keep.

    Returns
    -------
    mean, components, variances
        float64 ``(genes,)``, ``(n_components, genes)`` and ``(n_components,)``: the components
        are the covariance's leading eigenvectors, largest variance first, each signed as
        scikit-learn signs its (the entry of largest magnitude positive). Computes here.
    """
    if n_cells < 2:
        raise ValueError("a PCA of all cells needs at least two cells")
    mean = moments[0] / n_cells
    covariance = (moments[1:] - n_cells * np.outer(mean, mean)) / (n_cells - 1)
    covariance = (covariance + covariance.T) / 2  # exactly symmetric for eigh
    variances, vectors = np.linalg.eigh(covariance)
    order = np.argsort(variances)[::-1][:n_components]
    components = vectors[:, order].T
    largest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(len(components)), largest])[:, None]
    return mean, components, variances[order]


def total_variance(moments: np.ndarray, n_cells: int) -> float:
    """The summed variance of every gene (the covariance's trace) from
    :func:`covariance_moments`: what a PCA's variance ratios are shares of."""
    mean = moments[0] / n_cells
    return float((np.diag(moments[1:]) - n_cells * mean**2).sum() / (n_cells - 1))
