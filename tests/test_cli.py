"""The `distumap` command: help, exit codes, one-line errors, a whole run, info and resume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from distumap.cli import _embed_kwargs, build_parser, main
from distumap.testing import synthetic_counts, write_dataset


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distumap.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "ingest", "preprocess", "embed", "export", "info", "demo"):
        assert command in out
    assert "DASK_DISTUMAP__LANDMARKS" in out


def test_run_options_follow_the_contract():
    args = build_parser().parse_args(
        [
            "run",
            "m.csv",
            "--out",
            "o",
            "--metadata",
            "meta.csv",
            "--color",
            "subclass_label",
            "--chunk-cells",
            "512",
            "--landmarks",
            "100",
            "--stratify",
            "class_label",
            "--pca",
            "0",
            "--n-neighbors",
            "15",
            "--min-dist",
            "0.1",
            "--seed",
            "1",
            "--max-zero-fraction",
            "0.4",
            "--refine-epochs",
            "5",
            "--scheduler",
            "tcp://127.0.0.1:8786",
            "--no-progress",
        ]
    )
    assert (args.chunk_cells, args.landmarks, args.pca, args.seed) == (512, 100, 0, 1)
    assert args.scheduler == "tcp://127.0.0.1:8786" and args.progress is False
    assert _embed_kwargs(args)["refine_epochs"] == 5 and _embed_kwargs(args)["pca"] == 0
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "m.csv"])  # --out is required
    assert exit_.value.code == 2


def test_loom_graph_only_when_asked(capsys):
    from distumap.cli import _writer_options

    parser = build_parser()
    for command in (["run", "m.csv", "--out", "o"], ["export", "store.zarr", "out.loom"]):
        assert parser.parse_args(command).loom_graph is False
        asked = parser.parse_args([*command, "--loom-graph"])
        assert _writer_options(asked, "loom") == {"graph": True}
        assert _writer_options(asked, "h5ad") == {}
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--loom-graph" in help_text and "np.in1d" in help_text


def test_bad_input_exits_2_with_one_line_naming_file_line_and_gene(tmp_path, loopback_cluster):
    bad = tmp_path / "bad.csv"
    bad.write_text("sample_name,A1BG,A2M\nc1,1,2\nc2,3,NA\n")
    result = _cli(
        "ingest",
        str(bad),
        str(tmp_path / "s.zarr"),
        "--no-progress",
        "--scheduler-file",
        str(loopback_cluster.scheduler_file),
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("distumap: error: ")
    assert f"{bad}: line 3, column 3 (gene 'A2M'): not an integer count: 'NA'" in last
    # the failed ingest is not accepted by the next stage
    result = _cli(
        "preprocess",
        str(tmp_path / "s.zarr"),
        "--no-progress",
        "--scheduler-file",
        str(loopback_cluster.scheduler_file),
    )
    assert result.returncode == 2
    assert "ingest stage is incomplete" in result.stderr


def test_missing_file_exits_2(tmp_path, loopback_cluster):
    result = _cli(
        "ingest",
        str(tmp_path / "nope.csv"),
        str(tmp_path / "s.zarr"),
        "--no-progress",
        "--scheduler-file",
        str(loopback_cluster.scheduler_file),
    )
    assert result.returncode == 2
    assert "nope.csv: no such file" in result.stderr


@pytest.mark.cluster
def test_run_writes_every_output_and_resumes(tmp_path, loopback_cluster):
    import loompy

    data = synthetic_counts(1200, 400, seed=2)
    matrix, metadata = write_dataset(tmp_path / "in", data)
    out = tmp_path / "out"
    args = [
        "run",
        str(matrix),
        "--metadata",
        str(metadata),
        "--out",
        str(out),
        "--chunk-cells",
        "250",
        "--landmarks",
        "400",
        "--pca",
        "10",
        "--no-progress",
        "--scheduler-file",
        str(loopback_cluster.scheduler_file),
    ]
    report = tmp_path / "dask-report.html"
    result = _cli(*args, "--performance-report", str(report))
    assert result.returncode == 0, result.stderr
    assert "Dask dashboard at http" in result.stderr
    assert "Dask Performance Report" in report.read_text()
    for name in ("store.zarr", "embedding.loom", "embedding.h5ad", "umap.png", "umap.html"):
        assert (out / name).exists(), name
    import anndata

    adata = anndata.read_h5ad(out / "embedding.h5ad")
    assert adata.shape == (1200, int(((data.counts == 0).mean(axis=0) < 0.5).sum()))
    assert "subclass_label" in adata.obs and adata.obsm["X_umap"].shape == (1200, 2)
    # the refinement ran (400 landmarks of 1200 cells): its graph is scanpy's neighbour graph
    assert adata.obsp["connectivities"].shape == (1200, 1200) and "neighbors" in adata.uns
    info = _cli("info", str(out / "store.zarr"), "--json")
    records = json.loads(info.stdout)
    assert [records[s]["status"] for s in ("ingest", "preprocess", "embed")] == ["complete"] * 3
    assert records["embed"]["params"]["landmarks"] == 400
    selected = (data.counts == 0).mean(axis=0) < 0.5
    assert records["preprocess"]["genes_selected"] == int(selected.sum())
    with loompy.connect(str(out / "embedding.loom"), "r") as loom:
        assert loom.shape == (int(selected.sum()), 1200)
        np.testing.assert_array_equal(loom[:, :], data.counts[:, selected].T)
        assert loom.ca["X_umap"].shape == (1200, 2)
        assert list(loom.col_graphs.keys()) == []  # the graph only with --loom-graph
    text = _cli("info", str(out / "store.zarr")).stdout
    assert "1200 cells x 400 genes" in text and "subclass_label" in text
    # a re-run skips every finished stage: the records (with their timings) are unchanged; the
    # exports are ours, so they are replaced; --formats picks them
    assert _cli(*args, "--formats", "loom,zarr", "--loom-graph").returncode == 0
    assert anndata.read_zarr(out / "embedding.zarr").shape == adata.shape
    with loompy.connect(str(out / "embedding.loom"), "r") as loom:
        assert loom.col_graphs["KNN"].shape == (1200, 1200)
    again = json.loads(_cli("info", str(out / "store.zarr"), "--json").stdout)
    for stage in ("ingest", "preprocess", "embed"):
        assert again[stage] == records[stage]
