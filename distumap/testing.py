"""Seeded synthetic count matrices in the tutorial's CSV layout, for tests, demo and benchmarks.

The model, in short: each gene has a heavy-tailed base expression; cells belong to subclasses of
very different sizes, grouped in classes; every class and every subclass raises its own marker
genes; each cell has a library-size factor; counts are Poisson draws. At the tutorial's 50,281
genes about 8% of the genes have fewer than 50% zeros, as in the real data.

Counts are reproducible block by block: everything about the genes and the populations comes from
``seed``, and cell ``i``'s row comes from a counter-based generator keyed by ``(seed, i)``, so any
block size (or any order of blocks) gives the same matrix. ``synthetic_counts`` and
``write_matrix_csv`` use the same compiled kernels and agree exactly.

Examples
--------
>>> from distumap.testing import SyntheticSpec, synthetic_counts, write_dataset
>>> data = synthetic_counts(200, 50, seed=1, zero_genes=2, zero_cells=1)
>>> data.counts.shape, data.counts.dtype
((200, 50), dtype('int32'))
>>> matrix, metadata = write_dataset(tmp_path, SyntheticSpec(200, 50, seed=1))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numba
import numpy as np
import pandas as pd

__all__ = [
    "R_DIALECTS",
    "TUTORIAL_CELLS",
    "TUTORIAL_GENES",
    "SyntheticData",
    "SyntheticSpec",
    "synthetic_counts",
    "synthetic_gene_ids",
    "write_10x_h5",
    "write_anndata_zarr",
    "write_dataset",
    "write_genes_by_cells_csv",
    "write_h5ad",
    "write_loom",
    "write_matrix_csv",
    "write_metadata_csv",
    "write_mex",
]

#: the tutorial's matrix: 76,533 human motor-cortex cells x 50,281 genes (~7.7 GB of CSV)
TUTORIAL_CELLS = 76_533
TUTORIAL_GENES = 50_281

# Class and subclass names of the human motor cortex, so that demos read like the tutorial.
_CLASS_NAMES = ("Glutamatergic", "GABAergic", "Non-neuronal")
_SUBCLASS_NAMES = {
    "Glutamatergic": (
        "L2/3 IT",
        "L5 IT",
        "L6 IT",
        "L6 CT",
        "L5/6 NP",
        "L6b",
        "L6 IT Car3",
        "L5 ET",
    ),
    "GABAergic": ("Pvalb", "Vip", "Sst", "Lamp5", "Sncg", "Chandelier", "Sst Chodl"),
    "Non-neuronal": ("Oligo", "Astro", "OPC", "Micro-PVM", "Endo", "VLMC", "Pericyte"),
}
# Letters-only prefixes: a name splits uniquely into prefix and number, so names are unique.
_GENE_FAMILIES = (
    "ZNF", "SLC", "KCN", "TMEM", "CCDC", "FAM", "OR", "RPL", "LINC", "ANKRD", "PCDH", "GPR", "CDH",
    "ADAM", "KIAA", "SNOR", "MIR", "TBC", "DNAJ", "ARHGEF", "NDUF", "PRR", "CACN", "LRRC", "WDR",
    "SEMA", "ATP", "RNF", "KRT", "ABC", "PPP", "CYP", "MT", "COL", "HOX", "GRI", "SYT", "NRXN",
    "SCN", "GABR",
)  # fmt: skip

# splitmix64 constants (Steele, Lea and Flood 2014); the increment is 2**64 / golden ratio
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53

# Poisson means below this are drawn as products of uniforms (lam + 1 cheap steps); above, by PTRS
_PRODUCT_LIMIT = 30.0


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic dataset is: its shape, seed and model parameters.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the count matrix (cells are rows, as in the CSV).
    seed
        Everything about the dataset follows from it.
    n_subclasses, n_classes
        Populations: subclasses, assigned to classes in turn. With 3 classes and up to 8, 7 and 7
        subclasses per class the labels are the human motor cortex's (``"L2/3 IT"``, ``"Pvalb"``,
        ...); otherwise generic labels (``"Class 4"``, ``"Glutamatergic 9"``).
    smallest_fraction
        Subclass sizes fall geometrically, by a constant ratio, down to this share of the cells
        for the last subclass (with 20 subclasses and 0.002 the largest holds 22.6%). Cells
        are assigned by a golden-ratio sequence, so every prefix of the cells holds each subclass
        within a couple of cells of its expected count.
    marker_fraction
        Fraction of the genes raised in each subclass (twice as many in each class).
    marker_log2_fold
        Mean log2 fold change of a marker gene (drawn per marker around this value).
    zero_genes, zero_cells
        How many genes and cells are all zero, for nasty fixtures. Their positions are seeded
        (see :attr:`zero_gene_indices`), and asking for them changes no other count.
    depth
        Sequencing depth: every expected count is multiplied by it. 1 gives ~17,000 counts per
        cell at 50,281 genes (the tutorial's Smart-seq-like depth); 0.3 at 20,000 genes gives
        droplet-like sparsity (~1,300 detected genes and ~2,000 counts per cell, as in 10x data).

    Examples
    --------
    >>> spec = SyntheticSpec(1_000, 200, seed=3, zero_cells=2)
    >>> spec.counts(0, 10).shape
    (10, 200)
    """

    n_cells: int
    n_genes: int
    seed: int = 0
    n_subclasses: int = 20
    n_classes: int = 3
    smallest_fraction: float = 0.002
    marker_fraction: float = 0.02
    marker_log2_fold: float = 2.0
    zero_genes: int = 0
    zero_cells: int = 0
    depth: float = 1.0

    def __post_init__(self) -> None:
        if self.n_cells < 0 or self.n_genes < 1:
            raise ValueError(f"need n_cells >= 0 and n_genes >= 1, got {self.shape}")
        if not 1 <= self.n_classes <= self.n_subclasses:
            raise ValueError("need 1 <= n_classes <= n_subclasses")
        if not 0 < self.smallest_fraction <= 1 / self.n_subclasses:
            raise ValueError("need 0 < smallest_fraction <= 1 / n_subclasses")
        if not 0 <= self.zero_genes <= self.n_genes or not 0 <= self.zero_cells <= self.n_cells:
            raise ValueError("zero_genes and zero_cells must fit in the matrix")
        if not self.depth > 0:
            raise ValueError(f"depth must be positive, got {self.depth}")

    @classmethod
    def tutorial(cls, *, seed: int = 0, **options) -> SyntheticSpec:
        """The tutorial's shape: 76,533 cells x 50,281 genes."""
        return cls(TUTORIAL_CELLS, TUTORIAL_GENES, seed=seed, **options)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_cells, self.n_genes)

    @property
    def zero_gene_indices(self) -> np.ndarray:
        """Sorted column indices of the genes made all zero (other genes may be zero by chance)."""
        return _model(self).zero_genes.copy()

    @property
    def zero_cell_indices(self) -> np.ndarray:
        """Sorted row indices of the cells made all zero."""
        return _model(self).zero_cells.copy()

    def counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Counts of cells ``start:stop`` as an int32 array (cells x genes); any split agrees."""
        start, stop = self._range(start, stop)
        population, scale = self._cells(start, stop)
        out = np.empty((stop - start, self.n_genes), dtype=np.int32)
        _fill_counts(out, start, _model(self).seed_key, population, scale, _model(self).means)
        return out

    def cell_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Sample names of cells ``start:stop``: unique, 10x-barcode-like, fixed width."""
        start, stop = self._range(start, stop)
        return (
            _name_bytes(start, stop, _model(self).seed_key)
            .view(f"S{_NAME_WIDTH}")[:, 0]
            .astype(str)
        )

    def gene_names(self) -> np.ndarray:
        """Unique gene-symbol-like names (``"ZNF1"``, ``"SLC1"``, ...), in column order."""
        return _gene_names(self.n_genes)

    def metadata(self) -> pd.DataFrame:
        """One row per cell, in matrix order.

        Columns: ``sample_name``, ``class_label``, ``subclass_label``, ``subclass_color`` and
        ``size_factor`` (the cell's library-size factor; 0 for the all-zero cells).
        """
        model = _model(self)
        population, scale = self._cells(0, self.n_cells)
        return pd.DataFrame(
            {
                "sample_name": self.cell_names(),
                "class_label": model.class_names[model.subclass_class[population]],
                "subclass_label": model.subclass_names[population],
                "subclass_color": model.subclass_colors[population],
                "size_factor": scale.astype(np.float32),
            }
        )

    def subclass_fractions(self) -> pd.Series:
        """Expected share of cells of each subclass, largest first."""
        model = _model(self)
        return pd.Series(np.diff(model.cumulative), index=model.subclass_names, name="fraction")

    def materialize(self) -> SyntheticData:
        """The whole dataset in memory (for small shapes)."""
        return SyntheticData(
            self, self.counts(), self.cell_names(), self.gene_names(), self.metadata()
        )

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_cells if stop is None else stop
        if not 0 <= start <= stop <= self.n_cells:
            raise IndexError(f"cells {start}:{stop} outside 0:{self.n_cells}")
        return start, stop

    def _cells(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        model = _model(self)
        population, scale = _cell_draws(
            start, stop, model.seed_key, model.weyl_offset, model.cumulative, model.subclass_scale
        )
        zero = model.zero_cells[(model.zero_cells >= start) & (model.zero_cells < stop)]
        scale[zero - start] = 0.0
        return population, scale


@dataclass
class SyntheticData:
    """A synthetic dataset in memory.

    Attributes
    ----------
    spec
        What it was made from; ``write_matrix_csv(path, spec)`` writes the same matrix.
    counts
        int32, cells x genes.
    cell_names, gene_names
        Unique str arrays, in row and column order.
    metadata
        One row per cell in row order; see :meth:`SyntheticSpec.metadata`.
    """

    spec: SyntheticSpec
    counts: np.ndarray = field(repr=False)
    cell_names: np.ndarray = field(repr=False)
    gene_names: np.ndarray = field(repr=False)
    metadata: pd.DataFrame = field(repr=False)


def synthetic_counts(n_cells: int, n_genes: int, *, seed: int = 0, **options) -> SyntheticData:
    """A seeded synthetic dataset in memory.

    Parameters
    ----------
    n_cells, n_genes
        Shape of the count matrix.
    seed
        Everything follows from it.
    **options
        Other :class:`SyntheticSpec` fields (``zero_genes``, ``zero_cells``, ``n_subclasses``...).

    Returns
    -------
    SyntheticData
        Counts (int32), cell and gene names, and metadata.

    Notes
    -----
    Computes everything at once: meant for small shapes. Stream large ones with
    :func:`write_matrix_csv` or :meth:`SyntheticSpec.counts`.

    Examples
    --------
    >>> data = synthetic_counts(100, 30, seed=2, zero_cells=1)
    >>> int((data.counts.sum(axis=1) == 0).sum()) >= 1
    True
    """
    return SyntheticSpec(n_cells, n_genes, seed=seed, **options).materialize()


@dataclass(frozen=True)
class _RWriter:
    """The text one R call writes for a matrix with row and column names."""

    sep: str
    quote: bool  # names in double quotes (numbers never are)
    first_cell: str | None  # the header's field above the row names; None: it has none
    scientific: bool  # whole numbers of a double matrix as R prints them: 100000 as 1e+05

    def name(self, text: str) -> str:
        return '"' + text.replace('"', '""') + '"' if self.quote else text

    def header(self, names) -> bytes:
        first = [] if self.first_cell is None else [self.name(self.first_cell)]
        return self.sep.join([*first, *(self.name(str(n)) for n in names)]).encode()

    def lines(self, counts: np.ndarray, row_names: list[str], eol: str) -> bytes:
        values = _r_doubles(counts) if self.scientific else counts.astype(str)
        return "".join(
            self.sep.join([self.name(name), *row]) + eol
            for name, row in zip(row_names, values.tolist(), strict=True)
        ).encode()


def _r_doubles(counts: np.ndarray) -> np.ndarray:
    """Whole numbers as R writes a double: fixed notation unless scientific is shorter
    (``scipen = 0``: 100000 is ``1e+05``, 12000000 is ``1.2e+07``, 120000 stays)."""
    text = counts.astype(np.int64).astype(str)
    for index in zip(*np.nonzero((counts >= 100_000) & (counts % 10 == 0)), strict=True):
        fixed = text[index]
        digits = fixed.rstrip("0")
        mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
        scientific = f"{mantissa}e+{len(fixed) - 1:02d}"
        if len(scientific) < len(fixed):
            text[index] = scientific
    return text


#: what R writes for the count matrix ``m`` (cells or genes as row names; a double matrix, as R
#: keeps counts), by the call that writes it: the CSV writers' ``dialect``
_R_WRITERS = {
    # write.table(m, "x.txt"): space-separated, quoted names, no header field above the row names
    "write.table": _RWriter(" ", quote=True, first_cell=None, scientific=True),
    # write.table(m, "x.tsv", sep="\t")
    "write.table-tsv": _RWriter("\t", quote=True, first_cell=None, scientific=True),
    # write.table(m, "x.txt", sep="\t", quote=FALSE)
    "write.table-tsv-unquoted": _RWriter("\t", quote=False, first_cell=None, scientific=True),
    # write.csv(m, "x.csv"): a quoted empty field above the row names
    "write.csv": _RWriter(",", quote=True, first_cell="", scientific=True),
    # data.table::fwrite(as.data.table(m, keep.rownames = TRUE), "x.csv"): quotes where needed
    "fwrite": _RWriter(",", quote=False, first_cell="rn", scientific=True),
    # readr::write_csv(tibble::as_tibble(m, rownames = "rowname"), "x.csv"): readr (since
    # 1.2) writes whole doubles in fixed notation
    "write_csv": _RWriter(",", quote=False, first_cell="rowname", scientific=False),
}

#: the R dialects the CSV writers write (their ``dialect``), named by the R call that writes
#: them: ``write.table`` (R's default: space-separated, quoted, a header with no field above
#: the row names), ``write.table-tsv`` (``sep = "\t"``), ``write.table-tsv-unquoted`` (and
#: ``quote = FALSE``), ``write.csv``, ``fwrite`` (data.table) and ``write_csv`` (readr)
R_DIALECTS = tuple(_R_WRITERS)


def _r_dialect(dialect: str | None) -> _RWriter | None:
    if dialect is None:
        return None
    if dialect not in _R_WRITERS:
        raise ValueError(f"dialect must be None or one of {', '.join(R_DIALECTS)}, not {dialect!r}")
    return _R_WRITERS[dialect]


def write_matrix_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    block_cells: int = 256,
    dialect: str | None = None,
) -> Path:
    """Write the count matrix as the tutorial's ``matrix.csv``, streaming blocks of cells.

    Parameters
    ----------
    path
        Output file. With ``compression="gzip"`` a ``.gz`` suffix is added unless present.
    data
        A spec (generated block by block, for any size) or an in-memory dataset.
    line_ending
        ``"\\n"`` or ``"\\r\\n"`` (both are valid input).
    final_newline
        False leaves the last line unterminated (also valid input).
    compression
        None or ``"gzip"`` (level 1, no timestamp: the same data gives the same bytes).
    block_cells
        Cells per block; it bounds memory (~6 bytes per count) and does not change the output.
    dialect
        None (the tutorial's layout), or one of :data:`R_DIALECTS`: the text that R call
        writes for the same matrix (cells as row names), line ending and compression as asked.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    Header ``sample_name,<gene1>,...``, then ``<sample name>,<int>,...`` per cell. Formatting is a
    compiled kernel into a reused byte buffer; at the tutorial's size it writes ~100 KB per line.

    Examples
    --------
    >>> write_matrix_csv(tmp_path / "matrix.csv", SyntheticSpec(100, 30))  # doctest: +SKIP
    """
    if line_ending not in ("\n", "\r\n"):
        raise ValueError(f"line_ending must be '\\n' or '\\r\\n', got {line_ending!r}")
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
    if block_cells < 1:
        raise ValueError("block_cells must be positive")
    r_dialect = _r_dialect(dialect)
    spec, counts_in_memory = _unpack(data)
    path = Path(path)
    if compression == "gzip" and path.suffix != ".gz":
        path = path.with_name(path.name + ".gz")
    eol = np.frombuffer(line_ending.encode(), dtype=np.uint8)
    header = ",".join(["sample_name", *spec.gene_names()]).encode()
    if r_dialect is not None:
        header = r_dialect.header(spec.gene_names())
    n_cells = spec.n_cells
    with open(path, "wb") as raw:
        sink = (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
            if compression == "gzip"
            else raw
        )
        try:
            sink.write(header)
            if n_cells == 0:
                if final_newline:
                    sink.write(eol.tobytes())
                return path
            sink.write(eol.tobytes())
            buffer = np.empty(0, dtype=np.uint8)
            for start in range(0, n_cells, block_cells):
                stop = min(start + block_cells, n_cells)
                if counts_in_memory is None:
                    block = spec.counts(start, stop)
                else:
                    block = np.ascontiguousarray(counts_in_memory[start:stop], dtype=np.int32)
                names = _name_bytes(start, stop, _model(spec).seed_key)
                if r_dialect is not None:
                    text = r_dialect.lines(block, [bytes(n).decode() for n in names], line_ending)
                    sink.write(text[: -eol.size] if stop == n_cells and not final_newline else text)
                    del block
                    continue
                size = _text_size(block, names.shape[1], eol.size)
                if buffer.size < size:
                    buffer = np.empty(int(size * 1.25), dtype=np.uint8)
                written = _format_rows(block, names, eol, buffer)
                if stop == n_cells and not final_newline:
                    written -= eol.size
                sink.write(memoryview(buffer)[:written])
                del block  # before the next block is made: peak memory holds one block
        finally:
            if sink is not raw:
                sink.close()
    return path


def write_genes_by_cells_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    sep: Literal[",", "\t"] = ",",
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    block_genes: int = 256,
    dialect: str | None = None,
) -> Path:
    """Write the count matrix transposed, genes in rows, as most GEO supplementary files are.

    Parameters
    ----------
    path
        Output file. With ``compression="gzip"`` a ``.gz`` suffix is added unless present.
    data
        A spec (generated block by block, for any size) or an in-memory dataset.
    sep
        ``","`` (CSV) or ``"\\t"`` (TSV).
    line_ending
        ``"\\n"`` or ``"\\r\\n"`` (both are valid input).
    final_newline
        False leaves the last line unterminated (also valid input).
    compression
        None or ``"gzip"`` (level 1, no timestamp: the same data gives the same bytes).
    block_genes
        Genes per block; it bounds memory (~10 bytes per count of a block of genes x all cells)
        and does not change the output.
    dialect
        None (pandas' layout), or one of :data:`R_DIALECTS`: the text that R call writes for
        the transposed matrix (genes as row names), which brings its own separator (leave
        ``sep`` as it is).

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    The header is an empty first cell and then the cell names, as pandas writes
    ``df.T.to_csv()``; then one line ``<gene>,<count>,...`` per gene, in gene order. The counts
    are exactly :func:`write_matrix_csv`'s, transposed: ingested with
    ``orientation="genes-by-cells"`` they give the same store.

    Examples
    --------
    >>> write_genes_by_cells_csv(tmp_path / "genes.csv", SyntheticSpec(100, 30))  # doctest: +SKIP
    """
    if sep not in (",", "\t"):
        raise ValueError(f"sep must be ',' or '\\t', got {sep!r}")
    if line_ending not in ("\n", "\r\n"):
        raise ValueError(f"line_ending must be '\\n' or '\\r\\n', got {line_ending!r}")
    if compression not in (None, "gzip"):
        raise ValueError(f"compression must be None or 'gzip', got {compression!r}")
    if block_genes < 1:
        raise ValueError("block_genes must be positive")
    r_dialect = _r_dialect(dialect)
    if r_dialect is not None and sep != ",":
        raise ValueError(f"the {dialect} dialect brings its own separator: leave sep as it is")
    spec, counts_in_memory = _unpack(data)
    path = Path(path)
    if compression == "gzip" and path.suffix != ".gz":
        path = path.with_name(path.name + ".gz")
    eol = np.frombuffer(line_ending.encode(), dtype=np.uint8)
    header = sep.join(["", *spec.cell_names()]).encode()
    if r_dialect is not None:
        header = r_dialect.header(spec.cell_names())
    genes = spec.gene_names()
    if counts_in_memory is None:
        model = _model(spec)
        population, scale = spec._cells(0, spec.n_cells)
    with open(path, "wb") as raw:
        sink = (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0)
            if compression == "gzip"
            else raw
        )
        try:
            sink.write(header + eol.tobytes())
            buffer = np.empty(0, dtype=np.uint8)
            for start in range(0, spec.n_genes, block_genes):
                stop = min(start + block_genes, spec.n_genes)
                if counts_in_memory is None:
                    block = np.empty((spec.n_cells, stop - start), dtype=np.int32)
                    _fill_gene_range(block, start, model.seed_key, population, scale, model.means)
                else:
                    block = counts_in_memory[:, start:stop]
                rows = np.ascontiguousarray(block.T, dtype=np.int32)  # genes x cells
                del block
                for offset, gene in enumerate(genes[start:stop]):
                    row = rows[offset : offset + 1]
                    if r_dialect is not None:
                        text = r_dialect.lines(row, [str(gene)], line_ending)
                        last = start + offset == spec.n_genes - 1
                        sink.write(text[: -eol.size] if last and not final_newline else text)
                        continue
                    name = np.frombuffer(str(gene).encode(), dtype=np.uint8)[None, :]
                    size = _text_size(row, name.shape[1], eol.size)
                    if buffer.size < size:
                        buffer = np.empty(int(size * 1.25), dtype=np.uint8)
                    written = _format_rows(row, name, eol, buffer)
                    if start + offset == spec.n_genes - 1 and not final_newline:
                        written -= eol.size
                    text = buffer[:written]
                    if sep == "\t":  # the kernel writes commas; gene names hold none
                        text[text == 44] = 9
                    sink.write(memoryview(text))
                del rows  # before the next block is made: peak memory holds one block
        finally:
            if sink is not raw:
                sink.close()
    return path


@numba.njit(cache=True, nogil=True)
def _fill_gene_range(out, gene_start, seed_key, population, scale, means):
    # _fill_counts for genes gene_start:gene_start + out.shape[1] of cells 0:out.shape[0]: the
    # same draws in the same order for each (cell, gene), so the counts agree bit for bit
    n_rows, n_genes = out.shape
    uniform = np.empty(n_genes, dtype=np.float64)
    p_zero = np.empty(n_genes, dtype=np.float64)
    exponent_bits = np.empty(n_genes, dtype=np.int64)
    power_of_two = exponent_bits.view(np.float64)
    for row in range(n_rows):
        key = _cell_key(seed_key, row)
        mean_row = means[population[row]]
        s = scale[row]
        for gene in range(n_genes):
            t = -min(mean_row[gene_start + gene] * s, 700.0) * _LOG2E
            n = math.floor(t + 0.5)
            p_zero[gene] = _exp2_fraction(t - n)
            exponent_bits[gene] = (np.int64(n) + 1023) << 52
            uniform[gene] = _unit(_mix64(key + np.uint64(gene_start + gene + 1) * _GAMMA))
        for gene in range(n_genes):
            p_zero[gene] *= power_of_two[gene]
            out[row, gene] = uniform[gene] >= p_zero[gene]
        for gene in range(n_genes):
            if out[row, gene] == 0:
                continue
            lam = mean_row[gene_start + gene] * s
            state = _mix64(key + np.uint64(gene_start + gene + 1) * _GAMMA)
            if lam < _PRODUCT_LIMIT:
                threshold = p_zero[gene]
                product = uniform[gene]
                k = 0
                while product >= threshold:
                    k += 1
                    state += _GAMMA
                    product *= _unit(_mix64(state))
                out[row, gene] = k
            else:
                out[row, gene] = _poisson_ptrs(lam, state)


def write_metadata_csv(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    missing_cells: int = 0,
    shuffle: bool = False,
) -> Path:
    """Write the tutorial's ``metadata.csv``: ``sample_name`` plus labels, one row per cell.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or an in-memory dataset.
    missing_cells
        Leave out this many cells (seeded choice), to test the "cells missing from metadata" path.
    shuffle
        Write the rows in a seeded random order instead of the matrix's (a join must not care).

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> write_metadata_csv(tmp_path / "metadata.csv", spec, missing_cells=3)  # doctest: +SKIP
    """
    spec, _ = _unpack(data)
    if not 0 <= missing_cells <= spec.n_cells:
        raise ValueError(f"missing_cells must be in 0..{spec.n_cells}, got {missing_cells}")
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    rng = np.random.default_rng([spec.seed, 0x4D455441])  # "META": a stream of its own
    keep = np.ones(spec.n_cells, dtype=bool)
    keep[rng.choice(spec.n_cells, size=missing_cells, replace=False)] = False
    order = np.flatnonzero(keep)
    if shuffle:
        order = rng.permutation(order)
    path = Path(path)
    metadata.iloc[order].to_csv(path, index=False)
    return path


def write_dataset(
    directory: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    line_ending: Literal["\n", "\r\n"] = "\n",
    final_newline: bool = True,
    compression: Literal["gzip"] | None = None,
    missing_cells: int = 0,
    shuffle_metadata: bool = False,
    block_cells: int = 256,
) -> tuple[Path, Path]:
    """Write ``matrix.csv`` (or ``matrix.csv.gz``) and ``metadata.csv`` into ``directory``.

    Parameters
    ----------
    directory
        Created if missing.
    data
        A spec or an in-memory dataset.
    line_ending, final_newline, compression, block_cells
        As in :func:`write_matrix_csv`.
    missing_cells, shuffle_metadata
        ``missing_cells`` and ``shuffle`` of :func:`write_metadata_csv`.

    Returns
    -------
    tuple of Path
        ``(matrix_path, metadata_path)``.

    Examples
    --------
    >>> matrix, metadata = write_dataset(tmp_path, SyntheticSpec(500, 300))  # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    matrix = write_matrix_csv(
        directory / "matrix.csv",
        data,
        line_ending=line_ending,
        final_newline=final_newline,
        compression=compression,
        block_cells=block_cells,
    )
    metadata = write_metadata_csv(
        directory / "metadata.csv", data, missing_cells=missing_cells, shuffle=shuffle_metadata
    )
    return matrix, metadata


# ---------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class _Model:
    seed_key: np.uint64
    weyl_offset: np.uint64
    means: np.ndarray  # float64, subclass x gene: expected count at size factor 1
    cumulative: np.ndarray  # float64, n_subclasses + 1 edges of the subclass intervals in [0, 1]
    subclass_scale: np.ndarray  # float64, per-subclass library-size factor
    subclass_class: np.ndarray  # int, class index of each subclass
    class_names: np.ndarray
    subclass_names: np.ndarray
    subclass_colors: np.ndarray
    zero_genes: np.ndarray  # sorted indices
    zero_cells: np.ndarray  # sorted indices


@functools.lru_cache(maxsize=8)
def _model(spec: SyntheticSpec) -> _Model:
    rng = np.random.default_rng([spec.seed, 0x5345454B])  # "SEEK": the model's own stream
    n_genes, n_sub = spec.n_genes, spec.n_subclasses

    # Base expression: a wide log-normal (means span ~5 decades), capped at 300 counts per cell,
    # calibrated so that at 50,281 genes about 8% of the genes have fewer than 50% zeros (as in
    # the tutorial's data) with ~17,000 counts per cell on average.
    log_base = np.minimum(-2.92 + 1.8 * rng.standard_normal(n_genes), np.log(300.0))
    log_means = np.repeat(log_base[None, :], n_sub, axis=0)

    # Markers: each class and each subclass raises its own random genes.
    subclass_class = np.arange(n_sub) % spec.n_classes
    log_fold = spec.marker_log2_fold * np.log(2.0)
    n_markers = max(1, round(spec.marker_fraction * n_genes))
    for klass in range(spec.n_classes):
        genes = rng.choice(n_genes, size=min(n_genes, 2 * n_markers), replace=False)
        fold = rng.normal(log_fold, 0.3 * log_fold, size=genes.size)
        members = np.flatnonzero(subclass_class == klass)
        log_means[np.ix_(members, genes)] += fold
    for sub in range(n_sub):
        genes = rng.choice(n_genes, size=n_markers, replace=False)
        log_means[sub, genes] += rng.normal(log_fold, 0.3 * log_fold, size=n_markers)
    means = np.exp(log_means)
    if spec.depth != 1.0:  # exactly the old means at depth 1
        means *= spec.depth
    # the all-zero genes and cells come from a stream of their own: asking for them changes
    # nothing else in the matrix
    zero_rng = np.random.default_rng([spec.seed, 0x5A45524F])  # "ZERO"
    zero_genes = np.sort(zero_rng.choice(n_genes, size=spec.zero_genes, replace=False))
    zero_cells = np.sort(zero_rng.choice(spec.n_cells, size=spec.zero_cells, replace=False))
    means[:, zero_genes] = 0.0

    fractions = _geometric_fractions(n_sub, spec.smallest_fraction)
    # subclasses differ in depth (neurons hold more RNA than glia); the average cell keeps 1
    subclass_scale = np.exp(rng.normal(0.0, 0.3, size=n_sub))
    subclass_scale /= fractions @ subclass_scale
    cumulative = np.concatenate([[0.0], np.cumsum(fractions)])
    cumulative[-1] = 1.0
    class_names, subclass_names = _labels(spec.n_classes, subclass_class)
    colors = np.array(
        [
            "#{:02x}{:02x}{:02x}".format(*rng.integers(40, 220, size=3, endpoint=True))
            for _ in range(n_sub)
        ]
    )
    seeds = rng.integers(0, 2**64, size=2, dtype=np.uint64, endpoint=False)
    return _Model(
        seed_key=seeds[0],
        weyl_offset=seeds[1],
        means=np.ascontiguousarray(means),
        cumulative=cumulative,
        subclass_scale=subclass_scale,
        subclass_class=subclass_class,
        class_names=class_names,
        subclass_names=subclass_names,
        subclass_colors=colors,
        zero_genes=zero_genes,
        zero_cells=zero_cells,
    )


def _geometric_fractions(n: int, smallest: float) -> np.ndarray:
    """``n`` geometric shares summing to 1 whose last (smallest) one is ``smallest``."""
    if n == 1:
        return np.ones(1)

    def smallest_share(ratio: float) -> float:
        shares = ratio ** np.arange(n)
        return shares[-1] / shares.sum()

    # smallest_share rises from 0 (ratio -> 0) to 1/n (ratio = 1): bisect for the target
    target = min(smallest, 1.0 / n)
    low, high = 1e-9, 1.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if smallest_share(mid) < target else (low, mid)
    shares = high ** np.arange(n)
    return shares / shares.sum()


def _labels(n_classes: int, subclass_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if n_classes == len(_CLASS_NAMES):
        class_names = list(_CLASS_NAMES)
    else:
        class_names = [f"Class {k + 1}" for k in range(n_classes)]
    subclass_names = []
    taken = np.zeros(n_classes, dtype=int)
    for klass in subclass_class:
        known = _SUBCLASS_NAMES.get(class_names[klass], ())
        index = taken[klass]
        taken[klass] += 1
        if index < len(known):
            subclass_names.append(known[index])
        else:
            subclass_names.append(f"{class_names[klass]} {index + 1}")
    return np.array(class_names), np.array(subclass_names)


@functools.lru_cache(maxsize=4)
def _gene_names(n_genes: int) -> np.ndarray:
    families = len(_GENE_FAMILIES)
    names = [f"{_GENE_FAMILIES[g % families]}{g // families + 1}" for g in range(n_genes)]
    return np.array(names)


def _unpack(data: SyntheticSpec | SyntheticData) -> tuple[SyntheticSpec, np.ndarray | None]:
    if isinstance(data, SyntheticData):
        if data.counts.shape != data.spec.shape:
            raise ValueError("SyntheticData.counts does not match its spec's shape")
        return data.spec, data.counts
    if isinstance(data, SyntheticSpec):
        return data, None
    raise TypeError(f"expected SyntheticSpec or SyntheticData, got {type(data).__name__}")


# ---------------------------------------------------------------------------------------------
# compiled kernels: counter-based random numbers, Poisson draws, cell names, CSV formatting


@numba.njit(inline="always")
def _mix64(z):
    # splitmix64's finaliser: a bijection of uint64 with good avalanche
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _unit(z):
    return np.float64(z >> np.uint64(11)) * _TO_UNIT


_LOG2E = 1.4426950408889634
# Taylor coefficients of 2**r = exp(r ln 2) up to r**10: relative error < 1e-12 for |r| <= 1/2
_EXP2_COEFFICIENTS = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(11))
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9, _E10 = _EXP2_COEFFICIENTS


@numba.njit(inline="always")
def _exp2_fraction(r):
    # plain multiply-adds in a fixed order: the same bits on every machine and vector width
    tail = _E7 + r * (_E8 + r * (_E9 + r * _E10))
    return _E0 + r * (_E1 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * tail))))))


@numba.njit(inline="always")
def _cell_key(seed_key, cell):
    return _mix64(seed_key + np.uint64(cell + 1) * _GAMMA)


@numba.njit(cache=True, nogil=True)
def _cell_draws(start, stop, seed_key, weyl_offset, cumulative, subclass_scale):
    n = stop - start
    population = np.empty(n, dtype=np.int32)
    scale = np.empty(n, dtype=np.float64)
    n_sub = cumulative.size - 1
    sigma = 0.4  # log-normal spread of library size within a subclass
    for row in range(n):
        cell = start + row
        # golden-ratio (Weyl) sequence: subclass shares are near exact in every prefix of cells
        position = _unit(weyl_offset + np.uint64(cell) * _GAMMA)
        sub = np.searchsorted(cumulative, position, side="right") - 1
        population[row] = min(max(sub, 0), n_sub - 1)
        key = _cell_key(seed_key, cell)
        # the cell's own draws sit at negative counters, apart from the genes' (1, 2, ...)
        u1 = 1.0 - _unit(_mix64(key - _GAMMA))
        u2 = _unit(_mix64(key - np.uint64(2) * _GAMMA))
        normal = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        scale[row] = subclass_scale[population[row]] * math.exp(sigma * normal - 0.5 * sigma**2)
    return population, scale


@numba.njit(inline="always")
def _poisson_ptrs(lam, state):
    # Hörmann's transformed rejection with squeeze (PTRS), valid for lam >= 10
    slam = math.sqrt(lam)
    loglam = math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    v_r = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        state += _GAMMA
        u = _unit(_mix64(state)) - 0.5
        state += _GAMMA
        v = _unit(_mix64(state))
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= v_r:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return k


@numba.njit(cache=True, nogil=True)
def _fill_counts(out, start, seed_key, population, scale, means):
    # Two passes per row. The first is branch-free so that LLVM vectorises it: a uniform per gene
    # and P(0) = exp(-lam) by our own polynomial (numba cannot vectorise math.exp without SVML);
    # it settles the ~85% of entries that are zero. The second finishes the others.
    n_rows, n_genes = out.shape
    uniform = np.empty(n_genes, dtype=np.float64)
    p_zero = np.empty(n_genes, dtype=np.float64)
    exponent_bits = np.empty(n_genes, dtype=np.int64)
    power_of_two = exponent_bits.view(np.float64)
    for row in range(n_rows):
        key = _cell_key(seed_key, start + row)
        mean_row = means[population[row]]
        s = scale[row]
        for gene in range(n_genes):
            # exp(-lam) = 2**t with t = -lam * log2(e) = n + r, |r| <= 1/2
            t = -min(mean_row[gene] * s, 700.0) * _LOG2E
            n = math.floor(t + 0.5)
            p_zero[gene] = _exp2_fraction(t - n)
            exponent_bits[gene] = (np.int64(n) + 1023) << 52
            uniform[gene] = _unit(_mix64(key + np.uint64(gene + 1) * _GAMMA))
        for gene in range(n_genes):
            p_zero[gene] *= power_of_two[gene]
            out[row, gene] = uniform[gene] >= p_zero[gene]
        for gene in range(n_genes):
            if out[row, gene] == 0:
                continue
            lam = mean_row[gene] * s
            state = _mix64(key + np.uint64(gene + 1) * _GAMMA)
            if lam < _PRODUCT_LIMIT:
                # Knuth's product of uniforms, continuing from the uniform that the first pass
                # compared with P(0): k is the number of factors before the product drops below
                # exp(-lam). No divisions, and the next uniform does not wait for the product.
                threshold = p_zero[gene]
                product = uniform[gene]
                k = 0
                while product >= threshold:
                    k += 1
                    state += _GAMMA
                    product *= _unit(_mix64(state))
                out[row, gene] = k
            else:
                out[row, gene] = _poisson_ptrs(lam, state)


_BARCODE = 16
_NAME_WIDTH = _BARCODE + len("-LKTX_0000")


@numba.njit(cache=True, nogil=True)
def _name_bytes(start, stop, seed_key):
    # "<16-base barcode>-LKTX_<library>": the barcode is a bijection of the cell index (below
    # 2**32), so names are unique; 10,000 cells per library, like a 10x run
    out = np.empty((stop - start, _NAME_WIDTH), dtype=np.uint8)
    bases = np.array([65, 67, 71, 84], dtype=np.uint8)  # A C G T
    suffix = np.array([45, 76, 75, 84, 88, 95], dtype=np.uint8)  # -LKTX_
    low32 = np.uint64(0xFFFFFFFF)
    salt = seed_key & low32
    for row in range(stop - start):
        cell = start + row
        h = (np.uint64(cell) & low32) ^ salt
        # a bijective 32-bit mixer (xor-shifts and odd multipliers mod 2**32 are invertible)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x7FEB352D)) & low32
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(0x846CA68B)) & low32
        h ^= h >> np.uint64(16)
        for j in range(_BARCODE):
            out[row, j] = bases[(h >> np.uint64(2 * j)) & np.uint64(3)]
        out[row, _BARCODE : _BARCODE + 6] = suffix
        library = cell // 10_000 + 1
        for j in range(4):
            out[row, _NAME_WIDTH - 1 - j] = 48 + library % 10
            library //= 10
    return out


@numba.njit(cache=True, nogil=True)
def _text_size(counts, name_width, eol_size):
    total = counts.shape[0] * (name_width + eol_size)
    for row in range(counts.shape[0]):
        for gene in range(counts.shape[1]):
            value = counts[row, gene]
            digits = 1
            while value >= 10:
                value //= 10
                digits += 1
            total += digits + 1
    return total


@numba.njit(cache=True, nogil=True)
def _format_rows(counts, names, eol, buffer):
    position = 0
    for row in range(counts.shape[0]):
        for j in range(names.shape[1]):
            buffer[position + j] = names[row, j]
        position += names.shape[1]
        for gene in range(counts.shape[1]):
            value = counts[row, gene]
            buffer[position] = 44  # ","
            position += 1
            if value < 10:
                buffer[position] = 48 + value
                position += 1
                continue
            digits = 1
            rest = value // 10
            while rest > 0:
                rest //= 10
                digits += 1
            for j in range(digits - 1, -1, -1):
                buffer[position + j] = 48 + value % 10
                value //= 10
            position += digits
        for j in range(eol.size):
            buffer[position + j] = eol[j]
        position += eol.size
    return position


# ---------------------------------------------------------------------------------------------
# the binary formats atlases ship in: 10x HDF5 and MEX, AnnData (h5ad, zarr), loom

#: Cell Ranger's HDF5 settings: gzip level 1 in chunks of 80,000 values
_TENX_CHUNK = 80_000
_TENX_COMPRESSION = 1
_ANTIBODY = "Antibody Capture"


def synthetic_gene_ids(n_genes: int) -> np.ndarray:
    """Ensembl-like ids (``"ENSG00000000001"``, ...) of the synthetic genes, in column order.

    Examples
    --------
    >>> synthetic_gene_ids(2).tolist()
    ['ENSG00000000001', 'ENSG00000000002']
    """
    return np.array([f"ENSG{gene + 1:011d}" for gene in range(n_genes)])


def _blocks(data: SyntheticSpec | SyntheticData, block_cells: int):
    """``(start, stop, counts)`` blocks of cells: generated for a spec, sliced for data."""
    spec, counts = _unpack(data)
    for start in range(0, spec.n_cells, max(1, block_cells)):
        stop = min(start + block_cells, spec.n_cells)
        if counts is None:
            yield start, stop, spec.counts(start, stop)
        else:
            yield start, stop, np.ascontiguousarray(counts[start:stop], dtype=np.int32)


def _antibody_counts(start: int, stop: int, n_antibodies: int) -> np.ndarray:
    cells = np.arange(start, stop, dtype=np.int64)[:, None]
    features = np.arange(n_antibodies, dtype=np.int64)[None, :]
    return ((cells * 7 + features * 3) % 11).astype(np.int32)


def write_10x_h5(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    version: Literal[2, 3] = 3,
    genome: str = "GRCh38",
    antibody_features: int = 0,
    block_cells: int = 4096,
) -> Path:
    """Write a 10x Cell Ranger ``filtered_feature_bc_matrix.h5``, block by block.

    Parameters
    ----------
    path
        Output file.
    data
        A spec (generated block by block, with flat memory, for any size) or in-memory data.
    version
        3: ``/matrix`` with ``features/{name,id,feature_type,genome}``; 2: one group named
        ``genome`` with ``genes`` and ``gene_names``.
    genome
        The genome name (v2 group name, v3 ``features/genome``).
    antibody_features
        v3 only: this many ``Antibody Capture`` features after the genes, with small
        deterministic counts (a CITE-seq run), which readers must leave out.
    block_cells
        Cells per block; bounds memory and does not change the file.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    The layout is Cell Ranger's: CSC genes x barcodes (``indptr`` over barcodes), ``data``
    int32, ``indices`` and ``indptr`` int64, ``shape`` int32, fixed-width byte strings, gzip
    level 1 in chunks of 80,000 values, extendible datasets appended block by block.

    Examples
    --------
    >>> write_10x_h5(tmp_path / "filtered.h5", SyntheticSpec(1_000, 200))  # doctest: +SKIP
    """
    import h5py

    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3, got {version!r}")
    if antibody_features and version != 3:
        raise ValueError("antibody features need version 3")
    spec, _ = _unpack(data)
    path = Path(path)
    n_features = spec.n_genes + antibody_features
    names = np.concatenate(
        [spec.gene_names(), [f"AB{j + 1}_TotalSeqB" for j in range(antibody_features)]]
    )
    ids = np.concatenate(
        [synthetic_gene_ids(spec.n_genes), [f"AB{j + 1}" for j in range(antibody_features)]]
    )
    types = np.array(["Gene Expression"] * spec.n_genes + [_ANTIBODY] * antibody_features)
    with h5py.File(path, "w") as file:
        file.attrs["filetype"] = "matrix"
        file.attrs["library_ids"] = np.array([b"LKTX"])
        file.attrs["chemistry_description"] = "Single Cell 3' v3"
        group = file.create_group("matrix" if version == 3 else genome)
        options = dict(compression="gzip", compression_opts=_TENX_COMPRESSION)
        values = group.create_dataset(
            "data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_TENX_CHUNK,),
            **options,
        )  # fmt: skip
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_TENX_CHUNK,),
            **options,
        )  # fmt: skip
        barcodes = group.create_dataset(
            "barcodes", shape=(spec.n_cells,), dtype=f"S{_NAME_WIDTH}", **options
        )
        indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
        nnz = 0
        for start, stop, block in _blocks(data, block_cells):
            if antibody_features:
                block = np.hstack([block, _antibody_counts(start, stop, antibody_features)])
            cells, features = np.nonzero(block)  # row-major: each cell's features in order
            values.resize((nnz + cells.size,))
            indices.resize((nnz + cells.size,))
            values[nnz:] = block[cells, features]
            indices[nnz:] = features
            indptr[start + 1 : stop + 1] = nnz + np.cumsum(
                np.bincount(cells, minlength=stop - start)
            )
            nnz += cells.size
            barcodes[start:stop] = _name_bytes(start, stop, _model(spec).seed_key).view(
                f"S{_NAME_WIDTH}"
            )[:, 0]
            del block, cells, features
        group.create_dataset("indptr", data=indptr, **options)
        group.create_dataset("shape", data=np.array([n_features, spec.n_cells], dtype=np.int32))
        as_bytes = np.char.encode
        if version == 3:
            features_group = group.create_group("features")
            features_group.create_dataset("name", data=as_bytes(names), **options)
            features_group.create_dataset("id", data=as_bytes(ids), **options)
            features_group.create_dataset("feature_type", data=as_bytes(types), **options)
            features_group.create_dataset(
                "genome", data=as_bytes(np.full(n_features, genome)), **options
            )
            features_group.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        else:
            group.create_dataset("genes", data=as_bytes(ids), **options)
            group.create_dataset("gene_names", data=as_bytes(names), **options)
    return path


@numba.njit(inline="always")
def _put_uint(buffer, position, value):
    digits = 1
    rest = value // 10
    while rest > 0:
        rest //= 10
        digits += 1
    for j in range(digits - 1, -1, -1):
        buffer[position + j] = 48 + value % 10
        value //= 10
    return position + digits


@numba.njit(cache=True, nogil=True)
def _format_triplets(first, second, third, buffer):
    # "<first> <second> <third>\n" per entry, all non-negative integers
    position = 0
    for k in range(first.size):
        position = _put_uint(buffer, position, first[k])
        buffer[position] = 32
        position = _put_uint(buffer, position + 1, second[k])
        buffer[position] = 32
        position = _put_uint(buffer, position + 1, third[k])
        buffer[position] = 10
        position += 1
    return position


def _mtx_lines(genes: np.ndarray, cells: np.ndarray, values: np.ndarray) -> memoryview:
    width = sum(len(str(int(part.max()))) if part.size else 1 for part in (genes, cells, values))
    buffer = np.empty(genes.size * (width + 3), dtype=np.uint8)
    written = _format_triplets(
        genes.astype(np.int64), cells.astype(np.int64), values.astype(np.int64), buffer
    )
    return memoryview(buffer)[:written]


def write_mex(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    gzip: bool = True,
    version: Literal[2, 3] = 3,
    antibody_features: int = 0,
    block_cells: int = 4096,
) -> Path:
    """Write a 10x MEX folder: ``matrix.mtx``, ``features.tsv`` or ``genes.tsv``, ``barcodes.tsv``.

    Parameters
    ----------
    folder
        Created if missing.
    data
        A spec or in-memory data. A spec is generated twice (the header needs the number of
        entries first), block by block.
    gzip
        Compress all three files (``.gz``), as Cell Ranger 3+ does.
    version
        3: ``features.tsv`` with ``id, name, Gene Expression``; 2: ``genes.tsv`` with ``id, name``.
    antibody_features
        Version 3: this many ``Antibody Capture`` features after the genes (see
        :func:`write_10x_h5`).
    block_cells
        Cells per block.

    Returns
    -------
    Path
        The folder.

    Notes
    -----
    ``%%MatrixMarket matrix coordinate integer general``, a ``%metadata_json`` comment, the size
    line ``genes cells entries``, then ``gene cell count`` lines (1-based) sorted by cell and
    gene within a cell: Cell Ranger's order.

    Examples
    --------
    >>> write_mex(tmp_path / "filtered", synthetic_counts(100, 30), gzip=False)  # doctest: +SKIP
    """
    import gzip as gzip_module

    if version not in (2, 3):
        raise ValueError(f"version must be 2 or 3, got {version!r}")
    if antibody_features and version != 3:
        raise ValueError("antibody features need version 3")
    spec, _ = _unpack(data)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzip else ""

    def sink(name: str):
        path = folder / (name + suffix)
        if gzip:
            return gzip_module.GzipFile(path, "wb", compresslevel=1, mtime=0)
        return open(path, "wb")

    def with_antibodies(start: int, stop: int, block: np.ndarray) -> np.ndarray:
        if not antibody_features:
            return block
        return np.hstack([block, _antibody_counts(start, stop, antibody_features)])

    nnz = sum(
        int(np.count_nonzero(with_antibodies(start, stop, block)))
        for start, stop, block in _blocks(data, block_cells)
    )
    n_features = spec.n_genes + antibody_features
    with sink("matrix.mtx") as out:
        out.write(b"%%MatrixMarket matrix coordinate integer general\n")
        out.write(
            b'%metadata_json: {"software_version": "cellranger-7.1.0", "format_version": 2}\n'
        )
        out.write(f"{n_features} {spec.n_cells} {nnz}\n".encode())
        for start, stop, block in _blocks(data, block_cells):
            block = with_antibodies(start, stop, block)
            cells, features = np.nonzero(block)
            out.write(_mtx_lines(features + 1, cells + start + 1, block[cells, features]))
    antibodies = range(1, antibody_features + 1)
    names = [*spec.gene_names(), *(f"AB{j}_TotalSeqB" for j in antibodies)]
    ids = [*synthetic_gene_ids(spec.n_genes), *(f"AB{j}" for j in antibodies)]
    types = ["Gene Expression"] * spec.n_genes + [_ANTIBODY] * antibody_features
    with sink("features.tsv" if version == 3 else "genes.tsv") as out:
        if version == 3:
            rows = zip(ids, names, types, strict=True)
            out.write("".join(f"{i}\t{n}\t{t}\n" for i, n, t in rows).encode())
        else:
            out.write("".join(f"{i}\t{n}\n" for i, n in zip(ids, names, strict=True)).encode())
    with sink("barcodes.tsv") as out:
        for start in range(0, spec.n_cells, max(1, block_cells)):
            stop = min(start + block_cells, spec.n_cells)
            out.write("".join(name + "\n" for name in spec.cell_names(start, stop)).encode())
    return folder


def _csr(data: SyntheticSpec | SyntheticData, block_cells: int = 4096):
    """The counts as a scipy CSR matrix, built block by block (for a spec: ~8 bytes per count)."""
    import scipy.sparse

    spec, counts = _unpack(data)
    if counts is not None:
        return scipy.sparse.csr_matrix(counts)
    pieces = [scipy.sparse.csr_matrix(block) for _, _, block in _blocks(data, block_cells)]
    if not pieces:
        return scipy.sparse.csr_matrix((0, spec.n_genes), dtype=np.int32)
    return scipy.sparse.vstack(pieces, format="csr")


@contextlib.contextmanager
def _quiet_anndata():
    """Silence anndata's and zarr's notices about their own future defaults (zarr v3 as the
    default format, autosharding, consolidated metadata in v3): they concern those packages'
    next releases, not the files written here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Writing zarr v2 data will no longer")
        warnings.filterwarnings("ignore", message=r"zarr v3 autosharding will be the default")
        warnings.filterwarnings("ignore", message=r"Consolidated metadata is currently not part")
        yield


def _anndata(data: SyntheticSpec | SyntheticData, x: str, layer: str | None):
    import anndata

    if x not in ("csr", "csc", "dense"):
        raise ValueError(f"x must be 'csr', 'csc' or 'dense', got {x!r}")
    spec, _ = _unpack(data)
    matrix = _csr(data)
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    obs = pd.DataFrame(
        {
            "class_label": pd.Categorical(metadata["class_label"]),
            "subclass_label": pd.Categorical(metadata["subclass_label"]),
            "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
            "size_factor": metadata["size_factor"].to_numpy(np.float32),
        },
        index=pd.Index(metadata["sample_name"].astype(str).to_numpy()),
    )
    var = pd.DataFrame(
        {"gene_ids": synthetic_gene_ids(spec.n_genes)},
        index=pd.Index(spec.gene_names()),
    )

    def shaped(matrix):
        if x == "csc":
            return matrix.tocsc()
        if x == "dense":
            return matrix.toarray()
        return matrix

    if layer is None:
        return anndata.AnnData(X=shaped(matrix), obs=obs, var=var)
    normalised = matrix.astype(np.float32)
    normalised.data = np.log1p(normalised.data)
    return anndata.AnnData(X=shaped(normalised), obs=obs, var=var, layers={layer: shaped(matrix)})


def write_h5ad(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
) -> Path:
    """Write the counts as an AnnData ``.h5ad`` with the anndata package.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or in-memory data (held in memory as CSR, ~8 bytes per count).
    x
        How X is stored: ``"csr"``, ``"csc"`` or ``"dense"``.
    layer
        None: the counts are X. A name: the counts go to ``layers[layer]`` and X holds
        ``log1p`` of them (float32), the usual layout of processed files.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    obs: index = cell names; ``class_label`` and ``subclass_label`` categorical,
    ``subclass_color`` strings, ``size_factor`` float32. var: index = gene names, ``gene_ids``.

    Examples
    --------
    >>> write_h5ad(tmp_path / "cells.h5ad", synthetic_counts(100, 30), x="csc")  # doctest: +SKIP
    """
    path = Path(path)
    with _quiet_anndata():
        _anndata(data, x, layer).write_h5ad(path)
    return path


def write_anndata_zarr(
    folder: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    x: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
    zarr_format: Literal[2, 3] = 2,
) -> Path:
    """Write the counts as an AnnData zarr group with the anndata package (see :func:`write_h5ad`).

    ``zarr_format`` picks zarr v2 (anndata 0.12's default) or v3.

    Examples
    --------
    >>> write_anndata_zarr(tmp_path / "cells.zarr", synthetic_counts(100, 30))  # doctest: +SKIP
    """
    import anndata

    folder = Path(folder)
    with anndata.settings.override(zarr_write_format=zarr_format), _quiet_anndata():
        _anndata(data, x, layer).write_zarr(folder)
    return folder


def write_loom(
    path: str | os.PathLike,
    data: SyntheticSpec | SyntheticData,
    *,
    layer: str | None = None,
) -> Path:
    """Write the counts as a loom file with ``loompy.create``: ``/matrix`` is genes x cells.

    Parameters
    ----------
    path
        Output file.
    data
        A spec or in-memory data (held in memory as sparse, ~12 bytes per count).
    layer
        None: the counts are ``/matrix``. A name: the counts go to ``/layers/<layer>`` and
        ``/matrix`` holds ``log1p`` of them (float32).

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    Row attributes ``Gene`` and ``Accession``; column attributes ``CellID``, ``class_label``,
    ``subclass_label``, ``subclass_color`` and ``size_factor``.

    Examples
    --------
    >>> write_loom(tmp_path / "cells.loom", synthetic_counts(100, 30))  # doctest: +SKIP
    """
    import loompy

    spec, _ = _unpack(data)
    path = Path(path)
    matrix = _csr(data).T.tocoo()  # genes x cells
    metadata = data.metadata if isinstance(data, SyntheticData) else spec.metadata()
    if layer is None:
        layers = {"": matrix}
    else:
        normalised = matrix.astype(np.float32)
        normalised.data = np.log1p(normalised.data)
        layers = {"": normalised, layer: matrix}
    loompy.create(
        str(path),
        layers,
        row_attrs={"Gene": spec.gene_names(), "Accession": synthetic_gene_ids(spec.n_genes)},
        col_attrs={
            "CellID": metadata["sample_name"].astype(str).to_numpy(),
            "class_label": metadata["class_label"].astype(str).to_numpy(),
            "subclass_label": metadata["subclass_label"].astype(str).to_numpy(),
            "subclass_color": metadata["subclass_color"].astype(str).to_numpy(),
            "size_factor": metadata["size_factor"].to_numpy(np.float32),
        },
    )
    return path
