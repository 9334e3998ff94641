"""Small data: ``distumap run`` against the tutorial's plain way on a CSV of a few hundred cells.

The plain way (the tutorial's): pandas reads ``matrix.csv`` whole, keeps the genes with under 50%
zeros, takes log2(x+1) and fits umap-learn (n_neighbors=30, min_dist=0.25, random_state=999),
then draws the embedding with matplotlib. distumap: ``distumap run matrix.csv --metadata
metadata.csv --out DIR`` with its defaults (an embedded cluster, the store, loom, h5ad, PNG and
HTML). Each runs in a fresh process and is timed from outside, imports and compilation included:

- ``first``: distumap with an empty numba cache (``NUMBA_CACHE_DIR`` pointed at a new folder),
  as the first run after installing;
- ``later``: distumap again with the cache the first run left;
- ``plain``: the plain way, best of ``--repeats`` (umap-learn's own numba cache warm).

    python benchmarks/small.py --cells 800 --genes 30000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent

PLAIN = """
import sys
import numpy as np
import pandas as pd
import umap
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

matrix, metadata, out = sys.argv[1:4]
counts = pd.read_csv(matrix, index_col=0)
labels = pd.read_csv(metadata, index_col=0).loc[counts.index, "subclass_label"]
kept = counts.loc[:, (counts == 0).mean(axis=0) < 0.5]
features = np.log2(kept.to_numpy(dtype=np.float64) + 1)
embedding = umap.UMAP(n_neighbors=30, min_dist=0.25, random_state=999).fit_transform(features)
codes, names = pd.factorize(labels)
plt.figure(figsize=(8, 8))
plt.scatter(embedding[:, 0], embedding[:, 1], c=codes, s=4, cmap="tab20")
plt.savefig(out, dpi=100)
"""


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=800)
    parser.add_argument("--genes", type=int, default=30_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from distumap.testing import SyntheticSpec, write_dataset

    work = Path(tempfile.mkdtemp(prefix="distumap-small-"))
    try:
        spec = SyntheticSpec(args.cells, args.genes, seed=0)
        matrix, metadata = write_dataset(work / "data", spec)
        distumap = str(Path(sys.executable).with_name("distumap"))
        command = [distumap, "run", str(matrix), "--metadata", str(metadata)]
        cache = work / "numba-cache"
        env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
        first = timed([*command, "--out", str(work / "first")], env)
        later = [
            timed([*command, "--out", str(work / f"later-{i}")], env) for i in range(args.repeats)
        ]
        plain = [
            timed([sys.executable, "-c", PLAIN, str(matrix), str(metadata), str(work / "p.png")])
            for _ in range(args.repeats)
        ]
        result = {
            "cells": args.cells,
            "genes": args.genes,
            "csv_mb": round(matrix.stat().st_size / 1e6, 1),
            "plain_seconds": [round(s, 1) for s in plain],
            "distumap_first_seconds": round(first, 1),
            "distumap_later_seconds": [round(s, 1) for s in later],
            "first_over_plain": round(first / min(plain), 2),
            "later_over_plain": round(min(later) / min(plain), 2),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "cores": os.cpu_count(),
        }
        print(json.dumps(result, indent=1))
        if args.output:
            args.output.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
