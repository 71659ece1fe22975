"""Category anchors: accumulation rules, files, and the authors' shipped anchors (docs/method.md §2)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cag.anchors import (AnchorAccumulator, class_masks, downsample_labels, load_anchors,
                         load_cag_uda_anchors, save_anchors)


def shared_reference() -> Path:
    return Path(os.environ.get("CAG_SHARED_REFERENCE",
                               Path(__file__).resolve().parents[2] / "shared" / "reference"))


def shipped_anchor_file() -> Path:
    path = shared_reference() / "original-artifacts" / "category_anchors"
    if not path.is_file():
        pytest.skip(f"the authors' category_anchors is not available at {path} (set CAG_SHARED_REFERENCE)")
    return path


def one_dim_batch(values_per_image, labels_per_image, predictions_per_image=None):
    """Features [B, 1, 1, W] with the given pixel values; labels/predictions [B, 1, W]."""
    features = torch.tensor(values_per_image, dtype=torch.float64)[:, None, None, :]
    labels = torch.tensor(labels_per_image)[:, None, :]
    predictions = labels.clone() if predictions_per_image is None else torch.tensor(predictions_per_image)[:, None, :]
    return features, labels, predictions


# --- downsampling and masks -----------------------------------------------------------------

def test_downsample_labels_is_nearest_and_keeps_ignore():
    labels = torch.tensor([[[0, 1, 2, 3],
                            [4, 255, 6, 7],
                            [8, 9, 255, 11],
                            [12, 13, 14, 15]]])
    # nearest with scale 2 picks rows 0, 2 and columns 0, 2
    assert downsample_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 255]]]
    assert downsample_labels(labels, (2, 2)).dtype == labels.dtype


def test_downsample_labels_arbitrary_size_matches_interpolate():
    labels = torch.randint(0, 20, (2, 7, 11), generator=torch.Generator().manual_seed(0))
    labels[labels == 19] = 255
    expected = torch.nn.functional.interpolate(labels[:, None].float(), size=(3, 5), mode="nearest")[:, 0].long()
    assert torch.equal(downsample_labels(labels, (3, 5)), expected)


def test_downsample_labels_rejects_channel_dimension():
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        downsample_labels(torch.zeros(1, 1, 4, 4), (2, 2))


def test_class_masks_keep_only_correct_pixels_and_drop_ignore():
    labels = torch.tensor([[[0, 0, 1, 255, 7]]])
    predictions = torch.tensor([[[0, 1, 1, 0, 7]]])
    masks = class_masks(labels, 2, predictions)
    assert masks[0, 0, :, 0].tolist() == [1, 0, 0, 0, 0]
    assert masks[0, 0, :, 1].tolist() == [0, 0, 1, 0, 0]
    assert class_masks(labels, 2)[0, 0, :, 0].tolist() == [1, 1, 0, 0, 0]


# --- faithful accumulation -------------------------------------------------------------------

def test_faithful_uses_correct_pixels_and_min_pixels():
    # 1 image, 4 pixels of 2-d features; class 0 correct at pixels 0, 1; class 1 only at pixel 3
    features = torch.tensor([[1.0, 3.0, 100.0, 7.0], [2.0, 4.0, 100.0, 7.0]], dtype=torch.float64)[None, :, None, :]
    labels = torch.tensor([[[0, 0, 0, 1]]])
    predictions = torch.tensor([[[0, 0, 1, 1]]])
    accumulator = AnchorAccumulator(2, 2, min_pixels=2)
    accumulator.update(features, labels, predictions)
    assert accumulator.anchors.tolist() == [[2.0, 3.0], [0.0, 0.0]]
    assert accumulator.counts.tolist() == [1.0, 0.0]
    assert accumulator.anchors.dtype == torch.float32


def test_capped_running_mean_hand_sequence_in_batch_order():
    # per-image class-0 means 2, 4, 8, 16 with cap 2:
    # 2 -> (2*1+4)/2 = 3 -> (3*2+8)/3 = 14/3 -> (14/3*2+16)/3 = 76/9 (count stays 2)
    features, labels, predictions = one_dim_batch([[2.0], [4.0], [8.0], [16.0]], [[0], [0], [0], [0]])
    accumulator = AnchorAccumulator(1, 1, min_pixels=1, count_cap=2)
    accumulator.update(features, labels, predictions)
    assert accumulator.running_mean.item() == pytest.approx(76 / 9, abs=1e-12)
    assert accumulator.counts.tolist() == [2.0]
    # the uncapped sums a distributed version would merge
    assert accumulator.feature_sums.item() == 30.0 and accumulator.sample_counts.item() == 4.0


def test_running_mean_sequence_is_the_same_image_by_image():
    accumulator = AnchorAccumulator(1, 1, min_pixels=1, count_cap=2)
    for value in (2.0, 4.0, 8.0, 16.0):
        accumulator.update(*one_dim_batch([[value]], [[0]]))
    assert accumulator.running_mean.item() == pytest.approx(76 / 9, abs=1e-12)


def test_every_image_has_equal_weight_whatever_its_pixel_count():
    # image A: three class-0 pixels of value 1; image B: one class-0 pixel of value 5
    features, labels, predictions = one_dim_batch([[1.0, 1.0, 1.0], [5.0, 9.0, 9.0]], [[0, 0, 0], [0, 255, 255]])
    faithful = AnchorAccumulator(1, 1, min_pixels=1)
    faithful.update(features, labels, predictions)
    assert faithful.anchors.tolist() == [[3.0]]  # (1 + 5) / 2
    assert faithful.counts.tolist() == [2.0]


def test_global_mode_is_the_plain_centroid_and_ignores_predictions():
    features, labels, _ = one_dim_batch([[1.0, 1.0, 1.0], [5.0, 9.0, 9.0]], [[0, 0, 0], [0, 255, 255]])
    wrong_predictions = torch.ones_like(labels)
    centroid = AnchorAccumulator(2, 1, mode="global")
    centroid.update(features, labels, wrong_predictions)
    assert centroid.anchors.tolist() == [[2.0], [0.0]]  # (3 * 1 + 5) / 4; class 1 never seen
    assert centroid.counts.tolist() == [4.0, 0.0]


def test_all_zero_vectors_are_skipped():
    features, labels, predictions = one_dim_batch([[0.0, 0.0], [6.0, 6.0]], [[0, 0], [0, 0]])
    accumulator = AnchorAccumulator(1, 1, min_pixels=1)
    accumulator.update(features, labels, predictions)
    assert accumulator.anchors.tolist() == [[6.0]]
    assert accumulator.counts.tolist() == [1.0]


def test_faithful_mode_requires_predictions():
    features, labels, _ = one_dim_batch([[1.0]], [[0]])
    with pytest.raises(ValueError, match="predictions"):
        AnchorAccumulator(1, 1).update(features, labels)


def test_update_checks_shapes():
    accumulator = AnchorAccumulator(2, 3)
    with pytest.raises(ValueError, match=r"features must be \[B, 3, h, w\]"):
        accumulator.update(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="labels must be"):
        accumulator.update(torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        AnchorAccumulator(2, 3, mode="paper")


# --- files -----------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    anchors = torch.tensor([[1.5, -2.0, 0.25], [0.0, 3.0, 7.0]])
    counts = torch.tensor([3000.0, 12.0])
    path = tmp_path / "sub" / "anchors.pt"
    save_anchors(path, anchors, counts, source="unit-test")
    loaded_anchors, loaded_counts = load_anchors(path)
    assert torch.equal(loaded_anchors, anchors) and torch.equal(loaded_counts, counts)
    assert sorted(p.name for p in path.parent.iterdir()) == ["anchors.pt"]  # no temp file left


def test_accumulator_resumes_from_its_file(tmp_path):
    accumulator = AnchorAccumulator(1, 1, min_pixels=1, count_cap=2)
    accumulator.update(*one_dim_batch([[2.0], [4.0]], [[0], [0]]))
    accumulator.save(tmp_path / "anchors.pt")
    resumed = AnchorAccumulator.load(tmp_path / "anchors.pt")
    assert (resumed.count_cap, resumed.min_pixels, resumed.mode) == (2, 1, "faithful")
    resumed.update(*one_dim_batch([[8.0], [16.0]], [[0], [0]]))
    assert resumed.running_mean.item() == pytest.approx(76 / 9, abs=1e-12)


def test_load_anchors_rejects_other_files_naming_them(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"anchors": torch.zeros(2, 3)}, path)
    with pytest.raises(ValueError, match="weights.pt"):
        load_anchors(path)


def test_save_anchors_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"counts must be a tensor \[C\] = \[2\]"):
        save_anchors(tmp_path / "a.pt", torch.zeros(2, 3), torch.zeros(3))


# --- the authors' legacy file ----------------------------------------------------------------

def test_legacy_reader_reads_a_legacy_torch_pickle(tmp_path):
    path = tmp_path / "category_anchors"
    vectors = np.arange(6.0).reshape(2, 3)
    torch.save({"objective_vectors": vectors, "objective_num": np.array([3000.0, 7.0])}, path,
               _use_new_zipfile_serialization=False)
    anchors, counts = load_cag_uda_anchors(path)
    assert anchors.dtype == torch.float32 and anchors.tolist() == vectors.tolist()
    assert counts.tolist() == [3000.0, 7.0]


def test_legacy_reader_rejects_cac_py_bare_array(tmp_path):
    path = tmp_path / "anchors_on_gta5_from_deeplab101"
    torch.save(np.zeros((19, 256)), path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="anchors_on_gta5_from_deeplab101.*objective_vectors"):
        load_cag_uda_anchors(path)


class CreatesMarker:
    """Unpickling this object calls open(marker, "w"), i.e. it runs code and creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("loader", [load_cag_uda_anchors, load_anchors])
def test_malicious_legacy_pickle_is_refused_and_never_runs(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "category_anchors"
    payload = {"objective_vectors": CreatesMarker(marker), "objective_num": np.zeros(19)}
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="category_anchors"):
        loader(path)
    assert not marker.exists()


def test_shipped_category_anchors():
    anchors, counts = load_cag_uda_anchors(shipped_anchor_file())
    assert anchors.shape == (19, 256) and anchors.dtype == torch.float32
    assert counts.tolist() == [3000, 3000, 3000, 3000, 1512, 3000, 3000, 2212, 3000, 3000, 3000, 2906,
                               546, 3000, 3000, 499, 125, 535, 80]
    assert (anchors >= 0).all()
    norms = anchors.norm(dim=1)
    assert 6.8 <= norms.min() and norms.max() <= 12.45
    distances = torch.cdist(anchors.double(), anchors.double()) + torch.eye(19, dtype=torch.float64) * 1e9
    closest = divmod(distances.argmin().item(), 19)
    assert closest == (3, 4)  # wall - fence
    assert distances.min().item() == pytest.approx(4.78, abs=0.005)


# --- the anchor pass over frames of several sizes (docs/data.md §2) ---------------------------------

def test_anchor_pass_batches_frames_of_other_sizes(tmp_path):
    """GTA5 has 1914x1046 frames among its 1914x1052 ones. The anchor pass resizes image
    (bilinear) and label (nearest) together to ``anchors.resize``, as the released loader does,
    so one batch mixing both sizes goes through (the label used to keep its own size and the
    batch failed to collate). Here 128x64 and 128x62 frames, resized to 128x64."""
    from cag.config import load_config
    from cag.data import io
    from cag.data.synthetic import generate, source_paths
    from cag.data.transforms import resize_label
    from cag.labels import gta5_lut
    from cag.stages import anchor_dataset, compute_anchors, make_model

    root = tmp_path / "bench"
    generate(root, size=(64, 128), n_source=2, n_target_train=0, n_target_val=0, n_target_test=0,
             source_sizes={1: (62, 128)}, progress=False)
    assert [io.read_image(source_paths(root, i)[0]).shape[:2] for i in (0, 1)] == [(64, 128), (62, 128)]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic.yaml", [
        f"data.source_root={root / 'source'}", "data.synthetic.root=null", f"out_dir={tmp_path}",
        "anchors.resize=[128,64]", "anchors.batch_size=2", "anchors.num_images=2", "anchors.min_pixels=1",
        "anchors.mode=global",  # every labelled pixel counts: a random network classifies few correctly
        "device=cpu", "quiet=true"])
    dataset = anchor_dataset(cfg)
    for index in (0, 1):
        item = dataset[index]
        raw = torch.from_numpy(gta5_lut(19)[io.read_index_label(source_paths(root, index)[1])].astype(np.int64))
        assert item["image"].shape == (3, 64, 128) and item["image"].dtype == torch.float32
        assert torch.equal(item["label"], resize_label(raw, (128, 64)))
    init = tmp_path / "init.pt"
    torch.save({"model": make_model(cfg, torch.device("cpu")).state_dict()}, init)
    result = compute_anchors(cfg, tmp_path / "anchors", init)
    assert result["images"] == 2 and [tuple(s) for s in result["image_sizes_wh"]] == [(128, 64)]
    anchors, counts = load_anchors(tmp_path / "anchors" / "anchors.pt")
    assert anchors.shape == (19, cfg.model.feature_dim) and counts.sum() > 0
    assert torch.isfinite(anchors[counts > 0]).all()
