"""What the check that every worker sees a command's paths adds (``distumap._shared_paths``).

On an embedded cluster of worker processes: the check alone (an ingest's: one input and a new
store; a later stage's: an existing store), and a small ingest with and without it, alternated.

    python benchmarks/paths_check.py --workers 2 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import distumap
from distumap import _stage
from distumap._shared_paths import check_workers_see
from distumap.cluster import close, connect
from distumap.testing import synthetic_counts, write_dataset


def _median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ingests", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        matrix = write_dataset(root / "data", synthetic_counts(2000, 500, seed=1))[0]
        client = connect(n_workers=args.workers, memory_limit="2GiB", quiet=True)
        try:
            existing = root / "existing.zarr"
            distumap.io.read(str(matrix), existing)
            new = root / "new" / "store.zarr"
            print(f"workers: {args.workers}")
            for name, kwargs in {
                "ingest's check (1 input, a new store)": {"reads": [matrix], "store": new},
                "a stage's check (an existing store)": {"store": existing},
            }.items():
                ms = _median_ms(lambda kw=kwargs: check_workers_see(client, **kw), args.repeats)
                print(f"{name}: median {ms:.1f} ms over {args.repeats}")
            timings: dict[bool, list[float]] = {True: [], False: []}
            for i in range(args.ingests):
                for checked in (True, False):
                    store = root / f"ingest-{checked}-{i}.zarr"
                    patch = mock.patch.object(_stage, "check_workers_see", lambda *a, **k: None)
                    started = time.perf_counter()
                    if checked:
                        distumap.io.read(str(matrix), store)
                    else:
                        with patch:
                            distumap.io.read(str(matrix), store)
                    timings[checked].append(time.perf_counter() - started)
            for checked, times in timings.items():
                label = "with the check" if checked else "without it"
                print(f"ingest 2000 x 500, {label}: median {statistics.median(times):.3f} s")
        finally:
            close(client)


if __name__ == "__main__":
    main()
