"""The ``distumap`` command: a thin layer over the Python API.

Exit codes: 0 success, 2 bad input or usage, 1 anything else, with one clear line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import dask

from distumap._errors import InputError

#: `distumap run --formats`: the export files it may write beside the store
RUN_EXPORTS = {"loom": "embedding.loom", "h5ad": "embedding.h5ad", "zarr": "embedding.zarr"}
#: the pictures `distumap run` draws, and their kinds
RUN_PICTURES = {"umap.png": "png", "umap.html": "html"}

EPILOG = """\
Settings default to dask's config namespace `distumap.*` (e.g. DASK_DISTUMAP__LANDMARKS=50000);
flags override them. With no --scheduler, --scheduler-file or DASK_SCHEDULER_ADDRESS, an embedded
cluster of worker processes starts (threads of this process for inputs under
distumap.in-process-below, 64 MiB); its dashboard link is printed at start."""


# ---------------------------------------------------------------- options


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running Dask scheduler (default: $DASK_SCHEDULER_ADDRESS)",
    )
    where.add_argument("--scheduler-file", metavar="FILE", help="a Dask scheduler file")
    group.add_argument(
        "--n-workers",
        type=int,
        metavar="N",
        help="workers of the embedded cluster (default: one per core)",
    )
    group.add_argument(
        "--memory-limit",
        metavar="SIZE",
        default="auto",
        help="memory limit per embedded worker, e.g. 4GiB (default: share of the machine)",
    )
    group.add_argument(
        "--dashboard-address",
        metavar="ADDR",
        default=":8787",
        help="where the embedded cluster serves its dashboard (default :8787)",
    )
    group.add_argument(
        "--performance-report",
        metavar="FILE",
        help="save Dask's HTML performance report of the run to FILE",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show progress bars on stderr (default: on)",
    )


def _ingest_options(parser: argparse.ArgumentParser) -> None:
    from distumap.io.readers import names  # the formats' registry, the one list of them

    parser.add_argument(
        "--metadata",
        metavar="META.csv",
        help="cell metadata, joined on the cell names (a sample_name column, else the first)",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *names()),
        help="input format (default: from the name and content)",
    )
    parser.add_argument(
        "--layer",
        metavar="NAME",
        help="read this AnnData or loom layer instead of the matrix (raw: AnnData's .raw)",
    )
    parser.add_argument(
        "--orientation",
        default="cells-by-genes",
        choices=("cells-by-genes", "genes-by-cells"),
        help="CSV/TSV: cells in rows (default) or genes in rows, as most GEO files are",
    )
    parser.add_argument(
        "--chunk-cells", type=int, metavar="N", help="cells per store chunk (default 1024)"
    )
    parser.add_argument(
        "--dtype",
        choices=("int32", "float32"),
        default="int32",
        help="int32: counts (floats within 1e-6 of an integer are rounded; stored as uint16 "
        "when every count fits); float32: any numbers, e.g. normalised data (default int32)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a distumap store made from other input or with other parameters "
        "(anything else at STORE is never replaced)",
    )


def _preprocess_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recipe",
        choices=("log2p1", "scanpy"),
        help="log2p1 (default): genes with few zeros, log2(x+1) of their counts; scanpy: "
        "normalize_total, log1p and the highly variable genes (flavor seurat), as scanpy's "
        "standard recipe",
    )
    parser.add_argument(
        "--max-zero-fraction",
        type=float,
        metavar="F",
        help="log2p1 recipe: keep genes with fewer zeros than this fraction of cells (0.5)",
    )
    parser.add_argument(
        "--n-top-genes",
        type=int,
        metavar="N",
        help="scanpy recipe: highly variable genes to keep (2000)",
    )
    parser.add_argument(
        "--target-sum",
        type=float,
        metavar="T",
        help="scanpy recipe: every cell's total after normalisation (10000)",
    )


def _preprocess_kwargs(args: argparse.Namespace) -> dict:
    return {
        "recipe": args.recipe,
        "max_zero_fraction": args.max_zero_fraction,
        "n_top_genes": args.n_top_genes,
        "target_sum": args.target_sum,
        "progress": args.progress,
    }


def _embed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--landmarks", type=int, metavar="N", help="cells to fit UMAP on (default 20000)"
    )
    parser.add_argument(
        "--stratify", metavar="COLUMN", help="sample landmarks per group of this metadata column"
    )
    parser.add_argument(
        "--pca",
        type=int,
        metavar="N",
        help="principal components to embed from (default 50; 0: the genes, as the tutorial)",
    )
    parser.add_argument(
        "--pca-fit",
        choices=("landmarks", "all"),
        help="cells the PCA is fitted on: the landmarks (default) or all cells (exact, "
        "one more pass over the selected genes)",
    )
    parser.add_argument("--n-neighbors", type=int, metavar="K", help="UMAP n_neighbors (30)")
    parser.add_argument("--min-dist", type=float, metavar="D", help="UMAP min_dist (0.25)")
    parser.add_argument("--seed", type=int, help="random seed (999)")
    parser.add_argument(
        "--transform-epochs",
        type=int,
        metavar="N",
        help="SGD epochs per transformed cell (default 10, or 30 with --refine-epochs 0)",
    )
    parser.add_argument(
        "--refine-epochs",
        type=int,
        metavar="N",
        help="epochs that move every cell over its nearest cells after the transform "
        "(default 30; 0: keep the transform's coordinates)",
    )


def _use_rep_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--use-rep", metavar="KEY", help=what)


#: what --use-rep does, as each command's help says it
USE_REP_HELP = {
    "run": "embed this AnnData obsm array (X_scVI, X_pca, ...) as it is: no gene filter, no "
    "PCA; the counts are read too, for the exports, which carry the array under its own key",
    "ingest": "read this AnnData obsm array (X_scVI, X_pca, ...) into the store's rep, for "
    "the embed; the counts are not read unless --with-counts is given (exports need them)",
    "embed": "embed the representation the store holds from `ingest --use-rep KEY` (the "
    "default for a store without counts)",
}


def _formats(text: str) -> list[str]:
    formats = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(formats) - set(RUN_EXPORTS))
    if unknown or not formats:
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose from {', '.join(RUN_EXPORTS)} (comma-separated)"
        )
    return formats


def _formats_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--formats",
        type=_formats,
        default=["loom", "h5ad"],
        metavar="LIST",
        help="exports to write: loom, h5ad, zarr (AnnData zarr), comma-separated "
        "(default loom,h5ad)",
    )
    _loom_graph_option(parser)


def _loom_graph_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loom-graph",
        action="store_true",
        help="also write the cells' kNN graph (each cell's nearest landmarks) to the loom "
        "file's /col_graphs/KNN. Off by default: loompy 3.0.8 slices a file's graphs with "
        "np.in1d, which NumPy 2.4 removed, so its view and scan fail on a file that has one",
    )


def _writer_options(args: argparse.Namespace, kind: str) -> dict:
    """The options of one export's writer that come from the command line."""
    return {"graph": True} if kind == "loom" and getattr(args, "loom_graph", False) else {}


def _color_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--color",
        metavar="COLUMN",
        help="metadata column to colour the pictures by (default: subclass_label if present)",
    )


def _run_command(commands) -> None:
    run = commands.add_parser(
        "run",
        help="all stages: CSV -> store -> loom, h5ad and pictures",
        description="Ingest, preprocess, embed and export. Writes DIR/store.zarr, "
        "DIR/embedding.loom and DIR/embedding.h5ad (see --formats), DIR/umap.png and "
        "DIR/umap.html. distumap replaces only files it wrote. A stage that already finished "
        "with the same parameters is skipped, so re-running resumes.",
    )
    run.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="count matrices: CSV/TSV, 10x .h5, MEX folder, .h5ad, AnnData zarr, .loom "
        "(paths or fsspec URLs); several are concatenated",
    )
    run.add_argument("--out", required=True, metavar="DIR", help="output directory (or URL)")
    for add in (
        _ingest_options,
        _preprocess_options,
        _embed_options,
        _color_option,
        _formats_option,
    ):
        add(run)
    _use_rep_option(run, USE_REP_HELP["run"])
    _cluster_options(run)


def _ingest_command(commands) -> None:
    ingest = commands.add_parser(
        "ingest",
        help="inputs -> zarr store, in parallel",
        description="Read CSV/TSV, 10x Cell Ranger .h5, 10x MEX folders, .h5ad, AnnData zarr or "
        ".loom into one store; several inputs are concatenated (cells), genes aligned by name.",
    )
    ingest.add_argument("inputs", nargs="+", metavar="INPUT")
    ingest.add_argument("store", metavar="STORE")
    _ingest_options(ingest)
    _use_rep_option(ingest, USE_REP_HELP["ingest"])
    ingest.add_argument(
        "--with-counts",
        action="store_true",
        help="with --use-rep: read the counts as well, so that the store can be exported",
    )
    _cluster_options(ingest)


def _preprocess_command(commands) -> None:
    preprocess = commands.add_parser("preprocess", help="gene statistics and the gene filter")
    preprocess.add_argument("store", metavar="STORE")
    _preprocess_options(preprocess)
    _cluster_options(preprocess)


def _embed_command(commands) -> None:
    embed = commands.add_parser("embed", help="landmark UMAP fit and parallel transform")
    embed.add_argument("store", metavar="STORE")
    _embed_options(embed)
    _use_rep_option(embed, USE_REP_HELP["embed"])
    _cluster_options(embed)


def _export_command(commands) -> None:
    export = commands.add_parser(
        "export",
        help="store -> loom, h5ad or AnnData zarr",
        description="Export a finished store; the format comes from OUT's name: OUT.loom "
        "(genes x cells, loompy), OUT.h5ad (AnnData, scanpy) or OUT.zarr (AnnData zarr).",
    )
    export.add_argument("store", metavar="STORE")
    export.add_argument("out", metavar="OUT", help="OUT.loom | OUT.h5ad | OUT.zarr")
    _loom_graph_option(export)
    _cluster_options(export)


def _info_command(commands) -> None:
    info = commands.add_parser("info", help="stages done, shapes and parameters of a store")
    info.add_argument("store", metavar="STORE")
    info.add_argument("--json", action="store_true", help="print the stage records as JSON")


def _demo_command(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="a seeded synthetic dataset of realistic shape, then `run`",
        description="Generate a seeded synthetic matrix (labelled populations of very different "
        "sizes, realistic sparsity) as DIR/data/matrix.csv and metadata.csv, then run every stage.",
    )
    demo.add_argument("--out", default="distumap-demo", metavar="DIR", help="(distumap-demo)")
    demo.add_argument("--cells", type=int, default=12_000, help="cells (12000)")
    demo.add_argument("--genes", type=int, default=50_281, help="genes (50281, as the tutorial)")
    demo.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data (0)")
    for add in (_preprocess_options, _embed_options, _formats_option):
        add(demo)
    demo.set_defaults(landmarks=None)
    _cluster_options(demo)


#: the subcommands in the order ``--help`` lists them
_COMMANDS = (
    _run_command,
    _ingest_command,
    _preprocess_command,
    _embed_command,
    _export_command,
    _info_command,
    _demo_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``distumap`` argument parser (used by :func:`main` and by the deploy tests)."""
    from distumap import __version__

    parser = argparse.ArgumentParser(
        prog="distumap",
        description="UMAP embeddings of single-cell count matrices too large for one process, "
        "on a Dask cluster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"distumap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    return parser


# ---------------------------------------------------------------- running


def _input_bytes(inputs: Sequence[str]) -> int | None:
    """The size on disk of local inputs (a folder's files summed), None if any is a URL or
    missing (the ingest says what is wrong with it)."""
    from distumap._paths import is_local, local_path

    total = 0
    for source in inputs:
        path = local_path(source)
        if not is_local(source) or not os.path.exists(path):
            return None
        if os.path.isdir(path):
            total += sum(entry.stat().st_size for entry in os.scandir(path) if entry.is_file())
        else:
            total += os.path.getsize(path)
    return total


def _in_process(args: argparse.Namespace) -> bool:
    """Whether the embedded cluster's workers are threads of this process: for inputs smaller
    than ``distumap.in-process-below``, where starting worker processes is most of the time."""
    inputs = getattr(args, "inputs", None) if args.command in ("ingest", "run") else None
    size = _input_bytes(inputs) if inputs else None
    return size is not None and size < dask.config.get("distumap.in-process-below")


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[object]:
    from distumap.cluster import close, connect

    client = connect(
        args.scheduler,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        memory_limit=args.memory_limit,
        dashboard_address=args.dashboard_address,
        processes=not _in_process(args),
    )
    try:
        if args.performance_report:
            from distributed import performance_report

            with performance_report(filename=args.performance_report):
                yield client
        else:
            yield client
    finally:
        close(client)


def _default_color(ds, color: str | None) -> str | None:
    if color is not None:
        if color not in ds.coords:
            raise InputError(f"--color {color!r}: no such metadata column")
        return color
    return "subclass_label" if "subclass_label" in ds.coords else None


def _embed_kwargs(args: argparse.Namespace) -> dict:
    return {
        "landmarks": args.landmarks,
        "stratify": args.stratify,
        "pca": args.pca,
        "n_neighbors": args.n_neighbors,
        "min_dist": args.min_dist,
        "seed": args.seed,
        "transform_epochs": args.transform_epochs,
        "refine_epochs": args.refine_epochs,
        "pca_fit": args.pca_fit,
        "use_rep": getattr(args, "use_rep", None),
        "progress": args.progress,
    }


def _check_outputs(store: str | None, files: dict[str, str]) -> None:
    """Refuse, before any work, to write over anything distumap did not write."""
    from distumap._format import check_replaceable

    if store:
        check_replaceable(store, "store")
    for path, kind in files.items():
        check_replaceable(path, kind)


def _outputs(out: str, formats: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The store that `run` writes into ``out``, and its other files with their kinds."""
    from distumap.io import export_kind

    exports = [f"{out}/{RUN_EXPORTS[name]}" for name in formats]
    files = {path: export_kind(path) for path in exports}
    files.update({f"{out}/{name}": kind for name, kind in RUN_PICTURES.items()})
    return f"{out}/store.zarr", files


def _ingest(args: argparse.Namespace, inputs: list[str], store: str, metadata: str | None):
    from distumap import io

    return io.read(
        inputs,
        store,
        metadata=metadata,
        chunk_cells=getattr(args, "chunk_cells", None),
        format=getattr(args, "format", "auto"),
        layer=getattr(args, "layer", None),
        dtype=getattr(args, "dtype", "int32"),
        orientation=getattr(args, "orientation", "cells-by-genes"),
        use_rep=getattr(args, "use_rep", None),
        # `run` exports, and every export writes counts; `ingest --use-rep` reads them if asked
        counts=True if args.command == "run" or getattr(args, "with_counts", False) else None,
        overwrite=getattr(args, "overwrite", False),
        progress=args.progress,
    )


def _run_all(args: argparse.Namespace, inputs: list[str], metadata: str | None, out: str) -> None:
    from distumap import _memory, io, pl, pp, tl
    from distumap._progress import report, report_status
    from distumap.io.writers import writer_named

    store, files = _outputs(out, args.formats)
    exports = [path for path, kind in files.items() if kind not in RUN_PICTURES.values()]
    png, html = (f"{out}/{name}" for name in RUN_PICTURES)
    tl.prepare_workers()  # the fit's kernels compile on the workers while the ingest runs
    # nothing is made at OUT before the ingest has checked that every worker sees it
    ds = _ingest(args, inputs, store, metadata)
    _memory.check_client(ds.sizes["cell"], "run")  # before the embed, not at its exports
    if "://" not in out:
        Path(out).mkdir(parents=True, exist_ok=True)
    color = _default_color(ds, getattr(args, "color", None))
    ds = pp.preprocess(ds, **_preprocess_kwargs(args))

    def pictures(ds) -> None:
        # drawn here, not in tasks: the dashboard hears of each picture from this process
        report_status("pictures", "started")
        try:
            pl.umap(ds, color=color, path=png)
            report("pictures", 1, len(RUN_PICTURES), block=0)
            pl.umap_html(ds, color=color, path=html)
            report("pictures", 1, len(RUN_PICTURES), block=1)
        except BaseException:
            report_status("pictures", "failed")
            raise
        report_status("pictures", "complete")

    # each export has one writer, on this process: the loom's waits on the workers (which
    # deflate its chunks), the h5ad's on its own deflate and the pictures on this process,
    # so they overlap instead of queueing (h5py serialises the HDF5 calls themselves). The
    # writers that take the embedding last (the HDF5 ones) start before the embed and write
    # the count layers while it runs (the fit leaves its worker's core to them), then add
    # what the embedding gives them.
    early = [path for path in exports if writer_named(files[path]).takes_embedded]
    embedded: Future = Future()
    with ThreadPoolExecutor(max_workers=len(exports) + 1, thread_name_prefix="export") as pool:
        jobs = [
            pool.submit(
                io.write,
                ds,
                path,
                progress=args.progress,
                embedded=embedded,
                **_writer_options(args, files[path]),
            )
            for path in early
        ]
        try:
            ds = tl.umap(ds, **_embed_kwargs(args), color=color)
        except BaseException as error:  # the early writers stop at their next block
            embedded.set_exception(error)
            raise
        embedded.set_result(ds)
        later = [path for path in exports if path not in early]
        jobs += [
            pool.submit(
                io.write, ds, path, progress=args.progress, **_writer_options(args, files[path])
            )
            for path in later
        ]
        jobs.append(pool.submit(pictures, ds))
        for job in jobs:
            job.result()
    print(f"distumap: wrote {', '.join([store, *exports, png])} and {html}")


def _info(store: str, as_json: bool) -> None:
    from distumap import io
    from distumap._format import check_store, stages

    ds = io.open_store(store, require=None)
    records = stages(ds)
    if as_json:
        print(json.dumps(records, indent=2, default=str))
        return
    print(f"{store}: {ds.sizes.get('cell', 0)} cells x {ds.sizes.get('gene', 0)} genes")
    for name, record in records.items():
        params = ", ".join(f"{k}={v}" for k, v in record.get("params", {}).items())
        print(f"  {name:<11} {record.get('status', '?'):<9} {params}")
    if "selected" in ds:
        print(f"  genes selected: {int(ds['selected'].sum())}")
    metadata = [name for name, c in ds.coords.items() if c.dims == ("cell",) and name != "cell"]
    if metadata:
        print(f"  metadata: {', '.join(metadata)}")
    problems = check_store(ds)
    for problem in problems:
        print(f"  problem: {problem}")


def _dispatch(args: argparse.Namespace) -> None:
    # each command imports the namespaces it uses: an ingest loads no science and no writer
    from distumap import io

    if args.command == "info":
        _info(args.store, args.json)
        return
    if args.command == "ingest" and args.with_counts and args.use_rep is None:
        raise InputError("--with-counts goes with --use-rep (the counts are read anyway)")
    if args.command == "run" and args.use_rep is not None:
        from distumap.tl._params import embed_params

        # a combination the embed refuses is refused before the ingest, not after it
        options = {k: v for k, v in _embed_kwargs(args).items() if k not in ("progress",)}
        embed_params(**options)
    # refuse to write over what distumap did not write before a cluster starts
    if args.command in ("run", "demo"):
        _check_outputs(*_outputs(args.out.rstrip("/"), args.formats))
    elif args.command == "ingest":
        _check_outputs(args.store, {})
    elif args.command == "export":
        _check_outputs(None, {args.out: io.export_kind(args.out)})
    with _cluster(args):
        if args.command == "run":
            _run_all(args, args.inputs, args.metadata, args.out.rstrip("/"))
        elif args.command == "demo":
            from distumap import testing

            out = args.out.rstrip("/")
            spec = testing.SyntheticSpec(args.cells, args.genes, seed=args.data_seed)
            matrix, metadata = (
                Path(out) / "data" / "matrix.csv",
                Path(out) / "data" / "metadata.csv",
            )
            written = matrix.parent / f".complete-{args.cells}x{args.genes}-{args.data_seed}"
            if not written.exists():  # a re-run resumes on the same data
                print(f"distumap: writing demo data to {matrix.parent}", file=sys.stderr)
                matrix, metadata = testing.write_dataset(matrix.parent, spec)
                written.touch()
            if args.landmarks is None:
                args.landmarks = min(dask.config.get("distumap.landmarks"), args.cells // 3)
            _run_all(args, [str(matrix)], str(metadata), out)
        elif args.command == "ingest":
            _ingest(args, args.inputs, args.store, args.metadata)
        elif args.command == "preprocess":
            from distumap import pp

            pp.preprocess(args.store, **_preprocess_kwargs(args))
        elif args.command == "embed":
            from distumap import tl

            tl.umap(args.store, **_embed_kwargs(args))
        elif args.command == "export":
            ds = io.open_store(args.store, require="embed")
            options = _writer_options(args, io.export_kind(args.out))
            io.write(ds, args.out, progress=args.progress, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distumap`` command; returns the exit code.

    Without ``argv`` (the command itself: its arguments are the process's), the process's
    heap is bounded first (:func:`distumap._compute.tune_allocator`), and the process ends
    after it: the objects it made are frozen out of the garbage collector first, so that the
    interpreter's exit does not walk every object of numba, pandas, xarray and bokeh in each of
    its collections (most of a small input's exit). Nothing else changes: files are closed and
    the cluster is gone by then, and the atexit handlers still run.
    """
    if argv is None:
        from distumap._compute import tune_allocator

        tune_allocator()
    try:
        return _main(argv)
    finally:
        if argv is None:
            gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("default", category=UserWarning, module="distumap")
    try:
        _dispatch(args)
    except InputError as error:
        print(f"distumap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distumap: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line, not a traceback
        if os.environ.get("DISTUMAP_TRACEBACK"):
            raise
        print(f"distumap: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
