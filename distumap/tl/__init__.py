"""Tools that derive results: landmark selection, the landmark UMAP embedding and the graph of
all cells that its refinement searched."""

from __future__ import annotations

from distumap.tl._embed import landmarks, prepare_workers, umap
from distumap.tl._graph import (
    CsrRows,
    cell_graph,
    connectivity_rows,
    distance_rows,
    neighbor_graph,
    union_rows,
)
from distumap.tl._union import in_edges

__all__ = [
    "CsrRows",
    "cell_graph",
    "connectivity_rows",
    "distance_rows",
    "in_edges",
    "landmarks",
    "neighbor_graph",
    "prepare_workers",
    "umap",
    "union_rows",
]
