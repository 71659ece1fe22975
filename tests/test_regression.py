"""Regression check on the built-in benchmark (results/README.md): CAG must stay above source-only.

A short run of the real pipeline on a fixed seed: a reduced ``class``-preset benchmark at its
calibrated default strength, source-only training, the anchors and one CAG stage started from
the source-only model (no warm-up, to keep the run short), both scored on the held-out
``test`` split.
"""
from pathlib import Path

import pytest
import torch

from cag.config import load_config

REPO = Path(__file__).resolve().parents[1]
SEED = 7
#: Minimum gain of CAG stage 1 over source-only, in mIoU points on the held-out test split.
MARGIN_POINTS = 3.0


def short_run(tmp_path: Path) -> list[str]:
    """configs/synthetic.yaml shrunk to a short run: fewer images, shorter stages, no warm-up."""
    data = tmp_path / "data"
    return [
        "name=regression", f"out_dir={tmp_path / 'runs'}", f"seed={SEED}", "quiet=true",
        f"data.synthetic.root={data}", "data.synthetic.preset=class", f"data.source_root={data / 'source'}",
        f"data.target_root={data / 'target'}", "data.synthetic.n_source=200", "data.synthetic.n_target_train=200",
        "data.synthetic.n_target_val=40", "data.synthetic.n_target_test=100",
        "source_only.iters=300", "warmup.iters=0", "anchors.num_images=200", "cag.stages=1", "cag.iters=120",
        "train.val_interval=1000", "train.checkpoint_interval=1000", "data.target_train_labels=false",
    ]


@pytest.fixture
def one_thread():
    """One CPU thread, so the scores do not depend on OMP_NUM_THREADS (reduction order)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.slow
def test_cag_stays_above_source_only_on_the_held_out_split(tmp_path, one_thread):
    """CAG stage 1 must beat source-only by at least MARGIN_POINTS = 3 mIoU points on ``test``.

    Measured on this seed: source-only 34.1, CAG stage 1 40.6 mIoU (+6.5 points). The margin
    is half the measured gain: far above cross-machine float differences and harmless code changes, and it fails when the pseudo-labels go
    wrong (with the anchor pseudo-labels shifted to the next class the stage falls below it).
    What it cannot see: the same stage with all target losses switched off (no anchor
    label passes a margin of 1e6, lam = 0) still gained +5.3 points here, from 120 more
    source iterations with the target batches in train mode (their BatchNorm statistics).
    CAG's own contribution is measured over 3 seeds by the benchmark's ``no_target_losses``
    ablation (results/ablations.csv), and the benchmark's 5-point target is a 3-seed mean of the
    full schedule, not this run.
    """
    from cag import stages
    from cag.pipeline import Pipeline

    cfg = load_config(REPO / "configs" / "synthetic.yaml", short_run(tmp_path))
    Pipeline(cfg).run(until="stage1")
    score = {stage: 100 * stages.evaluate(cfg, cfg.run_dir / stage / "last.pt", "test")["miou"]
             for stage in ("source_only", "stage1")}
    assert score["stage1"] - score["source_only"] >= MARGIN_POINTS, f"test mIoU (%): {score}"
