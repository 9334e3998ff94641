"""The exported neighbour graph's quality: kNN recall against brute force, and leiden on it
against leiden on ``sc.pp.neighbors`` of the same features.

    python benchmarks/graph.py --cells 1200 --genes 200 --landmarks 300 --separated

Runs the pipeline (threaded scheduler) on seeded ``distumap.testing`` data, exports the h5ad,
and compares the graph of all cells (``obsp``) with the exact k nearest cells of the embed's
features (the landmarks' PCA of log2(x+1)), and ``sc.tl.leiden`` on the export with
``sc.tl.leiden`` after ``sc.pp.neighbors(n_neighbors=k + 1)`` on those features (adjusted Rand
index; and each against the synthetic subclass labels). ``sc.pp.neighbors`` runs with exact
neighbours (``transformer="sklearn"``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import dask
import numpy as np

import distumap
from distumap._format import MODEL_GROUP
from distumap._store import read_group
from distumap.testing import SEPARATED, synthetic_counts, write_dataset
from distumap.tl import _model, _model_io


def _features(store: str, ds) -> np.ndarray:
    model = _model_io.from_arrays(*read_group(store, MODEL_GROUP))
    return _model.project(model, distumap.pp.log2p1(ds).values).astype(np.float32)


def _recall(features: np.ndarray, neighbors: np.ndarray) -> float:
    from sklearn.neighbors import NearestNeighbors

    k = neighbors.shape[1]
    # k + 1: each cell finds itself first (duplicates aside), which the graph leaves out
    _, exact = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors(features)
    hits = [
        len(set(found) & (set(row) - {cell})) / k
        for cell, (found, row) in enumerate(zip(neighbors, exact, strict=True))
    ]
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1200)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--landmarks", type=int, default=300)
    parser.add_argument("--pca", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--separated", action="store_true", help="five well-separated populations")
    args = parser.parse_args()

    import anndata
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    warnings.simplefilter("ignore")
    directory = tempfile.mkdtemp(prefix="distumap-graph-")
    options = SEPARATED if args.separated else {}
    data = synthetic_counts(args.cells, args.genes, seed=args.seed, **options)
    matrix, metadata = write_dataset(directory, data)
    store = f"{directory}/store.zarr"
    started = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, store, metadata=metadata)
        ds = distumap.tl.umap(distumap.pp.preprocess(ds), landmarks=args.landmarks, pca=args.pca)
        distumap.io.write_h5ad(ds, f"{directory}/embedding.h5ad")
    pipeline_seconds = time.perf_counter() - started
    features = _features(store, ds)
    adata = anndata.read_h5ad(f"{directory}/embedding.h5ad")
    sc.tl.leiden(adata, random_state=0)
    reference = adata.copy()
    reference.obsm["X_embed"] = features
    k = adata.uns["neighbors"]["params"]["n_neighbors"]
    # exact neighbours (sklearn), not scanpy's pynndescent default above 4,096 cells: scanpy
    # 1.11 calls getnnz on the csr_array pynndescent gives, which scipy 1.17 no longer has
    sc.pp.neighbors(
        reference, n_neighbors=k, use_rep="X_embed", random_state=0, transformer="sklearn"
    )
    sc.tl.leiden(reference, random_state=0)
    truth = adata.obs["subclass_label"]
    print(
        json.dumps(
            {
                "cells": args.cells,
                "genes_selected": int(ds["selected"].sum()),
                "landmarks": args.landmarks,
                "pca": args.pca,
                "separated": args.separated,
                "seed": args.seed,
                "k_other_cells": int(ds.sizes["cell_knn"]),
                "recall": round(_recall(features, ds["knn_cell"].values), 4),
                "leiden_ari_vs_pp_neighbors": round(
                    adjusted_rand_score(reference.obs["leiden"], adata.obs["leiden"]), 4
                ),
                "leiden_ari_vs_labels": round(adjusted_rand_score(truth, adata.obs["leiden"]), 4),
                "pp_neighbors_leiden_ari_vs_labels": round(
                    adjusted_rand_score(truth, reference.obs["leiden"]), 4
                ),
                "clusters": [adata.obs["leiden"].nunique(), reference.obs["leiden"].nunique()],
                "pipeline_seconds": round(pipeline_seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
