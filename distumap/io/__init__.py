"""Reading and writing: every input format into the zarr store, and the loom and AnnData
exports.

Each name is imported on first use: a worker that unpickles a reader's block task imports
``distumap.io`` (the parent package of the task's module) and must not load the writers, and
with them pandas, ``pp`` and ``tl``, that the task never runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distumap._store import open_store
    from distumap.io._ingest import read, read_csv
    from distumap.io._ingest_store import read_metadata
    from distumap.io.writers import (
        export_kind,
        write,
        write_anndata_zarr,
        write_h5ad,
        write_loom,
    )

#: public name -> the module that defines it
_SOURCES = {
    "open_store": "distumap._store",
    "read": "distumap.io._ingest",
    "read_csv": "distumap.io._ingest",
    "read_metadata": "distumap.io._ingest_store",
    "export_kind": "distumap.io.writers",
    "write": "distumap.io.writers",
    "write_anndata_zarr": "distumap.io.writers",
    "write_h5ad": "distumap.io.writers",
    "write_loom": "distumap.io.writers",
}

__all__ = [
    "export_kind",
    "open_store",
    "read",
    "read_csv",
    "read_metadata",
    "write",
    "write_anndata_zarr",
    "write_h5ad",
    "write_loom",
]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'distumap.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
