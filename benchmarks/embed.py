"""Embed benchmark: distumap's landmark UMAP against the tutorial's way, in the same run.

The tutorial's way: log2(x+1) of the genes with under 50% zeros, umap-learn fitted on every cell
(n_neighbors=30, min_dist=0.25, random_state=999). distumap: the same features, a landmark fit
and the parallel, batch-invariant transform on a running cluster. Reports time, quality
(neighbour-label agreement, trustworthiness on a fixed subsample) and transform cells/s per worker.
``--end-to-end`` also times ``distumap run`` from the CSV to the loom with the peak memory of the
whole process tree (client, scheduler, workers).

    python benchmarks/embed.py --cells 20000 --genes 50281 --landmarks 20000 --workers 2
    python benchmarks/embed.py --cells 76533 --genes 50281 --end-to-end --skip-full-fit
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"


def _agreement(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    neighbours = index.kneighbors(embedding, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


def _quality(features, embedding, labels, sample) -> dict[str, float]:
    from sklearn.manifold import trustworthiness

    return {
        "label_agreement": round(_agreement(embedding, labels), 4),
        "trustworthiness": round(
            float(trustworthiness(features[sample], embedding[sample], n_neighbors=15)), 4
        ),
    }


class TreePeak:
    """Peak resident memory of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.per_process: dict[int, int] = {}  # peak RSS of each process of the tree
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                sizes = {p.pid: p.memory_info().rss for p in procs}
                self.peak = max(self.peak, sum(sizes.values()))
                for pid, rss in sizes.items():
                    self.per_process[pid] = max(self.per_process.get(pid, 0), rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=50_281)
    parser.add_argument(
        "--landmarks", type=int, nargs="+", default=[20_000], help="one or more counts to compare"
    )
    parser.add_argument("--pca", type=int, default=50)
    parser.add_argument(
        "--refine-epochs", type=int, default=None, help="default: distumap.refine-epochs"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--memory-limit", default="4GiB", help="per worker (4GiB); 'default': distumap run's own"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full-fit", action="store_true")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument(
        "--end-to-end-only", action="store_true", help="the CLI run alone (implies --end-to-end)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "embed-results.json"))
    args = parser.parse_args()

    import dask
    import umap

    import distumap
    from distumap.testing import SyntheticSpec, write_dataset

    spec = SyntheticSpec(args.cells, args.genes, seed=args.seed)
    directory = DATA / f"synthetic-{args.cells}x{args.genes}-{args.seed}"
    marker = directory / ".complete"
    if not marker.exists():
        write_dataset(directory, spec)
        marker.touch()
    matrix, metadata = directory / "matrix.csv", directory / "metadata.csv"
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": __import__("os").cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "shape": [args.cells, args.genes],
    }

    if args.end_to_end or args.end_to_end_only:
        out = directory / "run"
        # from scratch: a finished store in ``out`` would be resumed, not recomputed
        shutil.rmtree(out, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "distumap.cli",
            "run",
            str(matrix),
            "--metadata",
            str(metadata),
            "--out",
            str(out),
            "--n-workers",
            str(args.workers),
            "--landmarks",
            str(args.landmarks[0]),
            "--pca",
            str(args.pca),
            "--no-progress",
            "--overwrite",
            "--dashboard-address",
            ":0",
        ]
        if args.memory_limit != "default":
            command += ["--memory-limit", args.memory_limit]
        started = time.perf_counter()
        process = subprocess.Popen(command)
        with TreePeak(process.pid) as peak:
            process.wait()
        results["end_to_end"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "peak_tree_gib": round(peak.peak / 2**30, 2),
            "peak_client_gib": round(peak.per_process.get(process.pid, 0) / 2**30, 2),
            "peak_other_processes_gib": sorted(
                (round(v / 2**30, 2) for k, v in peak.per_process.items() if k != process.pid),
                reverse=True,
            )[:4],
            "memory_limit_per_worker": args.memory_limit,
            "landmarks": args.landmarks[0],
            "csv_gb": round(matrix.stat().st_size / 1e9, 2),
            "exit": process.returncode,
        }
        if process.returncode == 0:
            import zarr

            stages = zarr.open_group(str(out / "store.zarr"), mode="r").attrs["distumap"]["stages"]
            results["end_to_end"]["stage_seconds"] = {
                name: record.get("seconds") for name, record in stages.items()
            }
            for name in ("fit_seconds", "transform_seconds", "refine_epochs_seconds"):
                results["end_to_end"][name] = stages["embed"].get(name)
        print(json.dumps(results["end_to_end"]), flush=True)
        if args.end_to_end_only:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
            return

    client = distumap.connect(
        n_workers=args.workers, memory_limit=args.memory_limit, dashboard_address=":0"
    )
    store = directory / "bench.zarr"
    ds = distumap.io.read_csv(matrix, store, metadata=metadata, overwrite=True)
    ds = distumap.pp.preprocess(ds)
    labels = np.asarray(ds["subclass_label"].values).astype(str)
    with dask.config.set(scheduler="threads"):
        features = distumap.pp.log2p1(ds).values
    sample = np.random.default_rng(0).choice(args.cells, min(2000, args.cells), replace=False)
    results["distumap"] = []
    for landmarks in args.landmarks:
        started = time.perf_counter()
        ds = distumap.tl.umap(
            ds, landmarks=landmarks, pca=args.pca, refine_epochs=args.refine_epochs
        )
        embed_seconds = time.perf_counter() - started
        record = ds.attrs["distumap"]["stages"]["embed"]
        transformed = args.cells - record["landmarks_used"]
        n_workers = len(client.scheduler_info()["workers"])
        results["distumap"].append(
            {
                "landmarks": record["landmarks_used"],
                "embed_seconds": round(embed_seconds, 1),
                "fit_seconds": record["fit_seconds"],
                "transform_seconds": record["transform_seconds"],
                "transformed_cells": transformed,
                "workers": n_workers,
                "transform_cells_per_s_per_worker": round(
                    transformed / max(record["transform_seconds"], 1e-9) / n_workers
                ),
                # the refinement over all cells (distumap.tl._refine; 0 epochs: none)
                "refine_epochs": record["params"].get("refine_epochs", 0),
                "refine_knn_seconds": record.get("refine_knn_seconds"),
                "refine_graph_seconds": record.get("refine_graph_seconds"),
                "refine_epochs_seconds": record.get("refine_epochs_seconds"),
                **_quality(features, ds["X_umap"].values, labels, sample),
            }
        )
        print(json.dumps(results["distumap"][-1]), flush=True)
    client.close()

    if not args.skip_full_fit:
        started = time.perf_counter()
        full = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999).fit_transform(features)
        results["umap_learn_full_fit"] = {
            "seconds": round(time.perf_counter() - started, 1),
            **_quality(features, full, labels, sample),
        }
        theirs = results["umap_learn_full_fit"]
        for ours in results["distumap"]:
            ours["vs_full_fit"] = {
                "speedup": round(theirs["seconds"] / ours["embed_seconds"], 2),
                "agreement_share": round(ours["label_agreement"] / theirs["label_agreement"], 4),
                "trustworthiness_gap": round(
                    theirs["trustworthiness"] - ours["trustworthiness"], 4
                ),
            }
    print(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
