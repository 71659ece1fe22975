"""cag.comparisons: Student-t quantiles, paired differences, the comparisons CSV and its sentences.

Every expected number is derived by hand (or taken from a printed t table) in the comments,
never computed by the code under test.
"""
import csv
import math

import pytest

from cag import comparisons as cmp

# t_{0.975, df} from standard tables.
T975 = {1: 12.7062047361747, 2: 4.30265272974946, 4: 2.77644510519779, 9: 2.26215716279820,
        30: 2.04227245630124}


# ----------------------------------------------------------------------------- t_quantile

@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_table(df):
    assert cmp.t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-9)


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_is_symmetric(df):
    assert cmp.t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-9)
    for p in (0.6, 0.9, 0.999):
        assert cmp.t_quantile(1 - p, df) == pytest.approx(-cmp.t_quantile(p, df), abs=1e-9)


def test_t_quantile_closed_forms():
    assert cmp.t_quantile(0.5, 7) == 0.0
    # df = 1 is Cauchy: t_p = tan(pi (p - 1/2)); t_{0.75, 1} = tan(pi/4) = 1.
    assert cmp.t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-9)
    # df = 2: t_p = (2p - 1) sqrt(2 / (4 p (1 - p))); p = 0.9 gives 0.8 * sqrt(2 / 0.36).
    assert cmp.t_quantile(0.9, 2) == pytest.approx(0.8 * math.sqrt(2 / 0.36), abs=1e-9)


@pytest.mark.parametrize("p, df", [(0.0, 3), (1.0, 3), (-0.1, 3), (1.5, 3), (0.975, 0)])
def test_t_quantile_rejects_bad_arguments(p, df):
    with pytest.raises(ValueError):
        cmp.t_quantile(p, df)


# ----------------------------------------------------------------------------- paired_difference

A = {1: 0.5, 2: 0.6, 3: 0.7}
B = {1: 0.4, 2: 0.4, 3: 0.4}
# Differences 0.1, 0.2, 0.3: mean 0.2, sample sd 0.1, half-width t_{0.975,2} * 0.1 / sqrt(3).
HALF = 4.30265272974946 * 0.1 / math.sqrt(3)  # 0.248413...


def test_paired_difference_by_hand():
    result = cmp.paired_difference(A, B)
    assert result["seeds"] == (1, 2, 3)
    assert result["mean_diff"] == pytest.approx(0.2, abs=1e-12)
    assert result["ci_low"] == pytest.approx(0.2 - HALF, abs=1e-9)
    assert result["ci_high"] == pytest.approx(0.2 + HALF, abs=1e-9)
    assert HALF == pytest.approx(0.248414, abs=1e-6)


def test_paired_difference_would_catch_common_mistakes():
    result = cmp.paired_difference(A, B)
    normal_half = 1.96 * 0.1 / math.sqrt(3)                    # 0.1132: normal instead of t
    ddof0_half = 4.30265272974946 * math.sqrt(0.02 / 3) / math.sqrt(3)  # 0.2028: ddof = 0
    assert abs((result["ci_high"] - 0.2) - normal_half) > 0.1
    assert abs((result["ci_high"] - 0.2) - ddof0_half) > 0.04
    # a - b, not b - a: the mean is +0.2 and the swapped call gives the mirrored interval.
    swapped = cmp.paired_difference(B, A)
    assert swapped["mean_diff"] == pytest.approx(-0.2, abs=1e-12)
    assert swapped["ci_low"] == pytest.approx(-0.2 - HALF, abs=1e-9)


def test_paired_difference_two_seeds_and_level():
    # Differences 0.2, 0.4: mean 0.3, sd sqrt(0.02) , half = t_{0.975,1} * sqrt(0.02) / sqrt(2) = 12.706... * 0.1.
    result = cmp.paired_difference({1: 0.3, 2: 0.5}, {1: 0.1, 2: 0.1})
    assert result["ci_low"] == pytest.approx(0.3 - 1.27062047361747, abs=1e-9)
    assert result["ci_high"] == pytest.approx(0.3 + 1.27062047361747, abs=1e-9)
    # level 0.5 uses t_{0.75, 1} = 1: half = 0.1.
    result = cmp.paired_difference({1: 0.3, 2: 0.5}, {1: 0.1, 2: 0.1}, level=0.5)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.2, 0.4), abs=1e-9)


def test_paired_difference_one_seed_has_no_interval():
    result = cmp.paired_difference({4: 0.5}, {4: 0.25})
    assert result["mean_diff"] == 0.25 and result["seeds"] == (4,)
    assert math.isnan(result["ci_low"]) and math.isnan(result["ci_high"])


def test_paired_difference_strict_names_unmatched_seeds():
    with pytest.raises(ValueError, match=r"only in a: \[3\].*only in b: \[7\]"):
        cmp.paired_difference(A, {1: 0.4, 2: 0.4, 7: 0.4})
    loose = cmp.paired_difference(A, {1: 0.4, 2: 0.4, 7: 0.4}, strict=False)
    assert loose["seeds"] == (1, 2)
    assert loose["mean_diff"] == pytest.approx(0.15, abs=1e-12)  # (0.1 + 0.2) / 2


def test_paired_difference_without_common_seed():
    with pytest.raises(ValueError, match=r"\[1, 2\].*\[8, 9\]"):
        cmp.paired_difference({1: 0.5, 2: 0.5}, {8: 0.5, 9: 0.5}, strict=False)


# ----------------------------------------------------------------------------- compare

def summary_rows():
    """Rows as csv.DictReader gives them (strings), with distractors of other presets, checkpoints and arms."""
    rows = []
    for arm, values in {"cag_stage1": A, "self_training_stage1": B, "source_only": {1: 0.1, 2: 0.1, 3: 0.1}}.items():
        for seed, value in values.items():
            rows.append({"preset": "class", "arm": arm, "seed": str(seed), "checkpoint": "last",
                         "miou": str(value), "road": "0.9"})
            rows.append({"preset": "class", "arm": arm, "seed": str(seed), "checkpoint": "best_val",
                         "miou": "0.0", "road": "0.9"})
            rows.append({"preset": "texture", "arm": arm, "seed": str(seed), "checkpoint": "last",
                         "miou": "1.0", "road": "0.9"})
    return rows


def test_compare_string_rows():
    result = cmp.compare(summary_rows(), "class", "cag_stage1", "self_training_stage1")
    assert tuple(result) == cmp.COMPARISON_KEYS
    assert result["seeds"] == "1 2 3"
    assert (result["preset"], result["arm_a"], result["arm_b"], result["checkpoint"]) == \
        ("class", "cag_stage1", "self_training_stage1", "last")
    assert result["mean_diff"] == pytest.approx(0.2, abs=1e-12)  # a fraction, not 20 points
    assert result["ci_low"] == pytest.approx(0.2 - HALF, abs=1e-9)
    assert result["ci_high"] == pytest.approx(0.2 + HALF, abs=1e-9)


def test_compare_through_a_real_csv(tmp_path):
    path = tmp_path / "summary.csv"
    rows = summary_rows()
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    result = cmp.compare(read, "class", "self_training_stage1", "source_only", metric="road")
    assert result["mean_diff"] == 0.0 and result["ci_low"] == 0.0  # 0.9 - 0.9 for every seed


def test_compare_numeric_rows_and_seed_subset():
    rows = [{**r, "seed": int(r["seed"]), "miou": float(r["miou"])} for r in summary_rows()]
    result = cmp.compare(rows, "class", "cag_stage1", "self_training_stage1", seeds=[3, 1])
    # Differences 0.1 (seed 1) and 0.3 (seed 3): mean 0.2, sd sqrt(0.02), half = 12.706... * 0.1.
    assert result["seeds"] == "1 3"
    assert result["ci_high"] == pytest.approx(0.2 + 1.27062047361747, abs=1e-9)
    with pytest.raises(ValueError, match=r"\[5\].*cag_stage1"):
        cmp.compare(rows, "class", "cag_stage1", "self_training_stage1", seeds=[1, 5])
    # level 0.99 (a Bonferroni 0.05 / 5): t_{0.995, 1} = 63.6567411628715 from standard tables
    wide = cmp.compare(rows, "class", "cag_stage1", "self_training_stage1", seeds=[3, 1], level=0.99)
    assert wide["ci_high"] == pytest.approx(0.2 + 6.36567411628715, abs=1e-9)
    assert wide["mean_diff"] == pytest.approx(result["mean_diff"])


def test_compare_errors():
    rows = summary_rows()
    with pytest.raises(ValueError, match=r"two rows for seed 2.*'cag_stage1'"):
        cmp.compare(rows + [dict(rows[3])], "class", "cag_stage1", "source_only")
    with pytest.raises(ValueError, match=r"no rows.*'fog'.*'cag_stage1'.*'last'"):
        cmp.compare(rows, "fog", "cag_stage1", "source_only")
    with pytest.raises(ValueError, match=r"only in a: \[3\]"):
        cmp.compare([r for r in rows if not (r["arm"] == "source_only" and r["seed"] == "3")],
                    "class", "cag_stage1", "source_only")


# ----------------------------------------------------------------------------- the CSV

ROWS = [
    {"preset": "class", "arm_a": "cag_stage1", "arm_b": "source_only", "checkpoint": "last",
     "mean_diff": 0.1 + 0.2, "ci_low": 1 / 3, "ci_high": 0.7, "seeds": "1 2 3"},
    {"preset": "class", "arm_a": "cag_stage1", "arm_b": "warmup", "checkpoint": "best_val",
     "mean_diff": -0.25, "ci_low": math.nan, "ci_high": math.nan, "seeds": (4,)},
]


def test_csv_round_trip(tmp_path):
    path = tmp_path / "deep" / "folder" / "comparisons.csv"
    cmp.write_comparisons(path, ROWS)
    with path.open() as f:
        lines = f.read().splitlines()
    assert lines[0] == ",".join(cmp.COMPARISON_KEYS)
    assert lines[2] == "class,cag_stage1,warmup,best_val,-0.25,,,4"
    from cag.results import read_csv

    back = read_csv(path)  # the one reader of the results files
    assert back[0]["mean_diff"] == 0.30000000000000004 and back[0]["ci_low"] == 1 / 3
    assert back[0]["seeds"] == (1, 2, 3) and back[1]["seeds"] == (4,)
    assert back[1]["ci_low"] is None and back[1]["ci_high"] is None
    assert back[1]["checkpoint"] == "best_val" and back[1]["mean_diff"] == -0.25
    assert cmp.count_sentence(back).startswith("The experiment file declares 2 comparisons; 1 of")
    assert "no interval" in cmp.verdict(back[1])


def test_write_is_atomic(tmp_path):
    path = tmp_path / "comparisons.csv"
    cmp.write_comparisons(path, ROWS)
    before = path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["comparisons.csv"]
    with pytest.raises(KeyError):  # a row without "seeds" fails half-way through the write
        cmp.write_comparisons(path, [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "seeds"}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["comparisons.csv"]


# ----------------------------------------------------------------------------- sentences

def row(mean, low, high, seeds="1 2 3 4 5"):
    return {"preset": "class", "arm_a": "cag_stage1", "arm_b": "self_training_stage1", "checkpoint": "last",
            "mean_diff": mean, "ci_low": low, "ci_high": high, "seeds": seeds}


def test_excludes_zero():
    assert cmp.excludes_zero(row(0.02, 0.004, 0.04))
    assert cmp.excludes_zero(row(-0.02, -0.04, -0.004))
    assert not cmp.excludes_zero(row(0.004, -0.011, 0.019))
    assert not cmp.excludes_zero(row(0.004, 0.0, 0.019))  # touching zero is not excluding it
    assert not cmp.excludes_zero(row(0.004, math.nan, math.nan, "1"))


def test_verdict_better():
    text = cmp.verdict(row(0.023, 0.004, 0.042), "CAG stage 1", "self-training stage 1")
    assert text == ("CAG stage 1 is better than self-training stage 1 by 2.3 mIoU points "
                    "(95 % CI 0.4 to 4.2, 5 seeds).")


def test_verdict_worse_prints_positive_magnitude_and_signed_interval():
    text = cmp.verdict(row(-0.012, -0.021, -0.003, (1, 2, 3)))
    assert text == ("cag_stage1 is worse than self_training_stage1 by 1.2 mIoU points "
                    "(95 % CI -2.1 to -0.3, 3 seeds).")


def test_verdict_no_difference():
    text = cmp.verdict(row(0.004, -0.011, 0.019), "A", "B")
    assert text == ("No detectable difference between A and B "
                    "(mean difference +0.4 mIoU points, 95 % CI -1.1 to 1.9, 5 seeds).")


def test_verdict_one_seed():
    text = cmp.verdict(row(-0.0125, math.nan, math.nan, "3"), "A", "B", digits=2)
    assert text.endswith("-1.25 mIoU points (1 seed: no interval).")
    assert "better" not in text and "worse" not in text


def test_verdict_from_compare():
    # Hand values: mean 0.2, interval 0.2 -+ 0.248414 -> +20.0 points, CI -4.8 to 44.8.
    text = cmp.verdict(cmp.compare(summary_rows(), "class", "cag_stage1", "self_training_stage1"))
    assert text == ("No detectable difference between cag_stage1 and self_training_stage1 "
                    "(mean difference +20.0 mIoU points, 95 % CI -4.8 to 44.8, 3 seeds).")
    # Against source-only (differences 0.4, 0.5, 0.6): 50.0 points, CI 25.2 to 74.8.
    text = cmp.verdict(cmp.compare(summary_rows(), "class", "cag_stage1", "source_only"))
    assert text == ("cag_stage1 is better than source_only by 50.0 mIoU points "
                    "(95 % CI 25.2 to 74.8, 3 seeds).")


def test_count_sentence():
    rows = [row(0.02, 0.01, 0.03)] * 7 + [row(0.0, -0.01, 0.01)] * 19
    assert cmp.count_sentence(rows) == (
        "The experiment file declares 26 comparisons; 7 of their 95 % intervals exclude zero. "
        "With 26 comparisons, about 1.3 would exclude zero by chance alone if no arm differed.")


def test_count_sentence_singular():
    assert cmp.count_sentence([row(0.02, 0.01, 0.03)]) == (
        "The experiment file declares 1 comparison; its 95 % interval excludes zero. "
        "With 1 comparison, about 0.1 would exclude zero by chance alone if no arm differed.")
    assert cmp.count_sentence([row(0.0, -0.01, 0.01)]).startswith(
        "The experiment file declares 1 comparison; its 95 % interval does not exclude zero.")
    rows = [row(0.02, 0.01, 0.03)] + [row(0.0, -0.01, 0.01)] * 2
    assert "3 comparisons; 1 of their 95 % intervals excludes zero." in cmp.count_sentence(rows)


def test_count_sentence_of_partial_results():
    rows = [row(0.02, 0.01, 0.03)] + [row(0.0, -0.01, 0.01)] * 2
    assert cmp.count_sentence(rows, complete=False).startswith(
        "These partial results hold 3 of the declared comparisons; 1 of their 95 % intervals excludes zero.")
    assert cmp.count_sentence([], complete=False) == "These partial results hold none of the declared comparisons yet."
    assert cmp.count_sentence([]) == "The experiment file declares no comparisons."
