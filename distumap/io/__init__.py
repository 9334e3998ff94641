"""Reading and writing: the CSV ingest, the zarr store and the loom export."""

from __future__ import annotations

from distumap._store import open_store
from distumap.io._export import write_loom
from distumap.io._ingest import read_csv, read_metadata

__all__ = ["open_store", "read_csv", "read_metadata", "write_loom"]
