"""The confusion-matrix metric (docs/method.md §12) against hand counts and the official
Cityscapes evaluation (docs/data.md §4)."""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from cag import labels
from cag.data.io import read_index_label, write_cityscapes_label
from cag.metrics import ConfusionMatrix, iou_from_confusion, miou13_from_16, miou13_ignore3, miou_16

IGNORE = labels.IGNORE_INDEX

# 3 classes, 6 pixels. Confusion (rows truth): [[1, 1, 0], [0, 2, 0], [1, 0, 1]].
# class 0: TP 1, FN 1, FP 1 -> 1/3; class 1: TP 2, FN 0, FP 1 -> 2/3; class 2: TP 1, FN 1, FP 0 -> 1/2.
TARGET = torch.tensor([0, 0, 1, 1, 2, 2])
PRED = torch.tensor([0, 1, 1, 1, 0, 2])


def filled(num_classes, pred, target, **kwargs):
    cm = ConfusionMatrix(num_classes, **kwargs)
    cm.update(torch.as_tensor(pred), torch.as_tensor(target))
    return cm


def same_floats(a, b, tol=0.0):
    return all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- hand-derived cases


def test_hand_counted_matrix_iou_miou_accuracy():
    cm = filled(3, PRED, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.matrix.dtype == torch.int64
    iou = cm.iou()
    assert iou.dtype == torch.float64 and iou.shape == (3,)
    assert iou.tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2], abs=1e-15)
    assert cm.miou() == pytest.approx(0.5, abs=1e-15)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6, abs=1e-15)
    assert cm.per_class(["a", "b", "c"]) == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 1 / 2}, abs=1e-15)


def test_ignored_and_out_of_range_truth_is_skipped():
    pred = torch.cat([PRED, torch.tensor([1, 2, 0, 0])])
    target = torch.cat([TARGET, torch.tensor([IGNORE, IGNORE, 3, -1])])
    cm = filled(3, pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.miou() == pytest.approx(0.5, abs=1e-15)


def test_ignore_prediction_counts_as_a_miss_of_the_true_class_only():
    # one more class-1 pixel predicted as ignore: class 1 FN 0 -> 1, so 2 / (2 + 1 + 1); others unchanged
    cm = filled(3, torch.cat([PRED, torch.tensor([IGNORE])]), torch.cat([TARGET, torch.tensor([1])]))
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert cm.abstained.tolist() == [0, 1, 0]
    assert cm.iou().tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 2], abs=1e-15)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7, abs=1e-15)


def test_custom_ignore_index_like_cag_250():
    cm = filled(3, torch.tensor([0, 250, 1]), torch.tensor([0, 1, 250]), ignore_index=250)
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert cm.abstained.tolist() == [0, 1, 0]
    assert same_floats(cm.iou().tolist(), [1.0, 0.0, float("nan")])


def test_absent_class_is_nan_and_skipped_by_the_mean():
    # class 3 never appears: NaN; class 2 only predicted: 0 (not NaN)
    cm = filled(4, [0, 0, 1, 2], [0, 0, 1, 1])
    assert same_floats(cm.iou().tolist(), [1.0, 0.5, 0.0, float("nan")])
    assert cm.miou() == pytest.approx(0.5, abs=1e-15)
    assert math.isnan(ConfusionMatrix(4).miou())
    assert math.isnan(ConfusionMatrix(4).pixel_accuracy())


def test_iou_from_confusion_without_abstentions():
    matrix = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert iou_from_confusion(matrix).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2], abs=1e-15)


def random_pair(generator, shape, num_classes):
    target = torch.randint(0, num_classes + 2, shape, generator=generator)
    target[target == num_classes + 1] = IGNORE
    pred = torch.randint(0, num_classes + 1, shape, generator=generator)
    pred[pred == num_classes] = IGNORE
    return pred, target


def test_several_updates_equal_one_big_update():
    g = torch.Generator().manual_seed(0)
    batches = [random_pair(g, (2, 5, 7), 4) for _ in range(3)]
    piecewise = ConfusionMatrix(4)
    for pred, target in batches:
        piecewise.update(pred, target)
    whole = filled(4, torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert torch.equal(piecewise.tally, whole.tally)
    assert piecewise.matrix.sum() + piecewise.abstained.sum() == sum(int((t < 4).sum()) for _, t in batches)


@pytest.mark.parametrize("shape", [(30,), (5, 6), (1, 5, 6), (2, 1, 3, 5), (0,)])
def test_any_shape_gives_the_flat_counts(shape):
    g = torch.Generator().manual_seed(1)
    pred, target = random_pair(g, shape, 3)
    assert torch.equal(filled(3, pred, target).tally, filled(3, pred.reshape(-1), target.reshape(-1)).tally)
    assert filled(3, pred, target).tally.sum() == pred.numel()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_dtypes_agree(dtype):
    pred = torch.cat([PRED, torch.tensor([IGNORE, 1])])
    target = torch.cat([TARGET, torch.tensor([1, IGNORE])])
    cm = filled(3, pred.to(dtype), target.to(dtype))
    assert torch.equal(cm.tally, filled(3, pred, target).tally)


def test_reset_zeroes_the_counts():
    cm = filled(3, PRED, TARGET)
    cm.reset()
    assert cm.tally.sum() == 0
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [3, -1, 254])
def test_prediction_outside_the_classes_is_reported(bad):
    cm = filled(3, torch.tensor([0, bad]), torch.tensor([0, IGNORE]))  # even on an ignored pixel
    reads = [cm.iou, cm.miou, cm.pixel_accuracy, lambda: cm.per_class(["a", "b", "c"])]
    for read in reads:
        with pytest.raises(ValueError, match=r"1 predicted pixels outside \[0, 3\)"):
            read()
    with pytest.raises(ValueError, match=r"1 predicted pixels outside \[0, 16\)"):
        miou13_ignore3(filled(16, torch.tensor([16 if bad == 3 else bad]), torch.tensor([0])))


def test_wrong_arguments_raise_clear_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(TypeError, match="pred must hold integer class ids, got torch.float32"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="target must hold integer class ids, got torch.bool"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="target must be a torch.Tensor, got ndarray"):
        cm.update(torch.zeros(2, dtype=torch.long), np.zeros(2))
    with pytest.raises(ValueError, match=r"pred shape \(2, 3\) != target shape \(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index 2 must lie outside"):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(ValueError, match="per_class needs 3 names, got 2"):
        cm.per_class(["a", "b"])


def test_per_class_defaults_to_the_protocol_names():
    cm = ConfusionMatrix(19)
    cm.update(torch.tensor([0, 13]), torch.tensor([0, 0]))
    scores = cm.per_class()
    assert list(scores)[:2] == ["road", "sidewalk"] and len(scores) == 19
    assert scores["road"] == 0.5 and scores["car"] == 0.0 and math.isnan(scores["bus"])


# ---------------------------------------------------------------- no host synchronisation

# Calls that make the host wait for the device: Python numbers or branching from a tensor
# (item, __bool__, ...), data-dependent shapes (nonzero, masked_select, unique, boolean
# indexing) and torch.bincount, whose CUDA kernel copies the input's min and max to the host.
HOST_SYNC_CALLS = {
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
    "nonzero", "masked_select", "unique", "unique_consecutive", "bincount",
}


class RecordCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((getattr(func, "__name__", str(func)), args))
        return func(*args, **(kwargs or {}))


def bool_indexed(name, args):
    index = args[1] if name == "__getitem__" else None
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def test_update_has_no_host_synchronising_call():
    cm = ConfusionMatrix(3)
    pred, target = random_pair(torch.Generator().manual_seed(2), (4, 4), 3)
    with RecordCalls() as recorder:
        cm.update(pred, target)
    names = {name for name, _ in recorder.calls}
    assert "index_add_" in names, "the recorder did not see the update"
    assert not names & HOST_SYNC_CALLS
    assert not any(bool_indexed(name, args) for name, args in recorder.calls)


@pytest.mark.cuda
def test_update_on_cuda_never_waits_for_the_device():
    pred, target = random_pair(torch.Generator().manual_seed(3), (2, 64, 128), 19)
    cm = ConfusionMatrix(19, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(pred.cuda(), target.cuda())
        cm.update(pred.cuda(), target.cuda())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cm.tally.device.type == "cuda"
    cpu = filled(19, torch.cat([pred, pred]), torch.cat([target, target]))
    assert torch.equal(cm.tally.cpu(), cpu.tally)


# ---------------------------------------------------------------- SYNTHIA protocol helpers


def test_synthia_13_class_variants_by_hand():
    # 16-class ids: road 0, sidewalk 1, wall 3. Pixels (truth -> prediction):
    # road->road, road->wall, road->ignore, wall->road, sidewalk->sidewalk.
    # 16 classes: road TP1 FN2 FP1 = 1/4, sidewalk 1, wall TP0 FN1 FP1 = 0 -> mIoU16 = 5/12.
    # mIoU* (13 of the 16 IoUs): (1/4 + 1) / 2 = 5/8.
    # wall rows and columns dropped: road TP1 FN1 (ignore) FP0 = 1/2, sidewalk 1 -> 3/4.
    cm = filled(16, [0, 3, IGNORE, 0, 1], [0, 0, 0, 3, 1])
    assert miou_16(cm) == pytest.approx(5 / 12, abs=1e-15)
    assert miou13_from_16(cm.iou()) == pytest.approx(5 / 8, abs=1e-15)
    assert miou13_ignore3(cm) == pytest.approx(3 / 4, abs=1e-15)


def test_miou13_from_16_takes_the_13_classes_by_name():
    iou16 = torch.arange(16, dtype=torch.float64) / 100  # wall, fence, pole are 3, 4, 5
    assert miou13_from_16(iou16) == pytest.approx((0 + 1 + 2 + sum(range(6, 16))) / 1300, abs=1e-15)
    iou16[15] = float("nan")
    assert miou13_from_16(iou16.tolist()) == pytest.approx((0 + 1 + 2 + sum(range(6, 15))) / 1200, abs=1e-15)


def test_protocol_helpers_refuse_other_class_counts():
    with pytest.raises(ValueError, match="16-class"):
        miou_16(ConfusionMatrix(19))
    with pytest.raises(ValueError, match="16-class"):
        miou13_ignore3(ConfusionMatrix(13))
    with pytest.raises(ValueError, match="16 per-class IoUs"):
        miou13_from_16(torch.zeros(19))


# ---------------------------------------------------------------- oracle: cityscapesscripts

# Cityscapes ids that get ignoreInEval=True for the SYNTHIA protocols (docs/data.md §4).
NOT_IN_16 = (22, 27, 31)  # terrain, truck, train
NOT_IN_13 = NOT_IN_16 + (12, 13, 17)  # and wall, fence, pole
ABSENT_ID = 32  # motorcycle: in no GT and no prediction, so NaN on both sides


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """The official pixel-level evaluation, imported with its environment pointed at tmp dirs."""
    pytest.importorskip("cityscapesscripts", reason="test extra: cityscapesscripts")
    pytest.importorskip("pyquaternion", reason="test extra: pyquaternion (cityscapesscripts import chain)")
    root = tmp_path_factory.mktemp("cityscapes_env")
    with pytest.MonkeyPatch.context() as env:
        for var in ("CITYSCAPES_DATASET", "CITYSCAPES_RESULTS", "CITYSCAPES_EXPORT_DIR"):
            (root / var).mkdir()
            env.setenv(var, str(root / var))
        ev = importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    saved = {key: getattr(ev.args, key) for key in ("evalInstLevelScore", "JSONOutput", "quiet")}
    ev.args.evalInstLevelScore, ev.args.JSONOutput, ev.args.quiet = False, False, True
    yield ev
    for key, value in saved.items():
        setattr(ev.args, key, value)


def run_oracle(ev, pred_paths, gt_paths, ignored_ids):
    """Class scores of ``evaluateImgLists`` with ``ignored_ids`` patched to ignoreInEval=True."""
    original = {i: ev.id2label[i] for i in ignored_ids}
    try:
        for i in ignored_ids:
            ev.id2label[i] = original[i]._replace(ignoreInEval=True)
        result = ev.evaluateImgLists([str(p) for p in pred_paths], [str(p) for p in gt_paths], ev.args)
    finally:
        ev.id2label.update(original)
    return result["classScores"], result["averageScoreClasses"]


def write_fixture(directory, num_classes, seed, never_predicted=(), count=3, shape=(64, 128)):
    """Random GT labelIds (0-33, void ids included, motorcycle never) and train-id predictions
    (60% correct, ~5% ignore) written as labelId PNGs; returns the two path lists."""
    rng = np.random.default_rng(seed)
    lut = labels.cityscapes_lut(num_classes)
    gt_ids = np.array([i for i in range(34) if i != ABSENT_ID])
    banned = set(never_predicted) | {int(lut[ABSENT_ID])}
    preds, gts = [], []
    for k in range(count):
        gt = rng.choice(gt_ids, size=shape).astype(np.uint8)
        guess = rng.integers(0, num_classes + 1, size=shape)
        guess[guess == num_classes] = IGNORE
        pred = np.where(rng.random(shape) < 0.6, lut[gt], guess)
        pred[np.isin(pred, list(banned))] = 0
        gts.append(directory / f"c_000000_{k:06d}_gtFine_labelIds.png")
        preds.append(directory / f"c_000000_{k:06d}_pred.png")
        write_cityscapes_label(gts[-1], gt)
        write_cityscapes_label(preds[-1], labels.train_id_to_label_id(num_classes)[pred])
    return preds, gts


def ours_from_pngs(num_classes, pred_paths, gt_paths):
    """Our metric fed from the PNGs read back and mapped with ``cityscapes_lut``."""
    lut = torch.from_numpy(labels.cityscapes_lut(num_classes))
    cm = ConfusionMatrix(num_classes)
    for pred_path, gt_path in zip(pred_paths, gt_paths, strict=True):
        pred = lut[torch.from_numpy(read_index_label(pred_path)).long()]
        target = lut[torch.from_numpy(read_index_label(gt_path)).long()]
        cm.update(pred, target)
    return cm


def assert_same_scores(ours: dict, official: dict):
    names = list(ours)
    assert same_floats([ours[n] for n in names], [official[n] for n in names], tol=1e-9), (ours, official)
    assert sum(math.isnan(ours[n]) for n in names) == 1  # only motorcycle, so the NaN path is exercised


def test_oracle_19_classes(oracle, tmp_path):
    preds, gts = write_fixture(tmp_path, 19, seed=0)
    official, official_mean = run_oracle(oracle, preds, gts, ignored_ids=())
    cm = ours_from_pngs(19, preds, gts)
    assert cm.abstained.sum() > 0
    assert_same_scores(cm.per_class(), official)
    assert cm.miou() == pytest.approx(official_mean, abs=1e-9)


def test_oracle_16_classes_and_standard_13_class_miou_star(oracle, tmp_path):
    preds, gts = write_fixture(tmp_path, 16, seed=1)
    official, official_mean = run_oracle(oracle, preds, gts, ignored_ids=NOT_IN_16)
    cm = ours_from_pngs(16, preds, gts)
    assert_same_scores(cm.per_class(), official)
    assert miou_16(cm) == pytest.approx(official_mean, abs=1e-9)
    official_13 = np.nanmean([official[name] for name in labels.CLASSES_13])
    assert miou13_from_16(cm.iou()) == pytest.approx(official_13, abs=1e-9)
    assert miou13_ignore3(cm) != pytest.approx(official_13, abs=1e-6)  # the two 13-class numbers differ


def test_oracle_13_classes_ignored_three_when_they_are_never_predicted(oracle, tmp_path):
    # With no wall/fence/pole predictions, dropping their rows and columns is the same as
    # marking them ignoreInEval in the official evaluation.
    preds, gts = write_fixture(tmp_path, 16, seed=2, never_predicted=(3, 4, 5))
    _, official_mean = run_oracle(oracle, preds, gts, ignored_ids=NOT_IN_13)
    assert miou13_ignore3(ours_from_pngs(16, preds, gts)) == pytest.approx(official_mean, abs=1e-9)


# ---------------------------------------------------------------- all_reduce


def rank_batch(rank):
    return random_pair(torch.Generator().manual_seed(100 + rank), (3, 8), 4)


def all_reduce_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cm = ConfusionMatrix(4)
        cm.update(*rank_batch(rank))
        cm.all_reduce()
        torch.save(cm.tally, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_the_ranks_with_gloo(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    torch.multiprocessing.spawn(all_reduce_worker, args=(2, tmp_path / "store", tmp_path), nprocs=2, join=True)
    local = [filled(4, *rank_batch(rank)).tally for rank in range(2)]
    assert not torch.equal(local[0], local[1])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True), local[0] + local[1])


def test_all_reduce_without_a_process_group_is_a_no_op():
    cm = filled(3, PRED, TARGET)
    before = cm.tally.clone()
    cm.all_reduce()
    assert torch.equal(cm.tally, before)
