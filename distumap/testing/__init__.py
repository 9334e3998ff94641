"""Seeded synthetic count matrices in the tutorial's CSV layout, for tests, demo and benchmarks,
and the measures of an embedding's quality that the tests' floors and the benchmarks use.

The model, in short: each gene has a heavy-tailed base expression; cells belong to subclasses of
very different sizes, grouped in classes; every class and every subclass raises its own marker
genes; each cell has a library-size factor; counts are Poisson draws. At the tutorial's 50,281
genes about 8% of the genes have fewer than 50% zeros, as in the real data.

Counts are reproducible block by block: everything about the genes and the populations comes from
``seed``, and cell ``i``'s row comes from a counter-based generator keyed by ``(seed, i)``, so any
block size (or any order of blocks) gives the same matrix. ``synthetic_counts`` and
``write_matrix_csv`` use the same compiled kernels and agree exactly.

Examples
--------
>>> from distumap.testing import SyntheticSpec, synthetic_counts, write_dataset
>>> data = synthetic_counts(200, 50, seed=1, zero_genes=2, zero_cells=1)
>>> data.counts.shape, data.counts.dtype
((200, 50), dtype('int32'))
>>> matrix, metadata = write_dataset(tmp_path, SyntheticSpec(200, 50, seed=1))  # doctest: +SKIP
"""

from __future__ import annotations

from distumap.testing._anndata import (
    write_anndata_zarr,
    write_h5ad,
    write_legacy_anndata_zarr,
    write_legacy_h5ad,
)
from distumap.testing._csv import (
    R_DIALECTS,
    write_dataset,
    write_genes_by_cells_csv,
    write_matrix_csv,
    write_metadata_csv,
)
from distumap.testing._loom import write_loom
from distumap.testing._quality import (
    class_distance_correlation,
    class_means_preservation,
    distance_correlation,
    knn_preservation,
    label_agreement,
    sample_cells,
    trustworthiness,
)
from distumap.testing._synthetic import (
    SEPARATED,
    TUTORIAL_CELLS,
    TUTORIAL_GENES,
    SyntheticData,
    SyntheticSpec,
    synthetic_counts,
    synthetic_gene_ids,
)
from distumap.testing._tenx import write_10x_h5, write_mex

__all__ = [
    "R_DIALECTS",
    "SEPARATED",
    "TUTORIAL_CELLS",
    "TUTORIAL_GENES",
    "SyntheticData",
    "SyntheticSpec",
    "class_distance_correlation",
    "class_means_preservation",
    "distance_correlation",
    "knn_preservation",
    "label_agreement",
    "sample_cells",
    "synthetic_counts",
    "synthetic_gene_ids",
    "trustworthiness",
    "write_10x_h5",
    "write_anndata_zarr",
    "write_dataset",
    "write_genes_by_cells_csv",
    "write_h5ad",
    "write_legacy_anndata_zarr",
    "write_legacy_h5ad",
    "write_loom",
    "write_matrix_csv",
    "write_metadata_csv",
    "write_mex",
]
