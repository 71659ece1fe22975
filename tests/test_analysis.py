"""cag.analysis: the computations the book shows, on cases small enough to check by hand."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cag import analysis
from cag.config import ConfigError
from cag.labels import class_names
from cag.pseudo_labels import pseudo_label_quality

REPO = Path(__file__).resolve().parents[1]


class PooledModel(torch.nn.Module):
    """A stand-in network: features = 2x2-average of the first two channels, logits = 10 x the
    2x2-average of all three (three classes), both at stride 2."""

    feature_dim = 2

    def forward(self, x):
        return F.avg_pool2d(x[:, :2], 2), 10 * F.avg_pool2d(x, 2)


def tiny_dataset(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, 4, 4, generator=generator),
             "label": torch.randint(0, 3, (4, 4), generator=generator)} for _ in range(n)]


# ----------------------------------------------------------------------------- set-up


def test_repo_root_is_found_from_a_subfolder(tmp_path):
    (tmp_path / "cag").mkdir()
    (tmp_path / "cag" / "__init__.py").write_text("")
    (tmp_path / "configs").mkdir()
    (tmp_path / "book" / "deep").mkdir(parents=True)
    assert analysis.repo_root(tmp_path / "book" / "deep") == tmp_path.resolve()


def test_repo_root_outside_a_repository_names_the_start(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        analysis.repo_root(tmp_path)


def test_book_config_ci_profile_maps_parameters_to_keys():
    cfg = analysis.book_config("ci", iters=7, batch_size=4, seed=3, source_root="elsewhere",
                               overrides={"cag.delta_d": 1.5}, root=REPO)
    assert (cfg.device, cfg.quiet, cfg.name) == ("cpu", True, "synthetic")
    assert (cfg.source_only.iters, cfg.warmup.iters, cfg.cag.iters) == (7, 7, 7)
    assert (cfg.train.batch_size, cfg.seed, cfg.data.source_root, cfg.cag.delta_d) == (4, 3, "elsewhere", 1.5)


def test_book_config_paper_profile_reads_the_released_schedule():
    cfg = analysis.book_config("paper", root=REPO)
    assert (cfg.device, cfg.quiet, cfg.cag.iters, cfg.model.backbone) == ("auto", False, 62412, "resnet101")


def test_book_config_refuses_a_misspelt_override_and_an_unknown_profile():
    with pytest.raises(ConfigError, match="delta_dd"):
        analysis.book_config("ci", overrides={"cag.delta_dd": 2.0}, root=REPO)
    with pytest.raises(ConfigError, match="profile"):
        analysis.book_config("gpu", root=REPO)


# ----------------------------------------------------------------------------- run records


def test_read_metrics_filters_by_kind(tmp_path):
    lines = [{"kind": "train", "iter": 10, "total": 1.0}, {"kind": "val", "iter": 10, "miou": 0.3},
             {"kind": "train", "iter": 20, "total": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert analysis.read_metrics(tmp_path) == lines
    assert [r["iter"] for r in analysis.read_metrics(tmp_path, kind="train")] == [10, 20]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        analysis.read_metrics(tmp_path / "missing")


def test_results_table_picks_split_and_checkpoint():
    summary = {"results": [{"stage": "warmup", "checkpoint": "last", "split": "val", "miou": 0.2},
                           {"stage": "warmup", "checkpoint": "best_val", "split": "val", "miou": 0.25},
                           {"stage": "warmup", "checkpoint": "last", "split": "test", "miou": 0.1},
                           {"stage": "stage1", "checkpoint": "last", "split": "val", "miou": 0.3}]}
    assert analysis.results_table(summary, "val") == {"warmup": 0.2, "stage1": 0.3}
    assert analysis.results_table(summary, "val", "best_val") == {"warmup": 0.25}


def test_iou_delta_is_after_minus_before_and_none_when_a_side_is_missing():
    delta = analysis.iou_delta({"road": 0.5, "car": None, "sky": 0.9}, {"road": 0.75, "car": 0.3})
    assert delta == {"road": 0.25, "car": None, "sky": None}


def test_row_normalised_divides_rows_and_leaves_absent_classes_nan():
    shares = analysis.row_normalised(torch.tensor([[3, 1], [0, 0]]))
    assert shares[0].tolist() == [0.75, 0.25]
    assert torch.isnan(shares[1]).all()


# ----------------------------------------------------------------------------- features


def test_labelled_pixels_downsamples_labels_with_nearest_and_drops_ignore():
    features = torch.arange(8.0).reshape(1, 2, 2, 2)
    labels = torch.full((1, 4, 4), 7)
    labels[0, 0, 0], labels[0, 0, 2], labels[0, 2, 0], labels[0, 2, 2] = 1, 255, 3, 4
    points, classes = analysis.labelled_pixels(features, labels)
    assert classes.tolist() == [1, 3, 4]
    assert points.tolist() == [[0.0, 4.0], [2.0, 6.0], [3.0, 7.0]]


def test_labelled_pixels_subsample_is_seeded_and_ordered():
    features = torch.arange(32.0).reshape(1, 2, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    first, _ = analysis.labelled_pixels(features, labels, max_pixels=5, seed=1)
    again, _ = analysis.labelled_pixels(features, labels, max_pixels=5, seed=1)
    assert first.shape == (5, 2) and torch.equal(first, again)
    assert first[:, 0].tolist() == sorted(first[:, 0].tolist())


def test_pca_of_points_on_a_line():
    points = torch.tensor([[-1.0, -2.0], [1.0, 2.0], [3.0, 6.0]])
    mean, axes = analysis.pca(points, k=1)
    assert torch.allclose(mean, torch.tensor([1.0, 2.0]))
    assert torch.allclose(axes[0], torch.tensor([1.0, 2.0]) / math.sqrt(5), atol=1e-6)
    coords = analysis.project(points, mean, axes)
    assert torch.allclose(coords[:, 0], torch.tensor([-2.0, 0.0, 2.0]) * math.sqrt(5), atol=1e-5)


def test_pca_sign_is_fixed_by_the_largest_entry():
    points = torch.tensor([[2.0, -1.0], [-2.0, 1.0]])
    _, axes = analysis.pca(points, k=1)
    assert axes[0, 0] > 0 and axes[0, 1] < 0


def test_feature_rgb_is_an_image_in_the_unit_range():
    features = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0))
    mean, axes = analysis.pca(features.flatten(1).T, k=3)
    rgb = analysis.feature_rgb(features, mean, axes)
    assert rgb.shape == (3, 4, 3)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0


# ----------------------------------------------------------------------------- anchors


def test_anchor_separation_is_pairwise_euclidean_and_nan_without_anchor():
    distances = analysis.anchor_separation(torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]),
                                           torch.tensor([1.0, 5.0, 0.0]))
    assert distances[:2, :2].tolist() == [[0.0, 5.0], [5.0, 0.0]]
    assert torch.isnan(distances[2]).all() and torch.isnan(distances[:, 2]).all()


def test_nearest_anchor_report_by_hand():
    """Anchor 2 has no count: it sits on the first point yet is never its nearest, and its own
    pixel (class 2) gets NaN accuracy and distance."""
    anchors = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 0.0]])
    counts = torch.tensor([3.0, 2.0, 0.0])
    points = torch.tensor([[1.0, 0.0], [3.0, 0.0], [4.0, 1.0], [1.0, 0.0]])
    report = analysis.nearest_anchor_report(points, torch.tensor([0, 0, 1, 2]), anchors, counts)
    assert report["accuracy"][:2].tolist() == [0.5, 1.0]
    assert report["distance"][:2].tolist() == [2.0, 1.0]
    assert report["pixels"].tolist() == [2.0, 1.0, 1.0]
    assert torch.isnan(report["accuracy"][2]) and torch.isnan(report["distance"][2])


def test_anchors_by_rule_global_is_the_plain_centroid():
    dataset = tiny_dataset()
    rules = analysis.anchors_by_rule(PooledModel(), dataset, 3, "cpu", min_pixels=1, batch_size=3)
    images = torch.stack([d["image"] for d in dataset])
    labels = torch.stack([d["label"] for d in dataset])[:, ::2, ::2]
    features = F.avg_pool2d(images[:, :2], 2).permute(0, 2, 3, 1).reshape(-1, 2)
    flat = labels.reshape(-1)
    for c in range(3):
        assert torch.allclose(rules["global"][c], features[flat == c].mean(dim=0), atol=1e-6)


def test_anchors_by_rule_faithful_counts_only_correctly_predicted_pixels():
    dataset = tiny_dataset(n=1, seed=3)
    rules = analysis.anchors_by_rule(PooledModel(), dataset, 3, "cpu", min_pixels=1)
    features, logits = PooledModel()(dataset[0]["image"][None])
    points, predictions = features[0].reshape(2, -1).T, logits[0].argmax(0).reshape(-1)
    labels = dataset[0]["label"][::2, ::2].reshape(-1)
    for c in range(3):
        correct = (labels == c) & (predictions == c)
        expected = points[correct].mean(dim=0) if correct.any() else torch.zeros(2)
        assert torch.allclose(rules["faithful"][c], expected, atol=1e-6)
    assert not torch.allclose(rules["faithful"], rules["global"])


# ----------------------------------------------------------------------------- pseudo-labels


def test_pseudo_label_maps_on_the_book_example():
    anchors = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 6.0], [2.0, 0.0]])
    counts = torch.tensor([1.0, 1.0, 1.0, 0.0])
    pixels = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 1.0], [0.0, 5.0], [1.0, 0.0], [0.75, 0.0]])
    features = pixels.T.reshape(1, 2, 1, 6)
    logits = torch.zeros(1, 4, 1, 6)
    logits[0, 1, 0, 0] = 10.0
    maps = analysis.pseudo_label_maps(features, logits, anchors, counts, delta_d=2.5, prob_threshold=0.95)
    assert maps["anchor"].flatten().tolist() == [0, 255, 1, 2, 255, 0]
    assert maps["nearest"].flatten().tolist() == [0, 0, 1, 2, 0, 0]
    expected = [4.0, 0.0, math.sqrt(17) - 1, 4.0, 2.0, 2.5]
    assert torch.allclose(maps["margin"].flatten(), torch.tensor(expected), atol=1e-5)
    assert maps["probability"].flatten().tolist() == [1, 255, 255, 255, 255, 255]


def test_sum_quality_adds_counts_and_recomputes_rates():
    first = pseudo_label_quality(torch.tensor([0, 0, 1, 255]), torch.tensor([0, 1, 1, 1]), 2)
    second = pseudo_label_quality(torch.tensor([1, 255]), torch.tensor([0, 0]), 2)
    total = analysis.sum_quality(analysis.sum_quality(None, first), second)
    assert total["correct"].tolist() == [1, 1]
    assert total["assigned"].tolist() == [2, 2]
    assert total["ground_truth"].tolist() == [3, 3]
    assert total["precision"].tolist() == [0.5, 0.5]
    assert float(total["active_fraction"]) == 4 / 6


def test_split_pseudo_label_quality_equals_one_pass_over_the_whole_split():
    dataset = tiny_dataset(n=5)
    anchors, counts = torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]]), torch.ones(3)
    by_one = analysis.split_pseudo_label_quality(PooledModel(), dataset, anchors, counts, 3, "cpu",
                                                 delta_ds=(0.0, 0.1), prob_threshold=0.6, batch_size=1)
    by_two = analysis.split_pseudo_label_quality(PooledModel(), dataset, anchors, counts, 3, "cpu",
                                                 delta_ds=(0.0, 0.1), prob_threshold=0.6, batch_size=2)
    images = torch.stack([d["image"] for d in dataset])
    truth = torch.stack([d["label"] for d in dataset])[:, ::2, ::2]
    features, logits = PooledModel()(images)
    maps = analysis.pseudo_label_maps(features, logits, anchors, counts, delta_d=0.1, prob_threshold=0.6)
    direct_anchor = pseudo_label_quality(maps["anchor"], truth, 3)
    direct_probability = pseudo_label_quality(maps["probability"], truth, 3)
    for result in (by_one, by_two):
        for key in analysis.QUALITY_COUNTS:
            assert torch.equal(result["anchor"][0.1][key], direct_anchor[key])
            assert torch.equal(result["probability"][key], direct_probability[key])
    assert int(by_one["anchor"][0.0]["active"]) >= int(by_one["anchor"][0.1]["active"])


def test_split_pseudo_label_quality_max_images():
    dataset = tiny_dataset(n=5)
    result = analysis.split_pseudo_label_quality(PooledModel(), dataset, torch.rand(3, 2), torch.ones(3), 3, "cpu",
                                                 max_images=2)
    assert int(result["probability"]["evaluated"]) == 2 * 4


def test_mean_precision_recall_is_pixel_weighted():
    quality = {"correct": torch.tensor([2, 1]), "assigned": torch.tensor([4, 1]), "ground_truth": torch.tensor([3, 3])}
    assert analysis.mean_precision_recall(quality) == (3 / 5, 3 / 6)
    empty = {"correct": torch.tensor([0]), "assigned": torch.tensor([0]), "ground_truth": torch.tensor([0])}
    assert all(math.isnan(v) for v in analysis.mean_precision_recall(empty))


# ----------------------------------------------------------------------------- losses


TOY_FEATURES = torch.tensor([[[1.0, 0.0], [2.0, 4.0]], [[0.0, 1.0], [2.0, 2.0]]]).unsqueeze(0)
TOY_LABELS = torch.tensor([[[0, 0], [1, 1]]])
TOY_ANCHORS = torch.tensor([[0.0, 0.0], [2.0, 2.0]])


def test_faithful_distance_gradients_by_hand():
    """L = 5 (l0 + l1); class 0: dL/dv = 5 * (0.25, 0.25), class 1: 5 * (0.5, 0); every pixel of
    a pair gets dL/dv * 2 / (h w) = dL/dv / 2 (the released gradient rescale)."""
    norms = analysis.distance_loss_gradients(TOY_FEATURES, TOY_LABELS, TOY_ANCHORS, TOY_LABELS, "faithful", min_pixels=1)
    expected = torch.tensor([[[0.625 * math.sqrt(2)] * 2, [1.25, 1.25]]])
    assert torch.allclose(norms, expected, atol=1e-6)


def test_pixel_l2_distance_gradients_by_hand():
    """Mean of four unit-gradient norms: 1/4 per pixel, 0 where the feature sits on its anchor."""
    norms = analysis.distance_loss_gradients(TOY_FEATURES, TOY_LABELS, TOY_ANCHORS, TOY_LABELS, "pixel_l2")
    assert torch.allclose(norms, torch.tensor([[[0.25, 0.25], [0.0, 0.25]]]), atol=1e-6)


def test_distance_gradients_leave_wrongly_predicted_pixels_alone_in_the_faithful_variant():
    predictions = torch.tensor([[[0, 1], [1, 1]]])
    norms = analysis.distance_loss_gradients(TOY_FEATURES, TOY_LABELS, TOY_ANCHORS, predictions, "faithful", min_pixels=1)
    assert norms[0, 0, 1] == 0 and norms[0, 0, 0] > 0


# ----------------------------------------------------------------------------- tables


def test_markdown_table_formats_cells():
    table = analysis.markdown_table(["a", "b", "c"], [("x", 0.12345, None), (3, float("nan"), 2.0)], digits=2)
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 0.12 | – |", "| 3 | – | 2.00 |"]


# ----------------------------------------------------------------------------- figures (cag.figures)


def test_plot_per_class_leaves_out_classes_without_any_value():
    from cag import figures

    fig = figures.plot_per_class({"a": {"road": 0.5, "wall": None, "car": 0.2}, "b": {"road": 0.6, "car": None}},
                                 "IoU", "t")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["road", "car"]


def test_plot_confusion_and_anchor_distances_show_only_present_classes():
    from cag import figures

    shares = analysis.row_normalised(torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]]))
    fig = figures.plot_confusion(shares, ["road", "wall", "car"], "t")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["road", "car"]
    separation = analysis.anchor_separation(torch.rand(3, 2), torch.tensor([1.0, 0.0, 1.0]))
    fig = figures.plot_anchor_distances(separation, ["road", "wall", "car"], 2.5, "t")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["road", "car"]


def test_plot_curves_keeps_each_stage_in_one_colour_and_offsets_iterations():
    from cag import figures

    curves = {"warmup": [{"iter": 10, "adv": 1.0, "miou": 0.2}], "stage1": [{"iter": 5, "miou": 0.3}]}
    fig = figures.plot_curves(curves, ["adv", "miou"], "t")
    adv, miou = fig.axes[0], fig.axes[1]
    assert [line.get_color() for line in adv.get_lines() if line.get_linestyle() == "-"] == ["C0"]
    solid = [line for line in miou.get_lines() if line.get_linestyle() == "-"]
    assert [line.get_color() for line in solid] == ["C0", "C1"]
    assert solid[1].get_xdata().tolist() == [15]


def test_plot_delta_sweep_marks_the_configured_delta_d_and_the_smallest_gap():
    from cag import figures

    args = ([0.0, 1.0, 2.0], [0.8, 0.9, 1.0], [0.6, 0.4, 0.1], [0.7, 0.5, 0.1], 1.0, "t")
    vertical = lambda fig: [line.get_xdata()[0] for line in fig.axes[0].get_lines() if line.get_linestyle() in ("--", ":")]
    assert vertical(figures.plot_delta_sweep(*args)) == [1.0]
    assert vertical(figures.plot_delta_sweep(*args, gap=1.5)) == [1.0, 1.5]


def test_show_grid_draws_rgb_and_scalar_panels():
    from cag import figures

    fig = figures.show_grid([[torch.rand(3, 4, 8), torch.rand(4, 8)]], col_titles=["image", "map"])
    assert len(fig.axes) == 2
    assert fig.axes[1].get_images()[0].get_cmap().name == "magma"


def test_nearest_anchor_overall_weights_classes_by_their_pixels_and_skips_anchorless_ones():
    from cag.analysis import nearest_anchor_overall, nearest_anchor_report

    anchors = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 9.0]])
    counts = torch.tensor([5.0, 5.0, 0.0])  # class 2 has no anchor
    points = torch.tensor([[0.5, 0.0], [3.0, 0.0], [1.0, 0.0], [4.0, 3.0], [9.0, 9.0]])
    classes = torch.tensor([0, 0, 1, 1, 2])
    # class 0: nearest of (0.5, 0) is 0 (hit), of (3, 0) is 1 (miss); distances 0.5 and 3
    # class 1: (1, 0) -> 0 (miss), (4, 3) -> 1 (hit); distances 3 and 3; class 2 is left out
    report = nearest_anchor_report(points, classes, anchors, counts)
    share, distance = nearest_anchor_overall(report, counts)
    assert share == pytest.approx(2 / 4) and distance == pytest.approx((0.5 + 3 + 3 + 3) / 4)


def test_feature_space_panel_projects_the_labelled_pixels_of_the_images():
    from cag.analysis import feature_space_panel, pca

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x[:, :2], x[:, :2]

    images = torch.rand(2, 3, 4, 4)
    labels = torch.tensor([[[0, 1, 255, 1]] * 4] * 2)
    anchors, counts = torch.tensor([[0.2, 0.2], [0.8, 0.8], [0.5, 0.1]]), torch.tensor([1.0, 1.0, 0.0])
    mean, axes = pca(anchors[:2], k=2)
    panel, report = feature_space_panel(Identity(), images, labels, anchors, counts, mean, axes, "cpu", "t")
    assert panel["title"] == "t" and panel["points"].shape == (24, 2) and panel["anchors"].shape == (2, 2)
    assert panel["anchor_classes"].tolist() == [0, 1] and report["pixels"].tolist() == [8.0, 16.0, 0.0]


# ----------------------------------------------------------------------------- the benchmark's pseudo_labels.csv


def test_pseudo_label_rows_counts_and_rates_on_a_hand_case():
    # ground truth [[0, 0], [1, ignore]]; pseudo [[0, 1], [1, 0]]: the ignored pixel is not evaluated
    labels = torch.tensor([[[0, 0], [1, 255]]])
    pseudo = torch.tensor([[[0, 1], [1, 0]]])
    counts = pseudo_label_quality(pseudo, labels, num_classes=19)
    assert counts["correct"].tolist() == [1, 1] + [0] * 17
    assert counts["assigned"].tolist() == [1, 2] + [0] * 17
    assert counts["ground_truth"].tolist() == [2, 1] + [0] * 17
    assert counts["labelled"].tolist() == [2, 1] + [0] * 17
    rows = analysis.pseudo_label_rows({"anchor": counts}, 19, preset="p", stage=1)
    names = class_names(19)
    by_class = {r["class"]: r for r in rows}
    assert set(by_class) == {names[0], names[1]}  # the other classes are in neither map
    assert (by_class[names[0]]["precision"], by_class[names[0]]["recall"], by_class[names[0]]["coverage"]) == (1.0, 0.5, 1.0)
    assert (by_class[names[1]]["precision"], by_class[names[1]]["recall"], by_class[names[1]]["coverage"]) == (0.5, 1.0, 1.0)


def test_coverage_counts_wrong_labels_and_not_the_unlabelled():
    labels = torch.tensor([[[0, 0, 0, 0]]])
    pseudo = torch.tensor([[[0, 1, 255, 255]]])
    counts = pseudo_label_quality(pseudo, labels, num_classes=19)
    road, sidewalk = analysis.pseudo_label_rows({"probability": counts}, 19)
    assert (road["precision"], road["recall"], road["coverage"]) == (1.0, 0.25, 0.5)
    # sidewalk is absent from the ground truth but was assigned once: precision 0, no recall
    assert (sidewalk["assigned_pixels"], sidewalk["precision"], sidewalk["recall"]) == (1, 0.0, None)


def test_labeller_quality_is_kept_and_served_for_a_subset_of_the_margins(tmp_path, monkeypatch):
    """Chapter 7 reads chapter 5's measurement of the warm-up labeller instead of a second pass:
    a cached result serves a subset of its margins, equal to a direct measurement; another
    margin, a changed labeller file or no cache folder measure again."""
    from cag import stages
    from cag.anchors import save_anchors
    from cag.config import from_dict

    dataset, anchors, counts = tiny_dataset(n=5), torch.tensor([[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]]), torch.ones(3)
    forwards = []

    class Counting(PooledModel):
        def forward(self, x):
            forwards.append(len(x))
            return super().forward(x)

    monkeypatch.setattr(stages, "eval_dataset", lambda cfg, split: dataset)
    monkeypatch.setattr(stages, "make_model", lambda cfg, device, init=None: Counting())
    cfg = from_dict({"device": "cpu", "quiet": True, "data": {"num_classes": 19, "target_root": str(tmp_path)},
                     "cag": {"prob_threshold": 0.6}, "eval": {"batch_size": 2}})
    labeller, anchor_file, cache = tmp_path / "warmup.pt", tmp_path / "anchors.pt", tmp_path / "chapter_cache"
    labeller.write_bytes(b"weights")
    save_anchors(anchor_file, anchors, counts)
    direct = analysis.split_pseudo_label_quality(PooledModel(), dataset, anchors, counts, 19, "cpu",
                                                 delta_ds=(0.0, 0.1), prob_threshold=0.6, batch_size=2)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in analysis.QUALITY_COUNTS)

    first = analysis.labeller_quality(cfg, labeller, anchor_file, (0.0, 0.1), cache_dir=cache)
    assert forwards == [2, 2, 1] and len(list(cache.glob("*.pt"))) == 1
    again = analysis.labeller_quality(cfg, labeller, anchor_file, (0.1,), cache_dir=cache)
    assert forwards == [2, 2, 1] and list(again["anchor"]) == [0.1]  # read, not measured
    for result in (first, again):
        assert same(result["anchor"][0.1], direct["anchor"][0.1])
        assert same(result["probability"], direct["probability"])
    analysis.labeller_quality(cfg, labeller, anchor_file, (0.2,), cache_dir=cache)  # a margin not kept
    assert len(forwards) == 6
    labeller.write_bytes(b"other weights")  # the stage was trained again
    analysis.labeller_quality(cfg, labeller, anchor_file, (0.1,), cache_dir=cache)
    assert len(forwards) == 9
    analysis.labeller_quality(cfg, labeller, anchor_file, (0.1,))  # no cache folder: always measured
    assert len(forwards) == 12
