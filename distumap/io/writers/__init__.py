"""One writer per export format (loom, h5ad, AnnData zarr) behind one :class:`Writer` interface;
each registers itself where it is defined, and :func:`write` picks one by the output's name."""

from __future__ import annotations

from distumap.io.writers._base import Writer, registered_writers
from distumap.io.writers._dispatch import export_kind, export_suffixes, write, writer_named
from distumap.io.writers.anndata_zarr import write_anndata_zarr
from distumap.io.writers.h5ad import write_h5ad
from distumap.io.writers.loom import knn_graph, write_loom

__all__ = [
    "Writer",
    "export_kind",
    "export_suffixes",
    "knn_graph",
    "registered_writers",
    "write",
    "write_anndata_zarr",
    "write_h5ad",
    "write_loom",
    "writer_named",
]
