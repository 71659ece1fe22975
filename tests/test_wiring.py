"""Wiring between the modules, checked against hand-derived values.

Each test names the mutation it guards against: a change in how one module hands an argument
to the next (the anchor validity mask, the poly power, the head's learning-rate multiplier,
the evaluation scales) that the unit tests of the modules alone would not notice. Stub
networks with known outputs make the numbers writable by hand; where the real tiny network
runs, the expected value comes from an independent computation on the tensors it produced.

Shared by the hand derivations below:

- SmoothL1 (beta 1) per dimension: 0.5 x^2 for |x| < 1, |x| - 0.5 otherwise; the faithful
  distance loss averages it over the D = 2 dimensions per (image, class) pair and returns
  10 * sum / #pairs (no pair exceeds 5 here, so nothing is shrunk).
- Logits 10 * one_hot(class) over 3 classes: the CE of the right class is
  c = log(1 + 2 e^-10) and the softmax of the predicted class, e^10 / (e^10 + 2), passes 0.95.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from cag import loop, stages
from cag.anchors import save_anchors
from cag.config import from_dict
from cag.evaluate import evaluate_model, predict_probs
from cag.loop import LoopSpec, poly_lr, run_loop
from cag.losses import cag_loss
from cag.models import build_model
from test_evaluate import Items

C_RIGHT = math.log(1 + 2 * math.exp(-10))  # CE of a pixel whose logits are 10 * one_hot(its label)

# Anchors on the x axis: class 0 at -2, class 1 at the origin (count 0: no anchor), class 2 at +2.
ANCHORS = torch.tensor([[-2.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
COUNTS = torch.tensor([4.0, 0.0, 6.0])
VALID = COUNTS > 0


@pytest.fixture
def restore_determinism():
    """``stages.seed_everything`` switches on deterministic algorithms process-wide; put it back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def one_hot_logits(classes: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    return 10.0 * nn.functional.one_hot(classes.long(), num_classes).permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------- the source batch
# 2 x 3 pixels, features (x, y) and labels:
#   label  [[0, 0, 1], [1, 2, 2]]
#   x      [[-1, -2, 3], [3, 2, 2]]
#   y      [[0, 0, 0], [0, 1, 1]]
# class 0: mean (-1.5, 0), anchor (-2, 0): SmoothL1 (0.125, 0) -> 0.0625
# class 1: mean (3, 0), anchor (0, 0):     SmoothL1 (2.5, 0)   -> 1.25   (no anchor: must not count)
# class 2: mean (2, 1), anchor (2, 0):     SmoothL1 (0, 0.5)   -> 0.25
# faithful: 10 * (0.0625 + 0.25) / 2 = 1.5625; with class 1: 10 * 1.5625 / 3 = 5.2083
# pixel_l2: distances 1, 0, 1, 1 over the four class-0/2 pixels -> 3/4 = 0.75; with class 1 (3, 3): 9/6 = 1.5
SRC_LABELS = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
SRC_FEATURES = torch.tensor([[[[-1.0, -2.0, 3.0], [3.0, 2.0, 2.0]],
                              [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]]])
DIST_SOURCE = {"faithful": 1.5625, "pixel_l2": 0.75}


@pytest.mark.parametrize("variant", ["faithful", "pixel_l2"])
def test_cag_loss_keeps_classes_without_anchor_out_of_the_source_distance(variant):
    """Guards against ``cag_loss`` ignoring ``anchor_valid``: the source pixels of class 1 (no
    anchor) would enter L_dis^s (5.2083 instead of 1.5625 faithful, 1.5 instead of 0.75
    pixel_l2). The source CE still counts them (all 6 pixels right: c each)."""
    features = SRC_FEATURES.clone().requires_grad_(True)
    logits = one_hot_logits(SRC_LABELS)
    tgt_features = torch.zeros(1, 2, 2, 3)
    nothing = torch.full((1, 2, 3), 255)
    losses = cag_loss(logits, SRC_LABELS, features, torch.zeros(1, 3, 2, 3), tgt_features, ANCHORS,
                      nothing, nothing, lam=0.7, distance_variant=variant, min_pixels=1, anchor_valid=VALID)
    assert losses["dist_source"].item() == pytest.approx(DIST_SOURCE[variant], rel=1e-6)
    assert losses["ce_source"].item() == pytest.approx(C_RIGHT, abs=1e-6)
    assert losses["dist_target"].item() == 0.0 and losses["ce_target"].item() == 0.0
    assert losses["total"].item() == pytest.approx(C_RIGHT + 0.7 * DIST_SOURCE[variant], rel=1e-5)
    # class 1's source features get no gradient (here the CE's logits are separate tensors, so the
    # distance loss is the features' only path); a class-0 feature does get one
    losses["total"].backward()
    assert features.grad[0, :, 0, 2].abs().sum() == 0 and features.grad[0, :, 1, 0].abs().sum() == 0
    assert features.grad[0, :, 0, 0].abs().sum() > 0


# ----------------------------------------------------------------------------- one CAG step


class EchoNet(nn.Module):
    """A stand-in network: features = channels 0-1 of the input, logits = 10 * one_hot of the
    class written in channel 2, both times a parameter w = 1 (so the losses have a graph)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, :2] * self.w, one_hot_logits(x[:, 2].round()) * self.w


# The target crop, 2 x 3 pixels, features (x, y) and the class both networks predict:
#   x     [[-2, -1.2, 0.1], [0.8, 1.8, 0]]
#   y     [[0, 0, 0], [0, 0, 3]]
#   pred  [[0, 0, 0], [2, 2, 0]]
# delta_d = 1. Distances to the valid anchors 0 (at -2) and 2 (at +2):
#   (-2, 0): 0 vs 4 -> 0     (-1.2, 0): 0.8 vs 3.2 -> 0     (0.1, 0): 2.1 vs 1.9, margin 0.2 -> ignore
#   (0.8, 0): 2.8 vs 1.2 -> 2   (1.8, 0): 3.8 vs 0.2 -> 2   (0, 3): sqrt 13 twice, margin 0 -> ignore
# active fraction 4/6. Were class 1 (at the origin) a candidate: [[0, -, 1], [-, 2, -]], 3/6.
# L_dis^t faithful (mask = label & prediction agree, min_pixels 1):
#   class 0: mean (-1.6, 0) vs (-2, 0): SmoothL1 (0.08, 0) -> 0.04
#   class 2: mean (1.3, 0) vs (2, 0):   SmoothL1 (0.245, 0) -> 0.1225
#   10 * (0.04 + 0.1225) / 2 = 0.8125
# L_dis^t pixel_l2: (0 + 0.8 + 1.2 + 0.2) / 4 = 0.55
# CE_t: every active and every probability-labelled pixel is predicted right: (c + c) / 2 = c.
TGT = torch.tensor([[[[-2.0, -1.2, 0.1], [0.8, 1.8, 0.0]],
                     [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
                     [[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]]])
SRC = torch.cat([SRC_FEATURES, SRC_LABELS[:, None].float()], dim=1)
DIST_TARGET = {"faithful": 0.8125, "pixel_l2": 0.55}


def cag_config(**cag):
    return from_dict({"device": "cpu", "quiet": True, "data": {"num_classes": 19},
                      "cag": {"min_pixels": 1, "lam": 0.7, **cag}})


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("variant", ["faithful", "pixel_l2"])
def test_cag_step_leaves_a_class_with_zero_anchor_count_out_of_targets_and_distances(variant, fuse):
    """Guards against ``cag_train_step`` treating zero-count classes as valid (``valid =
    anchor_counts > 0`` made all-True, or not passed to the active-target test or to
    ``cag_loss``): the origin anchor of class 1 would take part in the margin test (active
    fraction 3/6 instead of 4/6, another L_dis^t) and its source pixels in L_dis^s."""
    cfg = cag_config(delta_d=1.0, distance_loss=variant, fuse_forward=fuse)
    student, teacher = EchoNet(), EchoNet().requires_grad_(False)
    losses = stages.cag_train_step(cfg, student, teacher, ANCHORS, COUNTS, SRC, SRC_LABELS, TGT,
                                   torch.device("cpu"), yt=torch.tensor([[[0, 0, 1], [2, 2, 1]]]))
    assert losses["active_fraction"].item() == pytest.approx(4 / 6)
    assert losses["dist_source"].item() == pytest.approx(DIST_SOURCE[variant], rel=1e-5)
    assert losses["dist_target"].item() == pytest.approx(DIST_TARGET[variant], rel=1e-5)
    assert losses["ce_source"].item() == pytest.approx(C_RIGHT, abs=1e-6)
    assert losses["ce_target"].item() == pytest.approx(C_RIGHT, abs=1e-6)
    expected_total = 2 * C_RIGHT + 0.7 * (DIST_SOURCE[variant] + DIST_TARGET[variant])
    assert losses["total"].item() == pytest.approx(expected_total, rel=1e-5)
    # monitoring: the 4 anchor labels (0, 0, 2, 2) all agree with yt; probability labels are the
    # prediction [[0, 0, 0], [2, 2, 0]]: 4 of 6 right
    assert losses["precision_anchor"].item() == pytest.approx(1.0)
    assert losses["precision_probability"].item() == pytest.approx(4 / 6)


def test_cag_step_with_the_tiny_network_never_activates_a_class_with_zero_anchor_count(monkeypatch):
    """Guards against ``cag_train_step`` treating zero-count classes as valid, on the real tiny
    DeepLab-v3+: class 1's anchor (count 0) sits exactly on one target pixel's teacher feature,
    so a step that let it compete would label that pixel 1 (distance 0, margin above delta_d
    by construction). The active map must equal an independent nearest-of-{0, 2} margin test,
    and L_dis^s (pixel_l2) must average only the source pixels of classes 0 and 2."""
    torch.manual_seed(0)
    net = build_model("deeplabv3plus", num_classes=3, backbone="tiny", output_stride=8, feature_dim=16,
                      aspp_rates=(1, 2, 3))
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    student = net.train()
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    ys_small = torch.randint(0, 3, (2, 8, 8), generator=g)
    ys = ys_small.repeat_interleave(4, 1).repeat_interleave(4, 2)  # nearest to 8 x 8 gives ys_small back
    with torch.no_grad():
        teacher_features, _ = teacher(xt)
    pixels = teacher_features.permute(0, 2, 3, 1).reshape(-1, 16)
    picked = [3, 70, 101]  # pixels whose features become anchors 0, 1 (count 0), 2
    anchors = pixels[picked].clone()
    pairwise = torch.cdist(anchors, anchors)[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)]
    assert pairwise.min() > 0
    delta_d = float(0.5 * pairwise.min())
    counts = torch.tensor([3.0, 0.0, 5.0])

    seen = {}

    def spy(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return cag_loss(*args, **kwargs)

    monkeypatch.setattr(stages, "cag_loss", spy)
    cfg = cag_config(delta_d=delta_d, distance_loss="pixel_l2")
    losses = stages.cag_train_step(cfg, student, teacher, anchors, counts, xs, ys, xt, torch.device("cpu"))
    src_logits, src_labels, src_features, tgt_logits, tgt_features, _, anchor_labels = seen["args"][:7]

    # independent active-target test over the two valid anchors
    d0 = ((pixels - anchors[0]) ** 2).sum(-1).sqrt()
    d2 = ((pixels - anchors[2]) ** 2).sum(-1).sqrt()
    margin = (d0 - d2).abs()
    assert ((margin - delta_d).abs() > 1e-4).all()  # no pixel on the threshold: the comparison is exact
    expected = torch.where(margin >= delta_d, torch.where(d0 <= d2, 0, 2), 255).reshape(2, 8, 8)
    assert not (anchor_labels == 1).any()
    assert torch.equal(anchor_labels, expected)
    assert expected.flatten()[picked[0]] == 0 and expected.flatten()[picked[2]] == 2
    assert losses["active_fraction"].item() == pytest.approx((expected != 255).float().mean().item())

    # L_dis^s, pixel_l2: mean distance to the own anchor over source pixels of classes 0 and 2
    f = src_features.detach().permute(0, 2, 3, 1)
    keep = ys_small != 1
    assert 0 < keep.sum() < keep.numel()
    dist = (f[keep] - anchors[ys_small[keep]]).pow(2).sum(-1).sqrt().mean()
    assert losses["dist_source"].item() == pytest.approx(dist.item(), rel=1e-5)
    # L_dis^t, pixel_l2: over the active pixels, to the anchor of their label
    ft = tgt_features.detach().permute(0, 2, 3, 1)
    active = expected != 255
    dist_t = (ft[active] - anchors[expected[active]]).pow(2).sum(-1).sqrt().mean()
    assert losses["dist_target"].item() == pytest.approx(dist_t.item(), rel=1e-5)


# ----------------------------------------------------------------------------- learning rates

# lr_i = lr * (1 - i / horizon)^power with lr = 0.01, horizon 10, for i = 0..3
POLY_0_9 = [0.01, 0.009095325760829623, 0.008180521460508584, 0.007254178469372199]  # 0.9^0.9, 0.8^0.9, 0.7^0.9
POLY_2 = [0.01, 0.0081, 0.0064, 0.0049]  # 0.9^2, 0.8^2, 0.7^2


def test_poly_lr_is_lr_times_one_minus_progress_to_the_power():
    """Guards against ``poly_lr`` dropping or replacing its power: 0.5^0.9 = 0.53588673."""
    assert poly_lr(0.01, 5, 10) == pytest.approx(0.005358867312681466, rel=1e-12)
    assert poly_lr(0.01, 3, 10, power=0.9) == pytest.approx(POLY_0_9[3], rel=1e-12)
    assert poly_lr(0.01, 3, 10, power=2.0) == pytest.approx(0.0049, rel=1e-12)
    assert poly_lr(0.01, 10, 10) == 0.0 and poly_lr(0.01, 12, 10) == 0.0


@pytest.mark.parametrize("power,expected", [(0.9, POLY_0_9), (2.0, POLY_2)])
def test_run_loop_sets_the_poly_lr_times_each_groups_multiplier(tmp_path, power, expected):
    """Guards against ``run_loop`` ignoring ``spec.poly_power`` (power 1, or poly_lr's default
    0.9 used for every power) and against it ignoring a group's ``lr_mult``: the lr each
    param group holds while step i runs must be 0.01 * (1 - i/10)^power, times 10 for the
    group with lr_mult 10."""
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr_mult": 1.0},
                                 {"params": [model.bias], "lr_mult": 10.0}], lr=123.0)
    seen = []

    def step(i):
        seen.append([group["lr"] for group in optimizer.param_groups])
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        return {"total": loss.detach()}

    run_loop(LoopSpec(stage_dir=tmp_path, iters=4, modules={"model": model}, optimizers={"model": optimizer},
                      base_lrs={"model": 0.01}, poly_horizon=10, poly_power=power, step=step, streams={},
                      validate=None, val_interval=100, checkpoint_interval=100, log_interval=100, quiet=True))
    assert [lr for lr, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert [lr for _, lr in seen] == pytest.approx([10 * x for x in expected], rel=1e-12)


class FakeStream:
    """Endless random batches of two 32 x 32 crops (19-class labels) in place of the loaders."""

    def __init__(self, batch_size: int, seed: int):
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(seed)

    def next(self) -> dict:
        return {"image": torch.rand(self.batch_size, 3, 32, 32, generator=self.generator),
                "label": torch.randint(0, 19, (self.batch_size, 32, 32), generator=self.generator)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_warmup_stage_gives_the_head_head_lr_mult_times_the_backbone_poly_lr(tmp_path, monkeypatch, restore_determinism):
    """Guards against ``warmup.head_lr_mult`` being ignored (``_param_groups`` giving the head
    lr_mult 1, ``warmup_stage`` not using it, ``run_loop`` not applying ``lr_mult``) and
    against the stage handing ``run_loop`` another power than ``train.poly_power``.

    The real warm-up runs 3 iterations of the tiny network on random crops; while iteration
    i runs, every ``backbone.*`` parameter must have lr 0.01 * (1 - i/10)^0.9, every other
    parameter (ASPP, decoder, classifier) 10 times that, and the discriminator
    0.001 * (1 - i/10)^0.9.
    """
    monkeypatch.setattr(stages, "source_dataset", lambda cfg: None)
    monkeypatch.setattr(stages, "target_dataset", lambda cfg, split, labels: None)
    monkeypatch.setattr(stages, "train_stream",
                        lambda cfg, dataset, resize, batch_size, seed, device: FakeStream(batch_size, seed))
    monkeypatch.setattr(stages, "_validator", lambda cfg, model, device: None)
    monkeypatch.setattr(stages, "git_commit", lambda: "test")
    seen = []

    def spying_run_loop(spec):
        names = {id(p): n for n, p in spec.modules["model"].named_parameters()}
        inner = spec.step

        def step(i):
            model_lrs = {names[id(p)]: group["lr"] for group in spec.optimizers["model"].param_groups
                         for p in group["params"]}
            disc_lrs = [group["lr"] for group in spec.optimizers["disc"].param_groups]
            seen.append((model_lrs, disc_lrs))
            return inner(i)

        spec.step = step
        return loop.run_loop(spec)

    monkeypatch.setattr(stages, "run_loop", spying_run_loop)
    cfg = from_dict({
        "device": "cpu", "quiet": True,
        "data": {"num_classes": 19, "num_workers": 0},
        "model": {"backbone": "tiny", "output_stride": 8, "feature_dim": 16, "aspp_rates": [1, 2, 3]},
        "train": {"batch_size": 2, "poly_power": 0.9, "checkpoint_interval": 100, "log_interval": 100,
                  "val_interval": 100},
        "warmup": {"iters": 3, "lr": 0.01, "head_lr_mult": 10.0, "poly_horizon": 10, "lr_d": 0.001,
                   "disc_channels": 4},
    })
    stages.warmup_stage(cfg, tmp_path / "warmup", "fingerprint", None)

    assert len(seen) == 3
    reference = build_model("deeplabv3plus", num_classes=19, backbone="tiny", output_stride=8, feature_dim=16,
                            aspp_rates=(1, 2, 3))
    all_names = [n for n, _ in reference.named_parameters()]
    backbone = {n for n in all_names if n.startswith("backbone.")}
    head = set(all_names) - backbone
    assert backbone and {n.split(".")[0] for n in head} == {"aspp", "decoder"}
    for i, (model_lrs, disc_lrs) in enumerate(seen):
        assert sorted(model_lrs) == sorted(all_names)  # every parameter in exactly one group
        assert [model_lrs[n] for n in sorted(backbone)] == pytest.approx([POLY_0_9[i]] * len(backbone), rel=1e-12), i
        assert [model_lrs[n] for n in sorted(head)] == pytest.approx([10 * POLY_0_9[i]] * len(head), rel=1e-12), i
        assert disc_lrs == pytest.approx([POLY_0_9[i] / 10], rel=1e-12), i


class LoopHandedOver(Exception):
    """Raised by the spy in place of training: the stage's set-up is what is under test."""


@pytest.mark.parametrize("stage", ["source_only", "warmup", "cag"])
def test_every_stage_hands_run_loop_train_poly_power_its_lr_and_its_horizon(tmp_path, monkeypatch, stage,
                                                                            restore_determinism):
    """Guards against a stage hard-coding the poly power (the released 0.9, or 1) instead of
    ``train.poly_power``, or taking another stage's lr or horizon: with a power of 2.0 and each
    stage's lr and horizon set to distinct values, the ``LoopSpec`` each stage builds must carry
    exactly them (``test_run_loop_sets_the_poly_lr_times_each_groups_multiplier`` shows that
    ``run_loop`` then applies them)."""
    monkeypatch.setattr(stages, "source_dataset", lambda cfg: None)
    monkeypatch.setattr(stages, "target_dataset", lambda cfg, split, labels: None)
    monkeypatch.setattr(stages, "train_stream",
                        lambda cfg, dataset, resize, batch_size, seed, device: FakeStream(batch_size, seed))
    monkeypatch.setattr(stages, "_validator", lambda cfg, model, device: None)
    specs = []

    def spy(spec):
        specs.append(spec)
        raise LoopHandedOver

    monkeypatch.setattr(stages, "run_loop", spy)
    cfg = from_dict({
        "device": "cpu", "quiet": True,
        "data": {"num_classes": 19, "num_workers": 0},
        "model": {"backbone": "tiny", "output_stride": 8, "feature_dim": 16, "aspp_rates": [1, 2, 3]},
        "train": {"batch_size": 2, "poly_power": 2.0},
        "source_only": {"iters": 7, "lr": 0.011, "poly_horizon": 70},
        "warmup": {"iters": 8, "lr": 0.012, "poly_horizon": 80, "disc_channels": 4},
        "cag": {"iters": 9, "lr": 0.013, "poly_horizon": 90},
    })
    anchors = tmp_path / "anchors.pt"
    save_anchors(anchors, torch.zeros(19, 16), torch.ones(19))
    run = {"source_only": lambda: stages.supervised_stage(cfg, tmp_path / "s", "f"),
           "warmup": lambda: stages.warmup_stage(cfg, tmp_path / "w", "f", None),
           "cag": lambda: stages.cag_stage(cfg, tmp_path / "c", "f", None, anchors)}[stage]
    with pytest.raises(LoopHandedOver):
        run()
    spec = specs[0]
    lr, horizon, iters = {"source_only": (0.011, 70, 7), "warmup": (0.012, 80, 8), "cag": (0.013, 90, 9)}[stage]
    assert (spec.poly_power, spec.base_lrs["model"], spec.poly_horizon, spec.iters) == (2.0, lr, horizon, iters)


# ----------------------------------------------------------------------------- multi-scale evaluation


class WidthModel(nn.Module):
    """Logits that depend on the input width W, the same at every pixel: class 0 gets 0,
    class 1 gets W - 5, every other class -100 (its softmax share e^-100 is negligible).

    On a 4 x 4 image at scales 1.0, 1.5, 2.0 (W = 4, 6, 8) the class-1 probability is
    sigmoid(-1), sigmoid(1), sigmoid(3) = 0.26894, 0.73106, 0.95257; their mean 0.65086 makes
    class 1 the prediction, while scale 1.0 alone predicts class 0.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.widths = []

    def forward(self, x):
        batch, _, height, width = x.shape
        self.widths.append(width)
        logits = torch.full((batch, self.num_classes, height, width), -100.0)
        logits[:, 0] = 0.0
        logits[:, 1] = width - 5.0
        return x, logits


def class_one_image():
    return Items([{"image": torch.zeros(3, 4, 4), "label": torch.ones(4, 4, dtype=torch.long)}])


def test_predict_probs_averages_over_scales_of_a_size_dependent_model():
    """Guards against multi-scale prediction running every pass at scale 1.0 (or any other
    single size): the averaged class-1 probability must be the mean of three different
    sigmoids, 0.65086, not sigmoid(-1) = 0.26894."""
    model = WidthModel(2)
    probs = predict_probs(model, torch.zeros(1, 3, 4, 4), (4, 4), scales=(1.0, 1.5, 2.0))
    assert model.widths == [4, 6, 8]
    assert probs.shape == (1, 2, 4, 4)
    assert torch.allclose(probs[:, 1], torch.full((1, 4, 4), 0.6508580422741445), atol=1e-6)
    single = predict_probs(WidthModel(2), torch.zeros(1, 3, 4, 4), (4, 4))
    assert torch.allclose(single[:, 1], torch.full((1, 4, 4), 0.2689414213699951), atol=1e-6)


def test_evaluate_model_passes_its_scales_on():
    """Guards against ``evaluate_model`` ignoring ``scales``: with scales 1.0, 1.5, 2.0 all 16
    class-1 pixels are predicted 1; at scale 1.0 alone all would be predicted 0."""
    cm = evaluate_model(WidthModel(2), class_one_image(), 2, "cpu", scales=(1.0, 1.5, 2.0), quiet=True)
    assert cm.matrix.tolist() == [[0, 0], [0, 16]]
    cm1 = evaluate_model(WidthModel(2), class_one_image(), 2, "cpu", quiet=True)
    assert cm1.matrix.tolist() == [[0, 0], [16, 0]]


@pytest.mark.parametrize("scales,miou", [([1.0, 1.5, 2.0], 1.0), ([1.0], 0.0)])
def test_evaluate_stage_uses_eval_scales(monkeypatch, scales, miou):
    """Guards against ``cag.stages.evaluate`` not handing ``eval.scales`` to the evaluation:
    over three scales every class-1 pixel is right (IoU 1, the only class present: mIoU 1);
    at scale 1.0 all are predicted 0 (IoU of classes 0 and 1 both 0: mIoU 0)."""
    model = WidthModel(19)
    monkeypatch.setattr(stages, "make_model", lambda cfg, device, init=None: model)
    monkeypatch.setattr(stages, "eval_dataset", lambda cfg, split: class_one_image())
    cfg = from_dict({"device": "cpu", "quiet": True, "data": {"num_classes": 19, "num_workers": 0},
                     "eval": {"scales": scales}})
    result = stages.evaluate(cfg, "unused.pt", "val", confusion=True)
    assert model.widths == [4 * s for s in scales]
    assert result["miou"] == pytest.approx(miou)
    assert result["per_class_iou"]["road"] == (None if miou == 1.0 else 0.0)
    # the matrix the scores came from (chapter 3 reads it): 16 class-1 pixels, predicted 1 or 0
    assert result["confusion"].shape == (19, 19) and int(result["confusion"].sum()) == 16
    assert int(result["confusion"][1, 1 if miou == 1.0 else 0]) == 16
    assert "confusion" not in stages.evaluate(cfg, "unused.pt", "val")  # summary.json stays JSON
