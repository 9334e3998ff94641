"""Ingest benchmark: distumap.io.read_csv against general CSV readers on the same files, same run.

    python benchmarks/ingest.py --cells 20000 --genes 50281 --workers 2
    python benchmarks/ingest.py --small                  # a quick run on small files

What runs, on files of the tutorial's layout written by ``distumap.testing`` (cached under
``benchmarks/data/``, which git ignores):

- ``distumap``: ``read_csv`` end to end (line index, store skeleton, parse, compress, write) on a
  running LocalCluster of ``--workers`` processes with one thread each, started and warmed up
  (imports, compiled kernel) before the clock starts. Peak RSS of the client and of every worker
  is sampled during the run, and the CPU seconds of all of them are summed.
- ``distumap-cli``: ``distumap ingest FILE STORE --scheduler ADDRESS`` onto that cluster, the
  command as a user runs it, timed from its start to its exit (the main file).
- ``kernel``: the bare parse kernel on one store chunk's bytes already in memory, into a buffer
  already allocated: the floor, per core.
- ``pyarrow`` (``pyarrow.csv.read_csv`` at its default block size; ``pyarrow-64mib`` at 64 MiB)
  and ``datatable`` (``fread``) on the ``--mid-cells`` file,
  ``pandas`` (``read_csv``) and ``dask`` (``dask.dataframe.read_csv``, threads) on the
  ``--small-cells`` file: general readers collapse at 50,000 columns, so they get smaller files.
  Each runs in a fresh process (its peak RSS is its own) and must reproduce the matrix's sum.
  distumap runs on those files too, so every ratio compares the same file.

The page cache is warm (the files were just written or read); the figures are read throughput.
Results are printed as a Markdown table and, with ``--json``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GIB = 2**30

# ------------------------------------------------------------------ data


def data_file(directory: Path, n_cells: int, n_genes: int, seed: int) -> tuple[Path, int]:
    """The cached CSV of this shape and seed (written if missing or stale) and its counts' sum.

    A JSON file beside the CSV holds the sum and a probe of the generator (the first cells'
    counts), so a file written by an older ``distumap.testing`` is noticed and written again.
    """
    from distumap.testing import SyntheticSpec, write_matrix_csv

    spec = SyntheticSpec(n_cells, n_genes, seed=seed)
    path = directory / f"matrix-{n_cells}x{n_genes}-s{seed}.csv"
    sidecar = path.with_suffix(".json")
    probe = int(spec.counts(0, min(4, n_cells)).sum(dtype=np.int64))
    if path.exists() and sidecar.exists():
        known = json.loads(sidecar.read_text())
        if known.get("probe") == probe and known.get("bytes") == path.stat().st_size:
            return path, int(known["sum"])
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    partial = path.with_suffix(".partial")
    write_matrix_csv(partial, spec, block_cells=512)
    partial.rename(path)
    seconds = time.perf_counter() - started
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {seconds:.0f} s", flush=True)
    total = sum(
        int(spec.counts(a, min(a + 512, n_cells)).sum(dtype=np.int64))
        for a in range(0, n_cells, 512)
    )
    sidecar.write_text(json.dumps({"sum": total, "probe": probe, "bytes": path.stat().st_size}))
    return path, total


# ------------------------------------------------------------------ machine


def machine() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in [
        "distumap",
        "dask",
        "distributed",
        "zarr",
        "numcodecs",
        "numba",
        "numpy",
        "pandas",
        "pyarrow",
        "datatable",
        "xarray",
    ]:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": packages,
    }


# ------------------------------------------------------------------ resource sampling


class Sampler:
    """Peak RSS of some processes, sampled every ``interval`` seconds in a thread, and the CPU
    seconds they used between ``start`` and ``stop``."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02, limit: float | None = None):
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.interval = interval
        self.limit = limit  # bytes: a process above it is killed (the machine is shared)
        self.killed: str | None = None
        self._last_cpu: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> dict[str, float]:
        for name, proc in self.processes.items():
            try:
                times = proc.cpu_times()
                self._last_cpu[name] = times.user + times.system
            except Exception:  # a process that went away keeps its last reading
                pass
        return dict(self._last_cpu)

    def _sample(self) -> None:
        for name, proc in self.processes.items():
            try:
                rss = proc.memory_info().rss
            except Exception:  # a process that went away
                continue
            self.peak[name] = max(self.peak[name], rss)
            if self.limit is not None and rss > self.limit and self.killed is None:
                self.killed = f"killed at {rss / GIB:.1f} GiB RSS (limit {self.limit / GIB:.1f})"
                proc.kill()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> Sampler:
        self._cpu0 = self._cpu()
        self._load0 = os.getloadavg()[0]
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        cpu1 = self._cpu()
        return {
            "peak_rss_gib": {k: round(v / GIB, 3) for k, v in self.peak.items()},
            "cpu_seconds": {k: round(cpu1[k] - self._cpu0[k], 2) for k in cpu1},
            "load_average_1min": [round(self._load0, 2), round(os.getloadavg()[0], 2)],
        }


# ------------------------------------------------------------------ distumap


def start_cluster(n_workers: int, memory_limit: str):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
    )
    client = Client(cluster)

    def warm_up():
        # imports and the compiled kernel, so that the clock measures the ingest
        import numpy as np

        from distumap.io import _ingest  # noqa: F401
        from distumap.io.readers import _csv_kernels as _csv

        _csv.parse_block(np.frombuffer(b"a,1\n", np.uint8), np.array([0]), 1)
        return os.getpid()

    pids = client.run(warm_up)
    return cluster, client, pids


def run_distumap(path: Path, store: Path, client, pids: dict, chunk_cells: int, label: str):
    import dask
    from distributed import get_task_stream

    import distumap.io

    shutil.rmtree(store, ignore_errors=True)
    processes = {"client": os.getpid()}
    processes.update({f"worker-{i}": pid for i, pid in enumerate(pids.values())})
    sampler = Sampler(processes).start()
    started = time.perf_counter()
    with get_task_stream(client) as stream:
        ds = distumap.io.read_csv(path, store, chunk_cells=chunk_cells)
    seconds = time.perf_counter() - started
    usage = sampler.stop()
    phases: dict[str, float] = {}
    for task in stream.data:
        prefix = "-".join(str(task["key"]).split("-")[:3])
        for part in task["startstops"]:
            if part["action"] == "compute":
                phases[prefix] = phases.get(prefix, 0.0) + part["stop"] - part["start"]
    with dask.config.set(scheduler="threads"):
        total = int(ds["counts"].sum(dtype=np.int64).compute())
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    size = path.stat().st_size
    shutil.rmtree(store, ignore_errors=True)
    cpu_total = sum(usage["cpu_seconds"].values())
    usage["cpu_seconds_by_process"] = usage.pop("cpu_seconds")
    return {
        **_throughput("distumap", label, size, seconds),
        "mb_per_cpu_s": round(size / cpu_total / 1e6, 1),
        "cpu_seconds": round(cpu_total, 2),
        "task_seconds": {k: round(v, 2) for k, v in sorted(phases.items())},
        "store_gb": round(store_bytes / 1e9, 3),
        "sum": total,
        **usage,
    }


def run_cli(path: Path, store: Path, address: str, label: str) -> dict:
    """``distumap ingest PATH STORE --scheduler ADDRESS`` as a user types it: the wall time of the
    whole command (interpreter start, imports, connect, ingest, the store's checks) on the running
    cluster."""
    shutil.rmtree(store, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("distumap")), "ingest", str(path), str(store)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--scheduler", address, "--no-progress"], capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    shutil.rmtree(store, ignore_errors=True)
    if done.returncode != 0:
        return {"reader": "distumap-cli", "file": label, "error": done.stderr.strip()[-500:]}
    return _throughput("distumap-cli", label, path.stat().st_size, seconds)


def _throughput(reader: str, label: str, size: int, seconds: float) -> dict:
    """The fields every distumap row starts with: what was read, how long it took, how fast."""
    return {
        "reader": reader,
        "file": label,
        "bytes": size,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / seconds / 1e6, 1),
    }


# ------------------------------------------------------------------ the floor


def kernel_floor(path: Path, chunk_cells: int, repeats: int = 5) -> dict:
    """The parse kernel alone on one chunk's bytes in memory, into a warm buffer (one core)."""
    from distumap import _paths
    from distumap.io.readers import _csv_kernels as _csv
    from distumap.io.readers import csv as csv_reader

    genes, data_start, dialect = csv_reader.read_header(str(path))
    size = path.stat().st_size
    end = min(size, data_start + (1 << 30))
    index = csv_reader._index_task(str(path), data_start, end, size, dialect.sep)
    starts = index.starts[: chunk_cells + 1]
    end = int(starts[-1]) if len(starts) > chunk_cells else size
    starts = starts[:chunk_cells]
    buf = np.frombuffer(bytes(_paths.read_range(str(path), int(starts[0]), end)), np.uint8)
    relative = starts - starts[0]
    out = np.zeros((len(relative), len(genes)), dtype=np.int32)
    _csv.parse_block(buf, relative, len(genes), out=out)  # compile and fault the pages in
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        _, status, _ = _csv.parse_block(buf, relative, len(genes), out=out)
        best = min(best, time.process_time() - started)
        assert status == _csv.OK
    return {
        "reader": "kernel",
        "file": "main (one chunk in memory)",
        "bytes": int(buf.size),
        "seconds": round(best, 4),
        "mb_per_s": round(buf.size / best / 1e6, 1),
        "note": "one core, CPU time, best of 5",
    }


def phase_costs(path: Path, chunk_cells: int) -> dict:
    """CPU seconds per GB of CSV of each step of a parse task, on this process (one core)."""
    import zarr

    from distumap import _paths
    from distumap.io import _ingest_store
    from distumap.io.readers import _csv_kernels as _csv
    from distumap.io.readers import csv as csv_reader

    genes, data_start, dialect = csv_reader.read_header(str(path))
    size = path.stat().st_size
    cpu = time.process_time
    started = cpu()
    end = min(size, data_start + (1 << 30))
    index = csv_reader._index_task(str(path), data_start, end, size, dialect.sep)
    index_span = min(size, data_start + (1 << 30)) - data_start
    index_cost = (cpu() - started) / index_span * 1e9
    starts = index.starts[: chunk_cells + 1]
    out = np.empty((chunk_cells, len(genes)), dtype=np.int32)
    _csv.parse_block(np.frombuffer(b"a,1\n", np.uint8), np.array([0]), 1)
    tmp = HERE / "data" / "phase-costs.zarr"
    stored = _ingest_store.stored_dtype("int32")  # what the ingest stores when counts fit
    array = zarr.create_array(
        str(tmp),
        shape=out.shape,
        chunks=out.shape,
        dtype=stored,
        compressors=[_ingest_store.counts_codec(stored)],
        overwrite=True,
        config={"write_empty_chunks": True},
    )
    costs = {"view": 0.0, "parse": 0.0, "narrow+nonzero": 0.0, "compress+write": 0.0}
    for _ in range(3):
        t0 = cpu()
        view, offset = _paths.view_range(str(path), int(starts[0]), int(starts[-1]))
        buf = np.frombuffer(view, np.uint8)
        t1 = cpu()
        _, status, _ = _csv.parse_block(buf, starts[:-1] - offset, len(genes), out=out)
        t2 = cpu()
        narrow, _ = _ingest_store.narrowed(out, stored, 0)
        t3 = cpu()
        array[:] = narrow
        t4 = cpu()
        assert status == _csv.OK
        costs["view"] += t1 - t0
        costs["parse"] += t2 - t1
        costs["narrow+nonzero"] += t3 - t2
        costs["compress+write"] += t4 - t3
        del buf, view
    shutil.rmtree(tmp, ignore_errors=True)
    nbytes = 3 * int(starts[-1] - starts[0])
    return {
        "index": round(index_cost, 3),
        **{k: round(v / nbytes * 1e9, 3) for k, v in costs.items()},
    }


# ------------------------------------------------------------------ other readers (a child each)


def _child(reader: str, path: str, workers: int) -> dict:
    """Read ``path`` with ``reader`` in this (fresh) process; the matrix sum checks the result."""
    if reader in ("pyarrow", "pyarrow-64mib"):
        import pyarrow.csv as pacsv

        # pyarrow's default block (1 MB) holds only a few rows of a 50,000-column file; 64 MiB
        # is its best setting on these files (its documented knob for wide rows)
        options = pacsv.ReadOptions(block_size=64 * 2**20) if reader == "pyarrow-64mib" else None
        started = time.perf_counter()
        table = pacsv.read_csv(path, read_options=options)
        seconds = time.perf_counter() - started
        total = sum(
            int(np.asarray(table.column(i)).sum(dtype=np.int64))
            for i in range(1, table.num_columns)
        )
    elif reader == "datatable":
        import datatable

        datatable.options.nthreads = workers
        started = time.perf_counter()
        frame = datatable.fread(path)
        seconds = time.perf_counter() - started
        total = int(frame[:, 1:].to_numpy().sum(dtype=np.int64))
    elif reader == "pandas":
        import pandas as pd

        started = time.perf_counter()
        frame = pd.read_csv(path, index_col=0)
        seconds = time.perf_counter() - started
        total = int(frame.to_numpy().sum(dtype=np.int64))
    elif reader == "dask":
        import dask
        import dask.dataframe as dd

        started = time.perf_counter()
        # dask's default 256 kB sample cannot hold a header of 50,000 genes and a few lines
        frame = dd.read_csv(path, sample=32 * 2**20, blocksize=64 * 2**20)
        with dask.config.set(scheduler="threads", num_workers=workers):
            frame = frame.compute()
        seconds = time.perf_counter() - started
        total = int(frame.drop(columns="sample_name").to_numpy().sum(dtype=np.int64))
    else:
        raise ValueError(reader)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "sum": total, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def run_child(
    reader: str, path: Path, label: str, workers: int, timeout: float, max_rss_gib: float
) -> dict:
    size = path.stat().st_size
    row = {"reader": reader, "file": label, "bytes": size}
    command = [sys.executable, __file__, "--_child", reader, str(path), "--workers", str(workers)]
    # RSS is sampled from here: a child's own ru_maxrss starts at its parent's (fork and exec)
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler({"process": child.pid}, limit=max_rss_gib * GIB).start()
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        sampler.stop()
        return {**row, "error": f"gave up after {timeout:.0f} s"}
    usage = sampler.stop()
    if sampler.killed:
        seconds = time.perf_counter() - started
        return {
            **row,
            "error": f"{sampler.killed} after {seconds:.0f} s",
            "peak_rss_gib": usage["peak_rss_gib"],
        }
    if child.returncode:
        return {**row, "error": (stderr.strip().splitlines() or ["?"])[-1][:200]}
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        **row,
        "seconds": round(result["seconds"], 3),
        "mb_per_s": round(size / result["seconds"] / 1e6, 1),
        "sum": result["sum"],
        "peak_rss_gib": usage["peak_rss_gib"],
        "cpu_seconds": round(result["cpu_seconds"], 2),
        "load_average_1min": usage["load_average_1min"],
    }


# ------------------------------------------------------------------ report


def markdown(rows: list[dict], reference: dict[str, float]) -> str:
    lines = [
        "| reader | file | MB | seconds | MB/s | vs distumap | CPU s | peak RSS (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['reader']} | {row['file']} | {row['bytes'] / 1e6:.0f} | "
                f"{row['error']} | | | | |"
            )
            continue
        ref = reference.get(row["file"])
        ratio = (
            f"{ref / row['mb_per_s']:.1f}x slower" if ref and row["reader"] != "distumap" else ""
        )
        if row["reader"] == "kernel":
            ratio = f"{row['mb_per_s'] / reference.get('main', 1):.1f}x distumap (1 core)"
        rss = row.get("peak_rss_gib", {})
        rss_text = ", ".join(f"{k} {v:.2f}" for k, v in rss.items())
        lines.append(
            f"| {row['reader']} | {row['file']} | {row['bytes'] / 1e6:.0f} | {row['seconds']} | "
            f"{row['mb_per_s']:.0f} | {ratio} | {row.get('cpu_seconds', '')} | {rss_text} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=50_281)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="4GiB", help="per worker")
    parser.add_argument(
        "--chunk-cells", type=int, default=None, help="default: distumap's (distumap.chunk-cells)"
    )
    parser.add_argument("--mid-cells", type=int, default=2_000, help="file for pyarrow, datatable")
    parser.add_argument("--small-cells", type=int, default=1_000, help="file for pandas, dask")
    parser.add_argument(
        "--small", action="store_true", help="quick run: 2,000 x 5,000, mid 1,000, small 300"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument(
        "--readers",
        default="distumap,distumap-cli,kernel,pyarrow,pyarrow-64mib,datatable,pandas,dask",
    )
    parser.add_argument("--repeats", type=int, default=1, help="distumap runs on the main file")
    parser.add_argument("--timeout", type=float, default=600, help="per other reader, seconds")
    parser.add_argument(
        "--max-rss", type=float, default=6.0, help="GiB; another reader above it is stopped"
    )
    parser.add_argument("--delete", action="store_true", help="delete the main file afterwards")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._child:
        print(json.dumps(_child(args._child[0], args._child[1], args.workers)))
        return
    if args.small:
        args.cells, args.genes, args.mid_cells, args.small_cells = 2_000, 5_000, 1_000, 300
    from distumap import _config

    chunk_cells = int(_config.get("chunk-cells", args.chunk_cells))
    readers = set(args.readers.split(","))
    shapes = {"main": args.cells}
    if readers & {"pyarrow", "pyarrow-64mib", "datatable"}:
        shapes["mid"] = args.mid_cells
    if readers & {"pandas", "dask"}:
        shapes["small"] = args.small_cells
    files, sums = {}, {}
    for label, n_cells in shapes.items():
        path, sums[label] = data_file(args.data_dir, n_cells, args.genes, args.seed)
        files[label] = (n_cells, path)
    info = machine()
    print(json.dumps(info), flush=True)

    rows: list[dict] = []
    reference: dict[str, float] = {}
    store = args.data_dir / "bench-store.zarr"
    if "distumap" in readers:
        cluster, client, pids = start_cluster(args.workers, args.memory_limit)
        try:
            # one untimed ingest: the first read_csv in a process pays for lazy imports
            smallest = min(files.values())[1]
            run_distumap(smallest, store, client, pids, chunk_cells, "warm-up")
            for label, (_, path) in files.items():
                for _ in range(args.repeats if label == "main" else 1):
                    row = run_distumap(path, store, client, pids, chunk_cells, label)
                    assert row["sum"] == sums[label], (row["sum"], sums[label])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    reference[label] = max(reference.get(label, 0), row["mb_per_s"])
            if "distumap-cli" in readers:
                for _ in range(args.repeats):
                    row = run_cli(files["main"][1], store, cluster.scheduler_address, "main")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            client.close()
            cluster.close()
    if "kernel" in readers:
        rows.append(kernel_floor(files["main"][1], chunk_cells))
        print(json.dumps(rows[-1]), flush=True)
        phases = phase_costs(files["main"][1], chunk_cells)
        print("CPU seconds per GB of CSV, one core:", json.dumps(phases), flush=True)
        info["phase_cpu_s_per_gb"] = phases
    for reader, label in [
        ("pyarrow", "mid"),
        ("pyarrow-64mib", "mid"),
        ("datatable", "mid"),
        ("pandas", "small"),
        ("dask", "small"),
    ]:
        if reader in readers:
            row = run_child(
                reader, files[label][1], label, args.workers, args.timeout, args.max_rss
            )
            if "sum" in row and row["sum"] != sums[label]:
                row["error"] = f"wrong sum {row['sum']} != {sums[label]}"
            print(json.dumps(row), flush=True)
            rows.append(row)

    shapes = ", ".join(f"{label}: {n:,} x {args.genes:,}" for label, (n, _) in files.items())
    print(f"\nfiles: {shapes}; chunk_cells {chunk_cells}; workers {args.workers}\n")
    print(markdown(rows, reference))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "rows": rows,
                    "args": {
                        k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()
                        if not k.startswith("_")
                    },
                },
                indent=1,
            )
        )
    if args.delete:
        files["main"][1].unlink()


if __name__ == "__main__":
    main()
