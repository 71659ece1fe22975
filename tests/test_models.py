"""The networks: the released key layout, strides and shapes, and a functional oracle.

The oracle re-computes DeepLab-v3+ R101 OS16 from a state dict with plain ``torch.nn.functional``
calls and the numbers of docs/method.md §11 (strides, dilations, multi-grid, ASPP rates,
align_corners=True), independently of the module code.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from cag.checkpoint import CheckpointError
from cag.models import DeepLabV2, DeepLabV3Plus, build_model

RELEASED_KEYS = 680
RELEASED_VALUES = 59_453_444


def shared_reference() -> Path:
    return Path(os.environ.get("CAG_SHARED_REFERENCE",
                               Path(__file__).resolve().parents[2] / "shared" / "reference"))


def meta_model(cls=DeepLabV3Plus, **kwargs):
    with torch.device("meta"):
        return cls(**kwargs)


def test_released_layout_self_contained():
    sd = meta_model(num_classes=19).state_dict()
    assert len(sd) == RELEASED_KEYS
    assert sum(t.numel() for t in sd.values()) == RELEASED_VALUES
    expected = {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "aspp.aspp4.atrous_conv.weight": (256, 2048, 3, 3),
        "aspp.global_avg_pool.2.running_var": (256,),
        "aspp.conv1.weight": (256, 1280, 1, 1),
        "decoder.conv1.weight": (48, 256, 1, 1),
        "decoder.last_conv.0.weight": (256, 304, 3, 3),
        "decoder.last_conv.5.num_batches_tracked": (),
        "decoder.last_conv.8.bias": (19,),
    }
    assert {k: tuple(sd[k].shape) for k in expected} == expected


def test_released_layout_matches_authors_key_file():
    path = shared_reference() / "original-artifacts" / "deeplab_v3plus_state_dict_keys.json"
    if not path.is_file():
        pytest.skip(f"reference key file not available: {path}")
    released = json.loads(path.read_text())
    ours = {k: list(v.shape) for k, v in meta_model(num_classes=19).state_dict().items()}
    assert ours == released


def test_imagenet_normalisation_adds_no_state_dict_keys():
    assert meta_model(normalize="imagenet").state_dict().keys() == meta_model().state_dict().keys()


def dilations(layer):
    return [block.conv2.dilation[0] for block in layer]


def test_output_stride_16_layout_is_the_released_one():
    model = meta_model()
    backbone = model.backbone
    assert [layer[0].conv2.stride[0] for layer in
            (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)] == [1, 2, 2, 1]
    assert dilations(backbone.layer3) == [1] * 23
    assert dilations(backbone.layer4) == [2, 4, 8]
    assert [getattr(model.aspp, f"aspp{i}").atrous_conv.dilation[0] for i in (2, 3, 4)] == [6, 12, 18]


def test_output_stride_8_option():
    model = meta_model(output_stride=8)
    assert model.backbone.layer3[0].conv2.stride[0] == 1
    assert dilations(model.backbone.layer3) == [2] * 23
    assert dilations(model.backbone.layer4) == [4, 8, 16]
    assert [getattr(model.aspp, f"aspp{i}").atrous_conv.dilation[0] for i in (2, 3, 4)] == [12, 24, 36]
    assert model.output_stride == 4 and model.backbone_stride == 8


def test_deeplabv2_layout():
    model = meta_model(DeepLabV2, num_classes=7)
    assert model.backbone.layer4[0].conv2.stride[0] == 1
    assert dilations(model.backbone.layer3) == [2] * 23
    assert dilations(model.backbone.layer4) == [4, 4, 4]
    assert [conv.dilation[0] for conv in model.classifier.conv2d_list] == [6, 12, 18, 24]
    assert (model.feature_dim, model.num_classes, model.output_stride) == (2048, 7, 8)


SMALL_HEAD = {"deeplabv3plus": {"feature_dim": 32, "aspp_rates": (1, 2, 3)}, "deeplabv2": {}}


SHAPE_CASES = [(arch, backbone, size) for arch in SMALL_HEAD for backbone in ("tiny", "resnet18")
               for size in ((64, 96), (65, 97))] + [(arch, "resnet50", (65, 97)) for arch in SMALL_HEAD]


@pytest.mark.parametrize("arch, backbone, size", SHAPE_CASES)
def test_shapes_and_strides(arch, backbone, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, backbone=backbone, **SMALL_HEAD[arch]).eval()
    with torch.no_grad():
        features, logits = model(torch.rand(2, 3, *size))
    stride = {"deeplabv3plus": 4, "deeplabv2": 8}[arch]
    grid = [math.ceil(s / stride) for s in size]
    assert model.output_stride == stride
    assert features.shape == (2, model.feature_dim, *grid)
    assert logits.shape == (2, 5, *grid)
    assert features.min() >= 0
    torch.testing.assert_close(model.classifier(features), logits)


def test_small_backbone_channels_are_derived():
    model = DeepLabV3Plus(3, backbone="tiny", feature_dim=16, low_level_dim=8)
    assert model.backbone.low_level_channels == 16 and model.backbone.out_channels == 128
    assert model.decoder.conv1.weight.shape == (8, 16, 1, 1)
    assert model.aspp.aspp1.atrous_conv.weight.shape == (16, 128, 1, 1)
    assert model.decoder.last_conv[0].weight.shape == (16, 16 + 8, 3, 3)
    assert DeepLabV2(3, backbone="resnet18").feature_dim == 512


def test_deeplabv2_logits_are_the_sum_of_four_dilated_convs():
    torch.manual_seed(0)
    model = DeepLabV2(4, backbone="tiny").eval()
    with torch.no_grad():
        features, logits = model(torch.rand(1, 3, 64, 80))
        expected = sum(F.conv2d(features, conv.weight, conv.bias, padding=rate, dilation=rate)
                       for conv, rate in zip(model.classifier.conv2d_list, (6, 12, 18, 24)))
    torch.testing.assert_close(logits, expected)


def test_initialisation_and_determinism():
    torch.manual_seed(3)
    a = DeepLabV3Plus(4, backbone="tiny", feature_dim=16).eval()
    torch.manual_seed(3)
    b = DeepLabV3Plus(4, backbone="tiny", feature_dim=16).eval()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    bn = a.aspp.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and not bn.bias.any()
    conv = a.aspp.conv1.weight  # Kaiming normal, fan_in = 5 * 16: std sqrt(2 / 80)
    assert conv.std().item() == pytest.approx(math.sqrt(2 / 80), rel=0.15)
    assert not a.classifier.bias.any()
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        first, again = a(x), a(x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_features_are_taken_after_the_last_dropout():
    """``cls_feat`` follows Dropout(0.1): in train mode each value is 0 or its eval value / 0.9."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(4, backbone="tiny", feature_dim=16).eval()
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        clean, _ = model(x)
        model.decoder.last_conv[7].train()
        noisy, logits = model(x)
    dropped = noisy == 0
    assert (dropped & (clean > 0)).any()
    torch.testing.assert_close(noisy[~dropped], clean[~dropped] / 0.9)
    torch.testing.assert_close(model.classifier(noisy), logits)


def test_imagenet_normalisation_inside_the_model():
    torch.manual_seed(0)
    plain = DeepLabV3Plus(3, backbone="tiny", feature_dim=16).eval()
    normed = DeepLabV3Plus(3, backbone="tiny", feature_dim=16, normalize="imagenet").eval()
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 40, 40)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x)[1], plain((x - mean) / std)[1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown arch 'pspnet'"):
        build_model("pspnet")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        meta_model(backbone="vgg16")
    with pytest.raises(ValueError, match="output_stride must be 8 or 16"):
        meta_model(output_stride=32)
    with pytest.raises(ValueError, match="normalize must be one of"):
        meta_model(normalize="caffe")


# --- the functional oracle (docs/method.md §11) -------------------------------------------

def _conv(x, sd, name, stride=1, dilation=1):
    weight = sd[f"{name}.weight"]
    padding = dilation * (weight.shape[-1] // 2)
    return F.conv2d(x, weight, sd.get(f"{name}.bias"), stride, padding, dilation)


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], False, 0.0, 1e-5)


def _conv_bn_relu(x, sd, conv, bn, stride=1, dilation=1):
    return F.relu(_bn(_conv(x, sd, conv, stride, dilation), sd, bn))


def _bottleneck(x, sd, name, stride, dilation):
    out = _conv_bn_relu(x, sd, f"{name}.conv1", f"{name}.bn1")
    out = _conv_bn_relu(out, sd, f"{name}.conv2", f"{name}.bn2", stride, dilation)
    out = _bn(_conv(out, sd, f"{name}.conv3"), sd, f"{name}.bn3")
    if f"{name}.downsample.0.weight" in sd:
        x = _bn(_conv(x, sd, f"{name}.downsample.0", stride), sd, f"{name}.downsample.1")
    return F.relu(out + x)


def reference_forward(sd, x):
    """DeepLab-v3+ R101 OS16 with multi-grid (1, 2, 4), written from docs/method.md §11."""
    x = F.max_pool2d(_conv_bn_relu(x, sd, "backbone.conv1", "backbone.bn1", stride=2), 3, 2, 1)
    plan = {1: (1, [1] * 3), 2: (2, [1] * 4), 3: (2, [1] * 23), 4: (1, [2, 4, 8])}
    for stage, (stride, block_dilations) in plan.items():
        for i, dilation in enumerate(block_dilations):
            x = _bottleneck(x, sd, f"backbone.layer{stage}.{i}", stride if i == 0 else 1, dilation)
        if stage == 1:
            low_level = x
    branches = [_conv_bn_relu(x, sd, f"aspp.aspp{i}.atrous_conv", f"aspp.aspp{i}.bn", dilation=rate)
                for i, rate in ((1, 1), (2, 6), (3, 12), (4, 18))]
    pooled = _conv_bn_relu(x.mean((2, 3), keepdim=True), sd,
                           "aspp.global_avg_pool.1", "aspp.global_avg_pool.2")
    branches.append(pooled.expand(-1, -1, *x.shape[2:]))
    aspp = _conv_bn_relu(torch.cat(branches, 1), sd, "aspp.conv1", "aspp.bn1")
    low_level = _conv_bn_relu(low_level, sd, "decoder.conv1", "decoder.bn1")
    aspp = F.interpolate(aspp, size=low_level.shape[2:], mode="bilinear", align_corners=True)
    h = _conv_bn_relu(torch.cat([aspp, low_level], 1), sd, "decoder.last_conv.0", "decoder.last_conv.1")
    h = _conv_bn_relu(h, sd, "decoder.last_conv.4", "decoder.last_conv.5")
    return h, _conv(h, sd, "decoder.last_conv.8")


def randomise_batchnorm(model, seed=0):
    """Random affine parameters and running statistics, so that eval-mode BN is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor in (module.weight, module.running_var):
                    tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
                for tensor in (module.bias, module.running_mean):
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def test_v3plus_r101_matches_the_functional_oracle():
    torch.manual_seed(0)
    r101 = DeepLabV3Plus(19).eval()
    randomise_batchnorm(r101)
    x = torch.rand(1, 3, 129, 161, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, logits = r101(x)
        ref_features, ref_logits = reference_forward(r101.state_dict(), x)
    assert logits.shape == (1, 19, 33, 41)
    scale = ref_logits.abs().max().item()
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5 * scale)


# --- ImageNet backbone weights ------------------------------------------------------------------

def test_pretrained_resnet101_lands_in_every_backbone_tensor(tmp_path):
    torchvision_sd = torchvision.models.resnet101(weights=None).state_dict()
    old_style = {k: v for k, v in torchvision_sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet101.pth"
    torch.save(old_style, path)
    model = DeepLabV3Plus(19, pretrained_backbone=path)
    backbone_sd = model.backbone.state_dict()
    assert len(backbone_sd) == len([k for k in torchvision_sd if not k.startswith("fc.")])
    for name, tensor in backbone_sd.items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, torchvision_sd[name]), name


def test_pretrained_backbone_mismatch_names_the_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    DeepLabV2(3, backbone="resnet18", pretrained_backbone=path)
    with pytest.raises(CheckpointError) as err:
        DeepLabV3Plus(3, backbone="tiny", feature_dim=16, pretrained_backbone=path)
    message = str(err.value)
    assert str(path) in message
    assert "unexpected keys: layer1.1.conv1.weight" in message
    assert "conv1.weight (file [64, 3, 7, 7], model [16, 3, 7, 7])" in message


def test_pretrained_backbone_missing_keys_are_named(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    del sd["layer4.1.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: layer4\.1\.conv2\.weight"):
        DeepLabV3Plus(3, backbone="resnet18", feature_dim=16, pretrained_backbone=path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        DeepLabV3Plus(3, backbone="tiny", pretrained_backbone=tmp_path / "nowhere.pth")
