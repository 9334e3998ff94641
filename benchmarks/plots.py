"""File sizes and drawing times of umap.png and umap.html at tutorial and atlas size.

Synthetic coordinates (gaussian blobs of very different sizes, like cell types) stand in for an
embedding: the pictures depend only on ``X_umap`` and the colour column. Run::

    .venv/bin/python benchmarks/plots.py [--out DIR] [--cells 76533 1000000]

and it prints one JSON line per size (and writes ``plots-<n>.json`` beside this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import xarray as xr


def blobs(n_cells: int, n_groups: int = 40, seed: int = 1) -> xr.Dataset:
    """An embedded store's plotting columns: blobs of very different sizes, named like cells."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.0, n_groups) + 0.05
    sizes = rng.multinomial(n_cells - n_groups, weights / weights.sum()) + 1
    label = rng.permutation(np.repeat(np.arange(n_groups), sizes))
    centers = rng.uniform(-15, 15, (n_groups, 2))
    spread = rng.uniform(0.3, 1.5, n_groups)
    xy = centers[label] + rng.normal(size=(n_cells, 2)) * spread[label, None]
    names = np.array([f"subclass {i:02d}" for i in range(n_groups)], dtype=object)
    cells = np.char.add("cell_", np.arange(n_cells).astype("U7")).astype(object)
    return xr.Dataset(
        {"X_umap": (("cell", "umap"), xy.astype(np.float32))},
        coords={"cell": cells, "subclass_label": ("cell", names[label])},
    )


def measure(n_cells: int, out: Path) -> dict:
    from distumap.pl import umap, umap_html

    ds = blobs(n_cells)
    png, html = out / f"umap-{n_cells}.png", out / f"umap-{n_cells}.html"
    for path in (png, html):
        if path.exists():
            path.unlink()
    started = time.perf_counter()
    umap(ds, color="subclass_label", path=png)
    png_seconds = time.perf_counter() - started
    started = time.perf_counter()
    umap_html(ds, color="subclass_label", path=html)
    html_seconds = time.perf_counter() - started
    return {
        "cells": n_cells,
        "png_bytes": png.stat().st_size,
        "png_seconds": round(png_seconds, 2),
        "html_bytes": html.stat().st_size,
        "html_seconds": round(html_seconds, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/distumap-plots")
    parser.add_argument("--cells", type=int, nargs="+", default=[76_533, 1_000_000])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.cells:
        result = measure(n, out)
        print(json.dumps(result), flush=True)
        (Path(__file__).parent / f"plots-{n}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
