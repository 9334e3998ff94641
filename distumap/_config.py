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
    # preprocess
    "max-zero-fraction": 0.5,
    # embed
    "landmarks": 20000,
    "min-per-group": 50,
    "pca": 50,
    "n-neighbors": 30,
    "min-dist": 0.25,
    "seed": 999,
    "transform-epochs": 100,
}

dask.config.update_defaults({"distumap": DEFAULTS})


def get(name: str, value: Any = None) -> Any:
    """Return ``value`` if it is given, else the configured ``distumap.<name>``."""
    if value is not None:
        return value
    return dask.config.get(f"distumap.{name}")
