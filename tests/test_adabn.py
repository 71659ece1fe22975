"""cag.adabn: BatchNorm statistics re-estimated on target images, nothing else changed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cag.adabn import adapt_batchnorm, batchnorm_layers


def toy(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Dropout2d(dropout), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1))


def test_the_statistics_are_those_of_the_target_activations():
    model = toy()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    target = torch.randn(8, 3, 5, 6) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + 3.0
    adapt_batchnorm(model, [target[:4], target[4:]])  # two equal batches
    bn = model[2]
    activations = model[0](target)  # what the BatchNorm layer sees (no dropout)
    per_batch = [activations[:4], activations[4:]]
    mean = activations.mean(dim=(0, 2, 3))
    var = torch.stack([b.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for b in per_batch]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training and not bn.training
    for key, value in weights.items():  # no weight moved
        assert torch.equal(model.state_dict()[key], value), key


def test_dropout_stays_off_and_labels_are_not_read():
    plain, with_dropout = toy(), toy(dropout=0.9)
    images = torch.randn(6, 3, 4, 4)
    labels = torch.full((6, 4, 4), 255)
    adapt_batchnorm(plain, [images])
    adapt_batchnorm(with_dropout, [(images, labels)])  # a labelled dataset's batches
    assert torch.allclose(plain[2].running_mean, with_dropout[2].running_mean, atol=1e-6)
    assert torch.allclose(plain[2].running_var, with_dropout[2].running_var, atol=1e-6)


def test_old_statistics_are_forgotten_and_outputs_change_accordingly():
    model = toy()
    source, target = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4) * 3 + 5
    adapt_batchnorm(model, [source])
    before = model(target)
    adapt_batchnorm(model, [target])
    after = model(target)
    with torch.no_grad():
        normalised = model[3](model[2](model[0](target)))
    assert not torch.allclose(before, after)
    assert abs(float(normalised.mean())) < 1.0  # target activations now centred by the BN layer
    assert len(batchnorm_layers(model)) == 1


def test_no_batchnorm_or_no_images_is_an_error():
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Conv2d(3, 3, 1), [torch.zeros(1, 3, 2, 2)])
    model = toy()
    adapt_batchnorm(model, [torch.randn(4, 3, 4, 4) + 2])
    kept = model[2].running_mean.clone()
    with pytest.raises(ValueError, match="no images"):
        adapt_batchnorm(model, [])
    assert torch.equal(model[2].running_mean, kept)  # the statistics it had are kept
