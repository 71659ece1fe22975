"""Full-resolution evaluation (cag.evaluate, docs/method.md §12) against hand-derived values.

The models here are stubs whose logits are known exactly, so the confusion matrix, the
flip average and the multi-scale resizing can be written down by hand.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cag.evaluate import evaluate_model, predict_probs


class EchoModel(nn.Module):
    """Predicts, at every pixel, the class written in channel 0 of the image (logit 10 vs 0);
    a BatchNorm records whether the model ran in train or eval mode."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(1)
        self.calls = []

    def forward(self, x):
        self.calls.append(self.training)
        classes = x[:, 0].round().long()
        logits = 10.0 * nn.functional.one_hot(classes, self.num_classes).permute(0, 3, 1, 2).float()
        return x, logits


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def two_images():
    """Image 1 predicts class 0 in columns 0-1 and class 1 in columns 2-3 over a label of class 0
    whose last row is ignored; image 2 predicts class 2 over a label of class 2."""
    pred1 = torch.tensor([0, 0, 1, 1]).repeat(4, 1)
    label1 = torch.zeros(4, 4, dtype=torch.long)
    label1[3] = 255
    pred2 = torch.full((4, 4), 2)
    label2 = torch.full((4, 4), 2, dtype=torch.long)
    return Items([{"image": p.float().expand(3, 4, 4).clone(), "label": l} for p, l in ((pred1, label1),
                                                                                          (pred2, label2))])


@pytest.mark.parametrize("batch_size,num_workers", [(1, 0), (2, 0), (1, 2)])
def test_confusion_matrix_over_a_split_is_the_hand_count(batch_size, num_workers):
    cm = evaluate_model(EchoModel(3), two_images(), 3, "cpu", batch_size=batch_size, quiet=True,
                        num_workers=num_workers)
    # rows truth, columns prediction: 3 counted rows x 2 columns each of (0 -> 0) and (0 -> 1)
    assert cm.matrix.tolist() == [[6, 6, 0], [0, 0, 0], [0, 0, 16]]
    # IoU: class 0 = 6 / (6 + 6), class 1 = 0 / 6 (predicted, never true), class 2 = 16 / 16
    assert cm.iou().tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert cm.miou() == pytest.approx(0.5)


def test_max_images_scores_only_the_first_images():
    cm = evaluate_model(EchoModel(3), two_images(), 3, "cpu", max_images=1, quiet=True)
    assert cm.matrix.tolist() == [[6, 6, 0], [0, 0, 0], [0, 0, 0]]


def test_evaluation_runs_in_eval_mode_and_restores_every_module_mode():
    model = EchoModel(3)
    model.train()
    model.bn.eval()  # a frozen-BN model: the mixed state must come back as it was
    evaluate_model(model, two_images(), 3, "cpu", quiet=True)
    assert model.calls and not any(model.calls)
    assert model.training and not model.bn.training


class RampModel(nn.Module):
    """Two-class logits that grow with the column index for class 1: (0, k * column)."""

    def forward(self, x):
        width = x.shape[-1]
        ramp = torch.arange(width, dtype=torch.float32).expand(x.shape[0], 1, x.shape[-2], width)
        return x, torch.cat([torch.zeros_like(ramp), ramp], 1)


def test_flip_averages_the_softmax_of_the_image_and_its_mirror():
    image = torch.zeros(1, 3, 2, 3)
    plain = predict_probs(RampModel(), image, (2, 3))
    flipped = predict_probs(RampModel(), image, (2, 3), flip=True)
    # class-1 probability at column j: sigmoid(j) unflipped; the mirrored run, flipped back,
    # gives sigmoid(2 - j); the average is symmetric about the middle column
    sig = torch.sigmoid(torch.tensor([0.0, 1.0, 2.0]))
    assert plain[0, 1, 0].tolist() == pytest.approx(sig.tolist())
    assert flipped[0, 1, 0].tolist() == pytest.approx(((sig + sig.flip(0)) / 2).tolist())
    assert torch.allclose(flipped.sum(1), torch.ones(1, 2, 3))


def test_multi_scale_resizes_each_prediction_to_the_label_size_before_averaging():
    model = EchoModel(3)
    image = torch.zeros(1, 3, 4, 4)  # class 0 everywhere, at every scale
    probs = predict_probs(model, image, (8, 8), scales=(0.5, 1.0, 1.5))
    assert probs.shape == (1, 3, 8, 8)
    assert torch.equal(probs.argmax(1), torch.zeros(1, 8, 8, dtype=torch.long))
    expected = torch.softmax(torch.tensor([10.0, 0.0, 0.0]), 0)
    assert probs[0, :, 3, 5].tolist() == pytest.approx(expected.tolist())
    assert len(model.calls) == 3
