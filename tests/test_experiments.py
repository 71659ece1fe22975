"""cag.experiments (experiment files, the results files' writers) and the runners of its two kinds:
cag.calibration, cag.benchmark_table, cag.benchmark_runs, cag.score_cache."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cag import benchmark_table as bt
from cag import calibration as cal
from cag import experiments as ex
from cag import score_cache as sc
from cag.config import ConfigError, load_config
from cag.labels import class_names
from cag.pseudo_labels import smallest_anchor_gap
from cag.results import read_csv

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- files


def test_csv_round_trip_keeps_numbers_and_empty_cells(tmp_path):
    rows = [{"preset": "class", "arm": "warmup", "seed": 3, "checkpoint": "last", "miou": 0.123456789,
             "road": None, "sky": float("nan"), "car": 1.0}]
    path = tmp_path / "summary.csv"
    ex.write_csv(path, rows, ex.SUMMARY_KEYS, ["road", "sky", "car"])
    assert path.read_text().splitlines()[0] == "preset,arm,seed,checkpoint,miou,road,sky,car"
    (back,) = read_csv(path)
    assert isinstance(back["seed"], int) and back["seed"] == 3 and back["road"] is None and back["sky"] is None and back["car"] == 1.0
    assert back["miou"] == pytest.approx(0.123457, abs=1e-9)


# ----------------------------------------------------------------------------- experiment files


def write_spec(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("kind: nonsense\n", "kind: one of calibration, benchmark_v2"),
    ("kind: calibration\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\ngrid: {}\nsedes: 2\n",
     "unknown keys \\['sedes'\\]"),
    ("kind: calibration\nbase: missing.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\ngrid: {}\n", "missing.yaml"),
    ("kind: calibration\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: []\ngrid: {}\n", "seeds"),
    ("kind: calibration\nbase: configs/synthetic.yaml\ndata_dir: d\nresults_dir: x\nseeds: [1]\n", "runs_dir"),
    ("kind: benchmark_v2\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nwarmup_arms: {}\n", "presets"),
    # version 1 of the benchmark table was removed: its kind is named, with the kinds that exist
    ("kind: benchmark\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\nresults_dir: x\nseeds: [1]\npresets: {}\n",
     "kind: benchmark: the version-1 benchmark table was removed .*benchmark_v2.* the kinds are: calibration, benchmark_v2"),
])
def test_bad_experiment_files_are_refused_with_the_reason(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=message):
        ex.load_spec(write_spec(tmp_path, text))


def test_a_file_of_a_removed_kind_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = write_spec(tmp_path, "kind: benchmark\nbase: configs/synthetic.yaml\nruns_dir: r\ndata_dir: d\n"
                                "results_dir: x\nseeds: [1]\npresets: {class: [source_only]}\n")
    with pytest.raises(ConfigError, match="kind: benchmark: .*removed"):
        ex.run(path, quiet=True)
    assert not (REPO / "x").exists() and not (REPO / "r").exists()


def test_calibration_never_reads_the_test_split():
    with pytest.raises(ConfigError, match="held-out"):
        cal.calibrate({"split": "test", "seeds": [1], "grid": {}, "results_dir": "unused"})


def test_run_config_names_the_strength_and_a_data_root_per_preset_and_strength(monkeypatch):
    from cag.data.synthetic import PRESETS

    monkeypatch.chdir(REPO)
    spec = {"base": "configs/synthetic.yaml", "runs_dir": "runs/x", "data_dir": "data/bench", "overrides": []}
    cfg = ex.run_config(spec, name="global-seed2", seed=2, preset="global", extra=["cag.delta_d=1.0"])
    strength = PRESETS["global"].default_strength
    assert cfg.data.synthetic.strength == strength and cfg.data.synthetic.preset == "global"
    assert cfg.data.target_root == f"data/bench/global-{strength:g}/target"
    assert (cfg.seed, cfg.cag.delta_d, str(cfg.run_dir)) == (2, 1.0, "runs/x/global-seed2")


# ============================================ cag.calibration, cag.benchmark_table, cag.benchmark_runs, cag.score_cache

#: A schedule of a few iterations on 32x64 scenes, for the experiment-file tests.
TINY_RUNS = [
    "model.feature_dim=16", "data.base_width=64", "data.scale=[0.75,1.25]", "data.crop=[64,32]",
    "train.batch_size=2", "train.val_interval=3", "train.checkpoint_interval=2", "source_only.iters=4",
    "warmup.iters=3", "warmup.disc_channels=4", "anchors.num_images=8", "anchors.min_pixels=1",
    "anchors.batch_size=4", "cag.iters=3", "cag.poly_horizon=10", "cag.min_pixels=1", "eval.batch_size=4",
    "data.synthetic.size=[32,64]", "data.synthetic.n_source=8", "data.synthetic.n_target_train=8",
    "data.synthetic.n_target_val=4", "data.synthetic.n_target_test=4", "device=cpu",
]


def spec_file(tmp_path, name: str, **entries) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "synthetic.yaml"), "overrides": TINY_RUNS,
                                    **entries}, sort_keys=False))
    return path


class Spy:
    """Counts the trainings, scorings and AdaBN adaptations of the runner (and still runs them)."""

    def __init__(self, monkeypatch, forbid: bool = False):
        from cag.adabn import adapt_checkpoint
        from cag.pipeline import Pipeline

        self.trained, self.scored, self.adapted = [], [], []
        run, oracle, score = Pipeline.run, ex.train_oracle, ex.score

        def pipeline_run(pipeline, until=None):
            self.trained.append(pipeline.cfg.name)
            return run(pipeline, until=until)

        def train_oracle(cfg):
            self.trained.append(f"{cfg.name}/target_oracle")
            return oracle(cfg)

        def scored(cfg, checkpoint, split):
            self.scored.append((str(checkpoint), split))
            return score(cfg, checkpoint, split)

        def adapt(cfg, checkpoint, out, split="train"):
            self.adapted.append(split)
            return adapt_checkpoint(cfg, checkpoint, out, split=split)

        monkeypatch.setattr(Pipeline, "run", pipeline_run)
        monkeypatch.setattr(ex, "train_oracle", train_oracle)
        monkeypatch.setattr(ex, "score", scored)
        monkeypatch.setattr("cag.adabn.adapt_checkpoint", adapt)


# ----------------------------------------------------------------------------- arithmetic


def test_ratio_and_closure_by_hand():
    ratio, closure = cal.ratio_and_closure(0.30, 0.36, 0.60)
    assert ratio == pytest.approx(0.5) and closure == pytest.approx(0.06 / 0.30)  # AdaBN closes 20 % of the gap
    assert cal.ratio_and_closure(0.30, 0.24, 0.60)[1] == pytest.approx(-0.2)  # worse than source-only
    assert cal.ratio_and_closure(0.30, 0.36, None) == (None, None)
    assert cal.ratio_and_closure(0.30, None, 0.60) == (pytest.approx(0.5), None)
    assert cal.ratio_and_closure(0.30, 0.36, 0.30)[1] is None  # no gap to close


def test_smallest_gap_skips_invalid_anchors_and_delta_d_is_a_fraction_of_it():
    anchors = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [100.0, 100.0]])
    counts = torch.tensor([5.0, 3.0, 0.0, 2.0])  # anchor 2 (1 away from anchor 0) has no pixels
    gap, pair = smallest_anchor_gap(anchors, counts > 0)
    assert gap == pytest.approx(5.0) and pair == (0, 1)
    assert bt.delta_d_value(0.3, gap) == pytest.approx(1.5)
    assert bt.delta_d_value(0.1, 1 / 3) == 0.0333333
    with pytest.raises(ValueError, match="at least two"):
        smallest_anchor_gap(anchors, torch.tensor([True, False, False, False]))


def test_anchor_activity_is_active_over_evaluated_and_correct_over_active():
    counts = {"active": 5, "evaluated": 20, "correct": [1, 2, 0], "assigned": [2, 3, 0]}
    assert bt.anchor_activity(counts) == (0.25, pytest.approx(0.6))
    assert bt.anchor_activity({"active": 0, "evaluated": 20, "correct": [0]}) == (0.0, None)


# ----------------------------------------------------------------------------- the score cache


def test_score_cache_accepts_only_matching_records_and_writes_atomically(tmp_path):
    cache = sc.ScoreCache(tmp_path)
    unit = sc.Unit("class-0.4-seed1", "source_only-last-val", "f" * 16, "s" * 16, {"d": {"format_version": 2}}, 1)
    assert cache.status(unit) == "missing" and cache.get(unit) is None
    cache.put(unit, {"miou": 0.5, "per_class_iou": {"road": 0.9}}, wall_seconds=12.34, score_seconds=1.0)
    path = tmp_path / "scores" / "class-0.4-seed1" / "source_only-last-val.json"
    record = json.loads(path.read_text())
    assert cache.status(unit) == "valid" and cache.get(unit)["miou"] == 0.5
    assert {"fingerprint", "scoring", "data", "seed", "commit", "wall_seconds", "score_seconds"} <= set(record)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    for field, value in (("fingerprint", "0" * 16), ("scoring", "x"), ("data", {"d": {"format_version": 1}})):
        other = sc.Unit(**{**unit.__dict__, field: value})
        assert cache.status(other) == "stale" and cache.get(other) is None, field
    path.write_text("{not json")
    assert cache.status(unit) == "missing"


def test_score_cache_checks_the_lineage_only_when_it_is_known(tmp_path):
    cache = sc.ScoreCache(tmp_path)
    unit = sc.Unit("source-seed1", "source_only-last-val", "f" * 16, "s" * 16, {}, 1, lineage="a" * 16)
    cache.put(unit, {"miou": 0.5}, wall_seconds=None, score_seconds=1.0)
    assert json.loads(cache.path(unit).read_text())["lineage"] == "a" * 16
    assert cache.status(unit) == "valid"
    assert cache.status(sc.Unit(**{**unit.__dict__, "lineage": None})) == "valid"  # model not trained here: trust it
    retrained = sc.Unit(**{**unit.__dict__, "lineage": "b" * 16})  # the source-only model retrained elsewhere
    assert cache.status(retrained) == "stale" and cache.get(retrained) is None


def test_weights_digest_reads_the_model_weights_only(tmp_path):
    from cag.checkpoint import save_checkpoint

    model = {"conv.weight": torch.arange(6.0).reshape(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    save_checkpoint(tmp_path / "a.pt", {"model": model, "optimizers": {"model": {"lr": 0.1}}, "iteration": 5})
    save_checkpoint(tmp_path / "b.pt", {"model": {k: v.clone() for k, v in model.items()},
                                        "optimizers": {"model": {"lr": 0.2}}, "iteration": 9})
    changed = {**model, "conv.weight": model["conv.weight"].clone()}
    changed["conv.weight"][1, 2] += 2 ** -20  # one weight, in its last bits
    save_checkpoint(tmp_path / "c.pt", {"model": changed})
    digests = [sc.weights_digest(tmp_path / f"{name}.pt") for name in "abc"]
    assert digests[0] == digests[1] != digests[2]


def test_tables_refuse_one_group_with_two_source_models():
    records = {"x/source_only-last-test.json": {"lineage": "a"}, "y/warmup-last-test.json": {"lineage": "a"},
               "z/target_oracle-last-test.json": {}, "w/missing.json": None}
    sc.check_lineage(records, "preset class, seed 1")
    with pytest.raises(RuntimeError, match=r"preset class, seed 1: cached scores descend from 2 different source-only "
                                           r"models .*y/warmup-last-test.json"):
        sc.check_lineage({**records, "y/warmup-last-test.json": {"lineage": "b"}}, "preset class, seed 1")


def test_a_retrained_source_model_makes_every_score_of_its_seed_stale(tmp_path, monkeypatch):
    """Another machine retrains the source-only model with other weights: the units of that seed
    recorded from the old model are re-scored, not paired with the new ones."""
    from cag.checkpoint import load_checkpoint, save_checkpoint

    results, runs = tmp_path / "results", tmp_path / "runs"
    path = spec_file(tmp_path, "cal.yaml", kind="calibration", runs_dir=str(runs), data_dir=str(tmp_path / "data"),
                     results_dir=str(results), split="val", seeds=[1], jobs=1, adabn=True,
                     grid={"class": [0.3, 0.45]}, oracle_grid={})
    monkeypatch.setattr(cal, "calibration_tasks", lambda spec: [("source", 1)])  # no oracle: source-only and AdaBN
    ex.run(path, quiet=True)
    scores = sorted((results / "scores").glob("*/*.json"))
    assert len(scores) == 4 and len({json.loads(p.read_text())["lineage"] for p in scores}) == 1

    last = runs / "source-seed1" / "source_only" / "last.pt"
    checkpoint = load_checkpoint(last)
    model = checkpoint["modules"]["model"]
    name = next(k for k, v in model.items() if v.is_floating_point())
    model[name] = model[name] + 1e-3
    save_checkpoint(last, checkpoint)  # "retrained on another machine": other weights, same fingerprint
    (results / "scores" / "class-0.3-seed1" / "adabn-last-val.json").unlink()
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert spy.trained == [] and len(spy.scored) == 4 and len(spy.adapted) == 2  # all four units again
    assert len({json.loads(p.read_text())["lineage"] for p in scores}) == 1


def test_data_identity_names_a_missing_or_incomplete_manifest(tmp_path):
    with pytest.raises(ConfigError, match="benchmark.json: no benchmark manifest"):
        sc.data_identity(tmp_path)
    (tmp_path / "benchmark.json").write_text(json.dumps({"complete": False, "parameters": {}, "format_version": 1}))
    with pytest.raises(ConfigError, match="incomplete"):
        sc.data_identity(tmp_path)


# ----------------------------------------------------------------------------- experiment-file checks


def v2_spec(**changes) -> dict:
    spec = {"_file": "bench.yaml", "kind": "benchmark_v2", "base": str(REPO / "configs" / "synthetic.yaml"),
            "runs_dir": "r", "data_dir": "d", "results_dir": "x", "overrides": [], "eval_split": "test",
            "presets": {"class": {"seeds": [1, 2], "arms": ["source_only", "warmup", "cag"]}},
            "warmup_arms": {"warmup": []}, "arms": {"self_training": ["cag.pseudo_labels=probability"]},
            "sweeps": {"preset": "class", "seeds": [1, 2], "delta_d_fractions": [0.5],
                       "settings": {"cag_long": ["cag.iters=600"]}},
            "comparisons": [["class", "cag_stage1", "warmup", "last"]], "pseudo_label_arms": ["cag"]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize("changes, message", [
    ({"presets": {"class": {"seeds": [1, 2], "arms": ["source_only", "cag_magic"]}}},
     r"bench.yaml: presets.class.arms: unknown arms \['cag_magic'\]"),
    ({"presets": {"kitchen": {"seeds": [1], "arms": ["source_only"]}}}, "presets.kitchen: unknown preset"),
    ({"presets": {"class": {"seeds": [], "arms": ["source_only"]}}}, "presets.class.seeds"),
    ({"presets": {"class": {"seeds": [1, 2], "arms": ["cag"], "sedes": 3}}}, "presets.class: expected a mapping"),
    ({"comparisons": [["class", "self_training_stage1", "cag_stage1", "last"]]},
     r"comparisons\[0\]: arm 'self_training_stage1' is not produced on preset 'class'"),
    ({"comparisons": [["global", "cag_stage1", "warmup", "last"]]}, r"comparisons\[0\]: preset 'global'"),
    ({"comparisons": [["class", "cag_stage1", "warmup", "last", [1]]]}, "at least two seeds"),
    ({"comparisons": [["class", "cag_stage1", "warmup", "last", [1, 3]]]}, r"seeds \[3\] are not produced"),
    ({"comparisons": [["class", "cag_stage1", "warmup", "final"]]}, "checkpoint 'final'"),
    ({"comparisons": [["class", "cag_long_stage3", "cag_stage3", "last"]],
      "sweeps": {"preset": "class", "seeds": [1], "settings": {"cag_long": []}}}, "declare the seeds"),
    ({"eval_split": "val"}, "eval_split: 'val' is the split model selection"),
    ({"eval_split": "train"}, "eval_split: the target train split"),
    ({"arms": {"self_training": ["warmup.iters=10"]}}, "arms.self_training: warmup.iters: adapted arms"),
    ({"arms": {"self_training": ["data.val_split=test"]}}, "arms.self_training: data.val_split"),
    ({"arms": {"self_training": ["cag.pseudo_labels=magic"]}}, "arms.self_training: cag.pseudo_labels"),
    ({"arms": {"warmup": []}}, "arms.warmup: the name of a fixed or warm-up arm"),
    ({"warmup_arms": {"warmup": ["cag.lam=0"]}}, "warmup_arms.warmup: cag.lam: a warm-up arm may only change"),
    ({"warmup_arms": {"warmup_no_adv": []}, "presets": {"class": {"seeds": [1, 2], "arms": ["cag"]}}, "comparisons": []},
     "warmup_arms: the adapted arms of presets.class"),
    ({"sweeps": {"preset": "global"}}, "sweeps.preset: 'global'"),
    ({"sweeps": {"preset": "class", "seeds": [7]}}, r"sweeps.seeds: seeds \[7\]"),
    ({"sweeps": {"preset": "class", "delta_d_fractions": [0.0]}}, "sweeps.delta_d_fractions"),
    ({"sweeps": {"preset": "class", "settings": {"self_training": []}}}, "sweeps.settings.self_training: also an arm"),
    ({"pseudo_label_arms": ["magic"]}, "pseudo_label_arms: 'magic'"),
    ({"jobs": 0}, "jobs: expected a whole number"),
])
def test_benchmark_v2_files_are_checked_before_any_work(changes, message):
    with pytest.raises(ConfigError, match=message):
        bt.check_benchmark_spec(v2_spec(**changes))


def test_a_valid_benchmark_v2_spec_passes_and_lists_what_it_produces():
    spec = v2_spec()
    bt.check_benchmark_spec(spec)
    produced = bt.produced_arms(spec, "class")
    assert set(produced) == {"source_only", "warmup", "cag_stage1", "cag_stage2", "cag_stage3", "cag_long_stage1",
                             "cag_long_stage2", "cag_long_stage3"}


@pytest.mark.parametrize("changes, message", [
    ({"oracle_grid": {"class": [0.5]}}, r"oracle_grid.class: strengths \[0.5\] are not in grid.class"),
    ({"plateau": [1]}, "plateau: expected a list of whole multiples >= 2"),
    ({"adabn": "yes"}, "adabn: expected true or false"),
    ({"grid": {"kitchen": [0.3]}}, "grid.kitchen: unknown preset"),
    ({"grid": {"class": []}}, "grid.class: expected a non-empty list"),
    ({"jobs": 1.5}, "jobs: expected a whole number"),
    ({"oracle": {"init": "imagenet"}}, "oracle.init: expected one of scratch, source_only"),
    ({"oracle": {"init": "source_only", "overrides": ["cag.lam=0"]}}, "oracle.overrides: expected a list of source_only"),
    ({"oracle": {"init": "source_only", "overrides": ["source_only.iterz=5"]}}, "oracle.overrides: unknown key 'source_only.iterz'"),
    ({"oracle": {"init": "source_only", "iters": 5}}, "oracle: expected a mapping with the keys init and overrides"),
])
def test_calibration_files_are_checked_before_any_work(changes, message):
    spec = {"_file": "cal.yaml", "base": str(REPO / "configs" / "synthetic.yaml"), "overrides": [], "seeds": [1],
            "grid": {"class": [0.3, 0.4]}, **changes}
    with pytest.raises(ConfigError, match=f"cal.yaml: {message}"):
        cal.check_calibration_spec(spec)


def test_load_spec_knows_the_new_keys_and_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = spec_file(tmp_path, "b.yaml", kind="benchmark_v2", runs_dir="r", data_dir="d", results_dir="x",
                     presets={"class": {"seeds": [1, 2], "arms": ["source_only"]}})
    with pytest.raises(ConfigError, match="missing key 'warmup_arms'"):
        ex.load_spec(path)
    path = spec_file(tmp_path, "c.yaml", kind="calibration", runs_dir="r", data_dir="d", results_dir="x", seeds=[1],
                     grid={"class": [0.3]}, jobs=2, plateau=[2], adabn=True)
    spec = ex.load_spec(path)
    assert (spec["jobs"], spec["plateau"], spec["adabn"], spec["_file"]) == (2, [2], True, str(path))


@pytest.mark.parametrize("name", ["benchmark_v2.yaml", "calibration_v2.yaml"])
def test_shipped_v2_experiment_files_pass_their_checks(monkeypatch, name):
    monkeypatch.chdir(REPO)
    spec = ex.load_spec(REPO / "configs" / "experiments" / name)
    if spec["kind"] == "calibration":
        cal.check_calibration_spec(spec)
        assert spec["seeds"] == [1, 2, 3] and spec["plateau"] == [2] and spec["adabn"] is True
        return
    bt.check_benchmark_spec(spec)
    assert spec["presets"]["class"]["seeds"] == [1, 2, 3, 4, 5]
    assert len(spec["comparisons"]) >= 20
    base = load_config(spec["base"])
    long = load_config(spec["base"], spec["sweeps"]["settings"]["cag_long"])
    assert (long.cag.iters, long.cag.poly_horizon) == (4 * base.cag.iters, 4 * base.cag.poly_horizon)


# ----------------------------------------------------------------------------- calibration end to end


def test_calibration_runs_once_then_only_what_the_cache_lacks(tmp_path, monkeypatch):
    """The tiny calibration: its CSVs; a rerun after deleting runs_dir trains nothing; deleting one
    score trains only the run it needs; a record with another fingerprint is re-run and replaced;
    AdaBN reads the target train images."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    path = spec_file(tmp_path, "cal.yaml", kind="calibration", runs_dir=str(runs), data_dir=str(tmp_path / "data"),
                     results_dir=str(results), split="val", seeds=[1], jobs=1, plateau=[2], adabn=True,
                     grid={"class": [0.3, 0.45]}, oracle_grid={"class": [0.45]})
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert sorted(spy.trained) == ["class-0.45-seed1/target_oracle", "source-seed1", "source-seed1-x2"]
    assert spy.adapted == ["train", "train"]  # AdaBN on the target train images of each cell, never val
    assert all(split == "val" for _, split in spy.scored) and len(spy.scored) == 2 + 2 + 2 + 1
    rows = read_csv(results / "calibration.csv")
    assert list(rows[0]) == list(cal.CALIBRATION_KEYS)
    assert [(r["strength"], r["source_iters"]) for r in rows] == [(0.3, 4), (0.3, 8), (0.45, 4), (0.45, 8)]
    cell = {arm: json.loads((results / "scores" / "class-0.45-seed1" / f"{arm}-last-val.json").read_text())["miou"]
            for arm in ("source_only", "adabn", "target_oracle")}
    oracle_row = rows[2]
    assert (oracle_row["source_only"], oracle_row["adabn"], oracle_row["target_oracle"]) == \
        pytest.approx((cell["source_only"], cell["adabn"], cell["target_oracle"]), abs=1e-6)
    assert oracle_row["ratio"] == pytest.approx(cell["source_only"] / cell["target_oracle"], abs=1e-6)
    assert oracle_row["closure"] == pytest.approx((cell["adabn"] - cell["source_only"])
                                                  / (cell["target_oracle"] - cell["source_only"]), abs=1e-6)
    assert rows[0]["target_oracle"] is None and rows[0]["adabn"] is not None and rows[1]["adabn"] is None
    classes = read_csv(results / "calibration_classes.csv")
    assert [(r["strength"], r["arm"]) for r in classes] == [(0.3, "source_only"), (0.3, "adabn"), (0.45, "source_only"),
                                                            (0.45, "adabn"), (0.45, "target_oracle")]
    table = (results / "calibration.csv").read_text()

    shutil.rmtree(runs)  # a fresh clone: the committed score cache only
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert (spy.trained, spy.scored, spy.adapted) == ([], [], [])
    assert (results / "calibration.csv").read_text() == table

    (results / "scores" / "class-0.3-seed1" / "adabn-last-val.json").unlink()
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert spy.trained == ["source-seed1"] and spy.adapted == ["train"] and len(spy.scored) == 1
    assert (results / "calibration.csv").read_text() == table  # retraining reproduced the model

    oracle_file = results / "scores" / "class-0.45-seed1" / "target_oracle-last-val.json"
    record = json.loads(oracle_file.read_text())
    oracle_file.write_text(json.dumps({**record, "fingerprint": "0" * 16, "miou": 0.99}))
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert spy.trained == ["class-0.45-seed1/target_oracle"] and len(spy.scored) == 1
    assert json.loads(oracle_file.read_text())["miou"] == record["miou"]
    assert (results / "calibration.csv").read_text() == table


def test_an_oracle_fine_tuned_from_the_source_model_starts_from_it(tmp_path, monkeypatch):
    """oracle.init: source_only: the oracle runs after its seed's source-only model in the same
    task, starts from that model (one step of fine-tuning moves it little; from scratch it would be
    far away) and records its lineage; its overrides set its schedule."""
    from cag.checkpoint import load_checkpoint
    from cag.stages import make_model, seed_everything

    results, runs = tmp_path / "results", tmp_path / "runs"
    path = spec_file(tmp_path, "cal.yaml", kind="calibration", runs_dir=str(runs), data_dir=str(tmp_path / "data"),
                     results_dir=str(results), split="val", seeds=[1], jobs=1, grid={"class": [0.45]},
                     overrides=[*TINY_RUNS, "source_only.lr=0.3"],  # the source model moves far from its init
                     oracle={"init": "source_only", "overrides": ["source_only.iters=1", "source_only.lr=0.001"]})
    spec = yaml.safe_load(path.read_text())
    assert cal.calibration_tasks(spec) == [("source", 1)]  # no oracle task of its own
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert spy.trained == ["source-seed1", "class-0.45-seed1/target_oracle"]
    cell = results / "scores" / "class-0.45-seed1"
    lineages = {arm: json.loads((cell / f"{arm}-last-val.json").read_text()).get("lineage")
                for arm in ("source_only", "target_oracle")}
    assert lineages["target_oracle"] is not None and lineages["target_oracle"] == lineages["source_only"]
    source = load_checkpoint(runs / "source-seed1" / "source_only" / "last.pt")["modules"]["model"]
    oracle_dir = runs / "class-0.45-seed1" / "target_oracle"
    oracle = load_checkpoint(oracle_dir / "last.pt")["modules"]["model"]
    assert json.loads((oracle_dir / "done.json").read_text())["iters"] == 1
    weights = [k for k, v in source.items() if v.is_floating_point() and k.endswith("weight")]
    moved = sum(float((oracle[k] - source[k]).norm() ** 2) for k in weights) ** 0.5
    cfg = load_config(spec["base"], [*spec["overrides"], "seed=1"])
    seed_everything(cfg.seed, torch.device("cpu"))
    fresh = make_model(cfg, torch.device("cpu")).state_dict()  # where training from scratch starts
    travelled = sum(float((source[k] - fresh[k]).norm() ** 2) for k in weights) ** 0.5
    assert moved < 0.05 * travelled, (moved, travelled)  # from scratch it would be about `travelled` away


# ----------------------------------------------------------------------------- benchmark_v2 end to end


def test_benchmark_v2_end_to_end_then_resumes_from_the_score_cache(tmp_path, monkeypatch):
    """1 preset, 2 seeds, source-only, AdaBN, the warm-up and two CAG stages, a one-point Delta_d
    sweep and two declared comparisons; then a fresh clone (no runs_dir) trains nothing, and
    deleting one score retrains only that seed's chain (source-only -> warm-up -> CAG)."""
    results, runs = tmp_path / "results", tmp_path / "runs"
    path = spec_file(tmp_path, "bench.yaml", kind="benchmark_v2", runs_dir=str(runs), data_dir=str(tmp_path / "data"),
                     results_dir=str(results), eval_split="test", jobs=1,
                     overrides=[*TINY_RUNS, "cag.stages=2"],
                     presets={"class": {"seeds": [1, 2], "arms": ["source_only", "adabn", "warmup", "cag"],
                                        "strength": 0.45}},
                     warmup_arms={"warmup": []}, arms={},
                     sweeps={"preset": "class", "seeds": [1], "delta_d_fractions": [0.5]},
                     comparisons=[["class", "cag_stage1", "warmup", "last"], ["class", "adabn", "source_only", "last"]])
    spy = Spy(monkeypatch)
    outcome = ex.run(path, quiet=True)
    assert outcome["complete"] is True and outcome["comparisons"] == 2
    assert spy.trained == ["source-seed1", "source-seed2",  # phase 1, then one (preset, seed) group after the other
                           "class-0.45-seed1-warmup", "class-0.45-seed1-cag", "class-0.45-seed1-delta_d-0.5",
                           "class-0.45-seed2-warmup", "class-0.45-seed2-cag"]
    assert set(spy.adapted) == {"train"}

    with (results / "summary.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["preset", "arm", "seed", "checkpoint", "miou", *class_names(19)]
    summary = read_csv(results / "summary.csv")
    assert list(dict.fromkeys(r["arm"] for r in summary)) == ["source_only", "adabn", "warmup", "cag_stage1", "cag_stage2"]
    last = {(r["arm"], r["seed"]): r["miou"] for r in summary if r["checkpoint"] == "last"}
    assert len(last) == 10

    scores = results / "scores"
    exact = {seed: {arm: json.loads((scores / name / f"{stage}-last-test.json").read_text())["miou"]
                    for arm, name, stage in (("cag_stage1", f"class-0.45-seed{seed}-cag", "stage1"),
                                             ("warmup", f"class-0.45-seed{seed}-warmup", "warmup"))} for seed in (1, 2)}
    comparison = next(r for r in read_csv(results / "comparisons.csv") if r["arm_a"] == "cag_stage1")
    differences = [exact[s]["cag_stage1"] - exact[s]["warmup"] for s in (1, 2)]
    assert comparison["mean_diff"] == pytest.approx(sum(differences) / 2, abs=1e-12)
    assert comparison["ci_low"] < comparison["mean_diff"] < comparison["ci_high"]

    from cag.anchors import load_anchors

    gap = json.loads((scores / "class-0.45-seed1-cag" / "anchors-gap-source.json").read_text())["smallest_gap"]
    anchors, counts = load_anchors(runs / "class-0.45-seed1-cag" / "anchors" / "anchors.pt")
    assert gap == pytest.approx(smallest_anchor_gap(anchors, counts > 0)[0])
    deltas = read_csv(results / "delta_d.csv")
    assert [(r["seed"], r["fraction"], r["stage"]) for r in deltas] == [(1, 0.5, 1), (1, 0.5, 2)]
    assert all(r["delta_d"] == pytest.approx(0.5 * gap, rel=1e-5) and r["smallest_gap"] == pytest.approx(gap, abs=1e-6)
               and 0.0 <= r["active_fraction"] <= 1.0 and r["miou"] is not None for r in deltas)
    labels = read_csv(results / "pseudo_labels.csv")
    assert {(r["arm"], r["seed"], r["stage"]) for r in labels} == {("cag", s, k) for s in (1, 2) for k in (1, 2)}
    assert json.loads((results / "runs.json").read_text())["complete"] is True
    table = (results / "summary.csv").read_text()

    shutil.rmtree(runs)  # a fresh clone: the committed score cache only
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert (spy.trained, spy.scored, spy.adapted) == ([], [], [])
    assert (results / "summary.csv").read_text() == table

    (scores / "class-0.45-seed1-cag" / "stage2-last-test.json").unlink()
    spy = Spy(monkeypatch)
    ex.run(path, quiet=True)
    assert spy.trained == ["source-seed1", "class-0.45-seed1-warmup", "class-0.45-seed1-cag"]
    assert len(spy.scored) == 1 and spy.adapted == []
    assert (results / "summary.csv").read_text() == table  # retraining reproduced every model


@pytest.mark.slow
def test_calibration_tasks_run_in_worker_processes(tmp_path):
    """jobs: 2 runs the source-only task and the oracle task in two spawned workers; the main
    process writes the CSV from the units they cached."""
    results = tmp_path / "results"
    path = spec_file(tmp_path, "cal.yaml", kind="calibration", runs_dir=str(tmp_path / "runs"),
                     data_dir=str(tmp_path / "data"), results_dir=str(results), seeds=[3], jobs=2, adabn=True,
                     grid={"class": [0.3]}, oracle_grid={"class": [0.3]})
    ex.run(path, quiet=True)
    (row,) = read_csv(results / "calibration.csv")
    assert None not in (row["source_only"], row["adabn"], row["target_oracle"], row["ratio"], row["closure"])
    assert sorted(p.name for p in (results / "scores" / "class-0.3-seed3").iterdir()) == \
        ["adabn-last-val.json", "source_only-last-val.json", "target_oracle-last-val.json"]
    assert json.loads((results / "calibration_runs.json").read_text())["complete"] is True
