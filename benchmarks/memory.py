"""Memory of the UMAP fit by shape: the measurements behind :mod:`distumap._memory`.

Each case fits :func:`distumap.tl._model.fit_landmark_model` in a fresh process on seeded
log-count-like values of shape ``(landmarks, genes)`` and reports, sampled every 10 ms from
outside, the process's resident memory: after the imports and a warm-up fit (what a warmed-up
worker holds), and its peak during the fit. The estimate that :mod:`distumap._memory` makes for
the same shape is printed beside it, so the model can be checked against the machine.

    python benchmarks/memory.py                      # the default grid, to benchmarks/memory.json
    python benchmarks/memory.py --cases 20000x4078x50 20000x4078x0
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
HERE = Path(__file__).parent
GRID = (
    "5000x2000x50",
    "10000x4078x50",
    "20000x4078x50",
    "40000x4078x50",
    "20000x10000x50",
    "50000x2000x50",
    "5000x4078x0",
    "10000x4078x0",
    "20000x4078x0",
)

CHILD = """
import sys, time
import numpy as np
from distumap.tl import _model
n, g, pca = map(int, sys.argv[1:4])
rng = np.random.default_rng(0)
warm = np.log2(1 + rng.poisson(0.8, size=(300, 60))).astype(np.float32)
_model.fit_landmark_model(warm, n_pca=10, n_neighbors=30)      # compile, as a warmed-up worker has
print("ready", flush=True)
sys.stdin.readline()
X = np.empty((n, g), dtype=np.float32)
groups = rng.integers(0, 20, size=n)
centres = rng.gamma(0.5, 1.0, size=(20, g)).astype(np.float32)
for start in range(0, n, 2048):                                  # clustered, sparse-ish log counts
    stop = min(n, start + 2048)
    lam = centres[groups[start:stop]]
    X[start:stop] = np.log2(1 + rng.poisson(lam)).astype(np.float32)
print("data", flush=True)
sys.stdin.readline()
_model.fit_landmark_model(X, n_pca=pca, n_neighbors=30)
print("done", flush=True)
"""


def _measure(case: str) -> dict:
    import psutil

    n, g, pca = map(int, case.split("x"))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(n), str(g), str(pca)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    process = psutil.Process(child.pid)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    assert child.stdout.readline().strip() == "ready"
    warmed = process.memory_info().rss
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "data"
    with_data = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "done"
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    child.wait()

    from distumap import _memory

    estimate = _memory.fit_bytes(n, g, pca, 30)
    return {
        "case": case,
        "landmarks": n,
        "genes": g,
        "pca": pca,
        "input_gib": round(n * g * 4 / GIB, 3),
        "warmed_gib": round(warmed / GIB, 3),
        "with_input_gib": round(with_data / GIB, 3),
        "peak_gib": round(peak[0] / GIB, 3),
        "fit_above_warmed_gib": round((peak[0] - warmed) / GIB, 3),
        "estimate_gib": round(estimate / GIB, 3),
        "fit_seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(GRID), help="LANDMARKSxGENESxPCA")
    parser.add_argument("--output", type=Path, default=HERE / "memory.json")
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        row = _measure(case)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| landmarks | genes | PCs | input GiB | warmed worker GiB | fit peak GiB | "
        "peak above warmed | estimate | fit s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['landmarks']:,} | {r['genes']:,} | {r['pca']} | {r['input_gib']} | "
            f"{r['warmed_gib']} | {r['peak_gib']} | {r['fit_above_warmed_gib']} | "
            f"{r['estimate_gib']} | {r['fit_seconds']} |"
        )


if __name__ == "__main__":
    main()
