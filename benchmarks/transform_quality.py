"""Quality and speed of the landmark transform (distumap.tl._model) against umap-learn.

Quality: a seeded synthetic data set (clustered Poisson counts, populations of very different
sizes, log2(x+1)) embedded three ways - a full umap-learn fit on every cell, distumap's landmark
model (fit on landmarks, invariant transform of the rest) and umap-learn's own ``transform`` of
the rest from the same landmark fit. Reported: neighbour-label agreement (15 nearest cells in
2-D) and trustworthiness (15 neighbours, fixed subsample, against the log features).

Speed: transform throughput on one core (BLAS limited to one thread), compile excluded.

    python benchmarks/transform_quality.py quality --cells 6000 --genes 400 --landmarks 1500
    python benchmarks/transform_quality.py speed --landmarks 20000 --genes 2000 --pca 50
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from distumap.tl import _model


def make_log_counts(n_cells: int, n_genes: int, seed: int = 0, n_populations: int = 10):
    """Clustered Poisson counts; population shares fall geometrically (largest ~ 100x smallest)."""
    rng = np.random.default_rng(seed)
    shares = 0.6 ** np.arange(n_populations)
    shares /= shares.sum()
    labels = rng.choice(n_populations, size=n_cells, p=shares)
    base = rng.gamma(0.6, 2.0, size=n_genes)
    profiles = np.empty((n_populations, n_genes))
    for p in range(n_populations):
        fold = np.ones(n_genes)
        markers = rng.choice(n_genes, size=max(n_genes // 10, 1), replace=False)
        fold[markers] = rng.lognormal(1.0, 0.5, size=markers.size)
        profiles[p] = base * fold
    # a continuous within-population state, so neighbourhoods are graded rather than flat
    state = rng.random(n_cells)
    gradient = rng.lognormal(0.0, 0.4, size=(n_populations, n_genes))
    rates = profiles[labels] * gradient[labels] ** state[:, None]
    depth = rng.lognormal(0.0, 0.3, size=n_cells)
    counts = rng.poisson(rates * depth[:, None])
    return np.log2(counts + 1).astype(np.float32), labels


def label_agreement(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    _, idx = nn.kneighbors(embedding)
    return float((labels[idx[:, 1:]] == labels[:, None]).mean())


def trust(features: np.ndarray, embedding: np.ndarray, subsample: np.ndarray) -> float:
    from sklearn.manifold import trustworthiness

    return float(trustworthiness(features[subsample], embedding[subsample], n_neighbors=15))


def all_cells_pca(X: np.ndarray, n_pca: int) -> tuple[np.ndarray, np.ndarray]:
    """The embed's PCA of every cell (``--pca-fit all``): mean and components."""
    import dask.array as da

    from distumap.tl._pca import covariance_moments, pca_from_moments

    moments = covariance_moments(da.from_array(X, chunks=(1024, -1))).compute(scheduler="sync")
    return pca_from_moments(moments, len(X), n_pca)[:2]


def quality(args) -> dict:
    import umap

    X, labels = make_log_counts(args.cells, args.genes, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    landmarks = np.sort(rng.choice(len(X), size=args.landmarks, replace=False))
    rest = np.setdiff1d(np.arange(len(X)), landmarks)
    subsample = np.sort(rng.choice(len(X), size=min(2000, len(X)), replace=False))
    result: dict = {"cells": args.cells, "genes": args.genes, "landmarks": args.landmarks}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        full = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999).fit_transform(X)
        result["full_fit_s"] = time.perf_counter() - t
    result["full"] = {
        "agreement": label_agreement(full, labels),
        "trust": trust(X, full, subsample),
    }

    runs = [(n_pca, fit) for n_pca in args.pca_list for fit in args.pca_fit]
    for n_pca, fit in runs:
        if fit == "all" and not 0 < n_pca < X.shape[1]:
            continue
        t = time.perf_counter()
        pca = all_cells_pca(X, n_pca) if fit == "all" else None
        model = _model.fit_landmark_model(X[landmarks], n_pca=n_pca, seed=999, pca=pca)
        fit_s = time.perf_counter() - t
        _model.warm_up(model)
        t = time.perf_counter()
        emb = np.empty((len(X), 2), dtype=np.float32)
        emb[landmarks] = model.landmark_embedding
        emb[rest] = _model.transform(model, X[rest], rest)
        transform_s = time.perf_counter() - t
        # umap-learn's transform from the same landmark fit (same seed, same features)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reducer = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999)
            reducer.fit(_model.project(model, X[landmarks]))
            stock = np.empty_like(emb)
            stock[landmarks] = reducer.embedding_
            t = time.perf_counter()
            stock[rest] = reducer.transform(_model.project(model, X[rest]))
            stock_s = time.perf_counter() - t
        result[f"pca{n_pca}" + ("-all-cells" if fit == "all" else "")] = {
            "fit_s": fit_s,
            "transform_s": transform_s,
            "stock_transform_s": stock_s,
            "weight_reference": model.weight_reference,
            "mean_distance_reference": model.mean_distance_reference,
            "same_landmark_embedding": bool(
                np.array_equal(reducer.embedding_, model.landmark_embedding)
            ),
            "distumap": {
                "agreement": label_agreement(emb, labels),
                "trust": trust(X, emb, subsample),
            },
            "stock_transform": {
                "agreement": label_agreement(stock, labels),
                "trust": trust(X, stock, subsample),
            },
        }
    return result


def speed(args) -> dict:
    X, _ = make_log_counts(args.landmarks + args.cells, args.genes, seed=args.seed)
    t = time.perf_counter()
    model = _model.fit_landmark_model(
        X[: args.landmarks], n_pca=args.pca, transform_epochs=args.epochs
    )
    fit_s = time.perf_counter() - t
    _model.warm_up(model)
    cells = X[args.landmarks :]
    index = np.arange(args.landmarks, len(X))
    wall, cpu = time.perf_counter(), time.process_time()
    _model.transform(model, cells, index)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # stage split on one block, CPU seconds
    block = cells[:2000]
    t = time.process_time()
    features = _model.project(model, block)
    t_project = time.process_time() - t
    t = time.process_time()
    _model._knn(model, features)
    t_knn = time.process_time() - t
    return {
        "landmarks": args.landmarks,
        "genes": args.genes,
        "pca": args.pca,
        "epochs": args.epochs,
        "cells": len(cells),
        "fit_s": fit_s,
        "weight_reference": model.weight_reference,
        "cells_per_s_wall": len(cells) / wall,
        "cells_per_s_cpu": len(cells) / cpu,
        "project_us_per_cell_cpu": 1e6 * t_project / len(block),
        "knn_us_per_cell_cpu": 1e6 * t_knn / len(block),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["quality", "speed"])
    parser.add_argument("--cells", type=int, default=6000)
    parser.add_argument("--genes", type=int, default=400)
    parser.add_argument("--landmarks", type=int, default=1500)
    parser.add_argument("--pca", type=int, default=50)
    parser.add_argument("--pca-list", type=int, nargs="+", default=[50, 0])
    parser.add_argument("--pca-fit", nargs="+", choices=["landmarks", "all"], default=["landmarks"])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = quality(args) if args.what == "quality" else speed(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
