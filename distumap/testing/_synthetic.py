"""The synthetic dataset: its spec, the model behind it (genes, populations, library sizes),
the whole dataset in memory, and the pieces every writer reads (cell blocks, sparse counts,
gene ids)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from distumap.testing._kernels import NAME_WIDTH, cell_draws, fill_counts, name_bytes

#: the tutorial's matrix: 76,533 human motor-cortex cells x 50,281 genes
TUTORIAL_CELLS = 76_533
TUTORIAL_GENES = 50_281

#: :func:`synthetic_counts` options for a few well-separated populations, on which two
#: neighbour graphs of the same cells can agree (the default's twenty subclasses with a few
#: markers among a few hundred genes barely separate)
SEPARATED = {
    "n_subclasses": 5,
    "n_classes": 5,
    "smallest_fraction": 0.1,
    "marker_fraction": 0.1,
    "marker_log2_fold": 3.0,
}

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
        return model_of(self).zero_genes.copy()

    @property
    def zero_cell_indices(self) -> np.ndarray:
        """Sorted row indices of the cells made all zero."""
        return model_of(self).zero_cells.copy()

    def counts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Counts of cells ``start:stop`` as an int32 array (cells x genes); any split agrees."""
        start, stop = self._range(start, stop)
        population, scale = cell_populations(self, start, stop)
        out = np.empty((stop - start, self.n_genes), dtype=np.int32)
        fill_counts(out, start, model_of(self).seed_key, population, scale, model_of(self).means)
        return out

    def cell_names(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Sample names of cells ``start:stop``: unique, 10x-barcode-like, fixed width."""
        start, stop = self._range(start, stop)
        return (
            name_bytes(start, stop, model_of(self).seed_key)
            .view(f"S{NAME_WIDTH}")[:, 0]
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
        model = model_of(self)
        population, scale = cell_populations(self, 0, self.n_cells)
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
        model = model_of(self)
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


def synthetic_gene_ids(n_genes: int) -> np.ndarray:
    """Ensembl-like ids (``"ENSG00000000001"``, ...) of the synthetic genes, in column order.

    Examples
    --------
    >>> synthetic_gene_ids(2).tolist()
    ['ENSG00000000001', 'ENSG00000000002']
    """
    return np.array([f"ENSG{gene + 1:011d}" for gene in range(n_genes)])


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
def model_of(spec: SyntheticSpec) -> _Model:
    """Everything about the genes and populations of ``spec``, drawn once from its seed."""
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


def unpack(data: SyntheticSpec | SyntheticData) -> tuple[SyntheticSpec, np.ndarray | None]:
    """The spec of ``data`` and its counts in memory (None for a spec: generated on demand)."""
    if isinstance(data, SyntheticData):
        if data.counts.shape != data.spec.shape:
            raise ValueError("SyntheticData.counts does not match its spec's shape")
        return data.spec, data.counts
    if isinstance(data, SyntheticSpec):
        return data, None
    raise TypeError(f"expected SyntheticSpec or SyntheticData, got {type(data).__name__}")


def cell_populations(spec: SyntheticSpec, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Subclass and library-size factor of cells ``start:stop`` (0 for the all-zero cells)."""
    model = model_of(spec)
    population, scale = cell_draws(
        start, stop, model.seed_key, model.weyl_offset, model.cumulative, model.subclass_scale
    )
    zero = model.zero_cells[(model.zero_cells >= start) & (model.zero_cells < stop)]
    scale[zero - start] = 0.0
    return population, scale


def cell_blocks(data: SyntheticSpec | SyntheticData, block_cells: int):
    """``(start, stop, counts)`` blocks of cells: generated for a spec, sliced for data."""
    spec, counts = unpack(data)
    for start in range(0, spec.n_cells, max(1, block_cells)):
        stop = min(start + block_cells, spec.n_cells)
        if counts is None:
            yield start, stop, spec.counts(start, stop)
        else:
            yield start, stop, np.ascontiguousarray(counts[start:stop], dtype=np.int32)


def counts_csr(data: SyntheticSpec | SyntheticData, block_cells: int = 4096):
    """The counts as a scipy CSR matrix, built block by block (for a spec: ~8 bytes per count)."""
    import scipy.sparse

    spec, counts = unpack(data)
    if counts is not None:
        return scipy.sparse.csr_matrix(counts)
    pieces = [scipy.sparse.csr_matrix(block) for _, _, block in cell_blocks(data, block_cells)]
    if not pieces:
        return scipy.sparse.csr_matrix((0, spec.n_genes), dtype=np.int32)
    return scipy.sparse.vstack(pieces, format="csr")
