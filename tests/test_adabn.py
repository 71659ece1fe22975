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


# ----------------------------------------------------------------------------- saved models


def _tiny_cfg(bench, *extra):
    from pathlib import Path

    from cag.config import load_config

    repo = Path(__file__).resolve().parents[1]
    return load_config(repo / "configs" / "synthetic.yaml", [
        f"data.source_root={bench / 'source'}", f"data.target_root={bench / 'target'}", "data.synthetic.root=null",
        "model.feature_dim=16", "eval.batch_size=4", "quiet=true", "device=cpu", *extra])


def _saved_model(cfg, path):
    from cag.checkpoint import save_checkpoint
    from cag.stages import make_model

    torch.manual_seed(0)
    model = make_model(cfg, torch.device("cpu"))
    save_checkpoint(path, {"format": "cag-model/1", "model": model.state_dict()})
    return model


def _statistics(state):
    return {k: v for k, v in state.items() if "running_" in k}


def test_adapt_checkpoint_re_estimates_on_the_target_train_images(bench, tmp_path):
    """The adapted file holds the source weights with the BatchNorm statistics of the target *train*
    images (evaluation transform, batches of eval.batch_size); adapting on val gives other ones."""
    from cag.adabn import adapt_checkpoint
    from cag.checkpoint import load_checkpoint
    from cag.data.datasets import collate
    from cag.stages import eval_dataset, make_model

    cfg = _tiny_cfg(bench)
    source = _saved_model(cfg, tmp_path / "source.pt")
    out = adapt_checkpoint(cfg, tmp_path / "source.pt", tmp_path / "adapted" / "last.pt")
    adapted = load_checkpoint(out)
    assert adapted["format"] == "cag-model/1" and adapted["adabn"]["split"] == "train" and adapted["adabn"]["images"] == 8

    expected = make_model(cfg, torch.device("cpu"), tmp_path / "source.pt")
    loader = torch.utils.data.DataLoader(eval_dataset(cfg, "train"), batch_size=4, collate_fn=collate)
    adapt_batchnorm(expected, [batch["image"] for batch in loader])
    want = _statistics(expected.state_dict())
    assert want and all(torch.allclose(adapted["model"][k], v, atol=1e-6) for k, v in want.items())
    for key, value in source.state_dict().items():  # every weight as it was
        if "running_" not in key and "num_batches" not in key:
            assert torch.equal(adapted["model"][key], value), key

    on_val = load_checkpoint(adapt_checkpoint(cfg, tmp_path / "source.pt", tmp_path / "val.pt", split="val"))
    assert any(not torch.allclose(on_val["model"][k], v, atol=1e-4) for k, v in want.items())


def test_adapt_checkpoint_refuses_a_checkpoint_of_another_network(bench, tmp_path):
    from cag.adabn import adapt_checkpoint
    from cag.checkpoint import CheckpointError

    _saved_model(_tiny_cfg(bench, "model.feature_dim=8"), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt"):
        adapt_checkpoint(_tiny_cfg(bench), tmp_path / "other.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
