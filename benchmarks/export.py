"""Export benchmark: distumap's block-wise AnnData and loom writers against writing from memory.

Builds (once, under ``benchmarks/data/``) a finished store with the real pipeline from a seeded
synthetic CSV, with ``max_zero_fraction`` chosen so that about ``--selected`` genes are kept.
Then every method runs in a fresh process, so that its peak resident memory is its own:

- ``distumap-h5ad``, ``distumap-zarr``, ``distumap-loom``: ``distumap.io.write_h5ad``,
  ``write_anndata_zarr`` and ``write_loom`` on the store (dask's threaded scheduler, or
  ``--workers N`` processes of a LocalCluster);
- ``anndata-h5ad``, ``anndata-h5ad-gzip``, ``anndata-zarr``: the whole selected matrix loaded
  into a ``csr_matrix`` (and its log2p1 layer), then ``anndata.AnnData(...).write_h5ad`` /
  ``write_zarr``;
- ``loompy``: the same matrices loaded, then ``loompy.create``.

Throughput is the CSR payload (X and the layer: data and indices, 16 bytes per nonzero, plus
the two indptr) over the seconds; the in-memory methods report the load and the write apart.

    python benchmarks/export.py --cells 20000 --genes 20000 --selected 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
METHODS = (
    "distumap-h5ad",
    "distumap-zarr",
    "distumap-loom",
    "anndata-h5ad",
    "anndata-h5ad-gzip",
    "anndata-zarr",
    "loompy",
)


class PeakRSS:
    """Peak resident memory of this process (and of any worker processes) while it runs,
    sampled every 10 ms: ru_maxrss would report the imports' peak, not the export's."""

    def __init__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRSS:
        self.before = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def build_store(cells: int, genes: int, selected: int, seed: int) -> Path:
    """The finished store (ingest, preprocess, embed), reused when already there."""
    import dask

    import distumap
    from distumap.testing import SyntheticSpec, write_dataset

    directory = DATA / f"export-{cells}x{genes}-{selected}-s{seed}"
    store = directory / "store.zarr"
    done = directory / "done"
    if done.exists():
        return store
    shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    matrix, metadata = write_dataset(directory / "input", SyntheticSpec(cells, genes, seed=seed))
    with dask.config.set(scheduler="threads"):
        ds = distumap.io.read_csv(matrix, store, metadata=metadata, chunk_cells=2_000)
        zero_fraction = distumap.pp.zero_fraction(ds).values
        # the fraction that keeps about `selected` genes (the selection is strict: <)
        cut = float(np.sort(zero_fraction)[min(selected, genes - 1)])
        ds = distumap.pp.preprocess(ds, max_zero_fraction=cut)
        distumap.tl.umap(ds, landmarks=2_000, pca=20)
    os.remove(matrix)  # the CSV served the ingest; the store is what the benchmark reads
    done.write_text(f"{time.perf_counter() - started:.1f} s\n")
    return store


def _load(ds):
    """The selected genes as an in-memory CSR matrix and its log2p1 layer (what a user of
    anndata or loompy has to hold before writing)."""
    from scipy import sparse

    from distumap.pp._preprocess import log2p1_values

    counts = ds["counts"].values[:, ds["selected"].values]
    X = sparse.csr_matrix(counts)
    layer = X.copy()
    layer.data = log2p1_values(layer.data)
    layer = layer.astype(np.float32)
    return X, layer


def run_one(method: str, store: Path, out: Path, workers: int) -> dict:
    """One method in this process; returns its numbers."""
    import dask

    import distumap
    from distumap.io.writers import write_anndata_zarr, write_h5ad

    warnings.simplefilter("ignore")  # anndata's zarr-v2 notice, loompy's deprecations
    client = None
    if workers:
        from distumap.cluster import connect

        client = connect(n_workers=workers, memory_limit="4GiB", dashboard_address=":0", quiet=True)
    ds = distumap.io.open_store(store, require="embed")
    selected = ds["selected"].values
    n_cells = ds.sizes["cell"]
    with dask.config.set(scheduler="threads" if client is None else "dask.distributed"):
        nnz = int(
            (ds["counts"].data[:, np.flatnonzero(selected)] != 0).sum().compute(scheduler="threads")
        )
    memory = PeakRSS().__enter__()
    target = (
        out
        / {"h5ad": "x.h5ad", "zarr": "x.zarr", "loom": "x.loom", "loompy": "x.loom"}[
            method.split("-")[1] if method != "loompy" else "loompy"
        ]
    )
    load_seconds = 0.0
    started = time.perf_counter()
    if method.startswith("distumap-"):
        writer = {
            "distumap-h5ad": write_h5ad,
            "distumap-zarr": write_anndata_zarr,
            "distumap-loom": distumap.io.write_loom,
        }[method]
        with dask.config.set(scheduler="threads" if client is None else "dask.distributed"):
            writer(ds, target, client=client)
    else:
        import anndata
        import pandas as pd

        X, layer = _load(ds)
        obs = pd.DataFrame(
            {name: ds.coords[name].values for name in ("class_label", "subclass_label")},
            index=ds["cell"].values,
        )
        obs["landmark"] = ds["landmark"].values
        var = pd.DataFrame(
            {"zero_fraction": ds["zero_fraction"].values[selected]},
            index=ds["gene"].values[selected],
        )
        umap = ds["X_umap"].values
        load_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if method == "loompy":
            import loompy

            loompy.create(
                str(target),
                {"": X.T.tocsr(), "log2p1": layer.T.tocsr()},
                {"Gene": var.index.to_numpy(), "ZeroFraction": var["zero_fraction"].to_numpy()},
                {"CellID": obs.index.to_numpy(), "X_umap": umap},
            )
        else:
            adata = anndata.AnnData(
                X=X, obs=obs, var=var, obsm={"X_umap": umap}, layers={"log2p1": layer}
            )
            if method == "anndata-h5ad":
                adata.write_h5ad(target)
            elif method == "anndata-h5ad-gzip":
                adata.write_h5ad(target, compression="gzip")
            else:
                adata.write_zarr(target)
    seconds = time.perf_counter() - started
    memory.__exit__()
    payload = 16 * nnz + 2 * 8 * (n_cells + 1)
    result = {
        "method": method,
        "workers": workers or "threads",
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "payload_mb": round(payload / 1e6, 1),
        "mb_per_s": round(payload / 1e6 / seconds, 1),
        "mb_per_s_with_load": round(payload / 1e6 / (seconds + load_seconds), 1),
        "file_mb": round(_size(target) / 1e6, 1),
        "rss_before_mb": round(memory.before / 1e6),
        "peak_rss_over_before_mb": round((memory.peak - memory.before) / 1e6),
    }
    if client is not None:
        from distumap.cluster import close

        close(client)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--selected", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="LocalCluster workers (0: threads)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, Path(args.store), Path(args.out), args.workers)))
        return
    store = build_store(args.cells, args.genes, args.selected, args.seed)
    import xarray as xr

    ds = xr.open_zarr(store)
    shape = (ds.sizes["cell"], int(ds["selected"].sum()))
    print(f"store {store}: {ds.sizes['cell']} cells x {ds.sizes['gene']} genes, {shape[1]} kept")
    results = []
    for method in args.methods.split(","):
        out = DATA / "export-out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        command = [sys.executable, __file__, "--run", method, "--store", str(store)]
        command += ["--out", str(out), "--workers", str(args.workers)]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(line.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    shutil.rmtree(DATA / "export-out", ignore_errors=True)
    report = {
        "shape": shape,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }
    name = f"export-{args.cells}x{args.genes}-{args.workers or 'threads'}.json"
    (Path(__file__).parent / name).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
