"""cag.results: the benchmark's CSV files read into tables and sentences.

Every fixture value is chosen so that the expected numbers can be derived by hand (the comments
say how); none is computed by the code under test. The fixtures are reused by
tests/test_experiment_figures.py.
"""
import csv
import math

import pytest

from cag import results as res

T975_2 = 4.30265272974946  # t_{0.975, 2} from standard tables
SUMMARY_COLUMNS = ("preset", "arm", "seed", "checkpoint", "miou", "road", "sidewalk", "train")
CAL_COLUMNS = ("preset", "strength", "seed", "split", "source_iters", "source_only", "adabn", "target_oracle",
               "ratio", "closure")
CLASS_COLUMNS = ("preset", "strength", "seed", "split", "arm", "road", "sidewalk", "pole", "train")
DELTA_COLUMNS = ("preset", "seed", "fraction", "smallest_gap", "delta_d", "stage", "active_fraction",
                 "active_precision", "miou")
COMPARISON_COLUMNS = ("preset", "arm_a", "arm_b", "checkpoint", "mean_diff", "ci_low", "ci_high", "seeds")


def write(path, columns, rows):
    """A CSV as cag.calibration and cag.benchmark_table write it: None as an empty cell."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if v is None else v for v in row])
    return path


def summary_rows():
    """preset class, seeds 1-3 (``last`` unless said): every arm's mIoU below; ``best_val`` rows
    of source-only at 0.9 (a table reading best_val would show 0.9); no best_val row of
    self-training stage 1 at seed 3 (the same weights as last); preset global at 0.1 (a table
    mixing presets would move every mean)."""
    rows = []
    miou = {"source_only": (0.40, 0.50, 0.60),        # mean 0.5, sd 0.1
            "adabn": (0.45, 0.55, 0.65),              # mean 0.55
            "warmup": (0.50, 0.50, 0.50),             # stage 0 of the stage curves, sd 0
            "cag_stage1": (0.52, 0.54, 0.56),         # mean 0.54, sd 0.02
            "cag_stage2": (0.60, 0.60, 0.60),
            "self_training_stage1": (0.50, 0.51, 0.52),
            "cag_long_stage1": (0.70, 0.70, 0.70),
            "target_oracle": (0.80, 0.80, 0.80)}
    order = ["target_oracle", "cag_stage2", "self_training_stage1", "cag_long_stage1", "cag_stage1", "warmup",
             "adabn", "source_only"]   # not the table's order: the order is the code's
    for arm in order:
        for seed, value in zip((1, 2, 3), miou[arm]):
            road = {1: 0.8, 2: 0.7, 3: 0.6}[seed] if arm == "source_only" else 0.9    # source-only road mean 0.7
            sidewalk = {1: 0.1, 2: 0.2, 3: 0.3}[seed] if arm == "source_only" else None  # mean 0.2
            rows.append(("class", arm, seed, "last", value, road, sidewalk, None))
    for seed in (1, 2, 3):
        rows.append(("class", "source_only", seed, "best_val", 0.9, 0.0, 0.0, None))
    rows += [("class", "self_training_stage1", 1, "best_val", 0.56, 0.9, None, None),
             ("class", "self_training_stage1", 2, "best_val", 0.57, 0.9, None, None)]
    for seed in (1, 2, 3):
        rows.append(("global", "source_only", seed, "last", 0.10, 0.1, 0.1, 0.5))
        rows.append(("global", "cag_stage1", seed, "last", 0.10, 0.1, 0.1, 0.5))
    return rows


def calibration_rows():
    """class 0.35: source-only 0.28/0.30/0.32 (mean 0.30), AdaBN 0.33/0.35/0.37 (0.35), oracle
    0.58/0.60/0.62 (0.60): ratio of means 0.5 (the mean of the per-seed ratios is 0.4996),
    closure (0.35 - 0.30) / (0.60 - 0.30) = 1/6; at 800 iterations 0.29/0.31/0.33 (+1.0 point).
    class 0.4: source-only 0.26, AdaBN 0.30, oracle 0.65 on every seed: ratio 0.4 (the band's
    edge), closure 0.04 / 0.39; at 800 iterations 0.265 (+0.5 point). class 0.3: no oracle, no AdaBN.
    global 1.6: source-only 0.3, AdaBN 0.5, oracle 0.6: closure 2/3 (not an aim on global)."""
    rows = []
    for seed, (so, ad, oracle, long) in zip((1, 2, 3), [(0.28, 0.33, 0.58, 0.29), (0.30, 0.35, 0.60, 0.31),
                                                        (0.32, 0.37, 0.62, 0.33)]):
        rows.append(("class", 0.35, seed, "val", 400, so, ad, oracle, so / oracle, (ad - so) / (oracle - so)))
        rows.append(("class", 0.35, seed, "val", 800, long, None, None, None, None))
    for seed in (1, 2, 3):
        rows.append(("class", 0.4, seed, "val", 400, 0.26, 0.30, 0.65, 0.4, 0.04 / 0.39))
        rows.append(("class", 0.4, seed, "val", 800, 0.265, None, None, None, None))
        rows.append(("class", 0.3, seed, "val", 400, 0.35, None, None, None, None))
        rows.append(("class", 0.3, seed, "val", 800, 0.35, None, None, None, None))
        rows.append(("global", 1.6, seed, "val", 400, 0.3, 0.5, 0.6, 0.5, 2 / 3))
        rows.append(("global", 1.6, seed, "val", 800, 0.3, None, None, None, None))
    return rows


def class_rows():
    """Oracle per-class IoU at class 0.35: road 0.9, sidewalk 0.5, pole 0.20/0.30/0.31 (mean 0.27,
    the weakest), train absent; source-only's pole is 0 (not the oracle's); full 0.35's oracle has
    sidewalk 0.1 (another preset). class 0.4: pole exactly 0.25."""
    rows = []
    for seed, pole in zip((1, 2, 3), (0.20, 0.30, 0.31)):
        rows.append(("class", 0.35, seed, "val", "source_only", 0.5, 0.3, 0.0, None))
        rows.append(("class", 0.35, seed, "val", "target_oracle", 0.9, 0.5, pole, None))
        rows.append(("full", 0.35, seed, "val", "target_oracle", 0.9, 0.1, 0.9, None))
        rows.append(("class", 0.4, seed, "val", "target_oracle", 0.9, 0.5, 0.25, None))
        rows.append(("global", 1.6, seed, "val", "target_oracle", 0.9, 0.5, 0.4, None))
    return rows


def delta_rows():
    """class, seeds 1-3 with smallest gaps 2, 3, 4; fractions 0.1, 0.3, 0.6; stages 1 and 2.
    Stage 1: active fraction 0.8/0.9/1.0 at fraction 0.1 (mean 0.9), falling by 0.3 per step of
    the fraction list; precision 0.6/0.7/0.8 (0.7) rising by 0.1 per step, except seed 3 at 0.6
    where no pixel is active (empty); mIoU 0.50 + 0.01 x step. Stage 2: mIoU 0.60 + 0.01 x step.
    One row of preset full (a table mixing presets would count it)."""
    rows = []
    for step, fraction in enumerate((0.1, 0.3, 0.6)):
        for i, (seed, gap) in enumerate(((1, 2.0), (2, 3.0), (3, 4.0))):
            active = 0.8 + 0.1 * i - 0.3 * step
            precision = None if (seed, fraction) == (3, 0.6) else 0.6 + 0.1 * i + 0.1 * step
            for stage, miou in ((1, 0.50 + 0.01 * step), (2, 0.60 + 0.01 * step)):
                rows.append(("class", seed, fraction, gap, fraction * gap, stage, active, precision, miou))
    rows.append(("full", 1, 0.1, 9.0, 0.9, 1, 0.0, 0.0, 0.0))
    return rows


def comparison_rows():
    return [("class", "cag_stage1", "self_training_stage1", "last", 0.03, 0.01, 0.05, "1 2 3"),
            ("class", "adabn", "source_only", "last", 0.05, -0.01, 0.11, "1 2 3"),
            ("class", "warmup", "source_only", "last", -0.02, -0.03, -0.01, "1 2 3"),
            ("class", "cag_stage1", "self_training_stage1", "best_val", -0.03, -0.05, -0.01, "1 2 3"),
            ("class", "cag_long_stage1", "cag_stage1", "last", 0.01, None, None, "1"),
            ("global", "cag_stage1", "self_training_stage1", "last", -0.04, -0.06, -0.02, "1 2 3")]


@pytest.fixture
def files(tmp_path):
    """The five results files in a tmp folder, as paths."""
    return {"summary": write(tmp_path / "summary.csv", SUMMARY_COLUMNS, summary_rows()),
            "calibration": write(tmp_path / "calibration.csv", CAL_COLUMNS, calibration_rows()),
            "classes": write(tmp_path / "calibration_classes.csv", CLASS_COLUMNS, class_rows()),
            "delta_d": write(tmp_path / "delta_d.csv", DELTA_COLUMNS, delta_rows()),
            "comparisons": write(tmp_path / "comparisons.csv", COMPARISON_COLUMNS, comparison_rows())}


@pytest.fixture
def tables(files):
    return {name: res.read_csv(path) for name, path in files.items()}


# ----------------------------------------------------------------------------- reading


def test_read_csv_types(tables):
    row = tables["summary"][0]
    assert row == {"preset": "class", "arm": "target_oracle", "seed": 1, "checkpoint": "last", "miou": 0.8,
                   "road": 0.9, "sidewalk": None, "train": None}
    assert isinstance(row["seed"], int) and isinstance(row["miou"], float)
    cal = tables["calibration"][1]
    assert cal["source_iters"] == 800 and isinstance(cal["source_iters"], int)
    assert cal["strength"] == 0.35 and cal["adabn"] is None and cal["split"] == "val"
    assert tables["delta_d"][0]["stage"] == 1 and isinstance(tables["delta_d"][0]["stage"], int)
    comparisons = tables["comparisons"]
    assert comparisons[0]["seeds"] == (1, 2, 3) and comparisons[4]["seeds"] == (1,)
    assert comparisons[4]["ci_low"] is None and comparisons[1]["ci_low"] == -0.01


def test_read_csv_missing_file_names_it_and_its_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"calibration\.csv.*calibration_v2\.yaml"):
        res.read_csv(tmp_path / "calibration.csv")
    with pytest.raises(FileNotFoundError, match=r"summary\.csv.*benchmark_v2\.yaml"):
        res.read_csv(tmp_path / "summary.csv")


def test_mean_std():
    mean, sd, n = res.mean_std([0.40, None, 0.50, 0.60, math.nan])
    assert (mean, sd, n) == (pytest.approx(0.5), pytest.approx(0.1), 3)
    mean, sd, n = res.mean_std([0.3])
    assert mean == 0.3 and math.isnan(sd) and n == 1
    mean, sd, n = res.mean_std([None])
    assert math.isnan(mean) and math.isnan(sd) and n == 0


def test_arm_names():
    assert res.arm_name("cag_stage1") == "CAG stage 1"
    assert res.arm_name("self_training_stage1") == "self-training stage 1"
    assert res.arm_name("adabn") == "AdaBN"
    assert res.arm_name("warmup_no_adv") == "warm-up without the adversarial term"
    assert res.arm_name("target_oracle") == "target-trained (oracle)"
    assert res.arm_name("new_arm_stage12") == "new arm stage 12"


# ----------------------------------------------------------------------------- summary tables


def test_miou_table_last_checkpoint_one_preset(tables):
    table = {t["arm"]: t for t in res.miou_table(tables["summary"], "class")}
    so = table["source_only"]
    # 0.40, 0.50, 0.60: mean 0.5, sd 0.1. Reading best_val would give 0.9; mixing in global 0.1s 0.3.
    assert so["mean"] == pytest.approx(0.5) and so["sd"] == pytest.approx(0.1)
    assert so["n"] == 3 and so["seeds"] == (1, 2, 3) and so["name"] == "source-only"
    assert table["cag_stage1"]["mean"] == pytest.approx(0.54) and table["cag_stage1"]["sd"] == pytest.approx(0.02)
    assert table["cag_stage1"]["name"] == "CAG stage 1"
    assert table["self_training_stage1"]["mean"] == pytest.approx(0.51)


def test_miou_table_order(tables):
    arms = [t["arm"] for t in res.miou_table(tables["summary"], "class")]
    assert arms == ["source_only", "adabn", "warmup", "cag_stage1", "cag_stage2", "self_training_stage1",
                    "cag_long_stage1", "target_oracle"]
    given = [t["arm"] for t in res.miou_table(tables["summary"], "class", arms=["target_oracle", "adabn"])]
    assert given == ["target_oracle", "adabn"]


def test_miou_table_best_val_falls_back_to_last_where_the_same(tables):
    table = {t["arm"]: t for t in res.miou_table(tables["summary"], "class", checkpoint="best_val")}
    assert table["source_only"]["mean"] == pytest.approx(0.9)
    # seeds 1, 2 from best_val (0.56, 0.57), seed 3 from last (0.52): mean 0.55
    assert table["self_training_stage1"]["mean"] == pytest.approx(0.55) and table["self_training_stage1"]["n"] == 3
    # arms without any best_val row are their last rows
    assert table["cag_stage1"]["mean"] == pytest.approx(0.54)


def test_miou_table_other_preset(tables):
    table = res.miou_table(tables["summary"], "global")
    assert [t["arm"] for t in table] == ["source_only", "cag_stage1"]
    assert table[0]["mean"] == pytest.approx(0.1) and table[0]["sd"] == pytest.approx(0.0)


def test_per_class_table(tables):
    table = res.per_class_table(tables["summary"], "class", ["source_only", "cag_stage1"])
    # train has no value on preset class (it has on global): left out; file order kept.
    assert [t["class"] for t in table] == ["road", "sidewalk"]
    assert table[0]["source_only"] == pytest.approx(0.7) and table[0]["cag_stage1"] == pytest.approx(0.9)
    assert table[1]["source_only"] == pytest.approx(0.2) and table[1]["cag_stage1"] is None
    assert [t["class"] for t in res.per_class_table(tables["summary"], "global", ["source_only"])] == \
        ["road", "sidewalk", "train"]


def test_stage_table(tables):
    table = res.stage_table(tables["summary"], "class")
    cag = [t for t in table if t["arm"] == "cag"]
    assert [t["stage"] for t in cag] == [0, 1, 2]
    assert cag[0]["mean"] == pytest.approx(0.5) and cag[0]["half_ci"] == pytest.approx(0.0)
    # stage 1: sd 0.02 over 3 seeds: half-width t_{0.975,2} * 0.02 / sqrt(3)
    assert cag[1]["mean"] == pytest.approx(0.54) and cag[1]["sd"] == pytest.approx(0.02)
    assert cag[1]["half_ci"] == pytest.approx(T975_2 * 0.02 / math.sqrt(3), rel=1e-9)
    assert cag[2]["mean"] == pytest.approx(0.60) and cag[1]["name"] == "CAG"
    st = [t for t in table if t["arm"] == "self_training"]
    assert [t["stage"] for t in st] == [0, 1] and st[1]["mean"] == pytest.approx(0.51)
    assert [t["stage"] for t in res.stage_table(tables["summary"], "class", ["cag"], start=None)] == [1, 2]


# ----------------------------------------------------------------------------- calibration


def test_calibration_table(tables):
    table = {(t["preset"], t["strength"]): t for t in res.calibration_table(tables["calibration"])}
    assert list(table) == [("class", 0.3), ("class", 0.35), ("class", 0.4), ("global", 1.6)]   # strengths ascending
    cell = table[("class", 0.35)]
    assert cell["source_only"] == pytest.approx(0.30)     # base iterations only (800's mean is 0.31)
    assert cell["adabn"] == pytest.approx(0.35) and cell["target_oracle"] == pytest.approx(0.60)
    assert cell["ratio"] == pytest.approx(0.5, abs=1e-12)     # ratio of means, not the mean ratio 0.4996
    assert cell["closure"] == pytest.approx(1 / 6, abs=1e-12)  # against the gap oracle - source-only
    assert cell["n"] == 3 and cell["n_oracle"] == 3
    assert table[("class", 0.4)]["closure"] == pytest.approx(0.04 / 0.39)
    absent = table[("class", 0.3)]
    assert absent["target_oracle"] is None and absent["adabn"] is None
    assert absent["ratio"] is None and absent["closure"] is None and absent["n_oracle"] == 0


def test_plateau_table(tables):
    table = {(t["preset"], t["strength"]): t for t in res.plateau_table(tables["calibration"])}
    cell = table[("class", 0.35)]
    assert (cell["source_iters"], cell["long_iters"], cell["n"]) == (400, 800, 3)
    assert cell["base"] == pytest.approx(0.30) and cell["long"] == pytest.approx(0.31)
    assert cell["change_points"] == pytest.approx(1.0)
    assert table[("class", 0.4)]["change_points"] == pytest.approx(0.5)
    assert table[("global", 1.6)]["change_points"] == pytest.approx(0.0)


def test_oracle_floor(tables):
    name, iou = res.oracle_floor(tables["classes"], "class", 0.35)
    # the oracle's pole (0.27), not source-only's pole (0) nor full's sidewalk (0.1); train absent
    assert name == "pole" and iou == pytest.approx(0.27)
    with pytest.raises(ValueError, match="class"):
        res.oracle_floor(tables["classes"], "class", 0.3)


def test_calibration_verdicts_fixture(tables):
    v = res.calibration_verdicts(tables["calibration"], tables["classes"], "class", 0.35)
    assert v["ratio"] == pytest.approx(0.5) and v["ratio_ok"] is True
    assert v["closure_ok"] is True and v["closure_applies"] is True
    assert (v["floor_class"], v["floor_ok"]) == ("pole", True)
    assert v["plateau_change"] == pytest.approx(1.0) and v["plateau_ok"] is False   # < 1 point is strict
    assert v["all_ok"] is False
    edge = res.calibration_verdicts(tables["calibration"], tables["classes"], "class", 0.4)
    assert edge["ratio_ok"] is True and edge["floor_iou"] == pytest.approx(0.25) and edge["floor_ok"] is True
    assert edge["plateau_ok"] is True and edge["all_ok"] is True
    global_ = res.calibration_verdicts(tables["calibration"], tables["classes"], "global", 1.6)
    assert global_["closure"] == pytest.approx(2 / 3) and global_["closure_ok"] is False
    assert global_["closure_applies"] is False and global_["all_ok"] is True
    missing = res.calibration_verdicts(tables["calibration"], tables["classes"], "class", 0.3)
    assert missing["ratio_ok"] is None and missing["floor_ok"] is None
    # only the plateau measured here (and met): the others unmeasured, so not "failed" but unknown
    assert missing["plateau_ok"] is True and missing["all_ok"] is None
    # one aim failed (the plateau at class 0.35) and one unmeasured (no per-class rows): failed
    failed = res.calibration_verdicts(tables["calibration"], [], "class", 0.35)
    assert failed["floor_ok"] is None and failed["plateau_ok"] is False and failed["all_ok"] is False
    with pytest.raises(ValueError, match="full"):
        res.calibration_verdicts(tables["calibration"], tables["classes"], "full", 0.35)


def test_calibration_sentence_says_each_aim_and_its_verdict(tables):
    v = res.calibration_verdicts(tables["calibration"], tables["classes"], "class", 0.35)
    sentence = res.calibration_sentence(v)
    assert sentence.startswith("class at strength 0.35: source-only at 50.0% of the oracle (aim 40%-65%: met)")
    assert "twice the source-only iterations changing val mIoU by +1.0 points (aim under 1: NOT met)" in sentence
    assert "weakest class pole at IoU 0.270" in sentence and sentence.endswith("In all: not every aim met.")
    global_ = res.calibration_sentence(res.calibration_verdicts(tables["calibration"], tables["classes"], "global", 1.6))
    assert "AdaBN" not in global_ and global_.endswith("In all: every aim met.")
    unmeasured = dict(v, plateau_change=None, plateau_ok=None, all_ok=None)
    assert "twice the source-only iterations: not measured yet (aim: a change under 1 point)" in \
        res.calibration_sentence(unmeasured)
    assert res.calibration_sentence(unmeasured).endswith("not every aim measured yet.")


def one_cell(so, ad, oracle, so_long, floor):
    """Rows of one calibration cell (one seed), as read_csv returns them."""
    common = {"preset": "class", "strength": 0.35, "seed": 1, "split": "val"}
    rows = [{**common, "source_iters": 400, "source_only": so, "adabn": ad, "target_oracle": oracle,
             "ratio": None, "closure": None},
            {**common, "source_iters": 800, "source_only": so_long, "adabn": None, "target_oracle": None,
             "ratio": None, "closure": None}]
    return rows, [{**common, "arm": "target_oracle", "road": 0.9, "pole": floor}]


@pytest.mark.parametrize("so, ok", [(0.26, True), (0.4225, True), (0.2599, False), (0.4226, False)])
def test_ratio_band_edges(so, ok):
    # oracle 0.65: 0.26 / 0.65 = 0.40 and 0.4225 / 0.65 = 0.65 are inside; the others just outside
    rows, classes = one_cell(so, so, 0.65, so, 0.5)
    assert res.calibration_verdicts(rows, classes, "class", 0.35)["ratio_ok"] is ok


@pytest.mark.parametrize("adabn, ok", [(0.42, True), (0.4201, False), (0.30, True), (0.25, True)])
def test_closure_edges(adabn, ok):
    # (adabn - 0.30) / (0.60 - 0.30): 0.42 closes exactly 40 %; below source-only is negative
    rows, classes = one_cell(0.30, adabn, 0.60, 0.30, 0.5)
    assert res.calibration_verdicts(rows, classes, "class", 0.35)["closure_ok"] is ok


@pytest.mark.parametrize("floor, ok", [(0.25, True), (0.2499, False)])
def test_floor_edges(floor, ok):
    rows, classes = one_cell(0.30, 0.32, 0.60, 0.30, floor)
    assert res.calibration_verdicts(rows, classes, "class", 0.35)["floor_ok"] is ok


@pytest.mark.parametrize("so_long, ok", [(0.3099, True), (0.31, False), (0.29, False), (0.2901, True)])
def test_plateau_edges(so_long, ok):
    # source-only 0.30 at 400 iterations: +0.99, +1.00, -1.00, -0.99 points at 800
    rows, classes = one_cell(0.30, 0.32, 0.60, so_long, 0.5)
    assert res.calibration_verdicts(rows, classes, "class", 0.35)["plateau_ok"] is ok


# ----------------------------------------------------------------------------- Delta_d


def test_delta_d_table(tables):
    table = res.delta_d_table(tables["delta_d"], stage=1, preset="class")
    assert [t["fraction"] for t in table] == [0.1, 0.3, 0.6] and [t["n"] for t in table] == [3, 3, 3]
    first = table[0]
    # delta_d = 0.1 x (2, 3, 4): mean 0.3
    assert first["delta_d"] == pytest.approx(0.3) and first["active_fraction"] == pytest.approx(0.9)
    assert first["active_precision"] == pytest.approx(0.7) and first["miou"] == pytest.approx(0.50)
    assert table[1]["active_fraction"] == pytest.approx(0.6)
    # fraction 0.6: precision of seeds 1, 2 only (0.8, 0.9); seed 3 had no active pixel
    assert table[2]["active_precision"] == pytest.approx(0.85) and table[2]["miou"] == pytest.approx(0.52)
    assert res.delta_d_table(tables["delta_d"], stage=2, preset="class")[0]["miou"] == pytest.approx(0.60)
    with pytest.raises(ValueError, match="preset"):
        res.delta_d_table(tables["delta_d"])


# ----------------------------------------------------------------------------- text


def test_markdown(tables):
    table = res.miou_table(tables["summary"], "class", arms=["source_only", "cag_stage1"])
    text = res.markdown(table, {"name": "arm", "mean": "mIoU (%)", "sd": "sd", "n": "seeds"}, digits=1,
                        percent=("mean", "sd"))
    assert text.splitlines() == ["| arm | mIoU (%) | sd | seeds |", "|---|---|---|---|",
                                 "| source-only | 50.0 | 10.0 | 3 |", "| CAG stage 1 | 54.0 | 2.0 | 3 |"]
    per_class = res.per_class_table(tables["summary"], "class", ["cag_stage1"])
    assert res.markdown(per_class, ["class", "cag_stage1"], digits=2).splitlines()[-1] == "| sidewalk | – |"


def test_find_comparison(tables):
    row = res.find_comparison(tables["comparisons"], "class", "cag_stage1", "self_training_stage1")
    assert row["checkpoint"] == "last" and row["mean_diff"] == 0.03
    assert res.find_comparison(tables["comparisons"], "class", "cag_stage1", "self_training_stage1",
                               "best_val")["mean_diff"] == -0.03
    with pytest.raises(LookupError, match=r"self_training_stage1 - cag_stage1.*adabn - source_only"):
        res.find_comparison(tables["comparisons"], "class", "self_training_stage1", "cag_stage1")


def test_say(tables):
    rows = tables["comparisons"]
    assert res.say(rows, "class", "cag_stage1", "self_training_stage1") == \
        "CAG stage 1 is better than self-training stage 1 by 3.0 mIoU points (95 % CI 1.0 to 5.0, 3 seeds)."
    assert res.say(rows, "global", "cag_stage1", "self_training_stage1") == \
        "CAG stage 1 is worse than self-training stage 1 by 4.0 mIoU points (95 % CI -6.0 to -2.0, 3 seeds)."
    assert res.say(rows, "class", "warmup", "source_only") == \
        "Warm-up is worse than source-only by 2.0 mIoU points (95 % CI -3.0 to -1.0, 3 seeds)."
    assert res.say(rows, "class", "adabn", "source_only") == \
        ("No detectable difference between AdaBN and source-only "
         "(mean difference +5.0 mIoU points, 95 % CI -1.0 to 11.0, 3 seeds).")
    assert res.say(rows, "class", "cag_long_stage1", "cag_stage1") == \
        "The difference between long-stage CAG stage 1 and CAG stage 1 is +1.0 mIoU points (1 seed: no interval)."
    # partial results: a declared comparison is written once both arms are scored on all its seeds
    assert res.say(rows, "full", "cag_stage1", "warmup") == \
        ("CAG stage 1 - warm-up (last checkpoint, preset full): no result in these files (not declared, or not yet "
         "scored on all its seeds).")


def test_pseudo_label_overall_pools_pixels_over_classes_and_seeds():
    base = {"preset": "class", "arm": "cag", "rule": "anchor", "stage": 1}
    rows = [{**base, "seed": 1, "class": "road", "correct_pixels": 3, "assigned_pixels": 4, "labelled_pixels": 5,
             "ground_truth_pixels": 10},
            {**base, "seed": 2, "class": "sidewalk", "correct_pixels": 1, "assigned_pixels": 1, "labelled_pixels": 1,
             "ground_truth_pixels": 10},
            {**base, "rule": "probability", "seed": 1, "class": "road", "correct_pixels": 0, "assigned_pixels": 9,
             "labelled_pixels": 9, "ground_truth_pixels": 10}]
    (stage1,) = res.pseudo_label_overall(rows, "class")
    assert stage1 == {"stage": 1, "precision": pytest.approx(4 / 5), "recall": pytest.approx(4 / 20),
                      "coverage": pytest.approx(6 / 20)}


def test_undeclared_comparisons_skip_the_declared_and_pair_by_seed(tables):
    # the experiment file's list: declared whether or not comparisons.csv has its row yet
    declared = [["class", "cag_stage1", "self_training_stage1", "last"],
                ["class", "adabn", "warmup", "last", [1, 2, 3]],
                ["global", "self_training_stage1", "warmup", "last"],      # another preset
                ["class", "self_training_stage1", "warmup", "best_val"]]   # another checkpoint
    pairs = [("cag_stage1", "self_training_stage1"),   # declared: left out
             ("adabn", "warmup"),                      # declared (no comparisons.csv row): left out
             ("cag_stage1", "warmup"),                 # 0.52/0.54/0.56 - 0.50: d = 0.02/0.04/0.06
             ("self_training_stage1", "warmup"),       # d = 0.00/0.01/0.02
             ("cag_stage9", "warmup")]                 # no rows: left out
    rows = res.undeclared_comparisons(tables["summary"], declared, "class", pairs)
    assert [(r["arm_a"], r["arm_b"], r["seeds"]) for r in rows] == \
        [("cag_stage1", "warmup", "1 2 3"), ("self_training_stage1", "warmup", "1 2 3")]
    # mean 0.04, sd 0.02: half-width t_{0.975,2} * 0.02 / sqrt(3)
    half = T975_2 * 0.02 / math.sqrt(3)
    assert rows[0]["mean_diff"] == pytest.approx(0.04)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    assert rows[1]["mean_diff"] == pytest.approx(0.01)
    # best_val: self-training stage 1 has best_val rows 0.56/0.57 at seeds 1-2 and last (0.52) at
    # seed 3 stands in; warm-up has no best_val row (its last stands in): d = 0.06/0.07/0.02
    best = res.undeclared_comparisons(tables["summary"], declared[:3], "class",
                                      [("self_training_stage1", "warmup")], "best_val")
    assert best[0]["checkpoint"] == "best_val" and best[0]["mean_diff"] == pytest.approx(0.05)
    assert res.undeclared_comparisons(tables["summary"], declared, "class",
                                      [("self_training_stage1", "warmup")], "best_val") == []


def test_stage_differences_pair_each_stage_with_the_warmup(tables):
    table = res.stage_differences(tables["summary"], "class", ["cag", "self_training", "cag_long"])
    got = {(t["arm"], t["stage"]): t for t in table}
    assert list(got) == [("cag", 1), ("cag", 2), ("self_training", 1), ("cag_long", 1)]
    # cag_stage1 0.52/0.54/0.56 - warm-up 0.50: d = 0.02/0.04/0.06, mean 0.04, sd 0.02
    half = T975_2 * 0.02 / math.sqrt(3)
    assert got["cag", 1]["mean_diff"] == pytest.approx(0.04)
    assert (got["cag", 1]["ci_low"], got["cag", 1]["ci_high"]) == (pytest.approx(0.04 - half), pytest.approx(0.04 + half))
    # cag_stage2 0.6 on every seed: d = 0.1, sd 0, a zero-width interval
    assert (got["cag", 2]["mean_diff"], got["cag", 2]["ci_low"], got["cag", 2]["ci_high"]) == \
        (pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.1))
    assert got["self_training", 1]["mean_diff"] == pytest.approx(0.01) and got["cag", 1]["seeds"] == "1 2 3"
    assert got["cag_long", 1]["mean_diff"] == pytest.approx(0.2)   # 0.70 - 0.50
    # another start: against AdaBN 0.45/0.55/0.65, cag_stage1 - adabn = 0.07/-0.01/-0.09, mean -0.01
    assert res.stage_differences(tables["summary"], "class", ["cag"], start="adabn")[0]["mean_diff"] == \
        pytest.approx(-0.01)
    assert res.stage_differences(tables["summary"], "global", ["cag"]) == []   # no warm-up on global


def test_bonferroni_widens_each_interval_to_the_family_level(tables):
    # class has five comparisons in the fixture, so each is recomputed at level 1 - 0.05 / 5 = 0.99
    summary, compared = tables["summary"], tables["comparisons"]
    rows = res.bonferroni(summary, compared, "class")
    assert [(r["arm_a"], r["arm_b"], r["checkpoint"]) for r in rows] == \
        [(r["arm_a"], r["arm_b"], r["checkpoint"]) for r in compared if r["preset"] == "class"]
    first = rows[0]   # CAG stage 1 - self-training stage 1, last: d = 0.02/0.03/0.04, mean 0.03, sd 0.01
    t_995_2 = 9.92484320091829   # t_{0.995, 2} from standard tables
    half = t_995_2 * 0.01 / math.sqrt(3)
    assert first["mean_diff"] == pytest.approx(0.03)
    assert (first["ci_low"], first["ci_high"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    # the csv's own interval (0.01 to 0.05) excludes zero; the family one (0.03 -+ 0.0573) does not
    assert first["excludes_zero"] and not first["excludes_zero_family"]
    # adabn - source-only: d = 0.05 on every seed, sd 0: the family interval stays [0.05, 0.05] while
    # the fixture's csv interval (-0.01 to 0.11) contains zero: each flag reads its own interval
    adabn = next(r for r in rows if r["arm_a"] == "adabn")
    assert not adabn["excludes_zero"] and adabn["excludes_zero_family"]
