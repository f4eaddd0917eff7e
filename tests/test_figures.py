"""The figures as images: the marginals figure keeps every label inside the image and every title
clear, whatever the number of latent dimensions."""
import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import vae

from lab import analysis
from lab import figures

from conftest import make_flat_images, quiet


def box(text):
    """Where a text is drawn, in pixels."""
    return text.get_window_extent()


def is_drawn(ax, label):
    """A tick label with text, at a position inside the axes' x range (matplotlib keeps the
    others, undrawn)."""
    if not label.get_text():
        return False
    x = label.get_position()[0]
    return min(ax.get_xlim()) <= x <= max(ax.get_xlim())


@pytest.mark.parametrize("latent", [1, 2, 7, 20])
def test_the_marginals_figure_keeps_its_labels_in_the_image_and_its_titles_clear(latent, tmp_path):
    # Its margins are fixed in inches and save() keeps them (no bbox_inches="tight"): every title
    # and tick label lies inside the image, the figure's title above the axes' titles, no axes'
    # title on the ticks above it, and every axes at least 0.9 inch tall however many lines the
    # title wraps to.
    rng = np.random.default_rng(22)
    x_train = make_flat_images(200, rng)
    x_test = make_flat_images(60, rng)
    model = vae.VAE(784, 16, latent, seed=3)
    _, found = analysis.analyze(model, x_train, x_test, 0, 2, 3, "diag", log=quiet)
    fig = figures.marginals(model, found)
    FigureCanvasAgg(fig).draw()
    axes = [ax for ax in fig.axes if ax.axison]
    ticks = [box(t) for ax in axes for t in ax.get_xticklabels() if is_drawn(ax, t)]
    titles = [box(ax.title) for ax in axes]
    top = box(fig._suptitle)
    assert getattr(fig, "margins_set", False)
    assert len(axes) == latent and ticks
    for b in [top, *titles, *ticks]:                # inside the image
        inside = 0 <= b.x0 and b.x1 <= fig.bbox.width and 0 <= b.y0 and b.y1 <= fig.bbox.height
        assert inside, (b, fig.bbox)
    assert top.y0 >= max(t.y1 for t in titles)      # the figure's title above every axes title
    for ax in axes:                                 # an axes' title clear of the ticks above it
        title = box(ax.title)
        assert not any(title.overlaps(t) for t in ticks), ax.get_title()
    assert min(ax.get_window_extent().height for ax in axes) >= 0.9 * fig.dpi
    figures.save(str(tmp_path), {"m.png": fig})     # saved whole: 80 pixels an inch, not trimmed
    header = (tmp_path / "m.png").read_bytes()[16:24]       # the PNG header's IHDR
    width, height = struct.unpack(">2I", header)
    width_inches, height_inches = fig.get_size_inches()
    assert width == round(80 * width_inches)
    assert height == round(80 * height_inches)


def test_the_paper_figure_puts_each_run_and_its_papers_star_in_one_colour_at_their_epochs():
    runs = {"VAE k = 1": {"curve": [120.0, 110.0, 108.0, 107.0], "nll": 106.5},
            "IWAE k = 5": {"curve": [121.0, 111.0, 109.0, 108.0], "nll": 103.8},
            "PyTorch VAE k = 1": {"curve": [121.5, 111.0, 108.5, 107.5], "nll": 107.3}}
    paper = {"VAE k = 1": 86.76, "IWAE k = 5": 85.54}
    fig = figures.bound_curves(runs, paper, paper_epochs=3280)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for name, nll in paper.items():
        curve, star = lines[name], lines[f"{name}, the paper"]
        assert star.get_color() == curve.get_color(), name
        assert list(star.get_xdata()) == [3280] and list(star.get_ydata()) == [nll]
        assert list(curve.get_xdata()) == [1, 2, 3, 4]
        assert list(curve.get_ydata()) == runs[name]["curve"]
    torch_line = lines["PyTorch VAE k = 1"]
    assert torch_line.get_color() == lines["VAE k = 1"].get_color()   # the same row, by PyTorch
    assert torch_line.get_linestyle() == ":" and lines["VAE k = 1"].get_linestyle() == "-"
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert sorted(float(dot.get_ydata()[0]) for dot in dots) == [103.8, 106.5, 107.3]
    assert all(list(dot.get_xdata()) == [4] for dot in dots)       # each at its last epoch
    assert ax.get_xscale() == "log"
