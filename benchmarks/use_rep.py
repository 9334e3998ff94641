"""--use-rep benchmark: embedding an AnnData obsm array with distumap against umap-learn on the
same array, in the same run.

A seeded ``.h5ad`` holds a scVI-like representation (``obsm["X_scVI"]``: populations of very
different sizes in ``--dims`` dimensions, float32) and, with ``--genes``, sparse integer counts in
X. distumap: ``io.read(use_rep="X_scVI")`` (the representation alone), ``pp.preprocess`` (a record,
nothing computed), ``tl.umap`` (landmark fit, transform, refinement) on an embedded cluster; with
``--genes``, also the ingest that reads the counts beside it (what ``distumap run`` does, for the
exports). umap-learn: ``UMAP(n_neighbors=30, min_dist=0.25, random_state=999)`` fitted on every
cell's representation. Reports seconds per stage, peak memory of the process tree, and quality
(neighbour-label agreement, trustworthiness on a fixed subsample).

    python benchmarks/use_rep.py --cells 100000 --dims 30 --genes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from embed import TreePeak, _quality  # a sibling script, not a package

DATA = Path(__file__).parent / "data"


def _population_sizes(n_cells: int, n_populations: int) -> np.ndarray:
    """Sizes falling geometrically (the largest ~40x the smallest), summing to ``n_cells``."""
    weights = np.geomspace(40, 1, n_populations)
    sizes = np.floor(weights / weights.sum() * n_cells).astype(int)
    sizes[0] += n_cells - sizes.sum()
    return sizes


def write_atlas(
    path: Path, n_cells: int, n_dims: int, n_genes: int, seed: int, separation: float
) -> np.ndarray:
    """The seeded ``.h5ad``; returns each cell's population. The populations' centres are
    ``separation`` standard deviations apart per dimension (their spread is 1)."""
    import anndata
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(20), _population_sizes(n_cells, 20))
    centres = rng.normal(scale=separation, size=(20, n_dims))
    rep = (centres[labels] + rng.normal(size=(n_cells, n_dims))).astype(np.float32)
    if n_genes:
        density = 0.05
        nnz = int(n_cells * n_genes * density)
        rows = np.sort(rng.integers(0, n_cells, nnz))
        counts = sp.csr_matrix(
            (rng.integers(1, 20, nnz).astype(np.float32), (rows, rng.integers(0, n_genes, nnz))),
            shape=(n_cells, n_genes),
        )
        counts.sum_duplicates()
    else:
        counts = sp.csr_matrix((n_cells, 1), dtype=np.float32)
    adata = anndata.AnnData(X=counts)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    adata.obs["population"] = [f"p{label}" for label in labels]
    adata.obsm["X_scVI"] = rep
    adata.write_h5ad(path)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=30)
    parser.add_argument("--genes", type=int, default=2000, help="counts in X (0: none)")
    parser.add_argument(
        "--separation", type=float, default=4.0, help="spread of the populations' centres (4)"
    )
    parser.add_argument("--landmarks", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full-fit", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "use_rep-results.json"))
    args = parser.parse_args()

    import dask

    import distumap

    work = DATA / f"use-rep-{args.cells}x{args.dims}-{args.separation:g}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    atlas = work / "atlas.h5ad"
    started = time.perf_counter()
    labels = write_atlas(atlas, args.cells, args.dims, args.genes, args.seed, args.separation)
    print(f"wrote {atlas} in {time.perf_counter() - started:.1f} s", flush=True)
    import anndata

    rep = anndata.read_h5ad(atlas).obsm["X_scVI"]
    sample = np.random.default_rng(1).choice(args.cells, min(2000, args.cells), replace=False)
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "args": vars(args),
    }

    client = distumap.connect(
        n_workers=args.workers, memory_limit=args.memory_limit, dashboard_address=":0", quiet=True
    )
    distumap.tl.prepare_workers(client)
    timings: dict[str, float] = {}
    with TreePeak(os.getpid()) as peak:
        t = time.perf_counter()
        ds = distumap.io.read(atlas, work / "rep.zarr", use_rep="X_scVI")
        timings["ingest_rep_only_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        ds = distumap.pp.preprocess(ds)
        timings["preprocess_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        ds = distumap.tl.umap(ds, landmarks=args.landmarks)
        timings["embed_s"] = round(time.perf_counter() - t, 2)
    timings["total_s"] = round(sum(timings.values()), 2)
    embedding = ds["X_umap"].values
    results["distumap"] = {
        **timings,
        "peak_tree_gib": round(peak.peak / 2**30, 2),
        "embed_record": {
            k: v
            for k, v in ds.attrs["distumap"]["stages"]["embed"].items()
            if k.endswith("seconds")
        },
        **_quality(rep, embedding, labels, sample),
    }
    print(json.dumps(results["distumap"]), flush=True)
    if args.genes:
        t = time.perf_counter()
        distumap.io.read(atlas, work / "both.zarr", use_rep="X_scVI", counts=True)
        results["distumap"]["ingest_rep_and_counts_s"] = round(time.perf_counter() - t, 2)
        print(f"ingest with counts: {results['distumap']['ingest_rep_and_counts_s']} s")
    from distumap.cluster import close

    close(client)  # the embedded cluster's workers go: umap-learn runs alone

    if not args.skip_full_fit:
        import umap

        with dask.config.set(scheduler="sync"), TreePeak(os.getpid()) as peak:
            t = time.perf_counter()
            full = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999).fit_transform(rep)
            seconds = round(time.perf_counter() - t, 2)
        results["umap_learn_full_fit"] = {
            "seconds": seconds,
            "peak_process_gib": round(peak.peak / 2**30, 2),
            **_quality(rep, full, labels, sample),
        }
        print(json.dumps(results["umap_learn_full_fit"]), flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
