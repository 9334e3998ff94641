"""The exported neighbour graph's quality: kNN recall against brute force, and leiden on it
against leiden on ``sc.pp.neighbors`` of the same features.

    python benchmarks/graph.py --cells 1200 --genes 200 --landmarks 300 --separated

Runs the pipeline (threaded scheduler) on seeded ``distumap.testing`` data, exports the h5ad,
and compares the graph of all cells (``obsp``) with the exact k nearest cells of the embed's
features (the landmarks' PCA of log2(x+1)), and ``sc.tl.leiden`` on the export with
``sc.tl.leiden`` after ``sc.pp.neighbors(n_neighbors=k + 1)`` on those features (adjusted Rand
index; and each against the synthetic subclass labels). ``sc.pp.neighbors`` runs with exact
neighbours (``transformer="sklearn"``). Prints one JSON line.

    python benchmarks/graph.py --atlas 100000 300000 1000000

At atlas scale (``benchmarks/atlas.py``'s synthetic 10x files, cached under ``--data``):
``distumap run --formats h5ad`` on a 2-worker cluster as a user runs it (wall time, the embed's
graph search ``refine_knn_seconds``, peak RSS of its process tree), then in one fresh process
``sc.pp.neighbors`` with its defaults (pynndescent, ``n_neighbors`` k + 1) on the same features
(the store's ``X_pca``), after an untimed first call on 20,000 of the cells that compiles
pynndescent (about 25 s on this machine; fewer cells take other paths): its seconds, and its
process's RSS before the call and at its peak (before leiden runs). Recall of both graphs
against exact neighbours (brute force) on a ``--sample`` of cells; up to ``--leiden-max``
cells, ``sc.tl.leiden`` (igraph, 2 iterations, as scanpy recommends) on both graphs and their
adjusted Rand index. Writes ``graph-atlas-N.json`` beside this script.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

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


def exact_neighbors(features: np.ndarray, rows: np.ndarray, k: int, block: int = 64) -> np.ndarray:
    """The ``k`` nearest other cells of each of ``rows`` among all cells, by brute force."""
    features = features.astype(np.float64)  # exact: no float32 cancellation between near ties
    squared = np.einsum("ij,ij->i", features, features)
    found = np.empty((len(rows), k), dtype=np.int64)
    for start in range(0, len(rows), block):
        batch = rows[start : start + block]
        distances = squared[batch, None] - 2 * features[batch] @ features.T + squared[None, :]
        distances[np.arange(len(batch)), batch] = np.inf  # not itself
        nearest = np.argpartition(distances, k, axis=1)[:, :k]
        found[start : start + len(batch)] = nearest
    return found


def sampled_recall(neighbors: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each sampled cell's exact ``k`` nearest cells that ``neighbors`` holds."""
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(neighbors, exact, strict=True)]))


SCANPY = """
import json, resource, sys, time
import anndata, h5py, numpy as np, psutil, scanpy as sc, scipy.sparse, zarr
from sklearn.metrics import adjusted_rand_score

if not hasattr(scipy.sparse.csr_array, "getnnz"):
    # scanpy 1.11.5 (the last for Python 3.11) calls csr_array.getnnz, which SciPy 1.17 removed
    scipy.sparse.csr_array.getnnz = lambda self, axis=None: self._getnnz(axis=axis)

store, h5ad, work, k, leiden = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
features = zarr.open_array(store, path="X_pca", mode="r")[:]
adata = anndata.AnnData(obsm={"X_pca": features}, shape=(features.shape[0], 0))
# pynndescent compiles its numba code on first use in a process: once, untimed, on 20,000 cells
started = time.perf_counter()
sc.pp.neighbors(adata[:20000].copy(), n_neighbors=k + 1, use_rep="X_pca", random_state=0)
warm_up = time.perf_counter() - started
loaded = psutil.Process().memory_info().rss
started = time.perf_counter()
sc.pp.neighbors(adata, n_neighbors=k + 1, use_rep="X_pca", random_state=0)
seconds = time.perf_counter() - started
rows, exact = np.load(work + "/sample-rows.npy"), np.load(work + "/sample-exact.npy")
graph = adata.obsp["distances"].tocsr()
found = [graph.indices[graph.indptr[r] : graph.indptr[r + 1]] for r in rows]
recall = float(np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact)]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before leiden runs
result = {"neighbors_seconds": round(seconds, 1), "warm_up_seconds": round(warm_up, 1),
          "rss_before_gib": round(loaded / 2**30, 2),
          "peak_after_neighbors_gib": round(peak / 2**30, 2), "recall": round(recall, 4)}
if leiden == "yes":
    ours = adata.copy()
    with h5py.File(h5ad, "r") as file:
        ours.obsp["connectivities"] = anndata.io.read_elem(file["obsp/connectivities"])
        ours.uns["neighbors"] = anndata.io.read_elem(file["uns/neighbors"])
    for name, data in (("scanpy", adata), ("distumap", ours)):
        started = time.perf_counter()
        sc.tl.leiden(data, flavor="igraph", n_iterations=2, directed=False, random_state=0)
        result[f"leiden_seconds_{name}"] = round(time.perf_counter() - started, 1)
        result[f"clusters_{name}"] = int(data.obs["leiden"].nunique())
        np.save(f"{work}/leiden-{name}.npy", data.obs["leiden"].to_numpy().astype(int))
    result["leiden_ari"] = round(adjusted_rand_score(adata.obs["leiden"], ours.obs["leiden"]), 4)
print(json.dumps(result))
"""


def atlas_scale(args) -> None:
    """``--atlas``: the graph of ``distumap run`` against ``sc.pp.neighbors`` at atlas size."""
    import shutil

    import zarr
    from atlas import TreeSampler, atlas, machine, run_distumap, spec
    from sklearn.metrics import adjusted_rand_score

    for n_cells in args.atlas:
        h5, metadata = atlas(args.data, n_cells)
        out = args.work / f"graph-{n_cells}"
        args.extra = ["--formats", "h5ad", *args.extra]
        row = run_distumap(h5, metadata, out, args)
        args.extra = args.extra[2:]
        store = str(out / "store.zarr")
        features = zarr.open_array(store, path="X_pca", mode="r")[:]
        ours = zarr.open_array(store, path="knn_cell", mode="r")
        k = ours.shape[1]
        rows = np.sort(np.random.default_rng(0).choice(n_cells, args.sample, replace=False))
        started = time.perf_counter()
        exact = exact_neighbors(features, rows, k)
        brute = time.perf_counter() - started
        np.save(out / "sample-rows.npy", rows)
        np.save(out / "sample-exact.npy", exact)
        del features
        recall = sampled_recall(ours.get_orthogonal_selection((rows, slice(None))), exact)
        leiden = "yes" if n_cells <= args.leiden_max else "no"
        h5ad = str(out / "embedding.h5ad")
        child = subprocess.Popen(
            [sys.executable, "-c", SCANPY, store, h5ad, str(out), str(k), leiden],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler = TreeSampler(child.pid)
        stdout, stderr = child.communicate()
        memory = sampler.stop()
        if child.returncode != 0:
            raise SystemExit(f"scanpy failed:\n{stderr[-3000:]}")
        scanpy = json.loads(stdout.strip().splitlines()[-1])
        scanpy["peak_gib"] = memory["tree_peak_gib"]
        result = {
            "machine": machine(),
            "cells": n_cells,
            "k_other_cells": k,
            "sample": args.sample,
            "brute_force_seconds": round(brute, 1),
            "distumap": {
                key: row[key]
                for key in (
                    "seconds",
                    "stage_seconds",
                    "fit_seconds",
                    "transform_seconds",
                    "refine_knn_seconds",
                    "refine_epochs_seconds",
                    "genes_selected",
                    "landmarks",
                    "tree_peak_gib",
                    "client_peak_gib",
                    "worker_peaks_gib",
                    "load_average_1min",
                )
            },
            "distumap_recall": round(recall, 4),
            "scanpy": scanpy,
        }
        if leiden == "yes":
            truth = spec(n_cells).metadata()["subclass_label"].to_numpy()
            for name in ("scanpy", "distumap"):
                labels = np.load(out / f"leiden-{name}.npy")
                ari = adjusted_rand_score(truth, labels)
                result[f"leiden_ari_vs_labels_{name}"] = round(ari, 4)
        print(json.dumps(result), flush=True)
        path = Path(__file__).parent / f"graph-atlas-{n_cells}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1200)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--landmarks", type=int, default=300)
    parser.add_argument("--pca", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--separated", action="store_true", help="five well-separated populations")
    here = Path(__file__).parent
    parser.add_argument("--atlas", type=int, nargs="+", help="cells: atlas-scale runs (see above)")
    parser.add_argument("--data", type=Path, default=here / "data", help="atlas files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distumap-graph"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GiB")
    parser.add_argument("--sample", type=int, default=2000, help="cells whose recall is measured")
    parser.add_argument("--leiden-max", type=int, default=300_000, help="leiden up to these cells")
    parser.add_argument("--keep", action="store_true", help="keep the atlas runs' outputs")
    parser.add_argument("extra", nargs="*", help="--atlas: more `distumap run` options, after --")
    args = parser.parse_args()
    if args.atlas:
        atlas_scale(args)
        return

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
