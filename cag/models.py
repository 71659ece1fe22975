"""The segmentation networks: DeepLab-v3+ (the released CAG-UDA network) and DeepLab-v2.

docs/method.md §11: CAG-UDA uses DeepLab-v3+ with a ResNet-101 backbone at output stride 16
(the paper says v2; the first author confirmed v3+ in ``RogerZhangzz/CAG_UDA#6``). DeepLab-v2 is kept for comparison with
the v2 baselines (docs/paper-vs-code.md row 1).

Every network returns ``(features, logits)`` from ``forward(x)``: ``features`` is the
penultimate feature map the category anchors live in, ``logits`` the classifier output at the
same resolution. ``model.output_stride`` is their stride relative to the input (a size ``s``
becomes ``ceil(s / output_stride)``), ``model.feature_dim`` their channel count.

Inputs are RGB in [0, 1] (``normalize="none"``, as the released code, docs/paper-vs-code.md
row 11) or ImageNet-normalised inside the model (``normalize="imagenet"``).

Module names reproduce the original key layout, so the authors' checkpoints load strictly
(``cag.checkpoint.load_cag_uda_checkpoint``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .checkpoint import CheckpointError, check_state_dict, load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTI_GRID = (1, 2, 4)


class DilatedBasicBlock(BasicBlock):
    """torchvision's BasicBlock with both 3x3 convs dilated (torchvision refuses dilation > 1)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, dilation=1):
        super().__init__(inplanes, planes, stride, downsample)
        for conv in (self.conv1, self.conv2):
            conv.dilation = conv.padding = (dilation, dilation)


# name: (block, blocks per stage, stage widths)
BACKBONES = {
    "resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512)),
    "resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet18": (DilatedBasicBlock, (2, 2, 2, 2), (64, 128, 256, 512)),
    "tiny": (DilatedBasicBlock, (1, 1, 1, 1), (16, 32, 64, 128)),
}

#: torchvision's ImageNet weight files per backbone: the name ``torchvision.models.<name>(weights="IMAGENET1K_V1")``
#: downloads into the torch hub cache, then torchvision's pre-0.13 name for its ImageNet file (the one the
#: released code's ``_load_pretrained_model`` fetches for ResNet-101). ``tiny`` has none.
IMAGENET_WEIGHT_FILES = {
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
}


def stage_layout(output_stride: int, depths, multi_grid: bool) -> tuple[tuple, list[list[int]]]:
    """Per-stage strides and per-block dilations of a ResNet at ``output_stride`` (16 or 8).

    docs/method.md §11: OS16 has strides [1, 2, 2, 1] and dilations [1, 1, 1, 2]; OS8 has
    [1, 2, 1, 1] and [1, 1, 2, 4]. With ``multi_grid``, layer4's block j gets its stage
    dilation times ``MULTI_GRID[j mod 3]`` (``_make_MG_unit``: 2/4/8 at OS16, 4/8/16 at OS8).
    """
    layouts = {16: ((1, 2, 2, 1), (1, 1, 1, 2)), 8: ((1, 2, 1, 1), (1, 1, 2, 4))}
    if output_stride not in layouts:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    strides, dilations = layouts[output_stride]
    per_block = [[dilation] * depth for dilation, depth in zip(dilations, depths)]
    if multi_grid:
        per_block[3] = [dilations[3] * MULTI_GRID[j % len(MULTI_GRID)] for j in range(depths[3])]
    return strides, per_block


def make_stage(block, inplanes: int, planes: int, dilations: list[int], stride: int) -> nn.Sequential:
    """One ResNet stage: block 0 carries the stride (in its 3x3 conv) and the 1x1 downsample."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    blocks = [block(inplanes, planes, stride, downsample, dilation=dilations[0])]
    blocks += [block(out, planes, dilation=dilation) for dilation in dilations[1:]]
    return nn.Sequential(*blocks)


class ResNetBackbone(nn.Module):
    """A dilated ResNet with torchvision's key layout (no ``fc``), returning (layer1, layer4).

    docs/method.md §11: 7x7/2 conv stem and 3x3/2 max-pool, stride in the 3x3 conv. Layer1
    (the low-level feature) is at stride 4, layer4 at ``output_stride``. On backbones whose
    layer4 has fewer than 3 blocks the multi-grid uses the first entries of (1, 2, 4).
    """

    def __init__(self, name="resnet101", output_stride=16, multi_grid=True):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
        self.name = name
        block, depths, widths = BACKBONES[name]
        strides, dilations = stage_layout(output_stride, depths, multi_grid)
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, (width, block_dilations, stride) in enumerate(zip(widths, dilations, strides)):
            self.add_module(f"layer{i + 1}", make_stage(block, inplanes, width, block_dilations, stride))
            inplanes = width * block.expansion
        self.low_level_channels = widths[0] * block.expansion
        self.out_channels = inplanes

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low_level = self.layer1(x)
        return low_level, self.layer4(self.layer3(self.layer2(low_level)))


class ImageNetNormalize(nn.Module):
    """(x - mean) / std with the ImageNet statistics; non-persistent buffers, no state-dict keys."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def input_normalization(normalize: str) -> nn.Module:
    """The input transform for ``normalize`` ("none" or "imagenet"; docs/paper-vs-code.md row 11)."""
    choices = {"none": nn.Identity, "imagenet": ImageNetNormalize}
    if normalize not in choices:
        raise ValueError(f"normalize must be one of {sorted(choices)}, got {normalize!r}")
    return choices[normalize]()


def conv_bn_relu(inplanes: int, planes: int, kernel_size: int = 1, dilation: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) + BN + ReLU, the unit of the ASPP and the decoder."""
    padding = dilation * (kernel_size // 2)
    return [nn.Conv2d(inplanes, planes, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]


class ASPPBranch(nn.Module):
    """One ASPP branch (keys ``atrous_conv``, ``bn``): a 1x1 or dilated 3x3 conv + BN + ReLU."""

    def __init__(self, inplanes, planes, kernel_size, dilation):
        super().__init__()
        self.atrous_conv, self.bn, self.relu = conv_bn_relu(inplanes, planes, kernel_size, dilation)

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """DeepLab-v3+ atrous spatial pyramid pooling (docs/method.md §11).

    Five branches (1x1; three 3x3 at ``rates``; global pool -> 1x1 -> BN -> ReLU, broadcast back
    with bilinear align_corners=True), concatenated, then 1x1 -> BN -> ReLU -> Dropout(0.5).
    In train mode the pooled branch's BN sees one value per image, so it needs batch >= 2.
    """

    def __init__(self, inplanes, planes=256, rates=(6, 12, 18)):
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP needs three atrous rates, got {rates}")
        self.aspp1 = ASPPBranch(inplanes, planes, 1, 1)
        self.aspp2, self.aspp3, self.aspp4 = (ASPPBranch(inplanes, planes, 3, r) for r in rates)
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(inplanes, planes))
        self.conv1, self.bn1, self.relu = conv_bn_relu(5 * planes, planes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        pooled = F.interpolate(self.global_avg_pool(x), size=x.shape[2:], mode="bilinear",
                               align_corners=True)
        branches = [self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), pooled]
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(branches, dim=1)))))


class Decoder(nn.Module):
    """DeepLab-v3+ decoder (docs/method.md §11), returning (features, logits).

    Low-level feature -> 1x1 conv to ``low_level_dim`` -> BN -> ReLU; the ASPP output upsampled
    to it (bilinear, align_corners=True) and concatenated; ``last_conv`` = 3x3 conv, BN, ReLU,
    Dropout(0.5), 3x3 conv, BN, ReLU, Dropout(0.1), 1x1 classifier with bias. ``features`` is
    ``last_conv`` without its classifier (``cls_feat``, the anchor feature space).
    """

    def __init__(self, num_classes, low_level_channels, aspp_dim=256, feature_dim=256, low_level_dim=48):
        super().__init__()
        self.conv1, self.bn1, self.relu = conv_bn_relu(low_level_channels, low_level_dim)
        self.last_conv = nn.Sequential(
            *conv_bn_relu(aspp_dim + low_level_dim, feature_dim, 3), nn.Dropout(0.5),
            *conv_bn_relu(feature_dim, feature_dim, 3), nn.Dropout(0.1),
            nn.Conv2d(feature_dim, num_classes, 1),
        )

    def forward(self, x, low_level):
        low_level = self.relu(self.bn1(self.conv1(low_level)))
        x = F.interpolate(x, size=low_level.shape[2:], mode="bilinear", align_corners=True)
        features = self.last_conv[:-1](torch.cat([x, low_level], dim=1))
        return features, self.last_conv[-1](features)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_in) convs, zero biases, BN weight 1 and bias 0.

    docs/method.md §11 (``init_weights`` of the released code).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def load_backbone_weights(backbone: ResNetBackbone, path) -> None:
    """Load a local torchvision ResNet state dict file into ``backbone`` strictly, ``fc.*`` dropped.

    docs/method.md §11: the ImageNet weights (``resnet101-5d3b4d8f.pth``) are copied by key
    and ``fc`` is dropped. Never downloads; the file is read with the safe loader
    (:func:`cag.checkpoint.load_checkpoint`, ``weights_only``). Anything but a state dict whose
    keys and shapes are exactly the backbone's raises CheckpointError naming the file, the first
    differing keys and shapes, and the torchvision file expected (:data:`IMAGENET_WEIGHT_FILES`).
    """
    files = IMAGENET_WEIGHT_FILES.get(getattr(backbone, "name", None))
    expected = (f"torchvision's ImageNet {backbone.name} weights ({files[0]} or {files[1]})" if files
                else "a torchvision ResNet state dict of this backbone")
    state_dict = load_checkpoint(path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: expected {expected}, found {type(state_dict).__name__}")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    try:
        check_state_dict(state_dict, backbone.state_dict(), path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; expected {expected}") from None
    backbone.load_state_dict(state_dict, strict=True)


class DeepLabV3Plus(nn.Module):
    """DeepLab-v3+, the released CAG-UDA network (docs/method.md §11): ``(features, logits)``.

    ``features`` is the ``feature_dim``-channel decoder output after the second 3x3
    conv+BN+ReLU+Dropout(0.1) (``cls_feat``, non-negative; dropout noise in train mode),
    ``logits`` the 1x1 classifier output; both at the low-level (layer1) resolution, i.e.
    ``ceil(H/4) x ceil(W/4)``, as in the released code (no final upsample).

    ``output_stride`` (16 or 8) is the backbone's; ``model.output_stride`` is then 4 (the
    features'), and ``model.backbone_stride`` keeps the argument. ``aspp_rates`` defaults to
    (6, 12, 18) at OS16 and (12, 24, 36) at OS8, as the original ASPP. Train-mode BN needs
    batch >= 2 (the ASPP image-pooling branch). ``DeepLabV3Plus(19).state_dict()`` has exactly
    the 680 keys and shapes of the authors' checkpoints.
    """

    def __init__(self, num_classes=19, output_stride=16, backbone="resnet101", pretrained_backbone=None,
                 normalize="none", feature_dim=256, aspp_rates=None, low_level_dim=48):
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.output_stride = 4
        self.backbone_stride = output_stride
        self.input_norm = input_normalization(normalize)
        self.backbone = ResNetBackbone(backbone, output_stride, multi_grid=True)
        aspp_rates = aspp_rates or tuple(rate * 16 // output_stride for rate in (6, 12, 18))
        self.aspp = ASPP(self.backbone.out_channels, feature_dim, aspp_rates)
        self.decoder = Decoder(num_classes, self.backbone.low_level_channels, aspp_dim=feature_dim,
                               feature_dim=feature_dim, low_level_dim=low_level_dim)
        init_weights(self)
        if pretrained_backbone is not None:
            load_backbone_weights(self.backbone, pretrained_backbone)

    @property
    def classifier(self) -> nn.Conv2d:
        """The 1x1 classifier that maps ``features`` to ``logits``."""
        return self.decoder.last_conv[-1]

    def forward(self, x):
        low_level, x = self.backbone(self.input_norm(x))
        return self.decoder(self.aspp(x), low_level)


class ASPPClassifier(nn.Module):
    """DeepLab-v2 classifier: a sum of dilated 3x3 convs with bias (AdaptSegNet's ``Classifier_Module``).

    Weights are N(0, 0.01) and biases 0, as in the AdaptSegNet/ADVENT/ProDA lineage.
    """

    def __init__(self, inplanes, num_classes, rates=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=rate, dilation=rate) for rate in rates)
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return sum(conv(x) for conv in self.conv2d_list)


class DeepLabV2(nn.Module):
    """DeepLab-v2 (ResNet at output stride 8 + ASPP classifier), returning (features, logits).

    Backbone strides [1, 2, 1, 1], dilations [1, 1, 2, 4], no multi-grid (docs/paper-vs-code.md
    row 1: the paper's stated network, kept for fair comparison). The classifier reads
    layer4's output directly, so that post-ReLU map (``feature_dim`` = 2048 for ResNet-101) is
    the only penultimate feature and the anchor feature space. Features and logits are at
    stride 8 (``ceil(H/8) x ceil(W/8)``).
    """

    def __init__(self, num_classes=19, backbone="resnet101", pretrained_backbone=None, normalize="none",
                 aspp_rates=(6, 12, 18, 24)):
        super().__init__()
        self.num_classes = num_classes
        self.output_stride = 8
        self.input_norm = input_normalization(normalize)
        self.backbone = ResNetBackbone(backbone, output_stride=8, multi_grid=False)
        self.feature_dim = self.backbone.out_channels
        init_weights(self.backbone)
        self.classifier = ASPPClassifier(self.feature_dim, num_classes, aspp_rates)
        if pretrained_backbone is not None:
            load_backbone_weights(self.backbone, pretrained_backbone)

    def forward(self, x):
        _, features = self.backbone(self.input_norm(x))
        return features, self.classifier(features)


ARCHITECTURES = {"deeplabv3plus": DeepLabV3Plus, "deeplabv2": DeepLabV2}


def build_model(arch="deeplabv3plus", num_classes=19, backbone="resnet101", **kwargs) -> nn.Module:
    """The network named ``arch``: "deeplabv3plus" (docs/method.md §11) or "deeplabv2" (docs/paper-vs-code.md row 1)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, backbone=backbone, **kwargs)
