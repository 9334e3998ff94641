"""Preprocessing: gene statistics, the gene filter and log2(x+1), as lazy Dask graphs."""

from __future__ import annotations

from distumap.pp._preprocess import (
    filter_genes,
    log2p1,
    log2p1_values,
    preprocess,
    selected_counts,
    zero_counts,
    zero_fraction,
)

__all__ = [
    "filter_genes",
    "log2p1",
    "log2p1_values",
    "preprocess",
    "selected_counts",
    "zero_counts",
    "zero_fraction",
]
