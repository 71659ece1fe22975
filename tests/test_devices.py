"""The core computes the same thing on every device (CPU and CUDA).

Each test runs the CPU computation and the same computation on ``device``; the ``cpu``
parameter checks the test itself (and the device plumbing: tensors moved, no CPU-only call),
the ``cuda`` parameter runs where a GPU is present. TF32 is switched off so that float32 on
the GPU is compared with float32 on the CPU.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cag import stages
from cag.anchors import AnchorAccumulator
from cag.config import load_config
from cag.losses import anchor_distance_loss
from cag.metrics import ConfusionMatrix
from cag.pseudo_labels import anchor_distances, nearest_anchor_margin, anchor_pseudo_labels

REPO = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def full_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def features_and_anchors(seed=0, batch=2, dim=16, classes=5, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    anchors = 3.0 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (batch, h, w), generator=g)
    features = anchors[labels].permute(0, 3, 1, 2) + 1.5 * torch.randn(batch, dim, h, w, generator=g)
    return features, labels, anchors


@pytest.mark.parametrize("device", DEVICES)
def test_active_target_pseudo_labels_match_the_cpu(device):
    features, _, anchors = features_and_anchors()
    delta = torch.tensor([2.5, 1.0, 4.0, 2.0, 3.0])
    valid = torch.tensor([True, True, False, True, True])
    expected = anchor_pseudo_labels(features, anchors, delta, valid=valid)
    got = anchor_pseudo_labels(features.to(device), anchors.to(device), delta.to(device), valid=valid.to(device))
    assert got.device.type == device
    _, margin = nearest_anchor_margin(anchor_distances(features, anchors))
    clear = (margin - 2.5).abs() > 1e-3  # a margin within float noise of a threshold may flip
    assert torch.equal(got.cpu()[clear], expected[clear])
    assert 0 < (expected != 255).sum() < expected.numel()


@pytest.mark.parametrize("variant", ["faithful", "pixel_l2"])
@pytest.mark.parametrize("device", DEVICES)
def test_distance_losses_and_their_gradients_match_the_cpu(device, variant):
    features, labels, anchors = features_and_anchors(seed=1)
    predictions = torch.where(torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) < 0.8, labels, 0)

    def loss_and_grad(dev):
        f = features.clone().to(dev).requires_grad_(True)
        loss = anchor_distance_loss(f, labels.to(dev), anchors.to(dev), predictions.to(dev), variant=variant,
                                    min_pixels=2)
        loss.backward()
        return loss.detach().cpu(), f.grad.cpu()

    (loss_cpu, grad_cpu), (loss_dev, grad_dev) = loss_and_grad("cpu"), loss_and_grad(device)
    assert loss_cpu > 0
    torch.testing.assert_close(loss_dev, loss_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_dev, grad_cpu, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["faithful", "global"])
@pytest.mark.parametrize("device", DEVICES)
def test_anchor_accumulation_matches_the_cpu(device, mode):
    def accumulate(dev):
        acc = AnchorAccumulator(5, 16, min_pixels=3, count_cap=2, mode=mode)
        for seed in range(4):  # more images than the cap: the moving-average branch runs too
            features, labels, _ = features_and_anchors(seed=seed)
            acc.update(features.to(dev), labels.to(dev), labels.to(dev) if mode == "faithful" else None)
        return acc.anchors.cpu(), acc.counts.cpu()

    (anchors_cpu, counts_cpu), (anchors_dev, counts_dev) = accumulate("cpu"), accumulate(device)
    torch.testing.assert_close(anchors_dev, anchors_cpu, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts_dev, counts_cpu)
    assert (counts_cpu > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_confusion_matrix_matches_the_cpu(device):
    g = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 19, (2, 64, 64), generator=g)
    target = torch.randint(0, 19, (2, 64, 64), generator=g)
    target[:, :5] = 255
    expected, got = ConfusionMatrix(19), ConfusionMatrix(19, device=device)
    expected.update(pred, target)
    got.update(pred.to(device), target.to(device))
    assert torch.equal(got.matrix.cpu(), expected.matrix)
    assert got.miou() == pytest.approx(expected.miou(), abs=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_one_cag_training_step_matches_the_cpu(device):
    """Network forward (eval and train mode), pseudo-labels, all losses and the backward pass of
    one CAG iteration on the benchmark's network (docs/method.md §3-§7). Dropout is set to 0: its
    masks come from a different generator on each device."""
    cfg = load_config(REPO / "configs" / "synthetic.yaml", params={"device": "cpu", "cag.delta_d": 0.5})
    torch.manual_seed(0)
    student = stages.make_model(cfg, torch.device("cpu"))
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    g = torch.Generator().manual_seed(4)
    xs, xt = torch.rand(2, 3, 48, 96, generator=g), torch.rand(2, 3, 48, 96, generator=g)
    ys = torch.randint(0, 19, (2, 48, 96), generator=g)
    with torch.no_grad():
        features, _ = student.eval()(xs)
    anchors = torch.stack([features.mean((0, 2, 3)) + torch.randn(features.shape[1], generator=g)
                           for _ in range(19)])
    counts = torch.ones(19)

    def step(dev):
        dev = torch.device(dev)
        model = copy.deepcopy(student).to(dev).train()
        teacher = copy.deepcopy(student).to(dev).eval()
        with torch.no_grad():
            eval_features, eval_logits = teacher(xs.to(dev))
        losses = stages.cag_train_step(cfg, model, teacher, anchors.to(dev), counts.to(dev), xs.to(dev), ys.to(dev),
                                       xt.to(dev), dev)
        losses["total"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).cpu()
        return eval_logits.cpu(), {k: float(v.detach()) for k, v in losses.items()}, grads

    (logits_cpu, losses_cpu, grads_cpu), (logits_dev, losses_dev, grads_dev) = step("cpu"), step(device)
    torch.testing.assert_close(logits_dev, logits_cpu, rtol=1e-4, atol=1e-4)
    assert 0.1 < losses_cpu["active_fraction"] < 0.9 and losses_cpu["ce_target"] > 0  # the target path ran
    assert losses_dev.keys() == losses_cpu.keys()
    for key, value in losses_cpu.items():
        assert losses_dev[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert grads_cpu.abs().sum() > 0
    torch.testing.assert_close(grads_dev, grads_cpu, rtol=1e-2, atol=1e-4)
