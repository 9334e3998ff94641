"""Tools that derive results: landmark selection and the landmark UMAP embedding."""

from __future__ import annotations

from distumap.tl._embed import landmarks, prepare_workers, umap

__all__ = ["landmarks", "prepare_workers", "umap"]
