"""cag.experiments: experiment files, result tables, pseudo-label counts and the results/ files."""
import csv
import math
from pathlib import Path

import pytest
import torch

from cag import experiments as ex
from cag.config import ConfigError, load_config
from cag.labels import class_names
from cag.pseudo_labels import pseudo_label_quality

REPO = Path(__file__).resolve().parents[1]
ALLOWED_ARMS = {"source_only", "warmup", "self_training", "cag_stage1", "cag_stage2", "cag_stage3",
                "cag_anchor_only", "cag_pixel_l2", "target_oracle"}


def rows_for(arm_means: dict, preset="class", seeds=(1, 2)):
    """Summary rows where every seed of an arm gets mean +- 0.01 (so the mean is exact)."""
    rows = []
    for arm, mean in arm_means.items():
        for i, seed in enumerate(seeds):
            rows.append({"preset": preset, "arm": arm, "seed": seed, "checkpoint": "last",
                         "miou": mean + (0.01 if i % 2 else -0.01), "road": 0.5})
    return rows


# ----------------------------------------------------------------------------- statistics


def test_mean_std_skips_nan_and_uses_the_sample_deviation():
    mean, std, n = ex.mean_std([0.2, 0.4, float("nan")])
    assert (mean, n) == (pytest.approx(0.3), 2)
    assert std == pytest.approx(math.sqrt(0.02))  # ((0.1^2 + 0.1^2) / (2 - 1)) ** 0.5


def test_mean_std_of_one_value_has_zero_deviation_and_of_none_is_nan():
    assert ex.mean_std([0.7]) == (0.7, 0.0, 1)
    mean, std, n = ex.mean_std([float("nan")])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_targets_met_exactly_at_the_margins():
    rows = rows_for({"source_only": 0.21, "warmup": 0.24, "cag_stage1": 0.30, "cag_stage3": 0.26})
    result = ex.targets(rows)
    assert result["arm"] == "cag_stage3"
    assert result["over_source_only"] == pytest.approx(5.0)
    assert result["over_warmup"] == pytest.approx(2.0)
    assert (result["met_source_only"], result["met_warmup"], result["met"]) == (True, True, True)


def test_targets_missed_when_stage3_is_within_two_points_of_the_warmup():
    result = ex.targets(rows_for({"source_only": 0.20, "warmup": 0.25, "cag_stage3": 0.26}))
    assert result["met_source_only"] is True and result["met_warmup"] is False and result["met"] is False


def test_miou_table_orders_arms_as_the_issue_and_averages_seeds():
    rows = rows_for({"target_oracle": 0.8, "cag_stage3": 0.3, "source_only": 0.2})
    table = ex.miou_table(rows)
    assert [r["arm"] for r in table] == ["source_only", "cag_stage3", "target_oracle"]
    assert table[1]["miou_mean"] == pytest.approx(0.3) and table[1]["seeds"] == 2
    assert table[1]["miou_std"] == pytest.approx(math.sqrt(2 * 0.01**2))


def test_markdown_table_prints_percent_and_dashes():
    text = ex.markdown([{"arm": "cag", "miou": 0.2345, "x": float("nan")}])
    assert text.splitlines()[2] == "| cag | 23.4 | – |"


# ----------------------------------------------------------------------------- pseudo-labels


def test_pseudo_label_rows_counts_and_rates_on_a_hand_case():
    # ground truth [[0, 0], [1, ignore]]; pseudo [[0, 1], [1, 0]]: the ignored pixel is not evaluated
    labels = torch.tensor([[[0, 0], [1, 255]]])
    pseudo = torch.tensor([[[0, 1], [1, 0]]])
    counts = pseudo_label_quality(pseudo, labels, num_classes=19)
    assert counts["correct"].tolist() == [1, 1] + [0] * 17
    assert counts["assigned"].tolist() == [1, 2] + [0] * 17
    assert counts["ground_truth"].tolist() == [2, 1] + [0] * 17
    assert counts["labelled"].tolist() == [2, 1] + [0] * 17
    rows = ex.pseudo_label_rows({"anchor": counts}, 19, preset="p", stage=1)
    names = class_names(19)
    by_class = {r["class"]: r for r in rows}
    assert set(by_class) == {names[0], names[1]}  # the other classes are in neither map
    assert (by_class[names[0]]["precision"], by_class[names[0]]["recall"], by_class[names[0]]["coverage"]) == (1.0, 0.5, 1.0)
    assert (by_class[names[1]]["precision"], by_class[names[1]]["recall"], by_class[names[1]]["coverage"]) == (0.5, 1.0, 1.0)


def test_coverage_counts_wrong_labels_and_not_the_unlabelled():
    labels = torch.tensor([[[0, 0, 0, 0]]])
    pseudo = torch.tensor([[[0, 1, 255, 255]]])
    counts = pseudo_label_quality(pseudo, labels, num_classes=19)
    road, sidewalk = ex.pseudo_label_rows({"probability": counts}, 19)
    assert (road["precision"], road["recall"], road["coverage"]) == (1.0, 0.25, 0.5)
    # sidewalk is absent from the ground truth but was assigned once: precision 0, no recall
    assert (sidewalk["assigned_pixels"], sidewalk["precision"], sidewalk["recall"]) == (1, 0.0, None)


# ----------------------------------------------------------------------------- files


def test_csv_round_trip_keeps_numbers_and_empty_cells(tmp_path):
    rows = [{"preset": "class", "arm": "warmup", "seed": 3, "checkpoint": "last", "miou": 0.123456789,
             "road": None, "sky": float("nan"), "car": 1.0}]
    path = tmp_path / "summary.csv"
    ex.write_csv(path, rows, ex.SUMMARY_KEYS, ["road", "sky", "car"])
    assert path.read_text().splitlines()[0] == "preset,arm,seed,checkpoint,miou,road,sky,car"
    (back,) = ex.read_csv(path)
    assert isinstance(back["seed"], int) and back["seed"] == 3 and back["road"] is None and back["sky"] is None and back["car"] == 1.0
    assert back["miou"] == pytest.approx(0.123457, abs=1e-9)


def test_read_csv_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        ex.read_csv(tmp_path / "nothing.csv")


# ----------------------------------------------------------------------------- experiment files


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("kind: nonsense\n", "kind"),
    ("kind: benchmark\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\npresets: {}\nsedes: 2\n",
     "unknown keys \\['sedes'\\]"),
    ("kind: benchmark\nbase: missing.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\npresets: {}\n", "missing.yaml"),
    ("kind: benchmark\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: []\npresets: {}\n", "seeds"),
    ("kind: calibration\nbase: configs/synthetic.yaml\ndata_dir: d\nresults_dir: x\nseeds: [1]\n", "runs_dir"),
    ("kind: benchmark\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\n", "presets"),
])
def test_bad_experiment_files_are_refused_with_the_reason(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message):
        ex.load_spec(write_spec(tmp_path, text))


def test_unknown_arm_is_refused():
    spec = {"presets": {"class": ["source_only", "cag_magic"]}, "arms": {}}
    with pytest.raises(ConfigError, match="cag_magic"):
        ex.check_arms(spec)


def test_calibration_never_reads_the_test_split():
    with pytest.raises(ConfigError, match="held-out"):
        ex.calibrate({"split": "test", "seeds": [1], "grid": {}, "results_dir": "unused"})


@pytest.mark.parametrize("name", ["benchmark.yaml", "calibration.yaml"])
def test_shipped_experiment_files_load_and_every_override_is_a_valid_config(monkeypatch, name):
    monkeypatch.chdir(REPO)
    spec = ex.load_spec(REPO / "configs" / "experiments" / name)
    override_sets = [spec["overrides"]]
    if spec["kind"] == "benchmark":
        ex.check_arms(spec)
        override_sets += list(spec["arms"].values()) + list(spec["ablations"]["settings"].values())
        assert set(spec["presets"]["class"]) >= {"source_only", "warmup", "self_training", "cag", "cag_anchor_only",
                                                 "cag_pixel_l2", "target_oracle"}
    for overrides in override_sets:
        load_config(spec["base"], [*spec["overrides"], *overrides])


def test_run_config_names_the_strength_and_a_data_root_per_preset_and_strength(monkeypatch):
    from cag.data.synthetic import PRESETS

    monkeypatch.chdir(REPO)
    spec = {"base": "configs/synthetic.yaml", "runs_dir": "runs/x", "data_dir": "data/bench", "overrides": []}
    cfg = ex.run_config(spec, name="global-seed2", seed=2, preset="global", extra=["cag.delta_d=1.0"])
    strength = PRESETS["global"].default_strength
    assert cfg.data.synthetic.strength == strength and cfg.data.synthetic.preset == "global"
    assert cfg.data.target_root == f"data/bench/global-{strength:g}/target"
    assert (cfg.seed, cfg.cag.delta_d, str(cfg.run_dir)) == (2, 1.0, "runs/x/global-seed2")


# ----------------------------------------------------------------------------- the paper's tables


@pytest.mark.parametrize("table", [ex.PAPER_GTA5, ex.PAPER_SYNTHIA13])
def test_quoted_paper_rows_average_to_their_stated_miou(table):
    """The poster's tables: every row averages to its mIoU within rounding, except CAG-UDA on GTA5 (50.09 vs 50.2)."""
    for name, values in table["rows"].items():
        assert len(values) == len(table["classes"])
        mean = sum(values[:-1]) / (len(values) - 1)
        if name == "CAG-UDA":
            assert mean == pytest.approx(50.09, abs=0.01)
        else:
            assert mean == pytest.approx(values[-1], abs=0.051), name


def test_paper_table_markdown_cites_its_source():
    text = ex.paper_table(ex.PAPER_GTA5)
    assert text.splitlines()[0].count("|") == len(ex.PAPER_GTA5["classes"]) + 2
    assert "Source: CAG-UDA poster, Table 1" in text


# ----------------------------------------------------------------------------- figures


def test_miou_figure_bars_are_the_means_over_seeds():
    rows = rows_for({"source_only": 0.2, "cag_stage3": 0.3}) + rows_for({"source_only": 0.5}, preset="global")
    fig = ex.plot_miou(rows)
    class_axis, global_axis = fig.axes
    assert [round(p.get_height(), 6) for p in class_axis.patches] == [20.0, 30.0]
    assert [round(p.get_height(), 6) for p in global_axis.patches] == [50.0]


# ----------------------------------------------------------------------------- the generated results


def results_file(name: str) -> Path:
    path = REPO / "results" / name
    if not path.exists():
        pytest.skip(f"{path} not generated (python -m cag experiments configs/experiments/benchmark.yaml)")
    return path


def test_generated_summary_has_the_issue_columns_arms_and_fractions():
    path = results_file("summary.csv")
    with path.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == ["preset", "arm", "seed", "checkpoint", "miou", *class_names(19)]
    rows = ex.read_csv(path)
    assert rows and {r["arm"] for r in rows} <= ALLOWED_ARMS
    assert {r["checkpoint"] for r in rows} <= {"last", "best_val"}
    values = [r[k] for r in rows for k in ("miou", *class_names(19)) if r[k] is not None]
    assert all(0.0 <= v <= 1.0 for v in values)
    keys = [(r["preset"], r["arm"], r["seed"], r["checkpoint"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_pseudo_label_overall_pools_pixels_over_classes_and_seeds():
    base = {"preset": "class", "arm": "cag", "rule": "anchor", "stage": 1}
    rows = [{**base, "seed": 1, "class": "road", "correct_pixels": 3, "assigned_pixels": 4, "labelled_pixels": 5,
             "ground_truth_pixels": 10},
            {**base, "seed": 2, "class": "sidewalk", "correct_pixels": 1, "assigned_pixels": 1, "labelled_pixels": 1,
             "ground_truth_pixels": 10},
            {**base, "rule": "probability", "seed": 1, "class": "road", "correct_pixels": 0, "assigned_pixels": 9,
             "labelled_pixels": 9, "ground_truth_pixels": 10}]
    (stage1,) = ex.pseudo_label_overall(rows, "class")
    assert stage1 == {"stage": 1, "precision": pytest.approx(4 / 5), "recall": pytest.approx(4 / 20),
                      "coverage": pytest.approx(6 / 20)}


def test_per_class_mean_std_formats_points_over_seeds_and_drops_absent_classes():
    names = class_names(19)
    rows = []
    for seed, (miou, road) in enumerate([(0.30, 0.80), (0.34, 0.90)], start=1):
        row = {"preset": "class", "arm": "warmup", "seed": seed, "checkpoint": "last", "miou": miou}
        row.update({c: None for c in names})
        row["road"] = road
        rows.append(row)
    rows.append({**rows[0], "checkpoint": "best_val", "miou": 0.99})
    (table,) = ex.per_class_mean_std(rows, "class")
    # mean 32.0, sample std of (30, 34) = 2.83; road mean 85.0, std 7.07
    assert table == {"arm": "warmup", "mIoU": "32.0 ± 2.8", "road": "85.0 ± 7.1"}
