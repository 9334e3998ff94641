"""distumap.testing: seeded synthetic data, and CSV files that parse back to exactly that data."""

from __future__ import annotations

import gzip
import itertools
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distumap.testing import (
    SyntheticData,
    SyntheticSpec,
    synthetic_counts,
    write_dataset,
    write_matrix_csv,
    write_metadata_csv,
)
from distumap.testing._kernels import fill_counts

NASTY = SyntheticSpec(53, 40, seed=11, zero_genes=3, zero_cells=4)


def read_matrix_bytes(path) -> bytes:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read()


def parse_matrix(raw: bytes, line_ending: str) -> tuple[list[str], list[str], np.ndarray]:
    """A deliberately plain parser, independent of pandas: (genes, cells, counts)."""
    lines = raw.decode().split(line_ending)
    if lines[-1] == "":
        lines.pop()
    header = lines[0].split(",")
    assert header[0] == "sample_name"
    rows = [line.split(",") for line in lines[1:]]
    cells = [row[0] for row in rows]
    counts = np.array([[int(token) for token in row[1:]] for row in rows], dtype=np.int64)
    return header[1:], cells, counts.reshape(len(rows), len(header) - 1)


# determinism -------------------------------------------------------------------------------


def test_same_seed_same_data_and_other_seed_differs():
    first = synthetic_counts(120, 80, seed=7)
    again = synthetic_counts(120, 80, seed=7)
    other = synthetic_counts(120, 80, seed=8)
    assert first.counts.dtype == np.int32
    assert first.counts.shape == (120, 80)
    np.testing.assert_array_equal(first.counts, again.counts)
    np.testing.assert_array_equal(first.cell_names, again.cell_names)
    pd.testing.assert_frame_equal(first.metadata, again.metadata)
    assert not np.array_equal(first.counts, other.counts)
    assert not np.array_equal(first.cell_names, other.cell_names)


def test_cell_rows_do_not_depend_on_the_number_of_cells():
    small = SyntheticSpec(30, 50, seed=3).counts()
    large = SyntheticSpec(90, 50, seed=3).counts()
    np.testing.assert_array_equal(small, large[:30])


@settings(max_examples=30, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=NASTY.n_cells), max_size=8),
    reverse=st.booleans(),
)
def test_any_block_split_gives_the_same_matrix(cuts, reverse):
    full = NASTY.counts()
    edges = sorted({0, NASTY.n_cells, *cuts})
    blocks = list(itertools.pairwise(edges))
    if reverse:  # blocks generated in any order
        blocks = blocks[::-1]
    pieces = {start: NASTY.counts(start, stop) for start, stop in blocks}
    np.testing.assert_array_equal(np.concatenate([pieces[s] for s in sorted(pieces)]), full)


# the CSV round trip ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line_ending", "final_newline", "compression"),
    [
        ("\n", True, None),
        ("\r\n", True, None),
        ("\n", False, None),
        ("\r\n", False, None),
        ("\n", True, "gzip"),
        ("\r\n", False, "gzip"),
    ],
)
def test_csv_parses_back_to_synthetic_counts(tmp_path, line_ending, final_newline, compression):
    expected = synthetic_counts(53, 40, seed=11, zero_genes=3, zero_cells=4)
    path = write_matrix_csv(
        tmp_path / "matrix.csv",
        NASTY,
        line_ending=line_ending,
        final_newline=final_newline,
        compression=compression,
        block_cells=7,  # 53 cells: a ragged last block of 4
    )
    assert path.name == ("matrix.csv.gz" if compression else "matrix.csv")
    raw = read_matrix_bytes(path)
    assert raw.endswith(line_ending.encode()) == final_newline
    assert raw.count(b"\n") == 54 - (not final_newline)
    assert raw.count(b"\r") == (raw.count(b"\n") if line_ending == "\r\n" else 0)

    genes, cells, counts = parse_matrix(raw, line_ending)
    assert genes == list(expected.gene_names)
    assert cells == list(expected.cell_names)
    np.testing.assert_array_equal(counts, expected.counts)

    # and an independent reader agrees
    frame = pd.read_csv(path, index_col="sample_name")
    assert list(frame.columns) == list(expected.gene_names)
    np.testing.assert_array_equal(frame.to_numpy(), expected.counts)


def test_spec_and_data_write_identical_bytes_for_any_block_size(tmp_path):
    data = NASTY.materialize()
    from_spec = write_matrix_csv(tmp_path / "spec.csv", NASTY, block_cells=5)
    from_data = write_matrix_csv(tmp_path / "data.csv", data, block_cells=64)
    assert from_spec.read_bytes() == from_data.read_bytes()


def test_gzip_output_is_reproducible(tmp_path):
    first = write_matrix_csv(tmp_path / "a.csv", NASTY, compression="gzip")
    second = write_matrix_csv(tmp_path / "b.csv.gz", NASTY, compression="gzip")
    assert second.name == "b.csv.gz"
    assert first.read_bytes() == second.read_bytes()  # no timestamp in the gzip header


def test_large_counts_are_written_with_all_their_digits(tmp_path):
    counts = np.array([[0, 9, 10, 99, 100, 123_456, 2**31 - 1]], dtype=np.int32)
    spec = SyntheticSpec(1, counts.shape[1])
    data = SyntheticData(spec, counts, spec.cell_names(), spec.gene_names(), spec.metadata())
    raw = write_matrix_csv(tmp_path / "m.csv", data).read_bytes()
    assert raw.split(b"\n")[1].split(b",")[1:] == [b"0", b"9", b"10", b"99", b"100", b"123456",
                                                     b"2147483647"]  # fmt: skip


def test_a_matrix_without_cells_is_a_header(tmp_path):
    spec = SyntheticSpec(0, 3)
    assert (
        write_matrix_csv(tmp_path / "m.csv", spec).read_bytes() == b"sample_name,ZNF1,SLC1,KCN1\n"
    )
    unterminated = write_matrix_csv(tmp_path / "n.csv", spec, final_newline=False)
    assert unterminated.read_bytes() == b"sample_name,ZNF1,SLC1,KCN1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"line_ending": "\r"}, "line_ending"),
        ({"compression": "bz2"}, "compression"),
        ({"block_cells": 0}, "block_cells"),
    ],
)
def test_bad_writer_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        write_matrix_csv(tmp_path / "m.csv", NASTY, **options)
    assert not (tmp_path / "m.csv").exists()


# the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_about_8_percent_of_genes_have_under_half_zeros(seed):
    counts = SyntheticSpec(500, 20_000, seed=seed).counts()
    zero_fraction = (counts == 0).mean(axis=0)
    # the tutorial keeps 4,078 of 50,281 genes (8.1%); seeds scatter by about a point
    assert 0.065 <= (zero_fraction < 0.5).mean() <= 0.10
    # and it is sparse overall, like droplet data: mostly zeros and single digits
    assert 0.80 <= (counts == 0).mean() <= 0.92
    assert (counts < 10).mean() > 0.98


def test_subclass_sizes_span_25_to_0_2_percent_and_nest_in_classes():
    spec = SyntheticSpec(5_000, 10, seed=4)
    fractions = spec.subclass_fractions()
    assert len(fractions) == 20
    assert fractions.sum() == pytest.approx(1.0)
    assert 0.20 <= fractions.iloc[0] <= 0.26
    assert fractions.iloc[-1] == pytest.approx(0.002, rel=1e-6)
    assert (np.diff(fractions.to_numpy()) < 0).all()

    metadata = spec.metadata()
    sizes = metadata["subclass_label"].value_counts().reindex(fractions.index)
    # the golden-ratio assignment keeps every subclass within a few cells of its share
    np.testing.assert_allclose(sizes.to_numpy(), fractions.to_numpy() * 5_000, atol=3)
    classes_per_subclass = metadata.groupby("subclass_label")["class_label"].nunique()
    assert (classes_per_subclass == 1).all()
    assert set(metadata["class_label"]) == {"Glutamatergic", "GABAergic", "Non-neuronal"}
    assert {"L2/3 IT", "Pvalb", "Oligo", "Sst Chodl"} <= set(metadata["subclass_label"])


def test_populations_are_neighbours_in_the_tutorials_feature_space():
    # the tutorial's features: log2(x + 1) of the genes with under 50% zeros; a population that
    # UMAP can separate has its cells' nearest neighbours in the same population
    data = synthetic_counts(1_200, 20_000, seed=2)
    counts = data.counts
    features = np.log2(counts[:, (counts == 0).mean(axis=0) < 0.5] + 1.0)
    squared = (features**2).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * features @ features.T
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argpartition(distances, 10, axis=1)[:, :10]
    for column, floor in [("class_label", 0.98), ("subclass_label", 0.88)]:
        labels = data.metadata[column].to_numpy()
        assert (labels[neighbours] == labels[:, None]).mean() >= floor
    labels = data.metadata["subclass_label"].to_numpy()
    agreement = pd.Series((labels[neighbours] == labels[:, None]).mean(axis=1)).groupby(labels)
    sizes = pd.Series(labels).value_counts()
    assert agreement.mean()[sizes[sizes >= 40].index].min() >= 0.8


def test_zero_genes_and_cells_are_all_zero_and_change_nothing_else():
    plain = SyntheticSpec(150, 300, seed=9)
    nasty = SyntheticSpec(150, 300, seed=9, zero_genes=6, zero_cells=5)
    genes, cells = nasty.zero_gene_indices, nasty.zero_cell_indices
    assert len(np.unique(genes)) == 6 and len(np.unique(cells)) == 5
    counts, reference = nasty.counts(), plain.counts()
    assert (counts[:, genes] == 0).all()
    assert (counts[cells] == 0).all()
    assert reference[:, genes].sum() > 0 and (reference[cells].sum(axis=1) > 0).all()
    reference[:, genes] = 0
    reference[cells] = 0
    np.testing.assert_array_equal(counts, reference)
    assert (nasty.metadata()["size_factor"].to_numpy()[cells] == 0).all()


@pytest.mark.parametrize("mean", [0.3, 4.0, 29.0, 31.0, 250.0])
def test_poisson_draws_have_the_right_mean_and_variance(mean):
    # the kernel has three regimes: zero test, product of uniforms (< 30), PTRS (>= 30)
    n_cells, n_genes = 200, 1_000
    out = np.empty((n_cells, n_genes), dtype=np.int32)
    means = np.full((1, n_genes), mean)
    population = np.zeros(n_cells, dtype=np.int32)
    fill_counts(out, 0, np.uint64(12345), population, np.ones(n_cells), means)
    assert out.min() >= 0
    standard_error = np.sqrt(mean / out.size)
    assert abs(out.mean() - mean) < 5 * standard_error
    assert out.var() == pytest.approx(mean, rel=0.05)
    assert (out == 0).mean() == pytest.approx(np.exp(-mean), abs=0.01)


# names and metadata ------------------------------------------------------------------------


def test_names_are_unique_and_look_like_the_tutorials():
    spec = SyntheticSpec(300_000, 50_281, seed=2)
    cells = spec.cell_names()
    genes = spec.gene_names()
    assert len(np.unique(cells)) == len(cells)
    assert len(np.unique(genes)) == len(genes)
    assert all(re.fullmatch(r"[ACGT]{16}-LKTX_\d{4}", name) for name in cells[::997])
    assert cells[-1].endswith("_0030")
    assert all(re.fullmatch(r"[A-Z]+\d+", name) for name in genes[::101])
    np.testing.assert_array_equal(spec.cell_names(1000, 1010), cells[1000:1010])


def test_metadata_rows_match_the_cells(tmp_path):
    data = synthetic_counts(60, 30, seed=1, zero_cells=2)
    assert list(data.metadata.columns) == [
        "sample_name", "class_label", "subclass_label", "subclass_color", "size_factor"
    ]  # fmt: skip
    np.testing.assert_array_equal(data.metadata["sample_name"].to_numpy(), data.cell_names)
    written = pd.read_csv(write_metadata_csv(tmp_path / "metadata.csv", data))
    pd.testing.assert_frame_equal(written, data.metadata, check_dtype=False, rtol=1e-6)
    from_spec = pd.read_csv(write_metadata_csv(tmp_path / "spec.csv", data.spec))
    pd.testing.assert_frame_equal(from_spec, written)


def test_missing_cells_drops_exactly_that_many(tmp_path):
    spec = SyntheticSpec(80, 20, seed=6)
    names = spec.cell_names()
    kept = pd.read_csv(write_metadata_csv(tmp_path / "m.csv", spec, missing_cells=7))
    assert len(kept) == 73
    assert set(kept["sample_name"]) < set(names)
    assert len(set(names) - set(kept["sample_name"])) == 7
    # the kept rows stay in matrix order unless shuffled
    positions = pd.Index(names).get_indexer(kept["sample_name"])
    assert (np.diff(positions) > 0).all()
    shuffled = pd.read_csv(write_metadata_csv(tmp_path / "s.csv", spec, shuffle=True))
    assert set(shuffled["sample_name"]) == set(names)
    assert list(shuffled["sample_name"]) != list(names)
    with pytest.raises(ValueError, match="missing_cells"):
        write_metadata_csv(tmp_path / "x.csv", spec, missing_cells=81)


def test_write_dataset_writes_both_files(tmp_path):
    spec = SyntheticSpec(25, 12, seed=3, zero_cells=1)
    matrix, metadata = write_dataset(
        tmp_path / "data", spec, line_ending="\r\n", compression="gzip", missing_cells=2
    )
    assert matrix == tmp_path / "data" / "matrix.csv.gz"
    assert metadata == tmp_path / "data" / "metadata.csv"
    assert read_matrix_bytes(matrix).startswith(b"sample_name,ZNF1,")
    frame = pd.read_csv(matrix, index_col=0)
    np.testing.assert_array_equal(frame.to_numpy(), spec.counts())
    assert len(pd.read_csv(metadata)) == 23


@pytest.mark.parametrize(
    "options",
    [
        {"n_cells": -1, "n_genes": 5},
        {"n_cells": 5, "n_genes": 0},
        {"n_cells": 5, "n_genes": 5, "zero_genes": 6},
        {"n_cells": 5, "n_genes": 5, "zero_cells": 6},
        {"n_cells": 5, "n_genes": 5, "n_classes": 4, "n_subclasses": 3},
        {"n_cells": 5, "n_genes": 5, "smallest_fraction": 0.2},
    ],
)
def test_impossible_specs_are_refused(options):
    with pytest.raises(ValueError):
        SyntheticSpec(**options)


def test_tutorial_spec_has_the_tutorials_shape():
    spec = SyntheticSpec.tutorial(seed=1)
    assert spec.shape == (76_533, 50_281)
    assert spec.counts(76_530).shape == (3, 50_281)
