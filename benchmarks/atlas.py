"""Atlas scale: ``distumap run`` on a synthetic 10x atlas of N cells, end to end, on this machine.

The atlas (cached under ``--data``) is a 10x Cell Ranger v3 HDF5 file written block by block by
``distumap.testing.write_10x_h5``: N cells x 20,000 genes at droplet depth (about 1,300 detected
genes per cell), 30 labelled populations of geometric sizes (the smallest holds 0.1% of the
cells), with a metadata CSV. For each N the script runs, in a fresh process::

    distumap run atlas-N.h5 --metadata atlas-N-metadata.csv --out OUT --n-workers 2 \\
        --memory-limit 3GiB --color subclass_label

and records the wall time, every stage's seconds (from the store's stage records), the peak
resident memory of the whole process tree and of each process in it (sampled every 100 ms),
the disk use of the store and each export, and the quality: kNN-label agreement (the share of a
cell's 15 nearest embedding neighbours with its own subclass label) on a fixed 20,000-cell
sample. With ``--scanpy`` (the default up to 100,000 cells) scanpy's in-memory route runs in the
same invocation on the same file: ``read_10x_h5``, the same gene filter, ``log1p`` (base 2),
PCA (50), ``neighbors`` (30), ``umap`` (min_dist 0.25, seed 999).

    python benchmarks/atlas.py --cells 100000 300000 1000000
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
GIB = 2**30
N_GENES = 20_000
SAMPLE = 20_000


def spec(n_cells: int):
    from distumap.testing import SyntheticSpec

    return SyntheticSpec(
        n_cells, N_GENES, seed=0, n_subclasses=30, smallest_fraction=0.001, depth=0.3
    )


def atlas(directory: Path, n_cells: int) -> tuple[Path, Path]:
    """The cached atlas file and its metadata CSV, written if missing (memory flat in N)."""
    from distumap.testing import write_10x_h5, write_metadata_csv

    directory.mkdir(parents=True, exist_ok=True)
    h5 = directory / f"atlas-{n_cells}.h5"
    metadata = directory / f"atlas-{n_cells}-metadata.csv"
    if not h5.exists():
        started = time.perf_counter()
        partial = h5.with_suffix(".partial.h5")
        write_10x_h5(partial, spec(n_cells))
        partial.rename(h5)
        print(f"wrote {h5} in {time.perf_counter() - started:.0f} s", flush=True)
    if not metadata.exists():
        write_metadata_csv(metadata, spec(n_cells))
    return h5, metadata


class TreeSampler:
    """Peak RSS of a process and all its descendants (their sum, and each one's own)."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.tree_peak = 0
        self.client_cpu = 0.0
        self.peaks: dict[str, int] = {}
        self.started = self._next_trace = time.perf_counter()
        self.client_trace: list[tuple[int, int]] = []
        self.worker_trace: dict[int, int] = {}  # second -> the largest worker's RSS in it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _name(self, proc) -> str:
        try:
            command = " ".join(proc.cmdline())
        except Exception:
            return f"pid-{proc.pid}"
        if proc.pid == self.root.pid:
            return "client"
        if "spawn_main" in command or "multiprocessing" in command:
            return f"worker-{proc.pid}"
        return f"{Path(command.split(' ')[0] or 'process').name}-{proc.pid}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except Exception:
                return
            total = 0
            try:  # the command's own CPU time (with the embedded scheduler's), as it goes
                times = self.root.cpu_times()
                self.client_cpu = times.user + times.system
            except Exception:
                pass
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except Exception:
                    continue
                total += rss
                name = self._name(proc)
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
                if name.startswith("worker-"):
                    second = round(time.perf_counter() - self.started)
                    self.worker_trace[second] = max(self.worker_trace.get(second, 0), rss)
                if name == "client" and time.perf_counter() >= self._next_trace:
                    # the client process (with the scheduler) once a second, to place its peak
                    self.client_trace.append((round(time.perf_counter() - self.started), rss))
                    self._next_trace = time.perf_counter() + 1.0
            self.tree_peak = max(self.tree_peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        workers = sorted(v for k, v in self.peaks.items() if k.startswith("worker-"))
        return {
            "tree_peak_gib": round(self.tree_peak / GIB, 2),
            "client_peak_gib": round(self.peaks.get("client", 0) / GIB, 2),
            "client_cpu_seconds": round(self.client_cpu, 1),
            "worker_peaks_gib": [round(v / GIB, 2) for v in workers],
            "client_gib_by_second": [(t, round(v / GIB, 2)) for t, v in self.client_trace],
            "worker_gib_by_second": [
                (t, round(v / GIB, 2)) for t, v in sorted(self.worker_trace.items())
            ],
        }


def disk(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 1e9, 3)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9, 3)


def agreement(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Share of each cell's ``k`` nearest embedding neighbours (in the sample) with its label."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(embedding)
    _, neighbours = index.kneighbors(embedding)
    return float((labels[neighbours[:, 1:]] == labels[:, None]).mean())


def sample_rows(n_cells: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).choice(n_cells, min(SAMPLE, n_cells), replace=False))


def run_distumap(h5: Path, metadata: Path, out: Path, args) -> dict:
    import xarray as xr

    shutil.rmtree(out, ignore_errors=True)
    command = [
        str(Path(sys.executable).with_name("distumap")), "run", str(h5),
        "--metadata", str(metadata),
        "--out", str(out), "--n-workers", str(args.workers), "--memory-limit", args.memory_limit,
        "--color", "subclass_label", *args.extra,
    ]  # fmt: skip
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    child = subprocess.Popen(command, stderr=subprocess.PIPE)
    sampler = TreeSampler(child.pid)
    # when each step of the embed draws its progress line first (redrawn in place: read as
    # it comes, not by lines)
    pieces, marks = [], {}
    while data := os.read(child.stderr.fileno(), 65536):
        pieces.append(data)
        recent = b"".join(pieces[-2:]).decode(errors="replace")
        for name, label in EMBED_LABELS.items():
            if label in recent and name not in marks:
                marks[name] = round(time.perf_counter() - sampler.started, 1)
    child.wait()
    stderr = b"".join(pieces).decode(errors="replace")
    seconds = time.perf_counter() - started
    memory = sampler.stop()
    if child.returncode != 0:
        raise SystemExit(f"distumap run failed ({child.returncode}):\n{stderr[-3000:]}")
    ds = xr.open_zarr(out / "store.zarr", consolidated=False)
    from distumap._format import stages

    records = stages(ds)
    stage_seconds = {name: record.get("seconds") for name, record in records.items()}
    embed = records.get("embed", {})
    rows = sample_rows(ds.sizes["cell"])
    embedding = ds["X_umap"].values[rows]
    labels = ds["subclass_label"].values[rows]
    landmarks = int(ds["landmark"].sum())
    result = {
        "method": "distumap run",
        "cells": ds.sizes["cell"],
        "genes_selected": int(ds["selected"].sum()),
        "landmarks": landmarks,
        "seconds": round(seconds, 1),
        "stage_seconds": stage_seconds,
        "fit_seconds": embed.get("fit_seconds"),
        "transform_seconds": embed.get("transform_seconds"),
        "refine_knn_seconds": embed.get("refine_knn_seconds"),
        "refine_graph_seconds": embed.get("refine_graph_seconds"),
        "refine_knn_passes": embed.get("refine_knn_passes", 1),
        "refine_epochs_seconds": embed.get("refine_epochs_seconds"),
        "refine_last_epoch_seconds": embed.get("refine_last_epoch_seconds"),
        "export_and_pictures_seconds": round(
            seconds - sum(v for v in stage_seconds.values() if v), 1
        ),
        **memory,
        "disk_gb": {
            "input": disk(h5),
            **{p.name: disk(p) for p in sorted(out.iterdir())},
        },
        "label_agreement": round(agreement(embedding, labels), 4),
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "stderr_tail": stderr[-1500:],
    }
    result["embed_step_started"] = marks
    result["gib_by_stage"] = stage_peaks(result)
    result["gib_by_embed_step"] = step_peaks(result)
    return result


#: the stages a run's peaks are placed in, in order (the exports and pictures come last)
STAGES = ("ingest", "preprocess", "embed", "export")


#: the embed's steps, in order, with the record's seconds of each
EMBED_STEPS = {
    "fit": "fit_seconds",
    "transform": "transform_seconds",
    "nearest cells": "refine_knn_seconds",
    "graph": "refine_graph_seconds",
    "epochs": "refine_epochs_seconds",
}


def _peaks(row: dict, bounds: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    peaks = {}
    for role, trace in (
        ("client", row["client_gib_by_second"]),
        ("worker", row["worker_gib_by_second"]),
    ):
        peaks[role] = {
            name: max((gib for t, gib in trace if low <= t < high), default=float("nan"))
            for name, (low, high) in bounds.items()
        }
    return peaks


def _consecutive(start: float, seconds: dict[str, float | None]) -> dict[str, tuple]:
    bounds = {}
    for name, length in seconds.items():
        bounds[name] = (start, start + (length or 0.0))
        start = bounds[name][1]
    return bounds


def stage_peaks(row: dict) -> dict[str, dict[str, float]]:
    """The client's and the largest worker's peak (GiB) in each stage of one distumap row,
    placed by the stages' recorded seconds on the once-a-second traces."""
    seconds = row["stage_seconds"]
    bounds = _consecutive(0.0, {name: seconds.get(name) for name in STAGES[:-1]})
    bounds["export"] = (bounds["embed"][1], float("inf"))
    return _peaks(row, bounds)


#: the first progress line of each step of the embed
EMBED_LABELS = {
    "fit": "embed: fit UMAP on landmarks",
    "transform": "embed: transform cells",
    "nearest cells": "embed: refine, nearest cells",
    "graph": "embed: refine, symmetrised graph",
    "epochs": "embed: refine, epoch",
}


def step_peaks(row: dict) -> dict[str, dict[str, float]]:
    """The same in each step of the embed (the fit on the landmarks, the transform, the
    refinement's nearest cells, graph and epochs), from when each printed its first progress
    line to the next's (the epochs: for their recorded seconds)."""
    marks = row.get("embed_step_started") or {}
    if set(marks) != set(EMBED_STEPS):  # an older result: placed by the recorded seconds
        seconds = row["stage_seconds"]
        start = (seconds.get("ingest") or 0.0) + (seconds.get("preprocess") or 0.0)
        return _peaks(row, _consecutive(start, {k: row.get(v) for k, v in EMBED_STEPS.items()}))
    names = list(EMBED_STEPS)
    ends = [marks[name] for name in names[1:]] + [marks["epochs"] + row["refine_epochs_seconds"]]
    return _peaks(row, {name: (marks[name], end) for name, end in zip(names, ends, strict=True)})


def fit(paths: list[Path], project: int = 10_000_000) -> dict:
    """peak = a + b x cells per role and stage (and step of the embed), by least squares over
    result files of several sizes (their distumap rows), and each line at ``project`` cells:
    issue 22's projection. The highest stage's projection is the role's."""
    rows = [
        row
        for path in paths
        for row in json.loads(Path(path).read_text())["rows"]
        if row["method"] == "distumap run"
    ]
    if len({row["cells"] for row in rows}) < 2:
        raise SystemExit("--fit needs results of at least two sizes")
    cells = np.array([row["cells"] for row in rows], dtype=float)
    result = {}
    for what, peaks_of in (("stages", stage_peaks), ("embed_steps", step_peaks)):
        peaks = [peaks_of(row) for row in rows]
        for role in ("client", "worker"):
            lines = {}
            for name in peaks[0][role]:
                gib = np.array([peak[role][name] for peak in peaks])
                slope, intercept = np.polyfit(cells / 1e6, gib, 1)
                lines[name] = {
                    "gib": gib.tolist(),
                    "a_gib": round(float(intercept), 3),
                    "b_gib_per_million": round(float(slope), 3),
                    f"at_{project}": round(float(intercept + slope * project / 1e6), 2),
                }
            entry = result.setdefault(role, {"cells": cells.astype(int).tolist()})
            entry[what] = lines
            if what == "stages":
                entry[f"highest_at_{project}"] = max(v[f"at_{project}"] for v in lines.values())
    return result


SCANPY = """
import json, sys, time
import numpy as np
import scanpy as sc
import scipy.sparse

if not hasattr(scipy.sparse.csr_array, "getnnz"):
    # scanpy 1.11.5, the last release for Python 3.11, calls csr_array.getnnz in neighbors(),
    # which SciPy 1.17 removed: give it back under its old meaning
    scipy.sparse.csr_array.getnnz = lambda self, axis=None: self._getnnz(axis=axis)

h5, max_zero, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
seconds, started = {}, time.perf_counter()


def lap(name):
    global started
    now = time.perf_counter()
    seconds[name] = round(now - started, 1)
    started = now


adata = sc.read_10x_h5(h5)
lap("read")
zero_fraction = 1 - np.asarray((adata.X > 0).sum(axis=0)).ravel() / adata.n_obs
adata = adata[:, zero_fraction < max_zero].copy()
sc.pp.log1p(adata, base=2)
lap("filter_log")
sc.pp.pca(adata, n_comps=50, random_state=999)
lap("pca")
sc.pp.neighbors(adata, n_neighbors=30, random_state=999)
lap("neighbors")
sc.tl.umap(adata, min_dist=0.25, random_state=999)
lap("umap")
np.save(out, adata.obsm["X_umap"].astype(np.float32))
print(json.dumps(seconds))
"""


def run_scanpy(h5: Path, n_cells: int, work: Path) -> dict:
    out = work / "scanpy-umap.npy"
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", SCANPY, str(h5), "0.5", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = TreeSampler(child.pid)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    memory = sampler.stop()
    if child.returncode != 0:
        return {"method": "scanpy", "error": stderr[-2000:]}
    rows = sample_rows(n_cells)
    labels = spec(n_cells).metadata()["subclass_label"].to_numpy()[rows]
    embedding = np.load(out)[rows]
    return {
        "method": "scanpy (in memory)",
        "cells": n_cells,
        "seconds": round(seconds, 1),
        "stage_seconds": json.loads(stdout.strip().splitlines()[-1]),
        "tree_peak_gib": memory["tree_peak_gib"],
        "label_agreement": round(agreement(embedding, labels), 4),
    }


def machine() -> dict:
    import psutil

    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000])
    parser.add_argument("--data", type=Path, default=HERE / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/distumap-atlas"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="3GiB")
    parser.add_argument(
        "--scanpy",
        choices=("auto", "yes", "no", "only"),
        default="auto",
        help="scanpy's in-memory route too (auto: up to 100,000 cells; only: scanpy alone, "
        "its row replacing the one in an earlier result file)",
    )
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run's outputs")
    parser.add_argument("--output", type=Path, default=None, help="JSON (default: atlas-N.json)")
    parser.add_argument(
        "--fit",
        type=Path,
        nargs="+",
        help="no run: fit peak = a + b x cells per role and stage over these result files (of "
        "several sizes) and project each line to 10,000,000 cells",
    )
    parser.add_argument("extra", nargs="*", help="more `distumap run` options, after --")
    args = parser.parse_args(argv)
    if args.fit:
        print(json.dumps(fit(args.fit), indent=1))
        return
    for n_cells in args.cells:
        h5, metadata = atlas(args.data, n_cells)
        if args.generate_only:
            continue
        path = args.output or HERE / f"atlas-{n_cells}.json"
        if args.scanpy == "only":
            rows = [
                row for row in json.loads(path.read_text())["rows"] if "scanpy" not in row["method"]
            ]
        else:
            out = args.work / f"run-{n_cells}"
            rows = [run_distumap(h5, metadata, out, args)]
            print(json.dumps(rows[0], indent=1), flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        if args.scanpy in ("yes", "only") or (args.scanpy == "auto" and n_cells <= 100_000):
            args.work.mkdir(parents=True, exist_ok=True)
            rows.append(run_scanpy(h5, n_cells, args.work))
            print(json.dumps(rows[-1], indent=1), flush=True)
        result = {"machine": machine(), "cells": n_cells, "rows": rows}
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
