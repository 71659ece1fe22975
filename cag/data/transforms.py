"""Joint image/label transforms on tensors: the released training augmentation.

docs/data.md §6: GTA5 is first resized to 1914x1052 (bilinear image,
nearest label); training then draws a new width ``int(U(0.5, 1.5) * 2200)`` keeping the aspect
ratio, crops 896x512 (W x H) at a random position and flips horizontally with p = 0.5. Images
are scaled to [0, 1] with no mean/std (the released normalisation); ImageNet mean/std is an option.

Every transform is a small class called as ``transform(image, label=None, generator=None)`` and
returning ``(image, label)``:

- ``image`` is a [3, H, W] tensor, uint8 until ``ToFloat`` and float32 after it;
- ``label`` is an int64 [H, W] train-id map (255 = ignore) or ``None`` for unlabeled data;
- every random draw comes from ``generator`` (a ``torch.Generator``; ``None`` uses torch's global
  generator), so the same generator seed gives the same output.

Sizes are given as (width, height), the order the released configs and PIL use.
Resizing uses bilinear interpolation with antialiasing for images (close to PIL's
``Image.BILINEAR``, within one grey level) and ``nearest-exact`` for labels (equal to PIL's
``Image.NEAREST``), so a label never receives an id that was not in it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("none", "imagenet")


def _size_wh(image: torch.Tensor) -> tuple[int, int]:
    return int(image.shape[-1]), int(image.shape[-2])


def resize_image(image: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of a [3, H, W] image to ``size_wh``, keeping its dtype.

    uint8 images are rounded and clamped back to uint8, like PIL's ``Image.BILINEAR``
    (docs/data.md §6).
    """
    width, height = size_wh
    resized = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )[0]
    if image.dtype == torch.uint8:
        return resized.round().clamp(0, 255).to(torch.uint8)
    return resized.to(image.dtype)


def resize_label(label: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of an [H, W] label map to ``size_wh``; the output holds only input ids.

    ``nearest-exact`` samples pixel centres, as PIL's ``Image.NEAREST`` does (docs/data.md §6).
    """
    width, height = size_wh
    resized = F.interpolate(label[None, None].float(), size=(height, width), mode="nearest-exact")
    return resized[0, 0].to(label.dtype)


def _resize_pair(image, label, size_wh):
    if _size_wh(image) == tuple(size_wh):
        return image, label
    return resize_image(image, size_wh), None if label is None else resize_label(label, size_wh)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in [low, high], both ends included (Python's ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    def __call__(self, image, label=None, generator=None):
        for transform in self.transforms:
            image, label = transform(image, label, generator=generator)
        return image, label

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Resize image (bilinear) and label (nearest) to a fixed ``size_wh``.

    The released GTA5 loader resizes every frame to 1914x1052, which also fixes the few GTA5
    frames with other sizes (docs/data.md §6). A frame already at ``size_wh`` is returned as is.
    With ``keep_label_size=True`` only the image is resized: evaluation scores predictions
    upsampled to the label's own resolution (docs/method.md §12).
    """

    def __init__(self, size_wh: tuple[int, int], keep_label_size: bool = False):
        self.size_wh = (int(size_wh[0]), int(size_wh[1]))
        self.keep_label_size = bool(keep_label_size)

    def __call__(self, image, label=None, generator=None):
        if self.keep_label_size:
            return _resize_pair(image, None, self.size_wh)[0], label
        return _resize_pair(image, label, self.size_wh)

    def __repr__(self) -> str:
        return f"Resize(size_wh={self.size_wh}, keep_label_size={self.keep_label_size})"


class RandomScaleWidth:
    """Resize to width ``int(U(*scale) * base_width)``, keeping the aspect ratio.

    The released ``RandomSized(2200)``: ``w = int(U(0.5, 1.5) * 2200)`` and
    ``h = int(w / (W / H))`` (docs/data.md §6, step 2).
    """

    def __init__(self, base_width: int = 2200, scale: tuple[float, float] = (0.5, 1.5)):
        self.base_width = int(base_width)
        self.scale = (float(scale[0]), float(scale[1]))

    def output_size(self, size_wh: tuple[int, int], generator=None) -> tuple[int, int]:
        """The (width, height) drawn for an input of ``size_wh``."""
        aspect = size_wh[0] / size_wh[1]
        width = int(_uniform(*self.scale, generator) * self.base_width)
        return width, int(width / aspect)

    def __call__(self, image, label=None, generator=None):
        return _resize_pair(image, label, self.output_size(_size_wh(image), generator))

    def __repr__(self) -> str:
        return f"RandomScaleWidth(base_width={self.base_width}, scale={self.scale})"


class RandomCrop:
    """Crop ``size_wh`` at a uniformly random position (docs/data.md §6, step 3).

    As in the released code, an input narrower or shorter than the crop is not padded: it is
    resized (bilinear image, nearest label) to exactly ``size_wh``, which changes its aspect
    ratio. With the released scales (width >= 1100 for a 896x512 crop) this never happens.
    """

    def __init__(self, size_wh: tuple[int, int] = (896, 512)):
        self.size_wh = (int(size_wh[0]), int(size_wh[1]))

    def __call__(self, image, label=None, generator=None):
        width, height = _size_wh(image)
        crop_w, crop_h = self.size_wh
        if width < crop_w or height < crop_h:
            return _resize_pair(image, label, self.size_wh)
        x0 = _randint(0, width - crop_w, generator)
        y0 = _randint(0, height - crop_h, generator)
        image = image[..., y0:y0 + crop_h, x0:x0 + crop_w]
        return image, None if label is None else label[y0:y0 + crop_h, x0:x0 + crop_w]

    def __repr__(self) -> str:
        return f"RandomCrop(size_wh={self.size_wh})"


class RandomHorizontalFlip:
    """Mirror image and label left-right with probability ``p`` (docs/data.md §6, step 4)."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image, label=None, generator=None):
        if float(torch.rand((), generator=generator)) >= self.p:
            return image, label
        return image.flip(-1), None if label is None else label.flip(-1)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToFloat:
    """uint8 image to float32 in [0, 1]; optionally ImageNet mean/std normalised.

    ``normalize="none"`` is the released normalisation (divide by 255, zero mean, unit std;
    docs/data.md §6); ``"imagenet"`` then applies (x - mean) / std with
    mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). The label is unchanged.
    """

    def __init__(self, normalize: str = "none"):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {normalize!r}")
        self.normalize = normalize

    def __call__(self, image, label=None, generator=None):
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if self.normalize == "imagenet":
            mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
            image = (image - mean) / std
        return image, label

    def __repr__(self) -> str:
        return f"ToFloat(normalize={self.normalize!r})"


def train_transform(
    resize: tuple[int, int] | None = None,
    base_width: int | None = 2200,
    scale: tuple[float, float] = (0.5, 1.5),
    crop: tuple[int, int] | None = (896, 512),
    flip: float = 0.5,
    normalize: str = "none",
) -> Compose:
    """The released training pipeline: [Resize] -> RandomScaleWidth -> RandomCrop -> flip -> ToFloat.

    docs/data.md §6. Pass ``resize=(1914, 1052)`` for GTA5 (None keeps the frame size, as for
    Cityscapes); ``base_width=None``, ``crop=None`` or ``flip=0`` leave that step out.
    """
    steps = []
    if resize is not None:
        steps.append(Resize(resize))
    if base_width is not None:
        steps.append(RandomScaleWidth(base_width, scale))
    if crop is not None:
        steps.append(RandomCrop(crop))
    if flip > 0:
        steps.append(RandomHorizontalFlip(flip))
    steps.append(ToFloat(normalize))
    return Compose(steps)


def eval_transform(resize: tuple[int, int] | None = None, normalize: str = "none") -> Compose:
    """Evaluation pipeline: [Resize image] -> ToFloat; full resolution by default (docs/method.md §12).

    ``resize`` (e.g. AdaptSegNet's 1024x512 input) changes only the image: the label keeps its
    full resolution, and predictions are upsampled to it before scoring.
    """
    steps = [] if resize is None else [Resize(resize, keep_label_size=True)]
    steps.append(ToFloat(normalize))
    return Compose(steps)
