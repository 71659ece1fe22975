"""The one-command pipeline: configuration, every stage end to end, skipping, stale runs, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cag.config import ConfigError, load_config
from cag.data.synthetic import generate
from cag.labels import CLASSES_16, CLASSES_19
from cag.pipeline import Pipeline, StageOrderError, fingerprints, stage_names

REPO = Path(__file__).resolve().parents[1]

#: A CPU-sized schedule: every stage runs a handful of iterations on 32x64 scenes.
TINY = [
    "model.backbone=tiny", "model.output_stride=8", "model.feature_dim=16", "model.aspp_rates=[1,2,3]",
    "data.base_width=64", "data.scale=[0.75,1.25]", "data.crop=[64,32]", "data.num_workers=0",
    "train.batch_size=2", "train.val_interval=3", "train.checkpoint_interval=2", "train.log_interval=2",
    "source_only.iters=4", "source_only.lr=0.01", "warmup.iters=3", "warmup.disc_channels=4",
    "anchors.num_images=8", "anchors.min_pixels=1", "anchors.batch_size=4",
    "cag.iters=3", "cag.poly_horizon=10", "cag.lr=0.005", "cag.min_pixels=1", "eval.batch_size=4", "quiet=true",
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    generate(root, preset="class", size=(32, 64), n_source=12, n_target_train=12, n_target_val=4, n_target_test=4,
             synthia=True, progress=False)
    return root


def synthetic_cfg(bench: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "synthetic.yaml", [
        f"data.source_root={bench / 'source'}", f"data.target_root={bench / 'target'}", "data.synthetic.root=null",
        f"out_dir={out}", *TINY, *extra,
    ])


# ----------------------------------------------------------------------------- configuration


def test_shipped_configs_validate():
    for name in ("gta5_to_cityscapes", "synthia_to_cityscapes", "synthetic"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.name == name
    released = load_config(REPO / "configs" / "gta5_to_cityscapes.yaml")
    assert (released.cag.iters, released.cag.poly_horizon, released.cag.lr) == (62412, 90000, 1e-4)
    assert (released.cag.delta_d, released.cag.prob_threshold, released.cag.lam) == (2.5, 0.95, 0.7)
    assert (released.train.weight_decay, released.data.crop, released.train.batch_size) == (2e-4, [896, 512], 4)
    assert load_config(REPO / "configs" / "synthia_to_cityscapes.yaml").data.num_classes == 16


@pytest.mark.parametrize("override, message", [
    ("cag.delta=2", "unknown key 'cag.delta'"),
    ("cag.delta=2", "did you mean 'cag.delta_d'"),
    ("cag.delta_d=-1", "cag.delta_d: must be >= 0"),
    ("train.batch_size=0", "train.batch_size: must be > 0"),
    ("train.batch_size=four", "train.batch_size: expected an integer"),
    ("data.crop=[4000,512]", "data.crop: width 4000 exceeds"),
    ("data.crop=[896,2000]", "data.crop: height 2000 exceeds"),
    ("model.init=/no/such/file.pt", "model.init: file not found: /no/such/file.pt"),
    ("cag.pseudo_labels=anchors", "cag.pseudo_labels: 'anchors' is not one of both, anchor, probability"),
    ("cag.prob_threshold=1.5", "cag.prob_threshold: must lie in (0, 1)"),
    ("train.channels_last=yes please", "train.channels_last: expected true or false"),
    ("model.arch=deeplabv2", "model.output_stride: DeepLab-v2 runs at output stride 8"),
    ("data.crop=[64,16]", "too small for the warm-up discriminator"),
    ("eval.checkpoints=[last,last]", "eval.checkpoints: expected one or both of last, best_val without repeats"),
    ("eval.checkpoints=[]", "eval.checkpoints: expected one or both of last, best_val"),
    ("eval.checkpoints=[final]", "eval.checkpoints: expected one or both of last, best_val"),
    ("eval.stages=[stage1]", "including the final one (stage3, the run's headline)"),
    ("eval.stages=[stage3,stage9]", "eval.stages: expected training stages among source_only, warmup, stage1"),
    ("eval.stages=[anchors,stage3]", "eval.stages: expected training stages"),
])
def test_bad_values_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "gta5_to_cityscapes.yaml", [override])
    assert message in str(err.value)


def test_overrides_and_params_are_typed_and_nested():
    cfg = load_config(REPO / "configs" / "synthetic.yaml", ["cag.delta_d=2", "data.scale=[0.5, 1.5]"],
                      params={"train.batch_size": 4, "seed": 7})
    assert cfg.cag.delta_d == 2.0 and isinstance(cfg.cag.delta_d, float)
    assert cfg.data.scale == [0.5, 1.5] and cfg.train.batch_size == 4 and cfg.seed == 7
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(REPO / "configs" / "synthetic.yaml", params={"trian.batch_size": 4})


def test_fingerprints_chain_through_the_stages():
    base = load_config(REPO / "configs" / "synthetic.yaml")
    changed = load_config(REPO / "configs" / "synthetic.yaml", ["cag.delta_d=2.0"])
    a, b = fingerprints(base), fingerprints(changed)
    assert [s for s in a if a[s] != b[s]] == ["stage1", "stage2", "stage3", "evaluate"]
    quiet = load_config(REPO / "configs" / "synthetic.yaml", ["quiet=true", "data.num_workers=3"])
    assert fingerprints(quiet) == a
    warm = fingerprints(load_config(REPO / "configs" / "synthetic.yaml", ["warmup.lambda_adv=0.02"]))
    assert warm["source_only"] == a["source_only"] and all(warm[s] != a[s] for s in stage_names(base)[1:])


# ----------------------------------------------------------------------------- end to end


def test_whole_pipeline_writes_the_run_directory(bench, tmp_path):
    cfg = synthetic_cfg(bench, tmp_path)
    record = Pipeline(cfg).run()
    run = tmp_path / "synthetic"
    for stage in ("source_only", "warmup", "stage1", "stage2", "stage3"):
        for name in ("last.pt", "metrics.jsonl", "summary.json", "done.json"):
            assert (run / stage / name).exists(), f"{stage}/{name}"
        assert list((run / stage / "tensorboard").iterdir())
        assert (run / stage / "best_val.pt").exists()
    anchors = torch.load(run / "anchors" / "anchors.pt", weights_only=True)
    assert anchors["anchors"].shape == (19, 16)
    summary = json.loads((run / "summary.json").read_text())
    assert record["miou"] == summary["miou"] and 0.0 <= summary["miou"] <= 1.0
    assert set(summary["per_class_iou"]) == set(CLASSES_19)
    for key in ("config", "commit", "seed", "device", "wall_seconds", "images_per_s", "peak_memory_gib"):
        assert key in summary, key
    assert summary["headline"] == {"stage": "stage3", "checkpoint": "last", "split": "test"}
    kinds = {(r["stage"], r["checkpoint"], r["split"]) for r in summary["results"]}
    assert ("source_only", "best_val", "val") in kinds and ("stage3", "last", "test") in kinds
    lines = [json.loads(l) for l in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    assert [l["iter"] for l in train] == [2, 3]
    assert all(math.isfinite(l[k]) for l in train for k in ("total", "ce_source", "ce_target", "dist_source", "dist_target"))
    assert all(0.0 <= l[k] <= 1.0 for l in train for k in ("active_fraction", "precision_anchor", "precision_probability"))
    assert [l["iter"] for l in lines if l["kind"] == "val"] == [3]
    best = torch.load(run / "stage1" / "best_val.pt", weights_only=True)
    assert best["selected_on"] == "target validation split" and best["iter"] == 3


def test_finished_stages_are_skipped_and_changed_ones_rerun(bench, tmp_path):
    cfg = synthetic_cfg(bench, tmp_path, "cag.stages=1")
    Pipeline(cfg).run()
    run = tmp_path / "synthetic"
    stamp = (run / "source_only" / "last.pt").stat().st_mtime_ns
    Pipeline(cfg).run()
    assert (run / "source_only" / "last.pt").stat().st_mtime_ns == stamp
    changed = synthetic_cfg(bench, tmp_path, "cag.stages=1", "cag.delta_d=1.0")
    Pipeline(changed).run()
    assert (run / "source_only" / "last.pt").stat().st_mtime_ns == stamp
    stale = sorted(p.name for p in run.iterdir() if ".stale-" in p.name)
    assert len(stale) == 2 and stale[0].startswith("evaluate.stale-") and stale[1].startswith("stage1.stale-")
    assert json.loads((run / "stage1" / "done.json").read_text())["fingerprint"] == fingerprints(changed)["stage1"]


def test_evaluate_scores_the_checkpoints_asked_for(bench, tmp_path):
    cfg = synthetic_cfg(bench, tmp_path, "cag.stages=1", "eval.checkpoints=[best_val]")
    assert load_config(REPO / "configs" / "synthetic.yaml").eval.checkpoints == ["last", "best_val"]
    Pipeline(cfg).run()
    summary = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
    assert {r["checkpoint"] for r in summary["results"]} == {"best_val"}
    assert {r["stage"] for r in summary["results"]} == {"source_only", "warmup", "stage1"}
    assert summary["headline"] == {"stage": "stage1", "checkpoint": "best_val", "split": "test"}
    assert summary["miou"] == next(r["miou"] for r in summary["results"]
                                   if r["stage"] == "stage1" and r["split"] == "test")
    # eval.stages: only the stages named are scored (evaluate runs again: its fingerprint changed)
    Pipeline(synthetic_cfg(bench, tmp_path, "cag.stages=1", "eval.checkpoints=[best_val]",
                           "eval.stages=[warmup,stage1]")).run()
    again = json.loads((tmp_path / "synthetic" / "summary.json").read_text())
    assert [(r["stage"], r["split"]) for r in again["results"]] == \
        [("warmup", "val"), ("warmup", "test"), ("stage1", "val"), ("stage1", "test")]
    assert again["miou"] == summary["miou"]


def model_weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["modules"]["model"]


def test_a_control_run_adopts_the_stages_it_shares_and_trains_only_its_own(bench, tmp_path):
    """Pipeline.adopt: the book's controls (chapters 3 and 6) copy the finished stages whose
    fingerprint they share; the copied stages hand on exactly the same models, so the same
    stage 1 trained in the copy is bit-identical, and a control differs only by its own setting."""
    main = Pipeline(synthetic_cfg(bench, tmp_path, "cag.stages=1"))
    main.run(until="stage1")
    twin = Pipeline(synthetic_cfg(bench, tmp_path, "cag.stages=1", "name=twin"))
    assert twin.adopt(main, until="anchors") == ["source_only", "warmup", "anchors"]
    assert twin.adopt(main, until="anchors") == []  # already done: nothing copied again
    stamp = (twin.stage_dir("warmup") / "last.pt").stat().st_mtime_ns
    twin.run(until="stage1")
    assert (twin.stage_dir("warmup") / "last.pt").stat().st_mtime_ns == stamp  # adopted, not retrained
    ours, theirs = model_weights(main.stage_dir("stage1") / "last.pt"), model_weights(twin.stage_dir("stage1") / "last.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    control = Pipeline(synthetic_cfg(bench, tmp_path, "cag.stages=1", "name=control", "cag.lam=0"))
    with pytest.raises(StageOrderError, match="stage 'stage1'"):
        control.adopt(main, until="stage1")  # stage 1 is the control's own: another fingerprint
    assert control.adopt(main, until="anchors") == ["source_only", "warmup", "anchors"]
    control.run(until="stage1")
    mine = model_weights(control.stage_dir("stage1") / "last.pt")
    assert not all(torch.equal(ours[k], mine[k]) for k in ours)
    unfinished = Pipeline(synthetic_cfg(bench, tmp_path / "elsewhere", "cag.stages=1"))
    with pytest.raises(StageOrderError, match="stage 'source_only'"):
        Pipeline(synthetic_cfg(bench, tmp_path, "name=third")).adopt(unfinished, until="warmup")


def test_one_stage_needs_its_inputs(bench, tmp_path):
    cfg = synthetic_cfg(bench, tmp_path)
    with pytest.raises(RuntimeError, match="stage 'stage2' needs anchors, stage1 first"):
        Pipeline(cfg).run_stage("stage2")


def test_cli_runs_a_stage_and_reports_config_errors(bench, tmp_path):
    args = [sys.executable, "-m", "cag", "source_only", str(REPO / "configs" / "synthetic.yaml"),
            f"data.source_root={bench / 'source'}", f"data.target_root={bench / 'target'}",
            "data.synthetic.root=null", f"out_dir={tmp_path}", *TINY]
    done = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "synthetic" / "source_only" / "done.json").exists()
    bad = subprocess.run(args[:5] + ["cag.delta_d=-3"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "cag.delta_d: must be >= 0" in bad.stderr


@pytest.mark.slow
def test_released_configs_run_every_stage_on_the_benchmark_files(bench, tmp_path):
    """The real-data configurations, ResNet-101 included, on the benchmark's GTA5/Cityscapes files.

    Sizes are reduced for the CPU; the layouts, loaders, network and stage code are the real ones.
    The backbone starts from random weights on purpose (``model.from_scratch``): no ImageNet file here.
    """
    small = ["model.from_scratch=true", "data.source_resize=[128,64]", "data.target_resize=[128,64]", "data.base_width=128",
             "data.crop=[96,48]", "data.num_workers=0", "anchors.resize=[128,64]", "anchors.num_images=4",
             "train.batch_size=2", "train.amp=none", "train.val_interval=2", "train.val_max_images=2",
             "source_only.iters=1", "warmup.iters=1", "cag.iters=1", "cag.stages=2", "eval.batch_size=4",
             "quiet=true", f"out_dir={tmp_path}", f"data.target_root={bench / 'target'}"]
    gta = load_config(REPO / "configs" / "gta5_to_cityscapes.yaml", [f"data.source_root={bench / 'source'}", *small])
    assert gta.model.backbone == "resnet101"
    Pipeline(gta).run()
    summary = json.loads((tmp_path / "gta5_to_cityscapes" / "summary.json").read_text())
    assert summary["headline"]["split"] == "val" and set(summary["per_class_iou"]) == set(CLASSES_19)

    syn = load_config(REPO / "configs" / "synthia_to_cityscapes.yaml",
                      [f"data.source_root={bench / 'source_synthia'}", "data.source_resize=[128,64]", *small,
                       "model.backbone=resnet18", "model.feature_dim=32"])
    Pipeline(syn).run()
    summary = json.loads((tmp_path / "synthia_to_cityscapes" / "summary.json").read_text())
    assert set(summary["per_class_iou"]) == set(CLASSES_16)
    assert "miou13" in summary["results"][0]
