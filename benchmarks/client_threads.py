"""Client CPU by thread while `write_h5ad` runs on an embedded cluster of 2 worker processes:
the writer (main thread), the client's deflate threads, and the rest (the scheduler, which runs in
this process, comms, the event loop); and the workers' CPU. The export's wall time on a shared
machine follows the load; the CPU each side spends much less so.

    python benchmarks/client_threads.py benchmarks/data/export-300000x4000-2000-s0/store.zarr
"""

import json
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore")


def main():
    import dask
    import psutil

    import distumap
    from distumap.cluster import close, connect
    from distumap.io.writers import write_h5ad

    client = connect(n_workers=2, memory_limit="4GiB", dashboard_address=":0", quiet=True)
    ds = distumap.io.open_store(sys.argv[1], require="embed")
    me = psutil.Process()
    seen = {}  # native id -> (name, cpu seconds at first sight, latest)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            names = {t.native_id: t.name for t in threading.enumerate()}
            for t in me.threads():
                cpu = t.user_time + t.system_time
                name = names.get(t.id, "other")
                first = seen.get(t.id, (name, cpu, cpu))[1]
                seen[t.id] = (name, first, cpu)
            stop.wait(0.05)

    sample_thread = threading.Thread(target=sample, name="sampler", daemon=True)
    # baseline: every thread's CPU before the export
    names = {t.native_id: t.name for t in threading.enumerate()}
    for t in me.threads():
        cpu = t.user_time + t.system_time
        seen[t.id] = (names.get(t.id, "other"), cpu, cpu)
    kids = me.children(recursive=True)
    w0 = sum(sum(k.cpu_times()[:2]) for k in kids)
    sample_thread.start()
    started = time.perf_counter()
    with dask.config.set(scheduler="dask.distributed"):
        write_h5ad(ds, str(Path(tempfile.mkdtemp()) / "x.h5ad"), client=client)
    wall = time.perf_counter() - started
    stop.set()
    sample_thread.join()
    workers = sum(sum(k.cpu_times()[:2]) for k in kids) - w0
    groups = {}
    for name, first, last in seen.values():
        group = (
            "writer"
            if name == "MainThread"
            else "client deflate"
            if name.startswith("h5ad-deflate")
            else "sampler"
            if name == "sampler"
            else "scheduler, comms, rest"
        )
        groups[group] = groups.get(group, 0) + last - first
    print(
        json.dumps(
            {
                "wall": round(wall, 1),
                "workers_cpu": round(workers, 1),
                **{k: round(v, 2) for k, v in groups.items()},
            }
        )
    )
    close(client)


if __name__ == "__main__":
    main()
