"""Figures for the book, each returning a ``matplotlib.figure.Figure``.

Figures are built without ``pyplot``: no global figure state, nothing shown twice in a
notebook (the inline backend renders a returned ``Figure``), and no backend is forced.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .labels import class_names, colorize, palette


def image_array(image) -> np.ndarray:
    """A dataset image (uint8 or float [3, H, W] tensor or array; float in [0, 1] or [0, 255])
    as uint8 [H, W, 3] for display."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {list(image.shape)}")
    image = image.transpose(1, 2, 0)
    if image.dtype == np.uint8:
        return image
    scale = 255.0 if float(image.max(initial=0.0)) <= 1.0 else 1.0
    return np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def show_domains(source_dataset, target_dataset, n: int = 4, num_classes: int = 19):
    """Source and target samples with their colour-coded labels, one sample pair per row.

    The two domains of the benchmark (docs/data.md §7): columns are source image, source
    label, target image, target label. Datasets yield dicts with ``image`` ([3, H, W]) and
    ``label`` (train ids [H, W], 255 = ignore, drawn black); the first ``n`` items are shown.
    """
    from matplotlib.figure import Figure

    rows = min(n, len(source_dataset), len(target_dataset))
    if rows < 1:
        raise ValueError("show_domains needs at least one item in each dataset and n >= 1")
    first = image_array(source_dataset[0]["image"])
    aspect = first.shape[1] / first.shape[0]
    fig = Figure(figsize=(4 * 2.2 * aspect, rows * 2.2 + 0.8), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    titles = ("source image", "source label", "target image", "target label")
    for row in range(rows):
        panels = []
        for dataset in (source_dataset, target_dataset):
            item = dataset[row]
            panels += [image_array(item["image"]), colorize(item["label"], num_classes)]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(titles[col])
    fig.suptitle("Source (synthetic) and target (real) domains: images with their colour-coded "
                 "ground-truth labels")
    return fig


# ----------------------------------------------------------------------------- book figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _class_colour(index: int, num_classes: int) -> tuple[float, float, float]:
    return tuple(palette(num_classes)[index] / 255.0)


def _class_legend(fig, classes, num_classes: int, ncols: int = 7) -> None:
    from matplotlib.patches import Patch

    names = class_names(num_classes)
    handles = [Patch(color=_class_colour(c, num_classes), label=names[c]) for c in classes]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(ncols, max(len(handles), 1)),
               fontsize="small", frameon=False)


def show_grid(panels, col_titles=None, row_titles=None, title: str | None = None, cell: float = 2.0):
    """Pictures in rows and columns: ``panels[row][col]`` is an RGB image ([H, W, 3], uint8 or
    float in [0, 1]; a [3, H, W] tensor is accepted) or a scalar map [H, W] drawn in the
    ``magma`` colour map. Used for the benchmark's shift, feature maps and gradient maps."""
    rows, cols = len(panels), max(len(row) for row in panels)
    first = _as_picture(panels[0][0])
    aspect = first.shape[1] / first.shape[0]
    fig = _figure(cols * cell * aspect, rows * cell + (0.5 if title else 0.2))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                picture = _as_picture(row[c])
                ax.imshow(picture, interpolation="nearest", cmap="magma" if picture.ndim == 2 else None)
            else:
                ax.set_axis_off()
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize="medium")
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize="medium")
    if title:
        fig.suptitle(title)
    return fig


def _as_picture(panel) -> np.ndarray:
    if isinstance(panel, torch.Tensor):
        panel = panel.detach().cpu()
        if panel.dim() == 3 and panel.shape[0] == 3:
            return image_array(panel)
        panel = panel.numpy()
    return np.asarray(panel)


def show_pseudo_labels(images, labels, maps: dict, delta_d: float, num_classes: int = 19, n: int = 3):
    """Active target pixels against probability pseudo-labels (paper eq. (1)-(2), docs/method.md §3).

    One row per target image: the image, its ground truth (for the reader only; training never
    sees it), the margin between the second-nearest and nearest anchor with the Delta_d contour,
    the anchor-based pseudo-labels (active pixels only; black = inactive) and the
    probability-based ones (p > threshold). ``maps`` is :func:`cag.analysis.pseudo_label_maps`.
    """
    rows = min(n, len(images))
    first = image_array(images[0])
    aspect = first.shape[1] / first.shape[0]
    fig = _figure(5 * 2.0 * aspect + 0.8, rows * 2.0 + 1.2)
    axes = fig.subplots(rows, 5, squeeze=False)
    titles = ("target image", "ground truth", f"margin d2 - d1 (white: {delta_d:g})",
              "anchor pseudo-labels", "probability pseudo-labels")
    margin_max = float(torch.nan_to_num(maps["margin"][:rows], posinf=0.0).quantile(0.99)) or 1.0
    for r in range(rows):
        margin = maps["margin"][r].cpu().numpy()
        panels = [image_array(images[r]), colorize(labels[r], num_classes), None,
                  colorize(maps["anchor"][r], num_classes), colorize(maps["probability"][r], num_classes)]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 2:
                shown = ax.imshow(margin, cmap="viridis", vmin=0.0, vmax=margin_max, interpolation="nearest")
                if np.nanmin(margin) < delta_d < np.nanmax(margin[np.isfinite(margin)]):
                    ax.contour(margin, levels=[delta_d], colors="white", linewidths=0.8)
            else:
                ax.imshow(panel, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize="small")
    fig.colorbar(shown, ax=axes[:, 2].tolist(), location="bottom", shrink=0.8, label="margin")
    present = sorted(set(torch.unique(torch.as_tensor(labels[:rows])).tolist()) - {255})
    _class_legend(fig, present, num_classes)
    return fig


def _grouped_bars(ax, series: dict, classes: list[str]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(classes))
    for k, (name, values) in enumerate(series.items()):
        heights = [np.nan if values.get(c) is None else values[c] for c in classes]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.grid(axis="y", alpha=0.3)


def _shown_classes(series: dict) -> list[str]:
    names = list(dict.fromkeys(name for values in series.values() for name in values))
    return [n for n in names if any(values.get(n) is not None and not np.isnan(values[n]) for values in series.values())]


def plot_per_class(series: dict, ylabel: str, title: str, ylim=(0.0, 1.0)):
    """Grouped bars of a per-class quantity: ``series`` maps a label (a model, a pseudo-label
    kind) to ``{class name: value or None}``; classes without any value are left out."""
    classes = _shown_classes(series)
    fig = _figure(max(6.0, 0.55 * len(classes) * max(len(series), 1) ** 0.5 + 2), 3.6)
    ax = fig.subplots()
    _grouped_bars(ax, series, classes)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_iou_delta(delta: dict, title: str):
    """Per-class IoU change between two models (:func:`cag.analysis.iou_delta`) as horizontal
    bars: green where the second model is better, red where it is worse."""
    classes = [c for c, v in delta.items() if v is not None and not np.isnan(v)]
    values = np.array([delta[c] for c in classes])
    fig = _figure(6.0, 0.3 * len(classes) + 1.2)
    ax = fig.subplots()
    ax.barh(classes, values, color=np.where(values >= 0, "tab:green", "tab:red"))
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("IoU change")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return fig


def _present_square(matrix, names) -> tuple[np.ndarray, list[str]]:
    """The rows and columns of a class-by-class matrix whose row is not all NaN, and their names."""
    matrix = torch.as_tensor(matrix).double()
    present = [i for i in range(matrix.shape[0]) if not torch.isnan(matrix[i]).all()]
    return matrix[present][:, present].numpy(), [names[i] for i in present]


def _class_ticks(ax, labels) -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")


def plot_confusion(matrix, names, title: str):
    """A row-normalised confusion matrix (:func:`cag.analysis.row_normalised`) of the classes
    present in the ground truth: entry (t, p) is the share of class-t pixels predicted as p."""
    shown, labels = _present_square(matrix, names)
    fig = _figure(0.45 * len(labels) + 2.4, 0.45 * len(labels) + 1.6)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0)
    for (t, p), value in np.ndenumerate(shown):
        if value >= 0.01:
            ax.text(p, t, f"{value:.2f}".lstrip("0"), ha="center", va="center", fontsize=6,
                    color="white" if value > 0.6 else "black")
    _class_ticks(ax, labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's pixels")
    ax.set_title(title)
    return fig


def plot_feature_space(panels: list[dict], num_classes: int = 19, title: str | None = None):
    """Target pixel features against the category anchors in a 2-D projection (docs/method.md §2).

    Each panel is a dict with ``title``, ``points`` [N, 2], ``classes`` [N] (ground truth, for
    colour only), ``anchors`` [K, 2] and ``anchor_classes`` [K]: dots are pixels coloured by
    their true class, stars the anchors in their class's colour.
    """
    fig = _figure(4.2 * len(panels), 4.6)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        points, classes = np.asarray(panel["points"]), np.asarray(panel["classes"])
        colours = palette(num_classes)[classes] / 255.0
        ax.scatter(points[:, 0], points[:, 1], c=colours, s=3, alpha=0.5, linewidths=0)
        anchors = np.asarray(panel["anchors"])
        anchor_colours = palette(num_classes)[np.asarray(panel["anchor_classes"])] / 255.0
        ax.scatter(anchors[:, 0], anchors[:, 1], c=anchor_colours, s=180, marker="*", edgecolors="black",
                   linewidths=0.8)
        ax.set_title(panel["title"], fontsize="medium")
        ax.set_xlabel("principal axis 1")
        ax.set_ylabel("principal axis 2")
    present = sorted(set(np.concatenate([np.asarray(p["classes"]) for p in panels]).tolist()))
    _class_legend(fig, present, num_classes)
    if title:
        fig.suptitle(title)
    return fig


def plot_anchor_distances(distances, names, delta_d: float, title: str):
    """Pairwise anchor distances (:func:`cag.analysis.anchor_separation`) of the classes that
    have an anchor, annotated; the scale against which Delta_d is set (docs/method.md §2)."""
    shown, labels = _present_square(distances, names)
    fig = _figure(0.45 * len(labels) + 2.6, 0.45 * len(labels) + 1.6)
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="viridis")
    for (a, b), value in np.ndenumerate(shown):
        if a != b:
            ax.text(b, a, f"{value:.1f}", ha="center", va="center", fontsize=6,
                    color="white" if value < np.nanmean(shown) else "black")
    _class_ticks(ax, labels)
    fig.colorbar(image, ax=ax, shrink=0.8, label=f"Euclidean distance (Delta_d = {delta_d:g})")
    ax.set_title(title)
    return fig


def plot_curves(curves: dict, keys, title: str):
    """Training curves of consecutive stages on one iteration axis: ``curves`` maps a stage name
    to its ``metrics.jsonl`` records (:func:`cag.analysis.read_metrics`); one panel per key in
    ``keys`` (records lacking a key are skipped); dashed lines mark where a stage begins, and
    each stage keeps its colour in every panel."""
    from matplotlib.lines import Line2D

    keys = list(keys)
    fig = _figure(7.5, 2.1 * len(keys) + 0.9)
    axes = fig.subplots(len(keys), 1, squeeze=False, sharex=True)[:, 0]
    offset, starts = 0, []
    for k, (stage, records) in enumerate(curves.items()):
        starts.append(offset)
        for ax, key in zip(axes, keys):
            points = [(offset + r["iter"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=f"C{k}", marker="o" if len(points) < 8 else None, markersize=3)
        offset += max((r["iter"] for r in records), default=0)
    for ax, key in zip(axes, keys):
        for start in starts[1:]:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{k}", label=stage) for k, stage in enumerate(curves)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize="small", frameon=False)
    axes[-1].set_xlabel("iteration (stages one after another)")
    fig.suptitle(title)
    return fig


def plot_margins(margins, correct, delta_d: float, title: str):
    """Histogram of the anchor margin d2 - d1 (paper eq. (2)) of target pixels whose nearest
    anchor is right against those where it is wrong, with the Delta_d threshold."""
    margins, correct = np.asarray(margins, dtype=float), np.asarray(correct, dtype=bool)
    finite = np.isfinite(margins)
    bins = np.linspace(0.0, np.quantile(margins[finite], 0.995) if finite.any() else 1.0, 40)
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    ax.hist(margins[finite & correct], bins=bins, alpha=0.6, label="nearest anchor is the true class")
    ax.hist(margins[finite & ~correct], bins=bins, alpha=0.6, label="nearest anchor is wrong")
    ax.axvline(delta_d, color="black", linestyle="--", label=f"Delta_d = {delta_d:g}")
    ax.set_xlabel("margin d2 - d1 (second-nearest minus nearest anchor distance)")
    ax.set_ylabel("pixels")
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def plot_delta_sweep(deltas, precision, recall, active, chosen: float, title: str, gap: float | None = None):
    """Pixel-weighted precision, recall and active fraction of the anchor pseudo-labels
    against Delta_d (docs/method.md §3): a larger margin buys precision with recall. With
    ``gap`` (the smallest distance between two anchors) a dotted line marks it: above it the
    two classes of the closest pair can get no label (the margin bound, eq. (3.4))."""
    fig = _figure(6.5, 3.4)
    ax = fig.subplots()
    for values, label in ((precision, "precision"), (recall, "recall"), (active, "active fraction")):
        ax.plot(deltas, values, marker="o", markersize=3, label=label)
    ax.axvline(chosen, color="black", linestyle="--", label=f"configured Delta_d = {chosen:g}")
    if gap is not None:
        ax.axvline(gap, color="grey", linestyle=":", label=f"smallest anchor gap = {gap:.2f}")
    ax.set_xlabel("Delta_d")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def plot_quality(qualities: dict, names, title: str):
    """Per-class precision (top) and recall (bottom) of pseudo-labels: ``qualities`` maps a
    label to a :func:`cag.pseudo_labels.pseudo_label_quality` dict (summed over a split)."""
    fig = _figure(8.0, 6.0)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, key, ylabel in ((axes[0], "precision", "precision"), (axes[1], "recall", "recall")):
        series = {label: {n: (None if math.isnan(v) else v) for n, v in zip(names, q[key].tolist())}
                  for label, q in qualities.items()}
        present = [n for n, count in zip(names, next(iter(qualities.values()))["ground_truth"].tolist()) if count > 0]
        _grouped_bars(ax, series, present)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0.0, 1.0)
    axes[0].legend(fontsize="small")
    axes[0].tick_params(labelbottom=False)
    fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- chapter 0


def _points_as_features(points) -> torch.Tensor:
    """2-D points [N, 2] as a feature map [1, 2, 1, N], the layout the method's functions take."""
    return torch.as_tensor(np.asarray(points).T, dtype=torch.float32).reshape(1, 2, 1, -1)


def cag_idea(delta_d: float = 1.0, seed: int = 0, n: int = 150):
    """CAG's idea in one picture: two category anchors and the active-target test, in 2-D.

    A toy feature space (chapter 0). Two source classes (open circles) give two category anchors
    (stars), their centroids (:class:`cag.anchors.AnchorAccumulator`, ``mode="global"``, method
    §2). Target features (dots), drawn from a shifted and wider domain, are coloured by
    :func:`cag.pseudo_labels.anchor_pseudo_labels` (method §3, eq. (3.2)): the nearest anchor's
    class where it wins by at least ``delta_d``, grey where it does not. The solid line is where
    both anchors are equally near, the dashed lines where the margin equals ``delta_d``; the
    shaded band between them is where no target pixel gets a label. ``seed`` fixes the draw of
    ``n`` points per class and domain.
    """
    from .anchors import AnchorAccumulator
    from .pseudo_labels import anchor_distances, anchor_pseudo_labels

    rng = np.random.default_rng(seed)
    centres = np.array([[-1.6, 0.0], [1.6, 0.0]])
    source = np.concatenate([c + 0.55 * rng.standard_normal((n, 2)) for c in centres])
    target = np.concatenate([c + np.array([0.6, 0.9]) + 0.9 * rng.standard_normal((n, 2)) for c in centres])
    accumulator = AnchorAccumulator(num_classes=2, dim=2, mode="global")
    accumulator.update(_points_as_features(source), torch.arange(2).repeat_interleave(n).reshape(1, 1, -1))
    anchors = accumulator.anchors
    pseudo = anchor_pseudo_labels(_points_as_features(target), anchors, delta_d=delta_d).flatten().numpy()

    points = np.concatenate([source, target])
    (x0, y0), (x1, y1) = points.min(axis=0) - 0.5, points.max(axis=0) + 0.5
    gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    distances = anchor_distances(_points_as_features(np.stack([gx.ravel(), gy.ravel()], axis=1)), anchors)
    difference = (distances[0, 0] - distances[0, 1]).reshape(gx.shape).numpy()

    fig = _figure(6.8, 4.6)
    ax = fig.subplots()
    ax.contourf(gx, gy, difference, levels=[-delta_d, delta_d], colors=["0.92"])
    ax.contour(gx, gy, difference, levels=[-delta_d, 0.0, delta_d], colors="0.35",
               linestyles=["--", "-", "--"], linewidths=1.0)
    colours = ("tab:blue", "tab:orange")
    for c, colour in enumerate(colours):
        ax.scatter(*source[c * n:(c + 1) * n].T, s=14, facecolors="none", edgecolors=colour, alpha=0.5,
                   label=f"source, class {c}")
        ax.scatter(*target[pseudo == c].T, s=14, color=colour, label=f"target, active: labelled {c}")
    ax.scatter(*target[pseudo == 255].T, s=14, color="0.55", label="target, inactive: ignored")
    ax.scatter(*anchors.numpy().T, s=260, marker="*", color=colours, edgecolors="black", zorder=3,
               label="category anchors")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xlabel("feature 1")
    ax.set_ylabel("feature 2")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Category anchors and active targets (toy, Delta_d = {delta_d:g})")
    return fig


# ----------------------------------------------------------------------------- benchmark results (chapter 8)

_HELD_OUT = "mIoU on the held-out target split (%)"


def _no_data(ax, what: str):
    """An empty panel that says what is missing (partial results: the benchmark writes a row
    only once it is scored), instead of an error; returns the panel's figure."""
    ax.text(0.5, 0.5, f"{what} in these results files yet", ha="center", va="center", transform=ax.transAxes,
            color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.figure


def plot_arms(rows, preset: str, arms=None, checkpoint: str = "last"):
    """Every arm of one preset (summary.csv rows): a bar at the mean mIoU over seeds
    (:func:`cag.results.miou_table`, arms in its order unless given) and each seed as a dot."""
    from .results import miou_table, seed_values

    table = miou_table(rows, preset, checkpoint, arms)
    fig = _figure(max(6.0, 0.5 * len(table) + 2.0), 4.2)
    ax = fig.subplots()
    x = np.arange(len(table))
    ax.bar(x, [100 * t["mean"] for t in table], color="0.82", edgecolor="0.45", label="mean over seeds")
    for i, entry in enumerate(table):
        values = [v for _, v in sorted(seed_values(rows, preset, entry["arm"], checkpoint).items())]
        offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(len(values))
        ax.scatter(i + offsets, 100 * np.asarray(values, dtype=float), color="black", s=14, zorder=3,
                   label="one seed" if i == 0 else None)
    ax.set_xticks(x, [t["name"] for t in table], rotation=40, ha="right")
    ax.set_xlabel("arm")
    ax.set_ylabel(_HELD_OUT)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"Preset {preset}: mIoU per arm\n(bars: mean over seeds; dots: one seed each; {checkpoint} checkpoint)")
    return fig


def plot_comparisons(comparison_rows, preset: str | None = None, title: str | None = None):
    """Forest plot of paired comparisons (comparisons.csv rows, all or one ``preset``'s): per row
    the mean per-seed difference arm A - arm B in mIoU points with its 95 % Student-t interval;
    green where the interval is above 0, red where below, grey where it contains 0. ``title``
    replaces the default one (e.g. to say the comparisons were not declared)."""
    from .results import arm_name

    shown = [r for r in comparison_rows if preset is None or r["preset"] == preset]
    fig = _figure(9.0, 0.32 * len(shown) + 1.6)
    ax = fig.subplots()
    ax.set_xlabel("arm A - arm B in mIoU points (mean, 95 % CI)")
    ax.set_ylabel("comparison (arm A - arm B)")
    ax.set_title(title or "Paired comparisons" + (f" on preset {preset}" if preset else "") + " (differences within each seed)")
    if not shown:
        return _no_data(ax, "no comparison" + (f" on preset {preset}" if preset else ""))
    for y, row in enumerate(shown):
        mean, low, high = (math.nan if row[k] is None else 100 * float(row[k]) for k in ("mean_diff", "ci_low", "ci_high"))
        colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "0.45"
        ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=colour, capsize=3, markersize=4)
    labels = [f"{arm_name(r['arm_a'])} - {arm_name(r['arm_b'])}" + ("" if preset else f" [{r['preset']}]")
              + ("" if r["checkpoint"] == "last" else f" ({r['checkpoint']})") for r in shown]
    ax.set_yticks(range(len(shown)), labels, fontsize="small")
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_per_class_iou(rows, preset: str, arms, checkpoint: str = "last"):
    """Mean IoU over seeds per class and arm (:func:`cag.results.per_class_table`) as grouped bars;
    only the classes the benchmark holds."""
    from .results import arm_name, per_class_table

    table = per_class_table(rows, preset, arms, checkpoint)
    classes = [t["class"] for t in table]
    series = {arm_name(arm): {t["class"]: None if t[arm] is None else 100 * t[arm] for t in table} for arm in arms}
    fig = _figure(min(14.0, max(7.0, 0.5 * len(classes) * max(len(arms), 1) ** 0.5 + 2)), 4.0)
    ax = fig.subplots()
    _grouped_bars(ax, series, classes)
    ax.set_ylim(0.0, 100.0)
    ax.set_xlabel("class")
    ax.set_ylabel("IoU on the held-out target split (%)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not on them
    ax.set_title(f"Preset {preset}: per-class IoU, mean over seeds ({checkpoint} checkpoint)")
    return fig


def plot_calibration(calibration_rows):
    """The calibration (calibration.csv rows), one panel per preset: mean val mIoU over seeds of
    source-only, AdaBN and the oracle against the shift strength (:func:`cag.results.calibration_table`),
    source-only trained longer where the plateau check ran (hollow), and shaded where source-only
    should lie: ``RATIO_BAND`` of the oracle."""
    from .results import RATIO_BAND, calibration_table, plateau_table

    table, plateau = calibration_table(calibration_rows), plateau_table(calibration_rows)
    presets = list(dict.fromkeys(t["preset"] for t in table))
    fig = _figure(4.0 * len(presets), 3.8)
    axes = fig.subplots(1, len(presets), squeeze=False, sharey=True)[0]
    low, high = RATIO_BAND
    for ax, preset in zip(axes, presets):
        cells = sorted((t for t in table if t["preset"] == preset), key=lambda t: t["strength"])
        for key, label, colour in (("source_only", "source-only", "tab:blue"), ("adabn", "AdaBN", "tab:orange"),
                                   ("target_oracle", "target-trained (oracle)", "tab:green")):
            points = [(t["strength"], 100 * t[key]) for t in cells if t[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", color=colour, label=label)
        oracle = [(t["strength"], 100 * t["target_oracle"]) for t in cells if t["target_oracle"] is not None]
        band = f"{low:.0%}-{high:.0%} of the oracle"
        if len(oracle) == 1:
            ax.axhspan(low * oracle[0][1], high * oracle[0][1], color="tab:green", alpha=0.12, label=band)
        elif oracle:
            xs, ys = zip(*oracle)
            ax.fill_between(xs, low * np.array(ys), high * np.array(ys), color="tab:green", alpha=0.12, label=band)
        for iters in sorted({p["long_iters"] for p in plateau if p["preset"] == preset}):
            points = sorted((p["strength"], 100 * p["long"]) for p in plateau
                            if p["preset"] == preset and p["long_iters"] == iters and p["long"] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", linestyle=":", color="tab:blue", markerfacecolor="none",
                        label=f"source-only, {iters} iterations")
        ax.set_xticks([t["strength"] for t in cells], [f"{t['strength']:g}" for t in cells])
        ax.set_xlabel("shift strength")
        ax.set_ylabel("val mIoU (%, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.set_title(f"preset {preset}", fontsize="medium")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4) or 1, fontsize="small",
               frameon=False)  # below the panels: in one it covered the oracle's line
    fig.suptitle("Calibration on target val: source-only, AdaBN and the oracle against the strength")
    return fig


def plot_delta_d(delta_rows, stage: int = 1, preset: str | None = None):
    """The Delta_d sweep (delta_d.csv rows, :func:`cag.results.delta_d_table`) against Delta_d as a
    fraction of each seed's smallest anchor gap: left, the share of target-train pixels that get an
    anchor pseudo-label at ``stage`` and its precision; right, mIoU after each CAG stage."""
    from .results import delta_d_table

    fig = _figure(10.0, 3.8)
    left, right = fig.subplots(1, 2)
    fig.suptitle("Delta_d sweep" + (f" on preset {preset}" if preset else "") + ": means over seeds")
    table = delta_d_table(delta_rows, stage, preset)
    if not table:
        for ax, ylabel in ((left, f"% of target-train pixels, stage {stage}"), (right, _HELD_OUT)):
            ax.set(xlabel="Delta_d / smallest anchor gap", ylabel=ylabel)
            _no_data(ax, "no Delta_d sweep row")
        return fig
    fractions = [t["fraction"] for t in table]
    for key, label in (("active_fraction", "active fraction"), ("active_precision", "precision of the active pixels")):
        left.plot(fractions, [np.nan if t[key] is None else 100 * t[key] for t in table], marker="o", label=label)
    left.set_ylim(0.0, 100.0)
    left.set_ylabel(f"% of target-train pixels, stage {stage}")
    left.set_title(f"Anchor pseudo-labels at stage {stage}", fontsize="medium")
    for k in sorted({r["stage"] for r in delta_rows}):
        rows = delta_d_table(delta_rows, k, preset)
        right.plot([t["fraction"] for t in rows], [np.nan if t["miou"] is None else 100 * t["miou"] for t in rows],
                   marker="o", label=f"after stage {k}")
    right.set_ylabel(_HELD_OUT)
    right.set_title("mIoU", fontsize="medium")
    for ax in (left, right):
        ax.set_xlabel("Delta_d / smallest anchor gap")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def plot_stage_differences(rows, preset: str, arms=("cag", "self_training"), start: str = "warmup",
                           checkpoint: str = "last"):
    """Each arm's paired difference from the warm-up model per CAG stage
    (:func:`cag.results.stage_differences`): mean over seeds in mIoU points with its paired 95 %
    Student-t interval; 0 (a line) is the warm-up every arm starts from."""
    from .results import arm_name, stage_differences

    table = stage_differences(rows, preset, arms, start, checkpoint)
    fig = _figure(6.5, 3.8)
    ax = fig.subplots()
    ax.set_xlabel("CAG stage")
    ax.set_ylabel(f"arm - {arm_name(start)} (mIoU points)")
    ax.set_title(f"Preset {preset}: each arm minus the {arm_name(start)} it starts from\n"
                 f"(paired differences within each seed, mean and 95 % CI; {checkpoint} checkpoint)")
    if not table:
        return _no_data(ax, f"no stage of {', '.join(arms)} on preset {preset}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    for k, arm in enumerate(arms):
        points = [t for t in table if t["arm"] == arm]
        if not points:
            continue
        shift = 0.06 * (k - (len(arms) - 1) / 2)
        means = [100 * t["mean_diff"] for t in points]
        ax.errorbar([0.0] + [t["stage"] + shift for t in points], [0.0] + means,
                    yerr=[[0.0] + [m - 100 * t["ci_low"] for m, t in zip(means, points)],
                          [0.0] + [100 * t["ci_high"] - m for m, t in zip(means, points)]],
                    marker="o", capsize=3, label=points[0]["name"])
    stages = [0] + sorted({t["stage"] for t in table})
    ax.set_xticks(stages, [arm_name(start) if s == 0 else str(s) for s in stages])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig
