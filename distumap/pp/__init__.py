"""Preprocessing: gene statistics, the gene filters (zero fraction, or scanpy's highly variable
genes) and the embed's features (log2(x+1), or log1p of normalised counts), as lazy Dask graphs."""

from __future__ import annotations

from distumap.pp._preprocess import (
    filter_genes,
    log2p1,
    log2p1_values,
    selected_counts,
    zero_counts,
    zero_fraction,
)
from distumap.pp._preprocess_stage import preprocess
from distumap.pp._recipes import (
    features,
    highly_variable_genes,
    normalize_log1p,
    normalize_log1p_values,
    recipe_of,
    total_counts,
)

__all__ = [
    "features",
    "filter_genes",
    "highly_variable_genes",
    "log2p1",
    "log2p1_values",
    "normalize_log1p",
    "normalize_log1p_values",
    "preprocess",
    "recipe_of",
    "selected_counts",
    "total_counts",
    "zero_counts",
    "zero_fraction",
]
