"""Reading and writing: every input format into the zarr store, and the loom and AnnData
exports."""

from __future__ import annotations

from distumap._store import open_store
from distumap.io._anndata import write_anndata_zarr, write_h5ad
from distumap.io._export import write_loom
from distumap.io._ingest import read, read_csv
from distumap.io._ingest_store import read_metadata
from distumap.io._write import export_kind, write

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
