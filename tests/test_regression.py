"""Regression check on the built-in benchmark: CAG's target losses must beat a control without them.

A short run of the real pipeline on a fixed seed, version 2 of the built-in benchmark
(``data.synthetic.version=2``, the ``class`` preset at strength 0.35) at the 64x128 of
``configs/synthetic.yaml``: source-only training, the anchors from that model, then from that
same model (``model.init``, ``source_only.iters=0``, ``warmup.iters=0``) one CAG stage twice:

* **cag**: the released settings;
* **control**: the same stage with every target loss off (``cag.pseudo_labels=anchor``,
  ``cag.delta_d=1000000``: no pixel passes the anchor margin, so no target pseudo-label;
  ``cag.lam=0``: no distance loss). It is continued source training with the target batches
  passing through the network in train mode (their BatchNorm statistics): the part of the
  stage's gain that is not CAG's own.

Both are scored on the held-out ``test`` split; the check is cag - control >= MARGIN_POINTS.
The mutation tests (``-m mutation``) break the CAG stage in three ways (:data:`BROKEN_BUILDS`)
and assert that the check then fails. The strength is pinned (0.35, the ``class`` preset's
default when this was measured; the default has since moved to 0.4, where CAG's gain over the
control was smaller still), so a recalibration of the benchmark does not move the check's data.
Every number behind SEED and MARGIN_POINTS, and the command that measures them, is in
benchmarks/NOTES.md section 11.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cag.bench import threads
from cag.config import load_config

REPO = Path(__file__).resolve().parents[1]
SEED = 4
#: Minimum gain of the CAG stage over the control, in mIoU points on the held-out test split
#: (how it was chosen: the check's docstring and benchmarks/NOTES.md section 11).
MARGIN_POINTS = 1.0
#: The control: the CAG stage with every target loss off.
CONTROL = ("cag.pseudo_labels=anchor", "cag.delta_d=1000000", "cag.lam=0")


def short_run(root: Path, name: str, seed: int = SEED) -> list[str]:
    """configs/synthetic.yaml on benchmark version 2, shrunk: fewer images, shorter stages, no warm-up."""
    data = root / "data"
    return [
        f"name={name}", f"out_dir={root / 'runs'}", f"seed={seed}", "quiet=true",
        f"data.synthetic.root={data}", "data.synthetic.version=2", "data.synthetic.preset=class",
        "data.synthetic.strength=0.35",
        f"data.source_root={data / 'source'}", f"data.target_root={data / 'target'}",
        "data.synthetic.n_source=200", "data.synthetic.n_target_train=200",
        "data.synthetic.n_target_val=40", "data.synthetic.n_target_test=100",
        "source_only.iters=300", "warmup.iters=0", "anchors.num_images=200", "cag.stages=1", "cag.iters=120",
        "train.val_interval=1000", "train.checkpoint_interval=1000", "data.target_train_labels=false",
    ]


@pytest.fixture
def one_thread():
    """One CPU thread, so the scores do not depend on OMP_NUM_THREADS (reduction order)."""
    with threads(1):
        yield


def held_out_score(cfg, stage: str) -> float:
    """mIoU in points of ``stage``'s last checkpoint on the held-out ``test`` split."""
    from cag import stages

    return 100 * stages.evaluate(cfg, cfg.run_dir / stage / "last.pt", "test")["miou"]


def source_only_run(root: Path, seed: int = SEED) -> dict:
    """Source-only training and the anchors from its model; {"start", "anchors", "source_only"}."""
    from cag.pipeline import Pipeline

    cfg = load_config(REPO / "configs" / "synthetic.yaml", short_run(root, "source", seed))
    pipeline = Pipeline(cfg)
    pipeline.run(until="anchors")
    return {"start": pipeline.model_of("warmup"), "anchors": pipeline.stage_dir("anchors") / "anchors.pt",
            "source_only": held_out_score(cfg, "source_only")}


def stage_score(root: Path, base: dict, name: str, extra=(), seed: int = SEED) -> float:
    """One CAG stage started from the source-only model and its anchors; its test mIoU (points)."""
    from cag.pipeline import Pipeline

    cfg = load_config(REPO / "configs" / "synthetic.yaml", [
        *short_run(root, name, seed), f"model.init={base['start']}", "source_only.iters=0",
        f"anchors.file={base['anchors']}", *extra])
    Pipeline(cfg).run(until="stage1")
    return held_out_score(cfg, "stage1")


# ----------------------------------------------------------------------------- broken builds
# Each takes a pytest MonkeyPatch and returns a list that grows by one entry per call of the
# patched function (how much that call changed: pixels relabelled, loss removed or flipped), so
# a test can check that the patch was called and changed something. Every name is patched
# where the CAG stage looks it up (cag.stages imports cag_loss and anchor_pseudo_labels by
# name; cag.losses.cag_loss calls anchor_distance_loss from its own module).


def target_losses_off(mp: pytest.MonkeyPatch) -> list:
    """The target pseudo-label CE and the distance losses (source and target) contribute zero."""
    from cag import stages

    calls, original = [], stages.cag_loss

    def cag_loss(*args, **kwargs):
        parts = original(*args, **kwargs)
        removed = [parts[key] for key in ("ce_target", "dist_source", "dist_target")]
        calls.append(float(sum(term.detach().abs() for term in removed)))  # what the patch took away
        for key in ("ce_target", "dist_source", "dist_target"):
            parts[key] = parts[key] * 0.0
        parts["total"] = parts["ce_source"] + parts["ce_target"] + parts["dist_source"] + parts["dist_target"]
        return parts

    mp.setattr(stages, "cag_loss", cag_loss)
    return calls


def anchor_labels_shifted(mp: pytest.MonkeyPatch) -> list:
    """The anchor pseudo-labels shifted by one class: c becomes (c + 1) mod C; ignore stays ignore."""
    from cag import stages
    from cag.labels import IGNORE_INDEX

    calls, original = [], stages.anchor_pseudo_labels

    def anchor_pseudo_labels(features, anchors, *args, **kwargs):
        labels = original(features, anchors, *args, **kwargs)
        ignored = labels == kwargs.get("ignore_index", IGNORE_INDEX)
        calls.append(int((~ignored).sum()))  # the pixels relabelled
        return torch.where(ignored, labels, (labels + 1) % anchors.shape[0])

    mp.setattr(stages, "anchor_pseudo_labels", anchor_pseudo_labels)
    return calls


def distance_sign_flipped(mp: pytest.MonkeyPatch) -> list:
    """The distance loss (source and target terms) with its sign flipped: features pushed away from the anchors."""
    from cag import losses

    calls, original = [], losses.anchor_distance_loss

    def anchor_distance_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(float(loss.detach().abs()))  # the size of the term flipped
        return -loss

    mp.setattr(losses, "anchor_distance_loss", anchor_distance_loss)
    return calls


BROKEN_BUILDS = {"target_losses_off": target_losses_off, "anchor_labels_shifted": anchor_labels_shifted,
                 "distance_sign_flipped": distance_sign_flipped}


# ----------------------------------------------------------------------------- the check


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict:
    """Source-only and the control, shared by the check and the mutation tests (1 thread)."""
    root = tmp_path_factory.mktemp("regression")
    with threads(1):
        base = source_only_run(root)
        base["control"] = stage_score(root, base, "control", CONTROL)
    return {**base, "root": root}


@pytest.mark.slow
def test_cag_target_losses_beat_the_control_on_the_held_out_split(baseline, one_thread):
    """CAG stage 1 must beat the control by at least MARGIN_POINTS = 1 mIoU point on ``test``.

    Measured with this file's own functions on seeds 1-5 (benchmarks/NOTES.md section 11), CAG -
    control in test mIoU points: the good build +2.58, +2.37, +1.18, +2.76, -0.40 (mean +1.70,
    sd 1.32, 95 % t-interval of the mean [+0.05, +3.34]); target_losses_off 0.00 on every seed
    (bit-identical to the control); anchor_labels_shifted +1.52, +1.14, -0.22, -5.87, -4.19;
    distance_sign_flipped -3.03, -0.53, -3.41, -1.04, -0.74. At SEED = 4 (source-only 17.69,
    control 20.04, CAG 22.80) the good build clears the margin by 1.76 points and the nearest
    broken build (target_losses_off, 0.00) misses it by 1.00 (anchor_labels_shifted by 6.87,
    distance_sign_flipped by 2.04).

    No margin separates the builds on every seed: the good build's lower 95 % bound (+0.05) is
    at target_losses_off's exact 0, and anchor_labels_shifted reached +1.52 on seed 1. At this
    size CAG's own gain over the control is about as large as the seed-to-seed spread (on the
    seeds tried, a longer run, 600 source-only and 240 CAG iterations, and the benchmark's newer
    default strength 0.4 made it smaller, not larger; section 11). So the check is a fixed-seed one:
    deterministic on CPU, it catches each of the three broken builds at SEED; 1.0 is the
    5-seed mean minus half a standard deviation, and 4 of the 5 seeds clear it. A harmless
    change that alters the training trajectory (as a new seed does) would fail it with a
    probability of roughly 30 % (normal approximation of the 5 seeds); after such a change,
    re-measure the 5 seeds with section 11's command rather than lowering the margin.
    """
    cag = stage_score(baseline["root"], baseline, "cag")
    scores = {"source_only": baseline["source_only"], "control": baseline["control"], "cag": cag}
    print(f"test mIoU (points): {scores}; cag - control {cag - baseline['control']:+.2f}")
    assert cag - baseline["control"] >= MARGIN_POINTS, f"test mIoU (points): {scores}"


@pytest.mark.slow
@pytest.mark.mutation
@pytest.mark.parametrize("build", sorted(BROKEN_BUILDS))
def test_the_check_fails_on_a_broken_build(build, baseline, one_thread, monkeypatch):
    """With the CAG stage broken (:data:`BROKEN_BUILDS`), cag - control falls below MARGIN_POINTS."""
    calls = BROKEN_BUILDS[build](monkeypatch)
    cag = stage_score(baseline["root"], baseline, f"broken-{build}")
    monkeypatch.undo()
    print(f"{build}: test mIoU (points) cag {cag:.2f}, control {baseline['control']:.2f}, "
          f"cag - control {cag - baseline['control']:+.2f}; {len(calls)} patched calls")
    assert calls, f"the {build} patch was never called"
    assert sum(calls) > 0, f"the {build} patch was called {len(calls)} times but never changed anything"
    assert cag - baseline["control"] < MARGIN_POINTS, \
        f"{build}: cag {cag:.2f} - control {baseline['control']:.2f} still >= {MARGIN_POINTS} mIoU points"
