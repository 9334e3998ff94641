"""Fixed cost of a small input: where a command's seconds go besides its work.

Runs ``distumap ingest`` of a 200 x 300 CSV and ``distumap run`` of an 800 x 30,000 CSV (as
``small.py``) in fresh processes, timed from outside, and splits each run into phases from
timestamps taken inside the command's process (the functions named below are wrapped, nothing
else changes): the interpreter and imports until the cluster starts, the embedded cluster's
start (``distumap.cluster.connect``), the command's stages, the cluster's close
(``distumap.cluster.close``), and the process's exit after ``main`` returns; and the CPU
seconds of the command's process and its worker processes together, which a loaded machine
stretches less than the wall time. Two source trees
can be compared run by run, interleaved (A, B, A, B, ...) so that both see the same machine load:

    python benchmarks/startup.py --tree before=/tmp/before --tree after=. --repeats 5

Each tree's numba cache is warmed by one untimed run of each command first, and its bytecode
is compiled (``compileall``), as an installed package's is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, sys, time
T0 = float(os.environ["STARTUP_T0"])
marks = []

def mark(what):
    marks.append((what, time.time() - T0))

def wrapped(owner, name, label):
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        mark(label + " start")
        try:
            return original(*args, **kwargs)
        finally:
            mark(label + " end")

    setattr(owner, name, timed)

if __name__ == "__main__":
    mark("interpreter")
    import distumap.cli as cli
    import distumap.cluster as cluster

    wrapped(cluster, "connect", "connect")
    wrapped(cluster, "close", "close")
    assert cli.__file__.startswith(os.environ["PYTHONPATH"]), cli.__file__
    sys.argv[0] = "distumap"
    code = cli.main()  # as the console script calls it
    mark("main returned")
    modules = sorted(m for m in sys.modules if "." not in m)
    print("STARTUP " + json.dumps({"marks": marks, "modules": modules}), file=sys.stderr)
    sys.exit(code)
"""


def _phases(marks: dict[str, float], total: float) -> dict[str, float]:
    return {
        "interpreter and imports": marks["connect start"],
        "cluster start": marks["connect end"] - marks["connect start"],
        "stages": marks["close start"] - marks["connect end"],
        "cluster close": marks["close end"] - marks["close start"],
        "exit": total - marks["close end"],
        "total": total,
    }


def _once(tree: Path, argv: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "STARTUP_T0": repr(time.time())}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # run from outside every tree: ``python -c`` puts the working folder first on sys.path
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
    )
    total = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the command's process and the worker processes it started (and waited for)
    cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    line = [x for x in done.stderr.splitlines() if x.startswith("STARTUP ")][-1]
    found = json.loads(line.removeprefix("STARTUP "))
    marks = dict(found["marks"])
    return {
        "phases": {k: round(v, 3) for k, v in _phases(marks, total).items()},
        "cpu_seconds": round(cpu, 2),
        "load_1min": os.getloadavg()[0],
        "in_process": "workers are threads" in done.stderr,
        "killed_workers": done.stderr.count("still alive after"),
        "modules": found["modules"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commands", default="ingest,run")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.tree)}
    for tree in trees.values():
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(tree / "distumap")],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
        )
    sys.path.insert(0, str(next(iter(trees.values()))))
    from distumap.testing import SyntheticSpec, write_dataset

    work = Path(tempfile.mkdtemp(prefix="distumap-startup-"))
    try:
        tiny, _ = write_dataset(work / "tiny", SyntheticSpec(200, 300, seed=0))
        small, metadata = write_dataset(work / "small", SyntheticSpec(800, 30_000, seed=0))
        common = ["--dashboard-address", ":0", "--no-progress"]
        commands = {
            "ingest": lambda out: ["ingest", str(tiny), str(out / "s.zarr"), *common],
            "run": lambda out: (
                ["run", str(small), "--metadata", str(metadata), "--out", str(out), *common]
            ),
        }
        chosen = args.commands.split(",")
        for tree in trees.values():  # warm each tree's numba cache, untimed
            for command in chosen:
                _once(tree, commands[command](work / "warm"), work / "warm")
        results: dict[str, dict[str, list]] = {c: {t: [] for t in trees} for c in chosen}
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for command in chosen:
                for name in order:
                    out = work / f"{command}-{name}"
                    result = _once(trees[name], commands[command](out), out)
                    results[command][name].append(result)
                    phases = " ".join(
                        f"{k.split()[0]} {v:.2f}" for k, v in result["phases"].items()
                    )
                    cpu, load = result["cpu_seconds"], result["load_1min"]
                    print(f"{command} {name}: {phases} cpu {cpu:.2f} load {load:.1f}", flush=True)
        summary = {
            command: {
                name: {
                    phase: round(statistics.median(r["phases"][phase] for r in runs), 2)
                    for phase in runs[0]["phases"]
                }
                | {
                    "load_1min": [round(r["load_1min"], 1) for r in runs],
                    "totals": [round(r["phases"]["total"], 2) for r in runs],
                    "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                    "in_process": runs[0]["in_process"],
                    "killed_workers": sum(r["killed_workers"] for r in runs),
                    "modules": runs[0]["modules"],
                }
                for name, runs in by_tree.items()
            }
            for command, by_tree in results.items()
        }
        summary["cores"] = os.cpu_count()
        text = json.dumps(summary, indent=1)
        print(text)
        if args.output:
            args.output.write_text(text + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
