"""cag.figures' benchmark-results figures on the fixtures of tests/test_results.py.

Each figure is checked through its artists: how many bars, lines, dots and error bars it draws,
where, and that every panel has a title and both axis labels.
"""
import math

import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from cag import figures
from test_results import T975_2, files, tables  # noqa: F401  (fixtures)


@pytest.fixture
def check():
    """Checks a figure's labels and titles; clears every figure it was given at the end."""
    made = []

    def check(fig, panels: int):
        assert isinstance(fig, Figure)
        made.append(fig)
        axes = fig.axes
        assert len(axes) == panels
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel()
            assert ax.get_title() or fig.get_suptitle()
        assert fig.get_suptitle() or all(ax.get_title() for ax in axes)
        return axes

    yield check
    for fig in made:
        fig.clear()


def containers(ax, kind):
    return [c for c in ax.containers if isinstance(c, kind)]


def test_plot_arms(tables, check):
    fig = figures.plot_arms(tables["summary"], "class")
    (ax,) = check(fig, 1)
    (bars,) = containers(ax, BarContainer)
    assert len(bars) == 8
    # bars at the means in points: source-only first (50), oracle last (80); last checkpoint
    assert bars[0].get_height() == pytest.approx(50.0) and bars[-1].get_height() == pytest.approx(80.0)
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(dots) == 8 and all(len(d.get_offsets()) == 3 for d in dots)
    assert sorted(dots[0].get_offsets()[:, 1]) == pytest.approx([40.0, 50.0, 60.0])
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["source-only", "AdaBN"]
    fig = figures.plot_arms(tables["summary"], "class", arms=["cag_stage1", "self_training_stage1"])
    (ax,) = check(fig, 1)
    assert len(containers(ax, BarContainer)[0]) == 2


def test_plot_comparisons(tables, check):
    fig = figures.plot_comparisons(tables["comparisons"], "class")
    (ax,) = check(fig, 1)
    bars = containers(ax, ErrorbarContainer)
    assert len(bars) == 5
    # first row: CAG stage 1 - self-training stage 1: mean 3 points, interval 1 to 5
    line, _, (segments,) = bars[0].lines[0], bars[0].lines[1], bars[0].lines[2]
    assert line.get_xdata()[0] == pytest.approx(3.0)
    (x0, _), (x1, _) = segments.get_segments()[0]
    assert (x0, x1) == (pytest.approx(1.0), pytest.approx(5.0))
    assert any(list(l.get_xdata()) == [0, 0] for l in ax.lines)   # the vertical line at 0
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "CAG stage 1 - self-training stage 1"
    assert labels[3] == "CAG stage 1 - self-training stage 1 (best_val)"
    assert ax.get_title() == "Paired comparisons on preset class (differences within each seed)"
    fig = figures.plot_comparisons(tables["comparisons"])
    (ax,) = check(fig, 1)
    assert len(containers(ax, ErrorbarContainer)) == 6
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "CAG stage 1 - self-training stage 1 [global]"
    (ax,) = check(figures.plot_comparisons(tables["comparisons"], "class", title="Exploratory"), 1)
    assert ax.get_title() == "Exploratory"
    (ax,) = check(figures.plot_comparisons(tables["comparisons"], "full"), 1)   # partial results: none yet
    assert not containers(ax, ErrorbarContainer)
    assert [t.get_text() for t in ax.texts] == ["no comparison on preset full in these results files yet"]


def test_plot_per_class_iou(tables, check):
    fig = figures.plot_per_class_iou(tables["summary"], "class", ["source_only", "cag_stage1"])
    (ax,) = check(fig, 1)
    groups = containers(ax, BarContainer)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)   # road and sidewalk; train left out
    assert [t.get_text() for t in ax.get_xticklabels()] == ["road", "sidewalk"]
    assert [b.get_height() for b in groups[0]] == [pytest.approx(70.0), pytest.approx(20.0)]
    assert math.isnan(groups[1][1].get_height())   # CAG has no sidewalk value


def test_plot_calibration(tables, check):
    fig = figures.plot_calibration(tables["calibration"])
    class_ax, global_ax = check(fig, 2)
    # class: source-only, AdaBN, oracle, source-only at 800 iterations
    assert len(class_ax.lines) == 4 and len(global_ax.lines) == 4
    so = class_ax.lines[0]
    assert list(so.get_xdata()) == [0.3, 0.35, 0.4]
    assert list(so.get_ydata()) == pytest.approx([35.0, 30.0, 26.0])
    assert len(class_ax.lines[1].get_xdata()) == 2           # AdaBN not measured at 0.3
    # the 40-65 % band: along the oracle at two strengths (class), a horizontal span at one (global)
    (band,) = [c for c in class_ax.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.40 * 60.0) and ys.max() == pytest.approx(0.65 * 65.0)
    (span,) = global_ax.patches
    y_low, y_high = span.get_y(), span.get_y() + span.get_height()   # data units on y
    assert (y_low, y_high) == (pytest.approx(0.40 * 60.0), pytest.approx(0.65 * 60.0))
    # one legend for the figure, below the panels (not on top of a panel's lines)
    assert class_ax.get_legend() is None and len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()][0].startswith("source-only")


def test_plot_delta_d(tables, check):
    fig = figures.plot_delta_d(tables["delta_d"], preset="class")
    left, right = check(fig, 2)
    assert len(left.lines) == 2 and len(right.lines) == 2
    active, precision = left.lines
    assert list(active.get_xdata()) == [0.1, 0.3, 0.6]
    assert list(active.get_ydata()) == pytest.approx([90.0, 60.0, 30.0])
    assert list(precision.get_ydata()) == pytest.approx([70.0, 80.0, 85.0])
    assert list(right.lines[1].get_ydata()) == pytest.approx([60.0, 61.0, 62.0])   # after stage 2
    with pytest.raises(ValueError, match="preset"):
        figures.plot_delta_d(tables["delta_d"])


def test_figures_of_results_not_scored_yet_say_so_without_warnings(check, recwarn):
    """Partial results (the benchmark writes a row once it is scored): an empty panel that says
    what is missing, no error and no warning (a notebook would show it as stderr)."""
    (ax,) = check(figures.plot_stage_differences([], "class"), 1)
    assert [t.get_text() for t in ax.texts] == ["no stage of cag, self_training on preset class in these results "
                                                "files yet"]
    for ax in check(figures.plot_delta_d([], preset="class"), 2):
        assert [t.get_text() for t in ax.texts] == ["no Delta_d sweep row in these results files yet"]
    assert not recwarn.list


def test_plot_stage_differences(tables, check):
    fig = figures.plot_stage_differences(tables["summary"], "class", ["cag", "self_training"])
    (ax,) = check(fig, 1)
    bars = containers(ax, ErrorbarContainer)
    assert len(bars) == 2
    # CAG: 0 at the warm-up, then 4 points (stage 1, interval 4 -+ t * 2 / sqrt 3) and 10 (stage 2)
    line = bars[0].lines[0]
    assert list(line.get_ydata()) == [pytest.approx(0.0), pytest.approx(4.0), pytest.approx(10.0)]
    (_, low), (_, high) = bars[0].lines[2][0].get_segments()[1]
    half = T975_2 * 2.0 / math.sqrt(3)
    assert (low, high) == (pytest.approx(4.0 - half), pytest.approx(4.0 + half))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["warm-up", "1", "2"]
    assert any(list(l.get_ydata()) == [0, 0] for l in ax.lines)   # the warm-up's line at 0
    (ax,) = check(figures.plot_stage_differences([], "class"), 1)
    assert not containers(ax, ErrorbarContainer) and ax.texts

