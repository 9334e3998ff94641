"""Quality at atlas shares: distumap at 2%, 5% and 20% landmarks against a full umap-learn fit,
measured as the field measures embeddings.

    python benchmarks/quality.py --cells 20000 100000

Data: the atlas benchmark's synthetic 10x file (``benchmarks/atlas.py``: N cells x 20,000 genes
at droplet depth, 30 subclasses of geometric sizes, the smallest 0.1% of the cells), cached
under ``--data``. distumap runs through its Python API on the threaded scheduler: ``io.read``,
``pp.preprocess`` (the tutorial's recipe), then ``tl.umap`` once per landmark share with
``pca_fit="all"``, so that every run embeds the same features (50 PCs of all cells; the script
checks that they are equal bit for bit), and umap-learn is fitted on exactly that matrix
(n_neighbors=30, min_dist=0.25, random_state=999; cached under ``--data``, keyed by the features).
``--full-seeds`` adds full fits with other seeds, to show how far two full fits differ.

Measures (``distumap.testing``), each for distumap and the full fit, and their ratio:
trustworthiness (15 neighbours, within a 5,000-cell sample), k-NN preservation (10 nearest cells,
5,000 sampled cells against all cells, exact), Kobak & Berens' class-mean measures over the
subclasses (KNC: 10 nearest class means; Spearman correlation of the distances between class
means) and their CPD (Spearman correlation of the distances between 1,000 sampled cells), and
neighbour-label agreement (15 nearest cells, all cells). Prints a table and one JSON line per N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import dask
import numpy as np
from atlas import atlas
from graph import _features
from refine import full_fit, machine

import distumap
from distumap import testing

HERE = Path(__file__).parent
MEASURES = ("trust", "knn", "knc", "class_rho", "cpd", "agreement")


def scores(features, embedding, labels, samples) -> dict:
    return {
        "trust": testing.trustworthiness(features, embedding, samples["trust"], k=15),
        "knn": testing.knn_preservation(features, embedding, samples["knn"], k=10),
        "knc": testing.class_means_preservation(features, embedding, labels, k=10),
        "class_rho": testing.class_distance_correlation(features, embedding, labels),
        "cpd": testing.distance_correlation(features, embedding, samples["cpd"]),
        "agreement": testing.label_agreement(embedding, labels, k=15),
    }


def embed(store: str, landmarks: int, refine_epochs: int | None) -> tuple[dict, float]:
    started = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ds = distumap.tl.umap(
            store, landmarks=landmarks, pca_fit="all", refine_epochs=refine_epochs
        )
    return ds, time.perf_counter() - started


def other_fit(features: np.ndarray, seed: int, path: Path) -> np.ndarray:
    """umap-learn on the same features with another seed: how far two full fits differ."""
    import umap

    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=seed)
            np.save(path, fit.fit_transform(features))
    return np.load(path)


def run(n_cells: int, args) -> dict:
    h5, metadata = atlas(args.data, n_cells)
    store = str(args.work / f"quality-{n_cells}.zarr")
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        ds = distumap.pp.preprocess(distumap.io.read(h5, store, metadata=metadata))
    result: dict = {
        "cells": n_cells,
        "genes_selected": int(ds["selected"].sum()),
        "ingest_preprocess_s": round(time.perf_counter() - started, 1),
        "refine_epochs": args.refine_epochs,
        "samples": {"trust": args.sample, "knn": args.sample, "cpd": 1000},
        "load_average": [os.getloadavg()],
    }
    labels = ds["subclass_label"].values.astype(str)
    samples = {
        name: testing.sample_cells(n_cells, size, seed=index)
        for index, (name, size) in enumerate(result["samples"].items())
    }
    features, runs = None, []
    for share in args.shares:
        landmarks = round(share * n_cells)
        ds, seconds = embed(store, landmarks, args.refine_epochs)
        own = _features(store, ds)
        if features is None:
            features = own
        elif not np.array_equal(features, own):
            raise RuntimeError(f"{landmarks} landmarks embedded other features than the first run")
        embedding = ds["X_umap"].values
        runs.append({"share": share, "landmarks": landmarks, "seconds": round(seconds, 1)})
        runs[-1]["scores"] = scores(features, embedding, labels, samples)
        print(json.dumps(runs[-1]), flush=True)
    digest = hashlib.sha1(features.tobytes()).hexdigest()[:12]
    reference, fit_seconds = full_fit(features, args.data / f"quality-full-{n_cells}-{digest}.npy")
    full = {"seconds": fit_seconds and round(fit_seconds, 1)}
    full["scores"] = scores(features, reference, labels, samples)
    result.update(full_fit=full, distumap=runs, other_seeds=[])
    for seed in args.full_seeds:
        path = args.data / f"quality-full-{n_cells}-{digest}-seed{seed}.npy"
        other = scores(features, other_fit(features, seed, path), labels, samples)
        result["other_seeds"].append({"seed": seed, "scores": other})
    result["load_average"].append(os.getloadavg())
    return result


def _row(name: str, row: dict, full: dict) -> str:
    cells = [f"{row['scores'][m]:.4f} ({row['scores'][m] / full[m]:.1%})" for m in MEASURES]
    return f"| {name} | " + " | ".join(cells) + " |"


def table(result: dict) -> str:
    full = result["full_fit"]["scores"]
    lines = [
        f"{result['cells']:,} cells, {result['genes_selected']} genes selected, 50 PCs",
        "| run | " + " | ".join(MEASURES) + " |",
        "|---|" + "---:|" * len(MEASURES),
        "| umap-learn, full fit | " + " | ".join(f"{full[m]:.4f}" for m in MEASURES) + " |",
    ]
    for row in result["distumap"]:
        lines.append(_row(f"distumap, {row['share']:.0%} ({row['landmarks']:,})", row, full))
    for row in result["other_seeds"]:
        lines.append(_row(f"umap-learn, seed {row['seed']}", row, full))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.05, 0.2])
    parser.add_argument("--sample", type=int, default=5000, help="cells for trust and k-NN")
    parser.add_argument("--refine-epochs", type=int, default=None, help="default: the package's")
    parser.add_argument(
        "--full-seeds", type=int, nargs="*", default=[], help="more full fits, other seeds"
    )
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distumap-quality"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for n_cells in args.cells:
        result = run(n_cells, args)
        result["machine"] = machine()
        print(table(result), flush=True)
        print(json.dumps(result), flush=True)
        shutil.rmtree(args.work / f"quality-{n_cells}.zarr", ignore_errors=True)


if __name__ == "__main__":
    main()
