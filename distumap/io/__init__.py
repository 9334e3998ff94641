"""Reading and writing: every input format into the zarr store, and the loom and AnnData
exports."""

from __future__ import annotations

from distumap._store import open_store
from distumap.io._ingest import read_csv, read_metadata
from distumap.io._read import read
from distumap.io.writers import (
    export_kind,
    write,
    write_anndata_zarr,
    write_h5ad,
    write_loom,
)

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
