"""Robustness and security (docs/robustness.md): bad configuration, faults during a run, untrusted files.

What the issue asks and where each item is tested (docs/robustness.md is the full table):

1. Bad data: tests/test_datasets.py (missing root, empty folder, wrong layout, truncated PNG, size
   mismatch, out-of-range ids, RGB label, 8-bit SYNTHIA label, ``check_dataset``). Here: a split
   the schedule needs only at its end fails before the first stage trains.
2. Bad configuration: tests/test_pipeline.py (typos, wrong types, negative delta_d, batch 0, crops,
   missing checkpoint, CLI exit code). Here: the cases it does not try, and "before any work".
3. Interrupted runs: tests/test_resume.py (SIGKILL of ``python -m cag run``). Here: an in-process
   crash and resume, the metrics log after a torn write, partial checkpoint files.
4. Numerical faults: here (stop and skip policies). Empty pseudo-label masks: tests/test_losses.py
   (``test_cag_loss_never_nan_when_everything_is_ignored`` and the all-ignored cases).
5. Untrusted files: tests/test_checkpoint.py and tests/test_anchors.py (crafted pickles). Here: the
   pipeline's own loads (a planted ``last.pt``, ``model.init``) go through the safe loader.
6. Full disk, unwritable output: here; tests/test_checkpoint.py covers the bare atomic write.

Every run here is a few iterations of the tiny network on a 32x64 benchmark, in this process.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

import cag.checkpoint
import cag.stages
from cag import cli
from cag.checkpoint import CheckpointError, load_checkpoint
from cag.config import ConfigError, load_config
from cag.data import DataError
from cag.errors import OutputError
from cag.loop import MetricsLog, NonFiniteLoss
from cag.losses import segmentation_ce
from cag.pipeline import Pipeline

ITERS = 8  # source-only iterations; checkpoints at 3 and 6 and 8, logs every 2, validation at 4 and 8


def tiny_params(bench: Path, out: Path) -> dict:
    """Flat (papermill-style) parameters of a seconds-long run on the tiny benchmark."""
    return {
        "name": "tiny", "out_dir": str(out), "seed": 5, "quiet": True, "device": "cpu",
        "data.source_root": str(bench / "source"), "data.target_root": str(bench / "target"),
        "data.source_resize": None, "data.target_resize": None, "data.base_width": 64,
        "data.scale": [1.0, 1.5], "data.crop": [64, 32], "data.num_workers": 0,
        "model.backbone": "tiny", "model.output_stride": 8, "model.feature_dim": 8, "model.aspp_rates": [1, 2, 3],
        "train.batch_size": 2, "train.val_interval": 4, "train.log_interval": 2, "train.checkpoint_interval": 3,
        "source_only.iters": ITERS, "source_only.poly_horizon": 2 * ITERS, "source_only.lr": 0.01,
        "warmup.iters": 2, "warmup.disc_channels": 4, "anchors.num_images": 4, "anchors.batch_size": 4,
        "anchors.resize": None, "anchors.min_pixels": 1, "cag.stages": 1, "cag.iters": 2,
        "cag.poly_horizon": 4, "cag.min_pixels": 1, "eval.batch_size": 2,
    }


def tiny_config(bench: Path, out: Path, **params):
    return load_config(params={**tiny_params(bench, out), **params})


def source_only(cfg, stage_dir: Path) -> dict:
    return cag.stages.supervised_stage(cfg, stage_dir, "fingerprint")


def model_of(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return ckpt["modules"]["model"] if "modules" in ckpt else ckpt["model"]


def assert_same_tensors(a: dict, b: dict, keys=None) -> None:
    assert a.keys() == b.keys()
    different = [k for k in (keys or a) if not torch.equal(a[k], b[k])]
    assert different == []


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.fixture(scope="module")
def reference(bench, tmp_path_factory) -> Path:
    """An uninterrupted source-only stage: the oracle of every interrupted one."""
    stage_dir = tmp_path_factory.mktemp("reference") / "source_only"
    source_only(tiny_config(bench, stage_dir.parent), stage_dir)
    return stage_dir


class Fault(Exception):
    """A crash injected into the training step."""


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def faulty_ce(at: set[int], fault: str):
    """``segmentation_ce`` that misbehaves on the calls numbered in ``at`` (one call per iteration)."""
    calls = itertools.count()

    def ce(logits, labels, **kwargs):
        loss = segmentation_ce(logits, labels, **kwargs)
        if next(calls) not in at:
            return loss
        if fault == "crash":
            raise Fault("killed mid-iteration")
        if fault == "inf loss":
            return loss * float("inf")
        return NaNGradient.apply(loss)

    return ce


# ---- 2. bad configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    pytest.param({"cag.detla_d": 2.0}, r"unknown key 'cag.detla_d': allowed keys are .*delta_d.*did you mean 'cag.delta_d'\?",
                 id="typo in a papermill parameter"),
    pytest.param({"train.batch_size": True}, r"train.batch_size: expected an integer, got True", id="bool for an int"),
    pytest.param({"data.crop": 64}, r"data.crop: expected a list of int, got 64", id="number for a list"),
    pytest.param({"anchors.file": "/nonexistent/category_anchors"}, r"anchors.file: file not found",
                 id="missing anchor file"),
    pytest.param({"name": "../elsewhere"}, r"name: a plain directory name is expected, got '../elsewhere'",
                 id="run name leaving out_dir"),
    pytest.param({"train.grad_accum": 3}, r"train.grad_accum: 3 does not divide train.batch_size 2",
                 id="grad_accum not dividing the batch"),
    pytest.param({"source_only.poly_horizon": -1}, r"source_only.poly_horizon: must be > 0 when set, got -1",
                 id="negative poly horizon"),
    pytest.param({"train.val_max_images": 0}, r"train.val_max_images: must be > 0 when set, got 0",
                 id="validation on 0 images"),
])
def test_bad_configuration_is_refused_naming_the_key(bench, tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(bench, tmp_path, **params)


def test_small_crops_are_fine_without_a_warmup(bench, tmp_path):
    assert tiny_config(bench, tmp_path, **{"data.crop": [64, 16], "warmup.iters": 0}).data.crop == [64, 16]


def write_yaml(path: Path, params: dict) -> Path:
    """A configuration file from flat parameters (JSON is YAML)."""
    nested: dict = {}
    for key, value in params.items():
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    path.write_text(json.dumps(nested, indent=1))
    return path


def test_cli_refuses_a_bad_override_before_any_work(bench, tmp_path, capsys):
    params = {**tiny_params(bench, tmp_path / "runs"), "data.synthetic.root": str(tmp_path / "generated")}
    config = write_yaml(tmp_path / "tiny.yaml", params)
    assert cli.main(["run", str(config), "cag.detla_d=2.0"]) == 2
    err = capsys.readouterr().err
    assert "configuration error: unknown key 'cag.detla_d'" in err and "did you mean 'cag.delta_d'?" in err
    assert str(config) in err
    assert not (tmp_path / "generated").exists() and not (tmp_path / "runs").exists()


# ---- 6. unwritable output folder and full disk -------------------------------------------------------

def test_unwritable_out_dir_fails_before_any_work(bench, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs folder should be")
    params = {**tiny_params(bench, blocker / "runs"), "data.synthetic.root": str(tmp_path / "generated")}
    with pytest.raises(OutputError, match=rf"out_dir: the run directory: cannot write {blocker / 'runs' / 'tiny'} "
                                          rf"\({blocker} is a file, not a folder\)"):
        Pipeline(load_config(params=params)).run()
    assert cli.main(["source_only", str(write_yaml(tmp_path / "tiny.yaml", params))]) == 2
    assert "output error: out_dir: the run directory: cannot write" in capsys.readouterr().err
    assert not (tmp_path / "generated").exists()
    assert blocker.read_text() == "a file where the runs folder should be"


def test_full_disk_at_a_checkpoint_keeps_everything_written_and_resumes(bench, tmp_path, monkeypatch, reference):
    stage_dir = tmp_path / "source_only"
    real_save = cag.checkpoint.torch.save
    writes = itertools.count()

    def full_disk_on_second_last_pt(obj, f):
        if obj.get("format") == "cag-training-state/1" and next(writes) == 1:
            f.write(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f)

    monkeypatch.setattr(cag.checkpoint.torch, "save", full_disk_on_second_last_pt)
    with pytest.raises(OSError) as err:
        source_only(tiny_config(bench, tmp_path), stage_dir)
    assert err.value.errno == errno.ENOSPC
    assert str(stage_dir / "last.pt") in str(err.value) and "No space left on device" in str(err.value)
    assert "the previous last.pt, if any, is unchanged" in str(err.value)
    assert load_checkpoint(stage_dir / "last.pt")["iter"] == 3
    assert load_checkpoint(stage_dir / "best_val.pt")["iter"] == 4
    assert [m["iter"] for m in metrics(stage_dir)] == [2, 4, 4, 6]
    assert leftovers(stage_dir) == []
    monkeypatch.undo()
    source_only(tiny_config(bench, tmp_path), stage_dir)
    assert_same_tensors(model_of(stage_dir / "last.pt"), model_of(reference / "last.pt"))


# ---- 1. bad data, found before the first stage trains ---------------------------------------------------

def test_a_missing_split_fails_before_the_first_stage_trains(bench, tmp_path):
    cfg = tiny_config(bench, tmp_path, **{"data.test_split": "test"})
    with pytest.raises(DataError, match=r"leftImg8bit/test/ is missing"):
        Pipeline(cfg).run()
    assert not (cfg.run_dir / "source_only" / "last.pt").exists()


# ---- 3. interrupted runs (the SIGKILL test is tests/test_resume.py) --------------------------------------

def test_a_crash_mid_stage_resumes_to_the_uninterrupted_result(bench, tmp_path, monkeypatch, reference):
    stage_dir = tmp_path / "source_only"
    monkeypatch.setattr(cag.stages, "segmentation_ce", faulty_ce({4}, "crash"))
    with pytest.raises(Fault):
        source_only(tiny_config(bench, tmp_path), stage_dir)
    assert load_checkpoint(stage_dir / "last.pt")["iter"] == 3
    monkeypatch.undo()
    summary = source_only(tiny_config(bench, tmp_path), stage_dir)
    assert summary["iters"] == ITERS
    assert_same_tensors(load_checkpoint(stage_dir / "last.pt")["modules"]["model"],
                        load_checkpoint(reference / "last.pt")["modules"]["model"])
    assert metrics(stage_dir) == metrics(reference)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    lines = [{"kind": "train", "iter": 2, "total": 1.5}, {"kind": "val", "iter": 3, "miou": 0.25},
             {"kind": "train", "iter": 4, "total": 1.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')
    MetricsLog(tmp_path, resume_iter=3).close()
    assert metrics(tmp_path) == lines[:2]


def test_partial_checkpoint_files_of_a_killed_write_are_removed(bench, tmp_path, reference):
    stage_dir = tmp_path / "source_only"
    stage_dir.mkdir()
    for name in (".last.pt.k2j4x0.tmp", ".best_val.pt.a8d3qq.tmp"):
        (stage_dir / name).write_bytes(b"half a checkpoint")
    (stage_dir / "notes.tmp").write_text("not ours")
    source_only(tiny_config(bench, tmp_path), stage_dir)
    assert leftovers(stage_dir) == ["notes.tmp"]


# ---- 4. numerical faults ------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["inf loss", "nan gradient"])
def test_a_non_finite_step_stops_with_the_last_good_checkpoint(bench, tmp_path, monkeypatch, fault):
    stage_dir = tmp_path / "source_only"
    monkeypatch.setattr(cag.stages, "segmentation_ce", faulty_ce({4}, fault))
    with pytest.raises(NonFiniteLoss) as err:
        source_only(tiny_config(bench, tmp_path), stage_dir)
    assert "non-finite loss or gradient at iteration 4" in str(err.value)
    assert f"the last good checkpoint is {stage_dir / 'last.pt'}" in str(err.value)
    monkeypatch.undo()
    clean = tmp_path / "three_iterations"
    source_only(tiny_config(bench, tmp_path, **{"source_only.iters": 3}), clean)
    assert load_checkpoint(stage_dir / "last.pt")["iter"] == 3
    assert_same_tensors(model_of(stage_dir / "last.pt"), model_of(clean / "last.pt"))


def parameter_names(cfg) -> list[str]:
    return [name for name, _ in cag.stages.make_model(cfg, torch.device("cpu")).named_parameters()]


def test_skip_policy_counts_skips_and_a_skipped_step_changes_no_weight(bench, tmp_path, monkeypatch):
    stage_dir = tmp_path / "source_only"
    cfg = tiny_config(bench, tmp_path, **{"train.nan_policy": "skip", "train.max_nan_skips": 2})
    monkeypatch.setattr(cag.stages, "segmentation_ce", faulty_ce({1, ITERS - 1}, "nan gradient"))
    summary = source_only(cfg, stage_dir)
    monkeypatch.undo()
    assert summary["iters"] == ITERS and summary["nan_skips"] == 2
    assert [m["iter"] for m in metrics(stage_dir) if m["kind"] == "nan_skip"] == [2, ITERS]
    assert load_checkpoint(stage_dir / "last.pt")["loop"]["nan_skips"] == 2
    weights = model_of(stage_dir / "last.pt")
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The last step was skipped: the parameters are those after step ITERS - 1 (BatchNorm
    # statistics still saw the skipped batch).
    before = tmp_path / "one_step_less"
    monkeypatch.setattr(cag.stages, "segmentation_ce", faulty_ce({1}, "nan gradient"))
    source_only(tiny_config(bench, tmp_path, **{"train.nan_policy": "skip", "source_only.iters": ITERS - 1}), before)
    assert_same_tensors(weights, model_of(before / "last.pt"), keys=parameter_names(cfg))


def test_skip_policy_stops_after_max_nan_skips(bench, tmp_path, monkeypatch):
    cfg = tiny_config(bench, tmp_path, **{"train.nan_policy": "skip", "train.max_nan_skips": 2})
    monkeypatch.setattr(cag.stages, "segmentation_ce", faulty_ce({0, 1, 2}, "inf loss"))
    with pytest.raises(NonFiniteLoss, match="at iteration 2"):
        source_only(cfg, tmp_path / "source_only")


# ---- 5. untrusted files in the pipeline's own loads -----------------------------------------------------

class OpensAFile:
    """Unpickling this object calls ``open(marker, "w")``: it runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("planted", ["resume state last.pt", "model.init"])
def test_a_malicious_checkpoint_in_the_pipeline_is_refused_and_never_runs(bench, tmp_path, planted):
    marker = tmp_path / "pwned"
    stage_dir = tmp_path / "source_only"
    evil = stage_dir / "last.pt" if planted.startswith("resume") else tmp_path / "warmup.pt"
    evil.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "cag-training-state/1", "modules": {"model": OpensAFile(marker)}}, evil)
    params = {} if planted.startswith("resume") else {"model.init": str(evil)}
    with pytest.raises(CheckpointError, match=rf"{evil}: refused to load: it asks for GLOBAL .*open"):
        source_only(tiny_config(bench, tmp_path, **params), stage_dir)
    assert not marker.exists()
