"""pl.umap (PNG) and pl.umap_html (bokeh): files written, readable, honest about subsampling."""

from __future__ import annotations

import re

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from distumap._palette import _srgb_to_lab, categories, palette
from distumap.pl._interactive import umap_html
from distumap.pl._static import DPI, FIGSIZE, umap

N_GROUPS = 30


def blobs(n_cells: int, n_groups: int = N_GROUPS, seed: int = 1) -> xr.Dataset:
    """An embedded store's plotting columns: gaussian blobs of very different sizes."""
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.0, n_groups) + 0.05
    sizes = rng.multinomial(n_cells - n_groups, weights / weights.sum()) + 1  # none empty
    label = np.repeat(np.arange(n_groups), sizes)
    centers = rng.uniform(-15, 15, (n_groups, 2))
    spread = rng.uniform(0.3, 1.5, n_groups)
    xy = centers[label] + rng.normal(size=(n_cells, 2)) * spread[label, None]
    names = np.array([f"type {i:02d}" for i in range(n_groups)], dtype=object)
    return xr.Dataset(
        {"X_umap": (("cell", "umap"), da.from_array(xy.astype(np.float32), chunks=(1_000, 2)))},
        coords={
            "cell": np.array([f"cell_{i:07d}" for i in range(n_cells)], dtype=object),
            "subclass_label": ("cell", names[label]),
            "depth": ("cell", xy[:, 1] + rng.normal(size=n_cells)),
        },
    )


@pytest.fixture(scope="module")
def dataset() -> xr.Dataset:
    return blobs(6_000)


def _read_png(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(path)


def _distinct_colors(image: np.ndarray) -> int:
    rgb = np.round(image[..., :3] * 255).astype(np.uint32).reshape(-1, 3)
    return len(np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]))


def test_png_categories(dataset, tmp_path):
    path = tmp_path / "umap.png"
    fig = umap(dataset, color="subclass_label", path=path)
    image = _read_png(path)
    assert image.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    assert _distinct_colors(image) > 200  # 30 colours, blended by alpha and antialiasing
    legend = fig.axes[0].get_legend()
    labels = [text.get_text() for text in legend.get_texts()]
    assert len(labels) == N_GROUPS
    counts = [int(re.search(r"\(([\d,]+)\)$", label).group(1).replace(",", "")) for label in labels]
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == dataset.sizes["cell"]
    assert fig.axes[0].get_title() == "UMAP of 6,000 cells, coloured by subclass_label"
    # the centre of the largest blob carries the largest category's colour, not white
    covered = (image[..., :3] < 0.95).any(axis=-1).mean()
    assert 0.01 < covered < 0.9


def test_png_numeric_column_gets_a_colour_bar(dataset, tmp_path):
    path = tmp_path / "depth.png"
    fig = umap(dataset, color="depth", path=path, title="depth")
    assert len(fig.axes) == 2  # the scatter and the colour bar
    assert fig.axes[1].get_ylabel() == "depth"
    assert fig.axes[0].get_title() == "depth"
    assert _distinct_colors(_read_png(path)) > 100


def test_png_without_colour_and_on_given_axes(dataset, tmp_path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.add_subplot()
    assert umap(dataset, ax=ax, path=tmp_path / "plain.png") is fig
    assert _read_png(tmp_path / "plain.png").shape[:2] == (300, 400)
    assert ax.get_legend() is None
    assert len(ax.collections[0].get_offsets()) == dataset.sizes["cell"]


def test_missing_values_are_one_grey_category_listed_last():
    values = np.array(["b", "", "a", "b", None, "b"], dtype=object)
    codes, names, counts, colors = categories(values)
    assert names == ["b", "a", "(missing)"]
    assert counts.tolist() == [3, 1, 2]
    assert codes.tolist() == [0, 2, 1, 0, 2, 0]
    assert colors[-1] == "#c8c8c8"


def test_the_data_own_colours_are_used_when_one_per_category():
    values = np.array(["b", "", "a", "b", "a"], dtype=object)
    given = np.array(["#00aa00", "", "#0000ff", "#00aa00", "#0000ff"], dtype=object)
    _, names, _, colors = categories(values, given)
    assert names == ["a", "b", "(missing)"]
    assert colors == ["#0000ff", "#00aa00", "#c8c8c8"]
    # two colours for one category, or not colours at all: our palette instead
    for bad in (["#00aa00", "", "#0000ff", "#00aa01", "#0000ff"], ["x", "", "y", "x", "y"]):
        assert categories(values, np.array(bad, dtype=object))[3] == [*palette(2), "#c8c8c8"]


def test_a_text_column_in_blocks_gives_the_categories_of_the_whole():
    """A text colour column is tallied and coded block by block where it lies: the codes,
    names, counts and colours are those of the whole column, categories first seen in a
    later block, the data's own colours and missing values included."""
    import dask.array as da
    import xarray as xr

    from distumap.pl._shared import plot_data

    rng = np.random.default_rng(3)
    values = rng.choice(np.array(["b", "a", "c", "", None], dtype=object), 1_000)
    values[-3:] = "late"
    hue = {"a": "#0000ff", "b": "#00aa00", "c": "#aa0000", "late": "#123456"}
    given = np.array([hue.get(v, "") if v else "" for v in values.tolist()], dtype=object)
    for colours in (given, None):
        columns = {"label": values} | ({} if colours is None else {"label_color": colours})
        ds = xr.Dataset(
            {"X_umap": (("cell", "umap"), da.from_array(rng.normal(size=(1_000, 2)), 64))},
            coords={k: ("cell", da.from_array(v, chunks=64)) for k, v in columns.items()},
        )
        _, numbers, groups = plot_data(ds, "label")
        assert numbers is None
        want = categories(values, colours)
        np.testing.assert_array_equal(groups[0], want[0])
        assert groups[1] == want[1] and groups[3] == want[3]
        np.testing.assert_array_equal(groups[2], want[2])
    assert want[1][-1] == "(missing)" and "late" in want[1]
    assert categories(values, given)[3][want[1].index("late")] == "#123456"


def test_shading_by_codes_in_parts_is_shading_by_colour_per_cell(monkeypatch):
    """The shading takes the cells a part at a time, and a palette with a code per cell: the
    image is the one a colour per cell, all at once, gives; and a numeric column's codes
    look the colour map up as the map itself does (NaN grey, infinities at the ends)."""
    import matplotlib as mpl

    from distumap.pl import _shared
    from distumap.pl._shared import density_rgba
    from distumap.pl._static import lookup

    rng = np.random.default_rng(5)
    xy = rng.normal(size=(5_000, 2))
    xy[7] = np.nan
    numbers = rng.normal(size=5_000)
    numbers[:3] = [np.nan, np.inf, -np.inf]
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#c8c8c8")
    norm = mpl.colors.Normalize(-2.0, 2.0)
    rgb, codes = lookup(cmap, norm, numbers)
    np.testing.assert_allclose(rgb[codes], cmap(norm(numbers))[:, :3])
    bounds, shape = (-3.0, 3.0, -3.0, 3.0), (40, 50)
    whole = density_rgba(xy, rgb[codes], bounds=bounds, shape=shape)
    monkeypatch.setattr(_shared, "SHADE_CELLS", 333)
    parts = density_rgba(xy, rgb, bounds=bounds, shape=shape, codes=codes)
    np.testing.assert_array_equal(parts, whole)
    assert (parts[..., 3] > 0).sum() > 500


def test_png_uses_subclass_color_column(dataset, tmp_path):
    hue = {
        f"type {i:02d}": f"#{(i * 8) % 256:02x}{(255 - i * 8) % 256:02x}80" for i in range(N_GROUPS)
    }
    given = np.array([hue[v] for v in dataset["subclass_label"].values], dtype=object)
    ds = dataset.assign_coords(subclass_color=("cell", given))
    fig = umap(ds, color="subclass_label")
    legend = fig.axes[0].get_legend()
    for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
        name = text.get_text().rsplit(" (", 1)[0]
        assert handle.get_color() == hue[name]


@pytest.mark.parametrize("n", [10, 25, 40])
def test_palette_colours_are_distinct(n):
    colors = palette(n)
    assert len(set(colors)) == n
    rgb = np.array([[int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)] for c in colors])
    lab = _srgb_to_lab(rgb)
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(n) * 1e9
    assert distance.min() > 15  # CIELAB units; about 2.3 is a just noticeable difference


def test_unknown_column_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match="no column 'nope'"):
        umap(dataset, color="nope")


def _cell_names(html: str) -> set[str]:
    return set(re.findall(r"cell_\d{7}", html))


def test_html_all_points_with_hover_and_legend(dataset, tmp_path):
    path = tmp_path / "umap.html"
    assert umap_html(dataset, color="subclass_label", path=path) == str(path)
    html = path.read_text(encoding="utf-8")
    assert len(_cell_names(html)) == dataset.sizes["cell"]
    for i in range(N_GROUPS):
        assert f"type {i:02d} (" in html  # legend entries with counts
    assert "webgl" in html and "HoverTool" in html and "$name" in html
    assert "(points: a sample" not in html and "cells (shading)" not in html
    assert "cdn.bokeh.org" not in html  # resources inline: works offline


def test_html_subsamples_above_max_points_and_says_so(dataset):
    html = umap_html(dataset, color="subclass_label", max_points=1_000)
    names = _cell_names(html)
    assert len(names) == 1_000
    assert "points: a sample of 1,000 of 6,000 cells; shading: all cells" in html
    assert names == _cell_names(umap_html(dataset, color="subclass_label", max_points=1_000))
    # every category keeps cells to hover, however small
    for i in range(N_GROUPS):
        assert f"type {i:02d} (" in html


def test_html_numeric_column(dataset, tmp_path):
    path = tmp_path / "depth.html"
    umap_html(dataset, color="depth", path=path)
    html = path.read_text(encoding="utf-8")
    assert "ColorBar" in html and "Viridis" not in html.split("<script", 1)[0]
    assert len(_cell_names(html)) == dataset.sizes["cell"]


# ---- atlas size: bounded HTML, shading of all cells, honest titles --------------------------


def _atlas(n_cells: int, n_groups: int = 40) -> xr.Dataset:
    """Synthetic coordinates at atlas size, with cell names as long as 10x barcodes with a
    sample suffix (the names dominate a page's size)."""
    rng = np.random.default_rng(7)
    label = rng.integers(0, n_groups, n_cells)
    centers = rng.uniform(-15, 15, (n_groups, 2))
    xy = (centers[label] + rng.normal(size=(n_cells, 2))).astype(np.float32)
    cells = np.char.add("AAACCTGAGCTAGTGG-LKTX_", np.arange(n_cells).astype("U7")).astype(object)
    names = np.array([f"subclass {i:02d}" for i in range(n_groups)], dtype=object)
    return xr.Dataset(
        {"X_umap": (("cell", "umap"), xy)},
        coords={"cell": cells, "subclass_label": ("cell", names[label])},
    )


#: the bound on umap.html at 1,000,000 cells: measured 4.2 MB with these 29-character names
#: (2.9 MB with 12-character ones); before the sample and shading, 6.3 MB with short names
HTML_BOUND_1M = 5_000_000


@pytest.mark.slow
def test_html_at_a_million_cells_stays_light(tmp_path):
    from distumap._format import HTML_MARK, output_kind

    path = tmp_path / "umap.html"
    umap_html(_atlas(1_000_000), color="subclass_label", path=path)
    size = path.stat().st_size
    assert size < HTML_BOUND_1M, f"{size:,} bytes"
    html = path.read_text(encoding="utf-8")
    assert HTML_MARK in html[:2000] and output_kind(path) == "html"
    assert "points: a sample of 50,000 of 1,000,000 cells; shading: all cells" in html
    assert "all 1,000,000 cells (shading)" in html and "data:image/png;base64," in html
    assert len(re.findall(r"LKTX_\d+", html)) == 50_000  # hover names of the sample only
    for i in range(40):
        assert f"subclass {i:02d} (" in html  # the legend counts every cell


def test_sample_keeps_every_category_and_is_seeded():
    from distumap.pl._interactive import CATEGORY_FLOOR, sample_cells

    codes = np.zeros(100_000, dtype=np.int64)
    codes[:7] = 1  # a rare population
    codes[7:200] = 2
    keep = sample_cells(codes.size, 1_000, codes)
    assert keep.size == 1_000 and np.all(np.diff(keep) > 0)
    assert set(np.flatnonzero(codes == 1)) <= set(keep)  # all 7 of them
    assert (codes[keep] == 2).sum() >= CATEGORY_FLOOR
    assert np.array_equal(keep, sample_cells(codes.size, 1_000, codes))
    # without categories: a uniform sample, evenly spread over the cells
    plain = sample_cells(100_000, 1_000)
    assert plain.size == 1_000 and np.histogram(plain, bins=10)[0].min() > 60


def test_html_shading_hides_with_its_legend_entry(dataset):
    html = umap_html(dataset, color="depth", max_points=1_000)
    assert "all 6,000 cells (shading)" in html and "a sample of 1,000 cells" in html
    assert len(_cell_names(html)) == 1_000


def test_density_image_colours_and_opacity():
    from distumap._palette import hex_to_rgb
    from distumap.pl._shared import density_rgba

    xy = np.array([[0.1, 0.1], [0.1, 0.1], [0.1, 0.1], [0.9, 0.9], [np.nan, 0.5]])
    rgb = hex_to_rgb(["#ff0000", "#0000ff", "#0000ff", "#00ff00", "#000000"])
    image = density_rgba(xy, rgb, bounds=(0.0, 1.0, 0.0, 1.0), shape=(2, 2))
    assert image.shape == (2, 2, 4) and image.dtype == np.uint8
    bottom_left, top_right = image[1, 0], image[0, 1]
    assert tuple(bottom_left[:3]) == (85, 0, 170)  # the mean colour of its three cells
    assert tuple(top_right[:3]) == (0, 255, 0)
    assert bottom_left[3] == 255 and 0 < top_right[3] < bottom_left[3]  # denser: more opaque
    assert image[0, 0, 3] == 0 and image[1, 1, 3] == 0  # empty: transparent


def test_png_shades_above_the_density_threshold(dataset, tmp_path, monkeypatch):
    import distumap.pl._static as static
    from distumap._format import output_kind

    monkeypatch.setattr(static, "DENSITY_CELLS", 1_000)
    path = tmp_path / "umap.png"
    fig = umap(dataset, color="subclass_label", path=path)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and not ax.collections  # one image, no scatter
    assert len(ax.get_legend().get_texts()) == N_GROUPS
    assert output_kind(path) == "png"  # still marked as distumap's
    image = _read_png(path)
    assert _distinct_colors(image) > 100
    fig = umap(dataset, color="depth")
    assert len(fig.axes) == 2 and len(fig.axes[0].images) == 1
