"""Readers benchmark: ``distumap.io.read`` of every binary format against the plain way, same run.

    python benchmarks/inputs.py --data-dir /tmp/bench-inputs            # 100,000 x 20,000
    python benchmarks/inputs.py --cells 25000 --data-dir /tmp/bench-inputs --formats h5ad-csr

What runs, on files that ``distumap.testing`` writes from the same seeded counts (cached under
``--data-dir``, default ``benchmarks/data/``, which git ignores; 100,000 cells need ~4 GB):

- ``distumap``: ``distumap.io.read(file, store)`` end to end (open and check the file, names and
  metadata, store skeleton, one ``read-<format>-block`` task per chunk of ``chunk_cells`` cells:
  read, densify, compress, write, mark) on a running LocalCluster of ``--workers`` processes with
  one thread each, started and warmed up (imports, compiled kernels: one untimed read of a small
  file of every format) before the clock starts. The peak RSS of the client and of every worker
  is sampled from outside every 20 ms, and the CPU seconds of all of them are summed.
- the plain way, in a fresh process each (its peak RSS, sampled the same way, is its own; the
  imports are done before its clock starts): ``scanpy.read_10x_h5``, ``scanpy.read_10x_mtx`` and
  ``scipy.io.mmread``, ``anndata.read_h5ad``, ``anndata.read_zarr``, and ``loompy.connect`` with
  a full ``ds[:, :]`` read. They load the whole matrix into memory; distumap writes a compressed
  store with bounded memory.

The counts are the default ``SyntheticSpec`` with ``zero_genes`` chosen so that a cell has about
``--detected`` detected genes (10x-like sparsity). Every result is checked against the generator:
the total, and the per-cell and per-gene totals (so a permuted or shifted block fails too).

The page cache is warm (each file is read once before the runs that read it). MB/s is file bytes
over seconds; "ratio" is the plain way's seconds over distumap's (above 1: distumap is faster).
Results are printed as a Markdown table and, with ``--json``, written as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ingest import GIB, Sampler, machine, start_cluster  # noqa: E402  (the ingest benchmark's)

#: format -> (file name, distumap's format name)
FORMATS = {
    "10x-h5": ("filtered.h5", "10x-h5"),
    "mex-gz": ("mex_gz", "mex"),
    "mex": ("mex_plain", "mex"),
    "h5ad-csr": ("csr.h5ad", "h5ad"),
    "h5ad-csc": ("csc.h5ad", "h5ad"),
    "h5ad-dense": ("dense.h5ad", "h5ad"),
    "anndata-zarr": ("csr.zarr", "anndata-zarr"),
    "loom": ("cells.loom", "loom"),
}
#: format -> the plain ways that read it
PLAIN = {
    "10x-h5": ["scanpy.read_10x_h5"],
    "mex-gz": ["scanpy.read_10x_mtx", "scipy.io.mmread"],
    "mex": ["scipy.io.mmread"],
    "h5ad-csr": ["anndata.read_h5ad"],
    "h5ad-csc": ["anndata.read_h5ad"],
    "h5ad-dense": ["anndata.read_h5ad"],
    "anndata-zarr": ["anndata.read_zarr"],
    "loom": ["loompy"],
}


# ------------------------------------------------------------------ data


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _digest(values: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]


def spec_for(n_cells: int, n_genes: int, seed: int, detected: int):
    """The default spec with ``zero_genes`` set so that a cell has ~``detected`` genes above 0."""
    from distumap.testing import SyntheticSpec

    probe = SyntheticSpec(max(n_cells, 1), n_genes, seed=seed)
    sample = probe.counts(0, min(2_000, probe.n_cells))
    full = float((sample > 0).sum(axis=1).mean())
    zero_genes = round(n_genes * max(0.0, 1.0 - detected / full)) if detected else 0
    return SyntheticSpec(n_cells, n_genes, seed=seed, zero_genes=min(zero_genes, n_genes - 1))


def truth(spec, block_cells: int = 4096) -> dict:
    """Total, per-cell and per-gene totals (digests) and entries of the generator's counts."""
    cell_totals = np.zeros(spec.n_cells, dtype=np.int64)
    gene_totals = np.zeros(spec.n_genes, dtype=np.int64)
    nnz = 0
    for start in range(0, spec.n_cells, block_cells):
        block = spec.counts(start, min(start + block_cells, spec.n_cells))
        cell_totals[start : start + block.shape[0]] = block.sum(axis=1, dtype=np.int64)
        gene_totals += block.sum(axis=0, dtype=np.int64)
        nnz += int(np.count_nonzero(block))
    return {
        "sum": int(cell_totals.sum()),
        "cells": _digest(cell_totals),
        "genes": _digest(gene_totals),
        "nnz": nnz,
        "detected_per_cell": round(nnz / max(spec.n_cells, 1), 1),
    }


def write_format(name: str, path: Path, spec) -> None:
    from distumap import testing

    writers = {
        "10x-h5": lambda: testing.write_10x_h5(path, spec),
        "mex-gz": lambda: testing.write_mex(path, spec, gzip=True),
        "mex": lambda: testing.write_mex(path, spec, gzip=False),
        "h5ad-csr": lambda: testing.write_h5ad(path, spec, x="csr"),
        "h5ad-csc": lambda: testing.write_h5ad(path, spec, x="csc"),
        "h5ad-dense": lambda: testing.write_h5ad(path, spec, x="dense"),
        "anndata-zarr": lambda: testing.write_anndata_zarr(path, spec, x="csr"),
        "loom": lambda: write_loom_in_batches(path, spec),
    }
    writers[name]()


def write_loom_in_batches(path: Path, spec, batch_cells: int = 8192) -> None:
    """What ``distumap.testing.write_loom`` writes, with ``loompy.new`` and ``add_columns`` of
    dense batches: ``write_loom`` hands loompy one sparse matrix, which loompy densifies whole
    (100,000 x 20,000 went past 20 GB)."""
    import loompy

    from distumap.testing import synthetic_gene_ids

    metadata = spec.metadata()
    row_attrs = {"Gene": spec.gene_names(), "Accession": synthetic_gene_ids(spec.n_genes)}
    with loompy.new(str(path)) as ds:
        for start in range(0, spec.n_cells, batch_cells):
            stop = min(start + batch_cells, spec.n_cells)
            rows = metadata.iloc[start:stop]
            col_attrs = {
                "CellID": rows["sample_name"].astype(str).to_numpy(),
                "class_label": rows["class_label"].astype(str).to_numpy(),
                "subclass_label": rows["subclass_label"].astype(str).to_numpy(),
                "subclass_color": rows["subclass_color"].astype(str).to_numpy(),
                "size_factor": rows["size_factor"].to_numpy(np.float32),
            }
            block = np.ascontiguousarray(spec.counts(start, stop).T)
            ds.add_columns({"": block}, col_attrs=col_attrs, row_attrs=row_attrs)


def dataset(directory: Path, name: str, spec) -> tuple[Path, dict]:
    """The cached file of format ``name`` for ``spec`` (written if missing) and its truth."""
    folder = directory / f"inputs-{spec.n_cells}x{spec.n_genes}-z{spec.zero_genes}-s{spec.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    sidecar = folder / "truth.json"
    if sidecar.exists():
        known = json.loads(sidecar.read_text())
    else:
        started = time.perf_counter()
        known = truth(spec)
        sidecar.write_text(json.dumps(known))
        print(f"truth of {folder.name} in {time.perf_counter() - started:.0f} s", flush=True)
    path = folder / FORMATS[name][0]
    done = path.with_name(path.name + ".done")
    if not done.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_format(name, path, spec)
        done.write_text(f"{time.perf_counter() - started:.1f} s\n")
        print(
            f"wrote {path} ({_size(path) / 1e6:.0f} MB) in {done.read_text().strip()}", flush=True
        )
    return path, known


def warm_page_cache(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass


# ------------------------------------------------------------------ distumap


def _store_totals(store: Path) -> dict:
    import dask
    import xarray as xr

    ds = xr.open_zarr(store)
    counts = ds["counts"].data.astype(np.int64)
    with dask.config.set(scheduler="threads"):
        cells, genes = dask.compute(counts.sum(axis=1), counts.sum(axis=0))
    return {
        "sum": int(cells.sum()),
        "cells": _digest(cells),
        "genes": _digest(genes),
        "dtype": str(ds["counts"].dtype),
    }


def run_distumap(path: Path, name: str, store: Path, client, pids: dict, chunk_cells: int) -> dict:
    from dask.utils import key_split
    from distributed import get_task_stream

    import distumap.io

    shutil.rmtree(store, ignore_errors=True)
    processes = {"client": os.getpid()}
    processes.update({f"worker-{i}": pid for i, pid in enumerate(pids.values())})
    sampler = Sampler(processes).start()
    started = time.perf_counter()
    with get_task_stream(client) as stream, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the readers' one-line notes
        distumap.io.read(path, store, chunk_cells=chunk_cells, format=FORMATS[name][1])
    seconds = time.perf_counter() - started
    usage = sampler.stop()
    phases: dict[str, float] = {}
    for task in stream.data:
        prefix = key_split(task["key"])
        if not prefix.startswith(("read", "index", "transpose")):
            continue  # the benchmark's own checks
        for part in task["startstops"]:
            if part["action"] == "compute":
                phases[prefix] = phases.get(prefix, 0.0) + part["stop"] - part["start"]
    totals = _store_totals(store)
    shutil.rmtree(store, ignore_errors=True)
    cpu = usage.pop("cpu_seconds")
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(sum(cpu.values()), 2),
        "cpu_seconds_by_process": cpu,
        "task_seconds": {k: round(v, 2) for k, v in sorted(phases.items())},
        "totals": totals,
        **usage,
    }


def warm_up(client, directory: Path, store: Path, chunk_cells: int, pids: dict) -> None:
    """One untimed read of a small file of every format: imports and compiled kernels."""
    from distumap.testing import SyntheticSpec

    spec = SyntheticSpec(600, 300, seed=1)
    for name in FORMATS:
        path, _ = dataset(directory, name, spec)
        run_distumap(path, name, store, client, pids, min(chunk_cells, 256))


# ------------------------------------------------------------------ the plain way (a child each)


def _sparse_totals(matrix, cells_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell and per-gene totals in int64 of a scipy sparse matrix, in pieces (no big copy)."""
    import scipy.sparse as sp

    if sp.isspmatrix_coo(matrix) or getattr(matrix, "format", "") == "coo":
        matrix = matrix.tocsr() if cells_axis == 0 else matrix.tocsc()
    major_is_cells = (matrix.format == "csr") == (cells_axis == 0)
    n_major = matrix.shape[0] if matrix.format == "csr" else matrix.shape[1]
    n_minor = matrix.shape[1] if matrix.format == "csr" else matrix.shape[0]
    major = np.zeros(n_major, dtype=np.int64)
    minor = np.zeros(n_minor, dtype=np.int64)
    indptr = matrix.indptr
    step = max(1, n_major // 64)
    for a in range(0, n_major, step):
        b = min(a + step, n_major)
        lo, hi = int(indptr[a]), int(indptr[b])
        values = np.rint(matrix.data[lo:hi]).astype(np.int64)
        minor += np.bincount(matrix.indices[lo:hi], weights=values, minlength=n_minor).astype(
            np.int64
        )
        rows = np.repeat(np.arange(a, b), np.diff(indptr[a : b + 1]))
        major += np.bincount(rows, weights=values, minlength=n_major).astype(np.int64)
    return (major, minor) if major_is_cells else (minor, major)


def _dense_totals(matrix: np.ndarray, cells_axis: int) -> tuple[np.ndarray, np.ndarray]:
    genes_axis = 1 - cells_axis
    return (
        matrix.sum(axis=genes_axis, dtype=np.int64),
        matrix.sum(axis=cells_axis, dtype=np.int64),
    )


def _child(method: str, path: str) -> dict:
    """Read ``path`` the plain way in this fresh process; totals check the result."""
    import psutil

    warnings.simplefilter("ignore")
    cells_axis = 0
    if method == "scanpy.read_10x_h5" or method == "scanpy.read_10x_mtx":
        import scanpy

        reader = scanpy.read_10x_h5 if method.endswith("h5") else scanpy.read_10x_mtx
        call = lambda: reader(path).X  # noqa: E731
    elif method == "scipy.io.mmread":
        import scipy.io

        matrix_file = next(p for p in Path(path).iterdir() if p.name.startswith("matrix.mtx"))
        call = lambda: scipy.io.mmread(str(matrix_file))  # noqa: E731
        cells_axis = 1
    elif method in ("anndata.read_h5ad", "anndata.read_zarr"):
        import anndata

        reader = anndata.read_h5ad if method.endswith("h5ad") else anndata.read_zarr
        call = lambda: reader(path).X  # noqa: E731
    elif method == "loompy":
        import loompy

        def call():
            with loompy.connect(path, "r", validate=False) as ds:
                return ds[:, :]

        cells_axis = 1
    else:
        raise ValueError(method)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    cpu_before = process.cpu_times()
    started = time.perf_counter()
    matrix = call()
    seconds = time.perf_counter() - started
    cpu_after = process.cpu_times()
    rss_after = process.memory_info().rss
    if isinstance(matrix, np.ndarray):
        cells, genes = _dense_totals(matrix, cells_axis)
    else:
        cells, genes = _sparse_totals(matrix, cells_axis)
    return {
        "seconds": seconds,
        "cpu_seconds": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
        "rss_before_read_gib": round(rss_before / GIB, 3),
        "rss_after_read_gib": round(rss_after / GIB, 3),
        "matrix": f"{type(matrix).__name__} {getattr(matrix, 'dtype', '')}",
        "totals": {"sum": int(cells.sum()), "cells": _digest(cells), "genes": _digest(genes)},
    }


def run_plain(method: str, path: Path, timeout: float, max_rss_gib: float) -> dict:
    command = [sys.executable, __file__, "--_child", method, str(path)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler({"process": child.pid}, limit=max_rss_gib * GIB).start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        sampler.stop()
        return {"error": f"gave up after {timeout:.0f} s"}
    usage = sampler.stop()
    if sampler.killed:
        return {"error": sampler.killed, "peak_rss_gib": usage["peak_rss_gib"]}
    if child.returncode:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage["peak_rss_gib"]["process"]
    result["load_average_1min"] = usage["load_average_1min"]
    return result


# ------------------------------------------------------------------ report


def _check(row: dict, known: dict) -> None:
    totals = row.get("totals")
    if totals is None:
        return
    wrong = [k for k in ("sum", "cells", "genes") if totals[k] != known[k]]
    if wrong:
        row["error"] = f"wrong result ({', '.join(wrong)} differ from the generator's)"


def _best(rows: list[dict]) -> dict | None:
    good = [row for row in rows if "error" not in row]
    return min(good, key=lambda row: row["seconds"]) if good else (rows[0] if rows else None)


def markdown(results: list[dict]) -> str:
    lines = [
        "| format | file MB | cells | distumap s (CPU s) | MB/s | cells/s | peak RSS GiB "
        "(workers; client) | plain way | plain s (CPU s) | plain peak RSS GiB | ratio |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for result in results:
        mine = _best(result["distumap"])
        mb = result["bytes"] / 1e6
        head = f"| {result['format']} | {mb:.0f} | {result['cells']:,} |"
        if mine is None or "error" in mine:
            first = f"{head} {mine['error'] if mine else 'not run'} | | | |"
            mine = None
        else:
            workers = [v for k, v in mine["peak_rss_gib"].items() if k.startswith("worker")]
            rss = f"{', '.join(f'{v:.2f}' for v in workers)}; {mine['peak_rss_gib']['client']:.2f}"
            first = (
                f"{head} {mine['seconds']:.2f} ({mine['cpu_seconds']:.1f}) | "
                f"{mb / mine['seconds']:.0f} | {result['cells'] / mine['seconds']:,.0f} | {rss} |"
            )
        plains = result["plain"] or {"-": []}
        for i, (method, rows) in enumerate(plains.items()):
            other = _best(rows)
            row = first if i == 0 else "| | | | | | | |"
            if other is None:
                lines.append(f"{row} {method} | not run | | |")
            elif "error" in other:
                lines.append(
                    f"{row} {method} | {other['error']} | {other.get('peak_rss_gib', '')} | |"
                )
            else:
                ratio = ""
                if mine is not None:
                    ratio = (
                        f"{other['seconds'] / mine['seconds']:.2f} "
                        f"(CPU {other['cpu_seconds'] / mine['cpu_seconds']:.2f})"
                    )
                lines.append(
                    f"{row} {method} | {other['seconds']:.2f} ({other['cpu_seconds']:.1f}) | "
                    f"{other['peak_rss_gib']:.2f} | {ratio} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--detected", type=int, default=1_000, help="genes above 0 per cell")
    parser.add_argument(
        "--dense-cells",
        type=int,
        default=20_000,
        help="cells of the dense h5ad (int32: 80 kB each)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GiB", help="per worker")
    parser.add_argument(
        "--chunk-cells", type=int, default=None, help="default: distumap's (distumap.chunk-cells)"
    )
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--no-plain", action="store_true", help="distumap only")
    parser.add_argument("--no-distumap", action="store_true", help="the plain ways only")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the best is shown")
    parser.add_argument("--timeout", type=float, default=900, help="per plain way, seconds")
    parser.add_argument(
        "--max-rss", type=float, default=14.0, help="GiB; a plain way above it is stopped"
    )
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--delete", action="store_true", help="delete the data files afterwards")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        print(json.dumps(_child(*args._child)))
        return
    from distumap import _config

    chunk_cells = int(_config.get("chunk-cells", args.chunk_cells))
    names = [name for name in args.formats.split(",") if name]
    unknown = set(names) - set(FORMATS)
    if unknown:
        parser.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
    spec = spec_for(args.cells, args.genes, args.seed, args.detected)
    dense_spec = spec_for(min(args.dense_cells, args.cells), args.genes, args.seed, args.detected)
    files = {}
    for name in names:
        files[name] = dataset(args.data_dir, name, dense_spec if name == "h5ad-dense" else spec)
    info = machine()
    for name in ("scanpy", "anndata", "loompy", "scipy", "h5py"):
        try:
            info["packages"][name] = version(name)
        except PackageNotFoundError:
            info["packages"][name] = None
    info["load_average"] = os.getloadavg()
    print(json.dumps(info), flush=True)

    results = []
    for name in names:
        path, known = files[name]
        n_cells = dense_spec.n_cells if name == "h5ad-dense" else spec.n_cells
        results.append(
            {
                "format": name,
                "path": str(path),
                "bytes": _size(path),
                "cells": n_cells,
                "genes": args.genes,
                "detected_per_cell": known["detected_per_cell"],
                "distumap": [],
                "plain": {method: [] for method in ([] if args.no_plain else PLAIN[name])},
            }
        )
    store = args.data_dir / "bench-inputs-store.zarr"
    if not args.no_distumap:
        cluster, client, pids = start_cluster(args.workers, args.memory_limit)
        try:
            warm_up(client, args.data_dir, store, chunk_cells, pids)
            for result in results:
                path, known = files[result["format"]]
                warm_page_cache(path)
                for _ in range(args.repeats):
                    row = run_distumap(path, result["format"], store, client, pids, chunk_cells)
                    _check(row, known)
                    print(json.dumps({"format": result["format"], **row}), flush=True)
                    result["distumap"].append(row)
        finally:
            client.close()
            cluster.close()
    for result in results:
        path, known = files[result["format"]]
        for method, rows in result["plain"].items():
            warm_page_cache(path)
            for _ in range(args.repeats):
                row = run_plain(method, path, args.timeout, args.max_rss)
                _check(row, known)
                print(json.dumps({"format": result["format"], "plain": method, **row}), flush=True)
                rows.append(row)

    print(
        f"\n{spec.n_cells:,} cells x {spec.n_genes:,} genes ({spec.zero_genes:,} all zero), "
        f"seed {spec.seed}; chunk_cells {chunk_cells}; {args.workers} workers x 1 thread; "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
    )
    print(markdown(results))
    if args.json:
        arguments = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("_")
        }
        args.json.write_text(
            json.dumps({"machine": info, "args": arguments, "results": results}, indent=1)
        )
    if args.delete:
        for path, _ in files.values():
            shutil.rmtree(path.parent, ignore_errors=True)
    errors = [
        row["error"]
        for result in results
        for row in [*result["distumap"], *(r for rows in result["plain"].values() for r in rows)]
        if "error" in row and row["error"].startswith("wrong result")
    ]
    if errors:
        raise SystemExit(f"{len(errors)} wrong results")


if __name__ == "__main__":
    main()
