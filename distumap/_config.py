"""distumap's settings, kept in dask's config namespace.

Every default lives under ``distumap.*`` so that ``dask.config.set({"distumap.landmarks": 5000})``
works in code and tests, and ``DASK_DISTUMAP__LANDMARKS=5000`` works in a Kubernetes pod. CLI flags
override both.
"""

from __future__ import annotations

from typing import Any

import dask.config

DEFAULTS: dict[str, Any] = {
    # cells per store chunk and per parse task: 1,024 cells x 50,281 genes is 206 MB of int32
    "chunk-cells": 1024,
    # ingest: bytes read per line-index task
    "index-block-bytes": 256 * 2**20,
    # genes-by-cells ingest: values (bytes) of one pass-1 block of gene lines at most; the block
    # is parsed in memory, so this bounds a worker's memory whatever the file's size. 64 MiB was
    # as fast as 256 MiB at 20,000 cells x 5,000 genes, with 0.3 GB less at the peak per worker
    "gene-block-bytes": 64 * 2**20,
    # preprocess
    "max-zero-fraction": 0.5,
    # a command whose cluster has had no worker this long exits 1 instead of waiting forever
    "no-workers-timeout": "5 minutes",
    # refuse (exit 2) work whose estimated memory exceeds the workers' limit (distumap._memory)
    "memory-check": True,
    # embed
    "landmarks": 20000,
    "min-per-group": 50,
    "pca": 50,
    "n-neighbors": 30,
    "min-dist": 0.25,
    "seed": 999,
    # SGD epochs per transformed cell (None: 30, or 10 when the refinement follows). Without
    # refinement, measured at 12,000 cells (4,000 landmarks, 50 PCs), 30 epochs keep the
    # quality of 100 (label agreement 0.967 vs 0.969, trustworthiness 0.981 for both) at 2.7x
    # the speed, and umap-learn's own transform uses 30 for batches over 10,000 cells. With the
    # refinement's 30 epochs after it, 10 give the same embedding quality (1,000,000 cells,
    # 20,000 landmarks: agreement 0.9562 vs 0.9566) for 40 s less of 154 s
    "transform-epochs": None,
    # epochs of UMAP's SGD over the kNN graph of all cells after the transform (0: none); see
    # benchmarks/RESULTS.md, "Transform refinement"
    "refine-epochs": 30,
}

dask.config.update_defaults({"distumap": DEFAULTS})


def get(name: str, value: Any = None) -> Any:
    """Return ``value`` if it is given, else the configured ``distumap.<name>``."""
    if value is not None:
        return value
    return dask.config.get(f"distumap.{name}")
