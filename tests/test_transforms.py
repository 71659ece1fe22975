"""Joint image/label transforms (docs/data.md §6): shapes, label values, determinism, geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cag.data.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaleWidth,
    Resize,
    ToFloat,
    eval_transform,
    train_transform,
)


def coordinate_pair(height: int, width: int):
    """An image and a label whose values encode the pixel position (y * width + x)."""
    position = torch.arange(height * width).reshape(height, width)
    image = torch.stack([position % 256, position // 256, torch.full_like(position, 7)]).to(torch.uint8)
    return image, position.to(torch.int64)


def random_pair(height=37, width=53, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 3, 13, 18, 255]), size=(height, width))
    return image, label


def to_tensors(image: np.ndarray, label: np.ndarray):
    return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(label.astype(np.int64))


# ---- Resize ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size_wh", [(20, 13), (100, 71), (31, 80)])
def test_resize_matches_pil_nearest_and_bilinear(size_wh):
    image, label = random_pair()
    out_image, out_label = Resize(size_wh)(*to_tensors(image, label))
    pil_label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size_wh, Image.NEAREST))
    pil_image = np.asarray(Image.fromarray(image).resize(size_wh, Image.BILINEAR)).astype(int)
    assert out_label.dtype == torch.int64 and out_image.dtype == torch.uint8
    assert np.array_equal(out_label.numpy(), pil_label)
    assert np.abs(out_image.permute(1, 2, 0).numpy().astype(int) - pil_image).max() <= 1


def test_resize_never_invents_label_ids_and_keeps_ignore():
    image, label = to_tensors(*random_pair())
    _, out = Resize((211, 97))(image, label)
    assert set(out.unique().tolist()) == {0, 3, 13, 18, 255}


def test_resize_to_the_same_size_is_the_identity():
    image, label = coordinate_pair(4, 6)
    out_image, out_label = Resize((6, 4))(image, label)
    assert torch.equal(out_image, image) and torch.equal(out_label, label)


def test_resize_can_leave_the_label_at_full_size():
    image, label = coordinate_pair(8, 16)
    out_image, out_label = Resize((8, 4), keep_label_size=True)(image, label)
    assert out_image.shape == (3, 4, 8) and torch.equal(out_label, label)


# ---- RandomScaleWidth ---------------------------------------------------------------------------
def test_scale_width_keeps_the_aspect_ratio_like_the_release():
    image, label = coordinate_pair(16, 32)
    out_image, out_label = RandomScaleWidth(base_width=64, scale=(1.0, 1.0))(image, label)
    assert out_image.shape == (3, 32, 64) and out_label.shape == (32, 64)
    # width int(u * base) with u = 0.5 + draw, height int(w / (W / H)): 1914x1052 at u = 0.5 -> 1100x604
    assert RandomScaleWidth(2200, (0.5, 0.5)).output_size((1914, 1052)) == (1100, 604)


def test_scale_width_draws_from_the_generator():
    draw = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    expected_width = int((0.5 + draw) * 2200)
    size = RandomScaleWidth(2200, (0.5, 1.5)).output_size((2048, 1024), torch.Generator().manual_seed(3))
    assert size == (expected_width, int(expected_width / 2.0))


# ---- RandomCrop ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_crop_is_an_aligned_window_within_bounds(seed):
    image, label = coordinate_pair(10, 17)
    out_image, out_label = RandomCrop((5, 4))(image, label, generator=torch.Generator().manual_seed(seed))
    assert out_image.shape == (3, 4, 5) and out_label.shape == (4, 5)
    y0, x0 = divmod(int(out_label[0, 0]), 17)
    assert 0 <= x0 <= 17 - 5 and 0 <= y0 <= 10 - 4
    assert torch.equal(out_label, label[y0:y0 + 4, x0:x0 + 5])
    assert torch.equal(out_image, image[:, y0:y0 + 4, x0:x0 + 5])


def test_crop_reaches_every_offset():
    image, label = coordinate_pair(3, 4)
    corners = {int(RandomCrop((2, 2))(image, label, torch.Generator().manual_seed(s))[1][0, 0]) for s in range(200)}
    assert corners == {0, 1, 2, 4, 5, 6}


def test_crop_of_a_smaller_image_resizes_up():
    image, label = coordinate_pair(2, 3)
    out_image, out_label = RandomCrop((6, 4))(image, label)
    assert out_image.shape == (3, 4, 6)
    assert out_label.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]


# ---- flip and float --------------------------------------------------------------------------------------
def test_flip_mirrors_image_and_label():
    image = torch.tensor([[[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]]], dtype=torch.uint8)
    label = torch.tensor([[0, 255, 2]])
    flipped_image, flipped_label = RandomHorizontalFlip(p=1.0)(image, label)
    assert flipped_image.tolist() == [[[3, 2, 1]], [[6, 5, 4]], [[9, 8, 7]]]
    assert flipped_label.tolist() == [[2, 255, 0]]
    kept_image, kept_label = RandomHorizontalFlip(p=0.0)(image, label)
    assert torch.equal(kept_image, image) and torch.equal(kept_label, label)


def test_flip_happens_about_half_the_time():
    image, label = coordinate_pair(1, 2)
    flips = sum(int(RandomHorizontalFlip(0.5)(image, label, torch.Generator().manual_seed(s))[1][0, 0]) for s in range(200))
    assert 60 < flips < 140


def test_to_float_scales_to_unit_range():
    image = torch.tensor([[[0, 255]], [[51, 102]], [[255, 0]]], dtype=torch.uint8)
    out, label = ToFloat()(image, None)
    assert out.dtype == torch.float32 and label is None
    assert torch.allclose(out, torch.tensor([[[0.0, 1.0]], [[0.2, 0.4]], [[1.0, 0.0]]]))


def test_to_float_imagenet_normalisation_values():
    image = torch.tensor([[[255]], [[0]], [[128]]], dtype=torch.uint8)
    out, _ = ToFloat("imagenet")(image)
    # (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225
    assert torch.allclose(out.flatten(), torch.tensor([2.2489083, -2.0357143, 0.4264924]), atol=1e-6)


def test_to_float_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="normalize must be one of"):
        ToFloat("caffe")


# ---- pipelines -------------------------------------------------------------------------------------------
def test_train_transform_shapes_dtypes_and_label_values():
    image, label = to_tensors(*random_pair(40, 80))
    out_image, out_label = train_transform(base_width=96, crop=(48, 24))(image, label, torch.Generator().manual_seed(0))
    assert out_image.shape == (3, 24, 48) and out_image.dtype == torch.float32
    assert out_label.shape == (24, 48) and out_label.dtype == torch.int64
    assert set(out_label.unique().tolist()) <= {0, 3, 13, 18, 255}
    assert 0.0 <= float(out_image.min()) and float(out_image.max()) <= 1.0


def test_same_generator_seed_gives_identical_output():
    image, label = to_tensors(*random_pair(40, 80))
    pipeline = train_transform(resize=(70, 35), base_width=96, crop=(48, 24), normalize="imagenet")
    runs = [pipeline(image, label, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    outputs = {pipeline(image, label, torch.Generator().manual_seed(s))[0].numpy().tobytes() for s in range(6)}
    assert len(outputs) > 1


def test_train_transform_steps_follow_the_release_order():
    steps = train_transform(resize=(1914, 1052)).transforms
    assert [type(s).__name__ for s in steps] == ["Resize", "RandomScaleWidth", "RandomCrop", "RandomHorizontalFlip", "ToFloat"]
    assert steps[1].base_width == 2200 and steps[1].scale == (0.5, 1.5)
    assert steps[2].size_wh == (896, 512) and steps[3].p == 0.5 and steps[4].normalize == "none"
    assert [type(s).__name__ for s in train_transform(base_width=None, crop=None, flip=0).transforms] == ["ToFloat"]


def test_eval_transform_keeps_full_resolution_and_label():
    image, label = to_tensors(*random_pair(16, 32))
    out_image, out_label = eval_transform()(image, label)
    assert out_image.shape == (3, 16, 32) and torch.equal(out_label, label)
    small_image, full_label = eval_transform(resize=(16, 8))(image, label)
    assert small_image.shape == (3, 8, 16) and torch.equal(full_label, label)


def test_unlabeled_input_passes_through_every_step():
    image, _ = coordinate_pair(16, 32)
    out_image, out_label = Compose([Resize((40, 20)), RandomCrop((8, 8)), RandomHorizontalFlip(1.0), ToFloat()])(image)
    assert out_image.shape == (3, 8, 8) and out_label is None
