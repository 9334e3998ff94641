"""distumap's settings, kept in dask's config namespace.

Every default lives under ``distumap.*`` so that ``dask.config.set({"distumap.landmarks": 5000})``
works in code and tests, and ``DASK_DISTUMAP__LANDMARKS=5000`` works in a Kubernetes pod. CLI flags
override both.
"""

from __future__ import annotations

from typing import Any

import dask.config

DEFAULTS: dict[str, Any] = {
    # cells per store chunk and per parse task; a chunk of a wide matrix is a few hundred MB
    # of int32, which bounds a block task's memory
    "chunk-cells": 1024,
    # ingest: bytes read per line-index task
    "index-block-bytes": 256 * 2**20,
    # genes-by-cells ingest: values (bytes) of one pass-1 block of gene lines at most; the block
    # is parsed in memory, so this bounds a worker's memory whatever the file's size. A quarter
    # of the index block parsed as fast as the whole, with less at a worker's peak
    # (benchmarks/RESULTS.md)
    "gene-block-bytes": 64 * 2**20,
    # preprocess: the recipe ("log2p1": genes with fewer zeros than max-zero-fraction of cells,
    # log2(x+1) of their counts; "scanpy": scanpy's normalize_total to target-sum, log1p and the
    # n-top-genes highly variable genes, flavor "seurat")
    "recipe": "log2p1",
    "max-zero-fraction": 0.5,
    "n-top-genes": 2000,
    "target-sum": 1e4,
    # an embedded cluster for inputs smaller than this (bytes on disk, all inputs together)
    # runs its workers as threads of the command's own process: starting and importing worker
    # processes is most of a small input's time, and the results are the same (0: processes)
    "in-process-below": 64 * 2**20,
    # a command whose cluster has had no worker this long exits 1 instead of waiting forever
    "no-workers-timeout": "5 minutes",
    # how long the workers have to say which of a command's paths they see (a hung mount)
    "paths-check-timeout": "30 s",
    # refuse (exit 2) work whose estimated memory exceeds the workers' limit (distumap._memory)
    "memory-check": True,
    # embed
    "landmarks": 20000,
    "min-per-group": 50,
    "pca": 50,
    # where the PCA is fitted: "landmarks" (the cells UMAP is fitted on) or "all" cells
    "pca-fit": "landmarks",
    "n-neighbors": 30,
    "min-dist": 0.25,
    "seed": 999,
    # SGD epochs per transformed cell (None: 30, or 10 when the refinement follows). Without
    # refinement, 30 epochs keep the quality of 100 at a fraction of the time, and umap-learn's
    # own transform uses 30 for large batches. With the refinement's epochs after it, 10 give
    # the same embedding quality in less time (benchmarks/RESULTS.md)
    "transform-epochs": None,
    # epochs of UMAP's SGD over the kNN graph of all cells after the transform (0: none); see
    # benchmarks/RESULTS.md, "Transform refinement"
    "refine-epochs": 30,
    # the refinement's nearest-cell search holds about this many bytes of cells' features on a
    # worker at a time: more are searched in passes over ranges of buckets (the same result;
    # one pass up to 1.3 million cells of 50 components)
    "search-pass-bytes": 256 * 2**20,
}

dask.config.update_defaults({"distumap": DEFAULTS})


def get(name: str, value: Any = None) -> Any:
    """Return ``value`` if it is given, else the configured ``distumap.<name>``."""
    if value is not None:
        return value
    return dask.config.get(f"distumap.{name}")
