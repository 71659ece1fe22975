"""Kill ``python -m cag run`` with SIGKILL again and again: each rerun resumes, and the end is exact.

docs/robustness.md §3: a training subprocess is killed five times in a row, rerunning the
same command after each kill: at random moments (after a seeded random number of checkpoints
and a seeded random delay) and inside a checkpoint write (the moment its temporary file exists).
Then:

- after every kill, each stage's ``last.pt`` loads: a half-written checkpoint is never in place;
- every rerun that resumes says so, at the iteration of the ``last.pt`` it found, so it started
  from that complete file (or from scratch where there was none);
- the final weights of every training stage, the anchors and the metrics logs are exactly those
  of an uninterrupted run of the same command (CPU, one thread);
- nothing was written outside the run directory, and no partial checkpoint file is left over.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cag.checkpoint import load_checkpoint
from cag.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("source_only", "warmup", "stage1")
KILLS = ("checkpoint write", "random", "random", "checkpoint write", "random")
RESUMING = re.compile(r"^\[(\w+)\] resuming at iteration (\d+) from ", re.MULTILINE)


def tiny_run_config(bench: Path) -> dict:
    """21 iterations of the tiny network on a 32x64 benchmark; a checkpoint every 3."""
    return {
        "name": "killed", "seed": 11, "device": "cpu", "quiet": False,
        "data": {"source_root": str(bench / "source"), "target_root": str(bench / "target"),
                 "source_resize": None, "target_resize": None, "base_width": 64, "scale": [1.0, 1.5],
                 "crop": [64, 32], "num_workers": 0},
        "model": {"backbone": "tiny", "output_stride": 8, "feature_dim": 8, "aspp_rates": [1, 2, 3]},
        "train": {"batch_size": 2, "val_interval": 4, "log_interval": 2, "checkpoint_interval": 3},
        "source_only": {"iters": 6, "lr": 0.01},
        "warmup": {"iters": 6, "lr": 0.005, "disc_channels": 4},
        "anchors": {"num_images": 8, "batch_size": 4, "resize": None, "min_pixels": 1},
        "cag": {"stages": 1, "iters": 9, "poly_horizon": 18, "lr": 0.005, "min_pixels": 1},
        "eval": {"batch_size": 2},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    generate(root / "bench", preset="class", size=(32, 64), n_source=8, n_target_train=8,
             n_target_val=2, n_target_test=0, progress=False)
    config = root / "killed.yaml"
    config.write_text(json.dumps(tiny_run_config(root / "bench"), indent=1))
    (root / "cwd").mkdir()
    return {"root": root, "config": config, "cwd": root / "cwd"}


def launch(setup: dict, out_dir: Path, log: Path) -> subprocess.Popen:
    """``python -m cag run CONFIG out_dir=...`` in an empty working directory, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "cag", "run", str(setup["config"]), f"out_dir={out_dir}"],
                                cwd=setup["cwd"], env=env, stdout=out, stderr=err)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``condition`` every 2 ms while ``proc`` runs; False if it exits first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return False


def partial_checkpoints(run_dir: Path) -> set[Path]:
    return {p for stage in TRAINING_STAGES if (run_dir / stage).is_dir()
            for p in (run_dir / stage).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")}


def checkpoint_stamps(run_dir: Path) -> set[tuple[str, int]]:
    return {(stage, (run_dir / stage / "last.pt").stat().st_mtime_ns)
            for stage in TRAINING_STAGES if (run_dir / stage / "last.pt").exists()}


def after_checkpoints(run_dir: Path, n: int):
    """A condition that holds once ``n`` more ``last.pt`` files have been written (polled)."""
    seen = checkpoint_stamps(run_dir)
    start = len(seen)

    def condition() -> bool:
        seen.update(checkpoint_stamps(run_dir))
        return len(seen) - start >= n

    return condition


def in_checkpoint_write(run_dir: Path):
    """A condition that holds while a new temporary checkpoint file exists."""
    before = partial_checkpoints(run_dir)
    return lambda: bool(partial_checkpoints(run_dir) - before)


def checkpoint_iters(run_dir: Path) -> dict[str, int]:
    """The iteration of each stage's ``last.pt``; loading fails if one is not a complete file."""
    return {stage: load_checkpoint(run_dir / stage / "last.pt")["iter"]
            for stage in TRAINING_STAGES if (run_dir / stage / "last.pt").exists()}


def resumes(log: Path) -> list[tuple[str, int]]:
    return [(stage, int(n)) for stage, n in RESUMING.findall(log.with_suffix(".out").read_text())]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_state(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{where}: tensors differ from the uninterrupted run: {different[:5]}"


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_weights(setup, tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    uninterrupted = launch(setup, reference_dir, tmp_path / "reference")

    out_dir = tmp_path / "killed"
    run_dir = out_dir / "killed"
    rng = random.Random(20191208)
    found_before: dict[str, int] = {}
    resumed: list[tuple[str, int]] = []
    torn_writes = 0
    for attempt, moment in enumerate(KILLS):
        log = tmp_path / f"attempt{attempt}"
        torn_before = partial_checkpoints(run_dir)
        proc = launch(setup, out_dir, log)
        checkpoints = rng.randint(1, 3) if moment == "random" else rng.randint(0, 1)
        landed = wait_until(after_checkpoints(run_dir, checkpoints), proc)
        if moment == "checkpoint write":
            landed = landed and wait_until(in_checkpoint_write(run_dir), proc)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        returncode = proc.wait()
        assert returncode in (-signal.SIGKILL, 0), log.with_suffix(".err").read_text()[-3000:]
        if moment == "checkpoint write" and landed and partial_checkpoints(run_dir) - torn_before:
            torn_writes += 1
        for stage, iteration in resumes(log):
            assert iteration == found_before[stage], f"attempt {attempt}: {stage} resumed from a file it did not find"
            resumed.append((stage, iteration))
        found_before = checkpoint_iters(run_dir)
        print(f"kill {attempt} ({moment}): exit {returncode}, resumed {resumes(log)}, last.pt now at {found_before}")

    final = tmp_path / "final"
    proc = launch(setup, out_dir, final)
    assert proc.wait() == 0, final.with_suffix(".err").read_text()[-3000:]
    for stage, iteration in resumes(final):
        assert iteration == found_before[stage]
        resumed.append((stage, iteration))

    assert uninterrupted.wait() == 0, (tmp_path / "reference.err").read_text()[-3000:]
    assert torn_writes >= 1, "no kill landed inside a checkpoint write"
    assert resumed, "no rerun resumed a stage from its last.pt"
    reference = reference_dir / "killed"
    for stage in TRAINING_STAGES:
        ours, theirs = load_checkpoint(run_dir / stage / "last.pt"), load_checkpoint(reference / stage / "last.pt")
        assert ours["iter"] == theirs["iter"]
        for module in theirs["modules"]:
            assert_same_state(ours["modules"][module], theirs["modules"][module], f"{stage} {module}")
        assert records(run_dir / stage / "metrics.jsonl") == records(reference / stage / "metrics.jsonl")
    ours, theirs = load_checkpoint(run_dir / "anchors" / "anchors.pt"), load_checkpoint(reference / "anchors" / "anchors.pt")
    assert torch.equal(ours["anchors"], theirs["anchors"]) and torch.equal(ours["counts"], theirs["counts"])
    assert json.loads((run_dir / "summary.json").read_text())["miou"] == json.loads((reference / "summary.json").read_text())["miou"]
    assert partial_checkpoints(run_dir) == set()
    assert os.listdir(setup["cwd"]) == [] and os.listdir(out_dir) == ["killed"]
