"""Segmentation metrics: the confusion matrix, per-class IoU and the mIoU protocols.

docs/method.md §12: one confusion matrix is accumulated over the whole evaluation set,
pixels whose ground truth is not one of the evaluated classes are skipped,
IoU_c = TP_c / (TP_c + FP_c + FN_c) and mIoU is the NaN-skipping mean over the classes.
docs/method.md §12: this equals the official Cityscapes evaluation
(``cityscapesscripts``), which ``tests/test_metrics.py`` uses as the oracle, and the SYNTHIA
16/13-class protocols are plain confusion matrices over those class subsets.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .labels import CLASSES_13, CLASSES_16, IGNORE_INDEX, class_names


def iou_from_confusion(matrix: torch.Tensor, abstained: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class IoU_c = TP / (TP + FP + FN) from a [C, C] matrix (rows truth, columns prediction).

    docs/method.md §12. ``abstained[c]`` counts class-c pixels that were predicted as
    ignore: they are false negatives of c and false positives of no class. A class absent from
    both the ground truth and the prediction gets NaN. Returns float64 [C] on the CPU.
    """
    matrix = matrix.detach().cpu().to(torch.float64)
    missed = torch.zeros(matrix.shape[0], dtype=torch.float64)
    if abstained is not None:
        missed = abstained.detach().cpu().to(torch.float64)
    tp = matrix.diagonal()
    fn = matrix.sum(dim=1) + missed - tp
    fp = matrix.sum(dim=0) - tp
    return tp / (tp + fp + fn)


def nan_mean(values: torch.Tensor) -> float:
    """Mean over the entries that are not NaN (classes absent from truth and prediction)."""
    return torch.nanmean(torch.as_tensor(values, dtype=torch.float64)).item()


class ConfusionMatrix:
    """The accumulated confusion matrix of a segmentation evaluation (docs/method.md §12).

    ``matrix`` is the [C, C] int64 matrix, rows = ground truth, columns = prediction.

    Counting rules, one per kind of pixel:

    - ground truth equal to ``ignore_index`` or outside [0, C): skipped (not counted at all);
    - prediction equal to ``ignore_index``: the model gave no class, which counts as wrong
      (a false negative of the true class, a false positive of none; stored in ``abstained``).
      The Cityscapes evaluation does the same with a prediction of an ignored labelId;
    - any other prediction outside [0, C): a bug upstream. It is counted on the device and
      reported as a ``ValueError`` by the next read (``iou``, ``miou``, ``pixel_accuracy``,
      ``per_class``), so that ``update`` never waits for the device.

    All counts live in one int64 ``tally`` of shape [C + 1, C + 2]: row C collects the skipped
    pixels, column C the ignore predictions, column C + 1 the invalid predictions. One
    ``index_add_`` per update fills it (``torch.bincount`` would copy the input's maximum to the
    host on CUDA). The tally follows the device of the tensors passed to ``update``; ``device``
    only sets where it starts (give the NCCL device when a rank may see no data).
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} must lie outside the classes [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.tally = torch.zeros(num_classes + 1, num_classes + 2, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero all counts (keeps the device)."""
        self.tally.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: integer tensors of the same shape (any shape) and the same device."""
        _check_pair(pred, target)
        self.tally = self.tally.to(pred.device)
        index = self._bin_index(pred.reshape(-1).long(), target.reshape(-1).long())
        ones = torch.ones(1, dtype=torch.int64, device=pred.device).expand(index.numel())
        self.tally.view(-1).index_add_(0, index, ones)

    def _bin_index(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Flat ``tally`` bin of every pixel: row = truth or C (skipped), column = prediction,
        C (ignore prediction) or C + 1 (invalid prediction)."""
        c = self.num_classes
        row = torch.where((target >= 0) & (target < c), target, c)
        outside = torch.where(pred == self.ignore_index, c, c + 1)
        column = torch.where((pred >= 0) & (pred < c), pred, outside)
        return row * (c + 2) + column

    @property
    def matrix(self) -> torch.Tensor:
        """The [C, C] int64 confusion matrix (rows truth, columns prediction), a view of ``tally``."""
        return self.tally[: self.num_classes, : self.num_classes]

    @property
    def abstained(self) -> torch.Tensor:
        """[C] int64: pixels of each true class that were predicted as ``ignore_index``."""
        return self.tally[: self.num_classes, self.num_classes]

    def _raise_if_invalid(self) -> None:
        invalid = int(self.tally[:, self.num_classes + 1].sum())
        if invalid:
            raise ValueError(
                f"ConfusionMatrix.update received {invalid} predicted pixels outside "
                f"[0, {self.num_classes}) that are not ignore_index={self.ignore_index}"
            )

    def iou(self) -> torch.Tensor:
        """Per-class IoU, float64 [C] on the CPU, NaN for absent classes (docs/method.md §12)."""
        self._raise_if_invalid()
        return iou_from_confusion(self.matrix, self.abstained)

    def miou(self) -> float:
        """mIoU: the NaN-skipping mean of ``iou()`` (docs/method.md §12)."""
        return nan_mean(self.iou())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels; ignore predictions count as wrong (NaN if none)."""
        self._raise_if_invalid()
        correct = self.matrix.diagonal().sum().item()
        counted = self.matrix.sum().item() + self.abstained.sum().item()
        return correct / counted if counted else float("nan")

    def per_class(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """``{class name: IoU}``; names default to the 19/16/13-class protocol of ``cag.labels``."""
        names = class_names(self.num_classes) if names is None else tuple(names)
        if len(names) != self.num_classes:
            raise ValueError(f"per_class needs {self.num_classes} names, got {len(names)}")
        return dict(zip(names, self.iou().tolist()))

    def all_reduce(self) -> None:
        """Sum the counts of all processes (torch.distributed SUM); a no-op without a process group."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.tally, op=dist.ReduceOp.SUM)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    _check_class_ids("pred", pred)
    _check_class_ids("target", target)
    if pred.shape != target.shape:
        raise ValueError(
            f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
        )
    if pred.device != target.device:
        raise ValueError(f"ConfusionMatrix.update: pred on {pred.device} but target on {target.device}")


def _check_class_ids(role: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"ConfusionMatrix.update: {role} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"ConfusionMatrix.update: {role} must hold integer class ids, got {tensor.dtype}")


def _require_16(cm: ConfusionMatrix) -> None:
    if cm.num_classes != len(CLASSES_16):
        raise ValueError(f"expected a 16-class ConfusionMatrix (SYNTHIA protocol), got {cm.num_classes}")


def miou_16(cm: ConfusionMatrix) -> float:
    """SYNTHIA -> Cityscapes mIoU over 16 classes: the 16-class matrix's mIoU (docs/method.md §12)."""
    _require_16(cm)
    return cm.miou()


def miou13_from_16(iou16: torch.Tensor | Sequence[float]) -> float:
    """The standard mIoU* (AdaptSegNet, AdvEnt): mean of the 13 per-class IoUs of the 16-class run.

    ``iou16`` is in ``CLASSES_16`` order (``ConfusionMatrix(16).iou()``); docs/method.md §12.
    """
    iou16 = torch.as_tensor(iou16, dtype=torch.float64)
    if iou16.shape != (len(CLASSES_16),):
        raise ValueError(f"iou16 must hold {len(CLASSES_16)} per-class IoUs, got shape {tuple(iou16.shape)}")
    return nan_mean(iou16[_index_13_in_16()])


def miou13_ignore3(cm16: ConfusionMatrix) -> float:
    """The "three classes ignored" 13-class mIoU of the CAG poster (docs/method.md §12, ``RogerZhangzz/CAG_UDA#10``).

    Rows and columns of wall, fence and pole are dropped from the 16-class matrix: pixels of
    those classes, and pixels predicted as them, leave the evaluation, which lowers FP and FN
    of the other classes. Not comparable with ``miou13_from_16`` (the standard mIoU*).
    """
    _require_16(cm16)
    cm16._raise_if_invalid()
    keep = _index_13_in_16()
    return nan_mean(iou_from_confusion(cm16.matrix[keep][:, keep], cm16.abstained[keep]))


def _index_13_in_16() -> torch.Tensor:
    return torch.tensor([CLASSES_16.index(name) for name in CLASSES_13])
