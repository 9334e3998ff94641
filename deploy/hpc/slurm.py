"""Run ``distumap run`` on a SLURM cluster with dask-jobqueue.

The scheduler runs in this process (on a login node, or better inside a small, long ``sbatch``
driver job); the workers are SLURM jobs that dask-jobqueue submits. The scheduler writes a
scheduler file on the shared filesystem, and ``distumap run --scheduler-file`` connects to it, so
the command is the same one that runs on a laptop or in a Kubernetes job pod.

Needs, in the same environment on the login node and the compute nodes (a shared filesystem):
``pip install distumap dask-jobqueue``.

Examples
--------
Print the worker job script that would be submitted, and do nothing else::

    python deploy/hpc/slurm.py --dry-run --queue normal --account proj42

Run on 4 worker jobs of 8 single-threaded workers each::

    python deploy/hpc/slurm.py --queue normal --account proj42 --jobs 4 \\
        --cores 8 --memory 64GB --walltime 02:00:00 -- \\
        /scratch/me/matrix.csv --metadata /scratch/me/metadata.csv \\
        --out /scratch/me/out --color subclass_label

Everything after ``--`` goes to ``distumap run`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Start Dask workers as SLURM jobs, then run `distumap run` on them.",
    )
    parser.add_argument("--queue", help="SLURM partition (#SBATCH -p)")
    parser.add_argument("--account", help="SLURM account (#SBATCH -A)")
    parser.add_argument("--jobs", type=int, default=2, help="worker jobs to submit")
    parser.add_argument("--cores", type=int, default=8, help="cores per job, one worker each")
    parser.add_argument("--memory", default="64GB", help="memory per job, shared by its workers")
    parser.add_argument("--walltime", default="02:00:00")
    parser.add_argument(
        "--local-directory",
        default="$TMPDIR",
        help="node-local spill space for the workers (expanded on the compute node)",
    )
    parser.add_argument(
        "--scheduler-file",
        type=Path,
        default=Path("distumap-scheduler.json"),
        help="where the scheduler writes its address; must be on a shared filesystem",
    )
    parser.add_argument("--log-directory", type=Path, default=Path("distumap-slurm-logs"))
    parser.add_argument("--interface", help="network interface of the workers, e.g. ib0")
    parser.add_argument("--dry-run", action="store_true", help="print the job script and exit")
    parser.add_argument("distumap_args", nargs=argparse.REMAINDER, help="-- MATRIX --out DIR ...")
    return parser


def make_cluster(args: argparse.Namespace):
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        # one process per core: one thread per worker suits distumap's GIL-free kernels
        processes=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        local_directory=args.local_directory,
        log_directory=str(args.log_directory),
        interface=args.interface,
        # workers start with this interpreter, so the login node and the jobs agree on versions
        python=sys.executable,
        job_name="distumap-worker",
        scheduler_options={
            "scheduler_file": str(args.scheduler_file.resolve()),
            # the progress page at http://<login-node>:8787/distumap
            "preload": ["distumap.dashboard"],
            "dashboard_address": ":8787",
        },
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    distumap_args = args.distumap_args
    if distumap_args[:1] == ["--"]:
        distumap_args = distumap_args[1:]
    if not args.dry_run and not distumap_args:
        print("slurm.py: give the `distumap run` arguments after --", file=sys.stderr)
        return 2

    cluster = make_cluster(args)
    try:
        if args.dry_run:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        print(f"distumap: dashboard at {cluster.dashboard_link}", file=sys.stderr, flush=True)
        command = [
            "distumap",
            "run",
            *distumap_args,
            "--scheduler-file",
            str(args.scheduler_file),
        ]
        # the same command a user would type; the jobs join as SLURM starts them
        return subprocess.run(command, env=os.environ.copy(), check=False).returncode
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
