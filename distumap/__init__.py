"""distumap: UMAP embeddings of single-cell count matrices too large for one process, on Dask.

The namespaces follow scanpy's: :mod:`distumap.io` reads and writes, :mod:`distumap.pp`
transforms the matrix, :mod:`distumap.tl` derives results, :mod:`distumap.pl` draws.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from distumap import _config  # noqa: F401  (registers the distumap.* defaults)
from distumap import io, pl, pp, tl
from distumap.cluster import connect

try:
    __version__ = version("distumap")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "connect", "io", "pl", "pp", "tl"]
