"""Pictures of the embedding: a static PNG (the tutorial's figure) and an interactive HTML page."""

from __future__ import annotations

from distumap.pl._interactive import umap_html
from distumap.pl._static import umap

__all__ = ["umap", "umap_html"]
