"""Transform refinement (distumap.tl._refine): quality against a full fit, and cost per epoch.

Data: ``distumap.testing`` synthetic counts, 20 subclasses of geometric sizes (22.6% down to
0.2% of the cells); ``--fold`` sets the marker genes' mean log2 fold change (the default 1.0
makes a full umap-learn fit reach ~0.83 label agreement, about the issue's 0.85; the package's
default of 2.0 separates the populations almost perfectly). Features: log2(x+1) of the genes
with under 50% zeros.

``quality`` runs in one process with the functions the embed stage runs (the stage writes the
same bits, see tests/test_embed.py): a landmark model (50 PCs of the landmarks, n_neighbors=30,
min_dist=0.25, seed 999), the invariant transform of the other cells, then 0 / 10 / 30 / 100
refinement epochs. Reported per setting: neighbour-label agreement (share of each cell's 15
nearest cells in 2-D with its subclass) over all cells, landmarks only and transformed cells
only; trustworthiness (15 neighbours, a fixed 2,000-cell subsample) against 50 PCs of all
cells; and the same for umap-learn fitted on those 50 PCs of every cell. Seconds per epoch are
single-threaded, in process. ``--variants`` adds the settings that were tried and not kept.

``cost`` runs the real stage (CSV -> ingest -> preprocess -> ``distumap.tl.umap``) on a
LocalCluster and reads the stage's own timings: the nearest-cells step, the epochs (seconds per
epoch; the last epoch apart, since it runs one task per store chunk to write ``X_umap``), and
scales them in proportion to a million cells (``at_1m_*``).

    python benchmarks/refine.py quality --cells 10000 --genes 12000 --landmarks 1000 3000 --variants
    python benchmarks/refine.py quality --cells 100000 --genes 12000 --landmarks 5000 20000
    python benchmarks/refine.py cost --cells 100000 300000 --genes 2000 --epochs 10 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
K_AGREEMENT = 15


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def agreement(embedding: np.ndarray, labels: np.ndarray, k: int = K_AGREEMENT) -> np.ndarray:
    """Per cell: the share of its k nearest cells in the embedding with its label."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    neighbours = index.kneighbors(embedding, return_distance=False)[:, 1:]
    return (labels[neighbours] == labels[:, None]).mean(axis=1)


def scores(embedding, labels, is_landmark, features, sample) -> dict:
    from sklearn.manifold import trustworthiness

    per_cell = agreement(embedding, labels)
    out = {"agreement": round(float(per_cell.mean()), 4)}
    if is_landmark is not None:
        out["agreement_landmarks"] = round(float(per_cell[is_landmark].mean()), 4)
        out["agreement_transformed"] = round(float(per_cell[~is_landmark].mean()), 4)
    out["trust"] = round(
        float(trustworthiness(features[sample], embedding[sample], n_neighbors=15)), 4
    )
    return out


def log_features(cells: int, genes: int, seed: int, fold: float, data: Path):
    """log2(x+1) of the genes with under 50% zeros, and the subclass labels (cached)."""
    from distumap.testing import SyntheticSpec

    path = data / f"refine-{cells}x{genes}-fold{fold}-seed{seed}.npz"
    if path.exists():
        saved = np.load(path)
        return saved["X"], saved["labels"]
    spec = SyntheticSpec(cells, genes, seed=seed, marker_log2_fold=fold)
    block = max(1, 2_000_000 // genes)
    zeros = np.zeros(genes, dtype=np.int64)
    for start in range(0, cells, block):
        zeros += (spec.counts(start, min(start + block, cells)) == 0).sum(axis=0)
    selected = zeros / cells < 0.5
    X = np.empty((cells, int(selected.sum())), dtype=np.float32)
    for start in range(0, cells, block):
        stop = min(start + block, cells)
        X[start:stop] = np.log2(spec.counts(start, stop)[:, selected] + 1.0)
    labels = np.asarray(spec.metadata()["subclass_label"]).astype(str)
    data.mkdir(parents=True, exist_ok=True)
    np.savez(path, X=X, labels=labels)
    return X, labels


def full_fit(pcs: np.ndarray, path: Path) -> tuple[np.ndarray, float | None]:
    import umap

    if path.exists():
        return np.load(path), None
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        embedding = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999).fit_transform(pcs)
    seconds = time.perf_counter() - started
    np.save(path, embedding)
    return embedding, seconds


def landmark_start(X: np.ndarray, n_landmarks: int, transform_epochs: int = 30):
    """The landmark model, the transform of the other cells, and what the refinement needs."""
    import xarray as xr

    from distumap import tl
    from distumap.tl import _model

    cells = xr.Dataset(coords={"cell": np.arange(len(X)).astype(str)})
    is_landmark = tl.landmarks(cells, n_landmarks, seed=999).values
    rows, rest = np.flatnonzero(is_landmark), np.flatnonzero(~is_landmark)
    started = time.perf_counter()
    model = _model.fit_landmark_model(
        X[rows],
        n_pca=50,
        n_neighbors=30,
        min_dist=0.25,
        seed=999,
        transform_epochs=transform_epochs,
    )
    fit_seconds = time.perf_counter() - started
    _model.warm_up(model)
    positions = np.empty((len(X), 2), dtype=np.float32)
    nearest = np.empty((len(X), model.n_neighbors), dtype=np.int64)
    features = np.empty((len(X), model.landmark_features.shape[1]), dtype=np.float32)
    positions[rows] = model.landmark_embedding
    nearest[rows], _ = _model.landmark_knn(model, np.arange(len(rows)))
    features[rows] = model.landmark_features
    moved = np.empty((len(rest), features.shape[1]), dtype=np.float32)
    started = time.perf_counter()
    positions[rest], nearest[rest], _ = _model.transform(
        model, X[rest], rest, return_knn=True, features_out=moved
    )
    transform_seconds = time.perf_counter() - started
    features[rest] = moved
    timing = {"fit_s": round(fit_seconds, 1), "transform_s": round(transform_seconds, 1)}
    return model, is_landmark, positions, nearest, features, timing


def build_graph(features, is_landmark, nearest, model, settings, *, directed=False):
    """The refinement graph, as ``refine_embedding`` builds it (timed)."""
    from distumap.tl import _refine, _union

    started = time.perf_counter()
    home = _refine.home_buckets(is_landmark, nearest)
    neighbors, weights, examined = _refine.nearest_cells(
        _refine.bucket_index(home, int(is_landmark.sum()), features),
        np.arange(len(home)),
        features,
        home,
        nearest,
        mean_distance=model.mean_distance_reference,
        settings=settings,
    )
    knn_seconds = time.perf_counter() - started
    if directed:  # tried: the out-edges alone, without umap-learn's fuzzy union
        graph = _union.Graph(
            neighbors,
            weights,
            np.zeros(len(home) + 1, dtype=np.int64),
            np.zeros(0, dtype=np.int32),
            np.zeros(0, dtype=np.float32),
        )
    else:
        graph = _union.symmetrize(neighbors, weights)
    info = {
        "knn_s": round(knn_seconds, 2),
        "candidates_per_cell": round(examined / len(home), 1),
        "graph_mb": round(graph.nbytes / 1e6, 1),
    }
    return graph, neighbors, info


def run_epochs(positions, graph, is_landmark, model, settings) -> tuple[np.ndarray, float]:
    from distumap.tl import _refine

    frozen = np.zeros(len(positions), bool) if settings.move_landmarks else is_landmark
    started = time.perf_counter()
    out = _refine.refine(
        positions,
        graph,
        frozen,
        n_epochs=settings.n_epochs,
        a=model.a,
        b=model.b,
        gamma=model.repulsion_strength,
        initial_alpha=settings.initial_alpha,
        negative_sample_rate=model.negative_sample_rate,
        seed=model.seed,
    )
    return out, (time.perf_counter() - started) / max(settings.n_epochs, 1)


def knn_recall(features, neighbors, sample) -> float:
    from sklearn.neighbors import NearestNeighbors

    k = neighbors.shape[1]
    index = NearestNeighbors(n_neighbors=k + 1).fit(features)
    exact = index.kneighbors(features[sample], return_distance=False)[:, 1:]
    found = [len(set(a) & set(b)) / k for a, b in zip(exact, neighbors[sample], strict=True)]
    return round(float(np.mean(found)), 4)


def quality(args) -> dict:
    from sklearn.decomposition import PCA

    from distumap.tl import _refine

    X, labels = log_features(args.cells, args.genes, args.seed, args.fold, args.data)
    # the reference features: 50 PCs of every cell (distumap's model has 50 PCs of landmarks)
    pcs = PCA(50, random_state=0).fit_transform(X).astype(np.float32)
    sample = np.sort(np.random.default_rng(0).choice(len(X), min(2000, len(X)), replace=False))
    result: dict = {
        "machine": machine(),
        "cells": args.cells,
        "genes": args.genes,
        "selected_genes": int(X.shape[1]),
        "fold": args.fold,
        "settings": dataclasses.asdict(_refine.RefineSettings()),
    }
    if not args.skip_full_fit:
        name = f"refine-full-{args.cells}x{args.genes}-fold{args.fold}-seed{args.seed}.npy"
        full, seconds = full_fit(pcs, args.data / name)
        result["full_fit"] = {"seconds": seconds, **scores(full, labels, None, pcs, sample)}
        print(json.dumps({"full_fit": result["full_fit"]}), flush=True)
    result["runs"] = []
    for n_landmarks in args.landmarks:
        model, is_landmark, start, nearest, features, timing = landmark_start(
            X, n_landmarks, args.transform_epochs
        )
        settings = _refine.RefineSettings()
        graph, neighbors, info = build_graph(features, is_landmark, nearest, model, settings)
        info["recall"] = knn_recall(features, neighbors, sample)
        if not args.skip_full_fit:
            # the same full fit on the landmark model's features (PCA of the landmarks): what
            # the refinement could reach at best, since it searches neighbours in that space
            name = f"refine-full-{args.cells}x{args.genes}-fold{args.fold}-seed{args.seed}"
            same, seconds = full_fit(features, args.data / f"{name}-landmarks{n_landmarks}.npy")
            row = {"n_landmarks": n_landmarks, "seconds": seconds}
            row.update(scores(same, labels, None, pcs, sample))
            result.setdefault("full_fit_on_model_features", []).append(row)
            print(json.dumps({"full_fit_on_model_features": row}), flush=True)
        for n_epochs in args.epochs:
            settings = dataclasses.replace(settings, n_epochs=n_epochs)
            out, per_epoch = run_epochs(start, graph, is_landmark, model, settings)
            row = {
                "n_landmarks": n_landmarks,
                "epochs": n_epochs,
                **scores(out, labels, is_landmark, pcs, sample),
                "s_per_epoch": round(per_epoch, 3) if n_epochs else None,
                **timing,
                **info,
            }
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
        if args.variants and n_landmarks == args.landmarks[0]:
            result["variants"] = variants(
                X, labels, pcs, sample, model, is_landmark, start, nearest, features
            )
    return result


def variants(X, labels, pcs, sample, model, is_landmark, start, nearest, features) -> list:
    """Settings tried and not kept, each against the default at 30 epochs."""
    from distumap.tl import _refine

    base = dataclasses.replace(_refine.RefineSettings(), n_epochs=30)
    tries = {
        "default": (base, False),
        "landmarks held fixed": (dataclasses.replace(base, move_landmarks=False), False),
        "directed graph (no fuzzy union)": (base, True),
        "initial alpha 0.25": (dataclasses.replace(base, initial_alpha=0.25), False),
        "initial alpha 1.0 (umap-learn's)": (dataclasses.replace(base, initial_alpha=1.0), False),
        "30 neighbours": (dataclasses.replace(base, n_neighbors=30), False),
        "256 candidates": (dataclasses.replace(base, max_candidates=256), False),
        "100 epochs, initial alpha 0.25": (
            dataclasses.replace(base, n_epochs=100, initial_alpha=0.25),
            False,
        ),
    }
    rows = []
    for name, (settings, directed) in tries.items():
        graph, neighbors, info = build_graph(
            features, is_landmark, nearest, model, settings, directed=directed
        )
        out, per_epoch = run_epochs(start, graph, is_landmark, model, settings)
        row = {
            "variant": name,
            **scores(out, labels, is_landmark, pcs, sample),
            "s_per_epoch": round(per_epoch, 3),
            "recall": knn_recall(features, neighbors, sample),
            **info,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cost(args) -> dict:
    import distumap
    from distumap.testing import SyntheticSpec, write_dataset

    client = distumap.connect(
        n_workers=args.workers, memory_limit=args.memory_limit, dashboard_address=":0", quiet=True
    )
    result: dict = {"machine": machine(), "workers": args.workers, "runs": []}
    for cells in args.cells:
        spec = SyntheticSpec(cells, args.genes, seed=args.seed, marker_log2_fold=args.fold)
        directory = args.data / f"refine-cost-{cells}x{args.genes}-fold{args.fold}-{args.seed}"
        marker = directory / ".complete"
        if not marker.exists():
            write_dataset(directory, spec, block_cells=2048)
            marker.touch()
        store = directory / "store.zarr"
        shutil.rmtree(store, ignore_errors=True)  # a finished stage would be skipped
        ds = distumap.io.read_csv(
            directory / "matrix.csv", store, metadata=directory / "metadata.csv", overwrite=True
        )
        ds = distumap.pp.preprocess(ds)
        for landmarks in args.landmarks:
            started = time.perf_counter()
            ds = distumap.tl.umap(
                ds, landmarks=landmarks, pca=50, refine_epochs=args.epochs, n_neighbors=30
            )
            seconds = time.perf_counter() - started
            record = ds.attrs["distumap"]["stages"]["embed"]
            # the last epoch runs a task per store chunk (it writes X_umap): timed apart
            last = record["refine_last_epoch_seconds"]
            per_epoch = (record["refine_epochs_seconds"] - last) / max(args.epochs - 1, 1)
            scale = 1_000_000 / cells
            row = {
                "cells": cells,
                "n_landmarks": landmarks,
                "blocks": len(ds["counts"].data.chunks[0]),
                "embed_s": round(seconds, 1),
                "fit_s": record["fit_seconds"],
                "transform_s": record["transform_seconds"],
                "refine_knn_s": record["refine_knn_seconds"],
                "refine_graph_s": record.get("refine_graph_seconds"),
                "refine_s_per_epoch": round(per_epoch, 3),
                "refine_last_epoch_s": last,
                "at_1m_knn_s": round(record["refine_knn_seconds"] * scale, 1),
                "at_1m_s_per_epoch": round(per_epoch * scale, 2),
                "at_1m_last_epoch_s": round(last * scale, 1),
            }
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["quality", "cost"])
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000])
    parser.add_argument("--genes", type=int, default=12_000)
    parser.add_argument("--fold", type=float, default=1.0, help="marker log2 fold change")
    parser.add_argument("--landmarks", type=int, nargs="+", default=[1_000, 3_000])
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 10, 30, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--transform-epochs", type=int, default=30, help="the transform's own SGD epochs"
    )
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--skip-full-fit", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GiB")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()
    if args.what == "quality":
        if len(args.cells) != 1:
            parser.error("quality takes one --cells")
        args.cells = args.cells[0]
        result = quality(args)
    else:
        if len(args.epochs) != 1 or args.epochs[0] < 1:
            parser.error("cost takes one --epochs, at least 1")
        args.epochs = args.epochs[0]
        result = cost(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
