"""Category anchors (CAs): per-class centroids of source decoder features (docs/method.md §2).

The paper defines the anchors as "the centroids of category-wise features in the source
domain". The released code (``cac.py``) computes something more specific, which is this
module's default (``mode="faithful"``):

1. only pixels that the anchor model classifies correctly count: mask = (GT == c) & (pred == c);
2. a class is skipped in an image when its mask has fewer than ``min_pixels`` pixels;
3. every accepted image contributes its class mean with equal weight (running mean);
4. the running count is capped (3000), after which the update is a moving average with
   weight 1 / (cap + 1); all-zero vectors are skipped.

``mode="global"`` is the paper-literal centroid: the sum of all labelled source features of a
class divided by their pixel count.

Files: :func:`save_anchors` / :func:`load_anchors` use a plain dict of tensors (safe to load);
:func:`load_cag_uda_anchors` reads the authors' shipped legacy ``category_anchors`` pickle
without executing anything but an allow-list of numpy constructors.
"""
from __future__ import annotations

import _codecs

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .errors import UserInputError


ANCHOR_FILE_FORMAT = "cag-anchors-v1"
MODES = ("faithful", "global")


class AnchorsError(UserInputError, ValueError):
    """An anchors file is unreadable, refused, or not anchors of the expected shape."""

    kind = "anchors error"


def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of label maps [B, H, W] to ``size`` (docs/method.md §2).

    Identical to ``F.interpolate(labels[:, None].float(), size, mode="nearest")`` as in the
    released code; ignore (255) survives because nearest never mixes values.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W]; got shape {tuple(labels.shape)}")
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return resized[:, 0].to(labels.dtype)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    """float64 for stable running sums, except on backends without float64 (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def class_masks(labels: torch.Tensor, num_classes: int, predictions: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot class masks [B, h, w, C] (docs/method.md §2).

    With ``predictions`` the mask of class c keeps only correctly classified pixels,
    (label == c) & (prediction == c); without, every pixel labelled c. Labels outside
    [0, num_classes) (ignore included) belong to no class.
    """
    keep = (labels >= 0) & (labels < num_classes)
    if predictions is not None:
        keep &= predictions == labels
    index = torch.where(keep, labels, torch.full_like(labels, num_classes)).long()
    return F.one_hot(index, num_classes + 1)[..., :num_classes]


def masked_class_sums(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and class, the feature sum [B, C, D] and pixel count [B, C] under ``masks``.

    Computed in the features' dtype, at least float32 (bf16/fp16 features are promoted).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    masks = masks.to(dtype)
    sums = torch.einsum("bdhw,bhwc->bcd", features.to(dtype), masks)
    return sums, masks.sum(dim=(1, 2))


def _check_update_inputs(features, labels, predictions, dim, mode):
    if features.dim() != 4 or features.shape[1] != dim:
        raise ValueError(f"features must be [B, {dim}, h, w]; got shape {tuple(features.shape)}")
    expected = (features.shape[0], *features.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels must be [B, h, w] = {expected} at feature resolution; got {tuple(labels.shape)}")
    if mode == "faithful" and predictions is None:
        raise ValueError("mode='faithful' needs predictions (the anchor model's argmax): the mask is "
                         "(label == c) & (prediction == c); pass mode='global' for the plain centroid")
    if predictions is not None and tuple(predictions.shape) != expected:
        raise ValueError(f"predictions must be [B, h, w] = {expected}; got {tuple(predictions.shape)}")


class AnchorAccumulator:
    """Accumulates category anchors batch by batch (docs/method.md §2; paper: CAs, poster eq. (1)).

    ``mode="faithful"`` reproduces ``cac.py`` (correct-pixel masks, ``min_pixels``, per-image
    class means, running mean capped at ``count_cap``); ``mode="global"`` is the paper's plain
    centroid over all labelled pixels. State lives on the features' device in float64.

    ``feature_sums`` / ``sample_counts`` are plain per-class sums that a distributed version can
    all-reduce: in global mode they are the pixel-feature sums and pixel counts (anchors =
    sums / counts exactly); in faithful mode they are the sums and number of accepted per-image
    class means, uncapped (equal to the faithful anchors while no class reached the cap).
    """

    def __init__(self, num_classes: int, dim: int, min_pixels: int = 10, count_cap: int = 3000,
                 mode: str = "faithful"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if count_cap < 1:
            raise ValueError(f"count_cap must be >= 1; got {count_cap}")
        self.num_classes = num_classes
        self.dim = dim
        self.min_pixels = min_pixels
        self.count_cap = count_cap
        self.mode = mode
        self.running_mean = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.running_count = torch.zeros(num_classes, dtype=torch.float64)
        self.feature_sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.sample_counts = torch.zeros(num_classes, dtype=torch.float64)

    def _move_state(self, device: torch.device) -> None:
        dtype = _accumulation_dtype(device)
        for name in ("running_mean", "running_count", "feature_sums", "sample_counts"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor | None = None) -> None:
        """Adds one batch: features [B, D, h, w], labels and predictions [B, h, w] (255 = ignore)."""
        _check_update_inputs(features, labels, predictions, self.dim, self.mode)
        self._move_state(features.device)
        if self.mode == "global":
            self._update_global(features, labels)
        else:
            self._update_faithful(features, labels, predictions)

    def _update_global(self, features, labels):
        masks = class_masks(labels, self.num_classes)
        sums, pixels = masked_class_sums(features, masks)
        self.feature_sums += sums.sum(dim=0).to(self.feature_sums.dtype)
        self.sample_counts += pixels.sum(dim=0).to(self.sample_counts.dtype)

    def _update_faithful(self, features, labels, predictions):
        masks = class_masks(labels, self.num_classes, predictions)
        sums, pixels = masked_class_sums(features, masks)
        means = sums.to(self.running_mean.dtype) / pixels.clamp(min=1).unsqueeze(-1).to(self.running_mean.dtype)
        accepted = (pixels >= max(self.min_pixels, 1)) & (means.sum(dim=-1) != 0)
        for image_means, image_accepted in zip(means, accepted):
            self._add_image_means(image_means, image_accepted)

    def _add_image_means(self, means: torch.Tensor, accepted: torch.Tensor) -> None:
        """One image's class means into the capped running mean (``update_objective_SingleVector``).

        anchor <- (anchor * n + v) / (n + 1), then n <- min(n + 1, cap): below the cap a running
        mean, at the cap a moving average with weight 1 / (cap + 1).
        """
        n = self.running_count[accepted].unsqueeze(-1)
        self.running_mean[accepted] = (self.running_mean[accepted] * n + means[accepted]) / (n + 1)
        self.running_count[accepted] = (self.running_count[accepted] + 1).clamp(max=self.count_cap)
        self.feature_sums[accepted] += means[accepted]
        self.sample_counts[accepted] += 1

    @property
    def anchors(self) -> torch.Tensor:
        """The anchors, float32 [C, D]; a class never seen stays at zero."""
        if self.mode == "global":
            return (self.feature_sums / self.sample_counts.clamp(min=1).unsqueeze(-1)).float()
        return self.running_mean.float()

    @property
    def counts(self) -> torch.Tensor:
        """float32 [C]: capped image count (faithful) or pixel count (global) per class."""
        return (self.sample_counts if self.mode == "global" else self.running_count).float()

    def save(self, path) -> None:
        """Writes anchors, counts and the accumulator settings with :func:`save_anchors`."""
        save_anchors(path, self.anchors, self.counts, mode=self.mode, min_pixels=self.min_pixels,
                     count_cap=self.count_cap)

    @classmethod
    def load(cls, path) -> "AnchorAccumulator":
        """Restores an accumulator from :func:`save_anchors` output, ready to keep accumulating.

        The released ``cac.py`` does not do this: at HEAD it starts from zero, as
        :func:`cag.stages.compute_anchors` does (docs/paper-vs-code.md, row 22).
        """
        record = _read_anchor_file(path)
        anchors, counts, meta = record["anchors"], record["counts"], record["meta"]
        accumulator = cls(anchors.shape[0], anchors.shape[1],
                          min_pixels=int(meta.get("min_pixels", 10)),
                          count_cap=int(meta.get("count_cap", 3000)),
                          mode=str(meta.get("mode", "faithful")))
        accumulator.running_mean = anchors.double()
        accumulator.running_count = counts.double()
        accumulator.feature_sums = anchors.double() * counts.double().unsqueeze(-1)
        accumulator.sample_counts = counts.double()
        return accumulator


def save_anchors(path, anchors: torch.Tensor, counts: torch.Tensor, **meta) -> None:
    """Saves anchors [C, D] and counts [C] as a plain dict of tensors (docs/method.md §2).

    ``meta`` holds plain values (str, int, float, bool). The write is atomic
    (:func:`cag.checkpoint.save_checkpoint`).
    """
    anchors, counts = _checked_anchor_tensors(anchors, counts, source="save_anchors")
    record = {"format": ANCHOR_FILE_FORMAT, "anchors": anchors.detach().cpu().float(),
              "counts": counts.detach().cpu().float(), "meta": dict(meta)}
    save_checkpoint(path, record)


def load_anchors(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads a :func:`save_anchors` file: (anchors float32 [C, D], counts float32 [C])."""
    record = _read_anchor_file(path)
    return record["anchors"], record["counts"]


def read_anchors_file(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors [C, D], counts [C]) from either kind of anchors file: this project's
    (:func:`save_anchors`, e.g. ``runs/<name>/anchors/anchors.pt``) or the authors' shipped
    ``category_anchors`` (:func:`load_cag_uda_anchors`); ``anchors.file`` accepts both.
    """
    try:
        with open(path, "rb") as f:
            zip_file = f.read(4) == b"PK\x03\x04"
    except OSError as err:
        raise AnchorsError(f"{path}: cannot read the anchors file ({err.strerror or err})") from None
    if zip_file:
        try:
            return load_anchors(path)
        except AnchorsError as ours:
            if "format=" not in str(ours):
                raise
    return load_cag_uda_anchors(path)


def _read_anchor_file(path) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise AnchorsError(f"{path}: not a readable anchor file ({error.__class__.__name__}: {error})") from None
    if not isinstance(record, dict) or record.get("format") != ANCHOR_FILE_FORMAT:
        raise AnchorsError(f"{path}: expected a dict with format={ANCHOR_FILE_FORMAT!r} written by save_anchors; "
                         f"for the authors' legacy file use load_cag_uda_anchors")
    anchors, counts = _checked_anchor_tensors(record.get("anchors"), record.get("counts"), source=str(path))
    return {"anchors": anchors, "counts": counts, "meta": dict(record.get("meta") or {})}


def _checked_anchor_tensors(anchors, counts, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = torch.as_tensor(anchors) if isinstance(anchors, np.ndarray) else anchors
    counts = torch.as_tensor(counts) if isinstance(counts, np.ndarray) else counts
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not anchors.is_floating_point():
        raise AnchorsError(f"{source}: anchors must be a float tensor [C, D]; got {_describe(anchors)}")
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (anchors.shape[0],):
        raise AnchorsError(f"{source}: counts must be a tensor [C] = [{anchors.shape[0]}]; got {_describe(counts)}")
    return anchors.float(), counts.float()


def _describe(value) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} {value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _legacy_numpy_globals() -> list:
    """The only globals the legacy file needs: numpy array reconstruction and latin-1 bytes.

    ``_reconstruct`` is listed under its numpy 1 and numpy 2 module names.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [(_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype("float64")), _codecs.encode]


def _load_failure_reason(error: Exception) -> str:
    """The informative line of a ``torch.load`` failure (the unpickler's reason, if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if "WeightsUnpickler error" in line]
    return (reasons or lines or [error.__class__.__name__])[0]


def load_cag_uda_anchors(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads the authors' shipped ``category_anchors`` (docs/method.md §2).

    The file is a legacy (non-zip) torch pickle of {objective_vectors: float64 [19, 256],
    objective_num: float64 [19]} numpy arrays. It is loaded with ``weights_only=True`` and an
    allow-list of four numpy/codec globals, so nothing else can run. Returns
    (anchors float32 [C, D], counts float32 [C]).
    """
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise AnchorsError(f"{path}: refused to load as a CAG-UDA category_anchors file "
                         f"({_load_failure_reason(error)})") from None
    if not isinstance(record, dict) or not {"objective_vectors", "objective_num"} <= record.keys():
        raise AnchorsError(f"{path}: expected a dict with keys 'objective_vectors' [C, D] and 'objective_num' [C] "
                         f"(train.py's format); got {_describe(record)}"
                         + (f" with keys {sorted(record)}" if isinstance(record, dict) else ""))
    vectors, counts = record["objective_vectors"], record["objective_num"]
    for key, value in (("objective_vectors", vectors), ("objective_num", counts)):
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise AnchorsError(f"{path}: '{key}' must be a float numpy array; got {_describe(value)}")
    return _checked_anchor_tensors(vectors, counts, source=str(path))
