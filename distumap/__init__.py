"""distumap: UMAP embeddings of single-cell count matrices too large for one process, on Dask.

The namespaces follow scanpy's: :mod:`distumap.io` reads and writes, :mod:`distumap.pp`
transforms the matrix, :mod:`distumap.tl` derives results, :mod:`distumap.pl` draws. They are
imported on first use, so a scheduler's preload or a worker start does not pay for umap-learn.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from distumap import _config  # noqa: F401  (registers the distumap.* defaults)

if TYPE_CHECKING:
    from distumap import io, pl, pp, tl
    from distumap.cluster import connect

try:
    __version__ = version("distumap")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "connect", "io", "pl", "pp", "tl"]

_NAMESPACES = {"io", "pl", "pp", "tl", "testing", "dashboard", "cluster"}


def __getattr__(name: str):
    if name in _NAMESPACES:
        return importlib.import_module(f"distumap.{name}")
    if name == "connect":
        from distumap.cluster import connect

        return connect
    raise AttributeError(f"module 'distumap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | _NAMESPACES)
