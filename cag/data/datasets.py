"""GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes as map-style datasets, and a checker for a copy.

Layouts and encodings follow docs/data.md §1-§3; the label mappings are docs/data.md §4
(``cag.labels``). Each item is a dict:

- ``image``: uint8 [3, H, W] without a transform, float [3, h, w] after ``cag.data.transforms``;
- ``label``: int64 [H, W] train ids, 255 = ignore (absent for unlabeled data);
- ``name``: the sample's list-file entry, i.e. its path relative to the image folder
  (``00001.png``, ``0000000.png``, ``frankfurt/frankfurt_000000_000294_leftImg8bit.png``).

Samples are the sorted file names, or the entries of an AdaptSegNet-style list file. Cheap checks
(layout, image/label pairing) run at construction; content checks (readability, sizes, label
values) run when a sample is read, and raise ``cag.data.io.DataError`` naming the file.
Pairs with a missing half are dropped with one ``MissingFilesWarning`` giving the count.

Deterministic augmentation: sample ``i`` in epoch ``e`` is transformed with a ``torch.Generator``
seeded from ``(seed, e, i)`` (``sample_seed``), so its augmentation depends neither on the order
samples are read in nor on the number of DataLoader workers. Call ``dataset.set_epoch(e)`` before
each epoch; with ``persistent_workers=True`` the workers keep their own copy of the dataset and
do not see it, so leave that option off (the default) when augmenting.

``check_dataset`` runs every check over a user's copy and collects all problems at once; it is
the logic behind ``data_scripts/check_dataset.py``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from ..labels import cityscapes_lut, gta5_lut, synthia_lut
from .io import DataError, read_image, read_index_label, read_synthia_label

ERROR = "error"
WARNING = "warning"
#: Dropped entries named in the warning; the datasets already warned about in this process.
_NAMED = 20
_WARNED: set = set()


class MissingFilesWarning(UserWarning):
    """Some entries were dropped because their image or label file is missing."""


@dataclass(frozen=True)
class Problem:
    """One finding about a dataset copy: ``severity`` is ``"error"`` or ``"warning"``."""

    severity: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.message}"


@dataclass(frozen=True)
class Sample:
    """One dataset entry: its name and the image and label paths (label None if unlabeled)."""

    name: str
    image: Path
    label: Path | None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 64-bit augmentation seed of sample ``index`` in ``epoch`` (module docstring)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _listing(folder: Path) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(entries)} entries)" if len(entries) > 10 else ""
    return ", ".join(entries[:10]) + more if entries else "nothing"


_LAYOUT_MARKERS = (
    ("Cityscapes", ("leftImg8bit",)),
    ("SYNTHIA", ("RGB", "GT")),
    ("GTA5", ("images", "labels")),
)


def guess_layout(root) -> str | None:
    """The dataset whose top-level folders ``root`` has (docs/data.md §1-§3), or None."""
    root = Path(root)
    for kind, folders in _LAYOUT_MARKERS:
        if all((root / f).is_dir() for f in folders):
            return kind
    return None


def _layout_hint(root: Path, kind: str) -> str:
    guess = guess_layout(root)
    if guess is not None and guess != kind:
        return f" (this looks like a {guess} root)"
    if any(root.glob("*.png")):
        return " (this folder holds PNG files itself: pass the dataset root above it)"
    return ""


def _nearest_existing(folder: Path) -> Path:
    while not folder.is_dir():
        folder = folder.parent
    return folder


def ids_out_of_range(path, ids: np.ndarray, max_id: int, kind: str) -> list[Problem]:
    """An error if a label map holds ids above ``max_id`` (GTA5/Cityscapes 34, SYNTHIA 22).

    docs/data.md §2-§3: known void ids map to 255 through the lookup table; larger values
    mean the file is not a map of label ids (e.g. a colour or luminance image).
    """
    bad = np.unique(ids[ids > max_id])
    if bad.size == 0:
        return []
    shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
    return [Problem(ERROR, str(path), (
        f"{path}: label values {shown} are outside the {kind} label ids 0..{max_id} "
        "(is it a colour/luminance image or a train-id map instead of label ids?)"
    ))]


def size_mismatch(sample: Sample, image: np.ndarray, ids: np.ndarray) -> list[Problem]:
    """An error if the label's height and width differ from its image's (docs/data.md §1-§3)."""
    if image.shape[:2] == ids.shape[:2]:
        return []
    (ih, iw), (lh, lw) = image.shape[:2], ids.shape[:2]
    return [Problem(ERROR, str(sample.label), (
        f"{sample.label}: label is {lw}x{lh} (WxH) but its image {sample.image} is {iw}x{ih}"
    ))]


def _read_or_report(reader: Callable, path: Path, problems: list[Problem]):
    try:
        return reader(path)
    except DataError as err:
        problems.append(Problem(ERROR, str(path), str(err)))
        return None


class SegmentationDataset(Dataset):
    """Shared core of the three datasets: layout check, pairing, reading, mapping, transform.

    Subclasses set the folder layout as class attributes: ``image_dir``/``label_dir`` (relative
    to the root), ``image_suffix``/``label_suffix`` (an entry ``x + image_suffix`` pairs with the
    label ``x + label_suffix``), ``pattern_prefix`` (``"*/"`` for per-city folders), and
    ``max_label_id``, ``frame_size_wh``, ``expected_count`` for the checks.
    """

    kind = ""
    image_dir = ""
    label_dir = ""
    image_suffix = ".png"
    label_suffix = ".png"
    pattern_prefix = ""
    max_label_id = 255
    frame_size_wh: tuple[int, int] | None = None
    expected_count: int | None = None

    def __init__(self, root, lut: np.ndarray, num_classes: int, list_file=None, transform=None,
                 seed: int = 0, labels: bool = True):
        self.root = Path(root)
        self.lut = lut
        self.num_classes = num_classes
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.has_labels = bool(labels)
        self.list_file = None if list_file is None else Path(list_file)
        self._check_layout()
        images = self._image_entries()
        labels = self._label_entries() if self.has_labels else []
        entries = self._entries(images, labels)
        self.samples, self.incomplete = self._pair(entries, set(images), set(labels))
        self._warn_incomplete(len(entries))
        if not self.samples:
            raise DataError(self._empty_message(entries, len(images), len(labels)))

    @property
    def release(self) -> str:
        """The dataset (and split) name used in messages."""
        return self.kind

    # ---- construction: layout and pairing -------------------------------------------------
    def _required_dirs(self) -> list[str]:
        return [self.image_dir, self.label_dir] if self.has_labels else [self.image_dir]

    def _check_layout(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.kind} root {self.root} does not exist or is not a folder")
        missing = [d for d in self._required_dirs() if not (self.root / d).is_dir()]
        if missing:
            near = _nearest_existing(self.root / missing[0])
            raise DataError(
                f"{self.root}: not a {self.kind} root: expected the folders "
                f"{', '.join(d + '/' for d in self._required_dirs())} but {missing[0]}/ is missing; "
                f"{near} holds: {_listing(near)}{_layout_hint(self.root, self.kind)}"
            )

    def _found(self, folder: str, suffix: str) -> list[str]:
        base = self.root / folder
        return sorted(p.relative_to(base).as_posix() for p in base.glob(self.pattern_prefix + "*" + suffix))

    def _image_entries(self) -> list[str]:
        return self._found(self.image_dir, self.image_suffix)

    def _label_entries(self) -> list[str]:
        return [self._image_name(name) for name in self._found(self.label_dir, self.label_suffix)]

    def _image_name(self, label_name: str) -> str:
        return label_name[: -len(self.label_suffix)] + self.image_suffix

    def _label_name(self, entry: str) -> str:
        return entry[: -len(self.image_suffix)] + self.label_suffix

    def _entries(self, images: list[str], labels: list[str]) -> list[str]:
        if self.list_file is not None:
            return read_list_file(self.list_file, self.image_suffix)
        return sorted(set(images) | set(labels))

    def _gaps(self, name: str, images: set[str], labels: set[str]) -> list[str]:
        gaps = []
        if name not in images:
            gaps.append(f"no image {self.image_dir}/{name}")
        if self.has_labels and name not in labels:
            gaps.append(f"no label {self.label_dir}/{self._label_name(name)}")
        return gaps

    def _pair(self, entries: list[str], images: set[str], labels: set[str]):
        samples, incomplete = [], []
        for name in entries:
            gaps = self._gaps(name, images, labels)
            if gaps:
                incomplete.append((name, ", ".join(gaps)))
                continue
            label = self.root / self.label_dir / self._label_name(name) if self.has_labels else None
            samples.append(Sample(name, self.root / self.image_dir / name, label))
        return samples, incomplete

    def _warn_incomplete(self, total: int) -> None:
        """One ``MissingFilesWarning`` per dataset and process, naming the dropped entries.

        GTA5 itself has frames without labels; every stage of a run opens the same datasets,
        so the warning is given the first time only (once per run, not once per stage).
        """
        if not self.incomplete:
            return
        key = (type(self).__name__, str(self.root.resolve()), str(self.list_file), getattr(self, "split", None))
        if key in _WARNED:
            return
        _WARNED.add(key)
        shown = "; ".join(f"{name} ({why})" for name, why in self.incomplete[:_NAMED])
        more = (f"; and {len(self.incomplete) - _NAMED} more (data_scripts/check_dataset.py lists them all)"
                if len(self.incomplete) > _NAMED else "")
        warnings.warn(
            f"{self.release} at {self.root}: dropped {len(self.incomplete)} of {total} entries whose "
            f"image or label file is missing: {shown}{more}",
            MissingFilesWarning,
            stacklevel=4,
        )

    def _empty_message(self, entries: list[str], n_images: int, n_labels: int) -> str:
        if self.list_file is not None and entries:
            return (f"{self.release} at {self.root}: none of the {len(entries)} entries of list file "
                    f"{self.list_file} has both its image and label")
        if self.list_file is not None:
            return f"{self.release}: list file {self.list_file} has no entries"
        found = f"{n_images} images ({self.image_dir}/{self.pattern_prefix}*{self.image_suffix})"
        if self.has_labels:
            found += f", {n_labels} labels ({self.label_dir}/{self.pattern_prefix}*{self.label_suffix})"
        return f"{self.release} at {self.root}: empty dataset, no complete samples: found {found}"

    # ---- reading ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The entries of the usable samples, in order (what ``make_lists.py`` writes)."""
        return [s.name for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation seeds ``__getitem__`` uses (module docstring)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        """A CPU generator seeded from (dataset seed, epoch, index) for sample ``index``."""
        return torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))

    def read_label_ids(self, path: Path) -> np.ndarray:
        """The raw label ids of one label file, [H, W] (docs/data.md §1-§2: 8-bit P or L PNG)."""
        return read_index_label(path)

    def load(self, index: int) -> tuple[np.ndarray | None, np.ndarray | None, list[Problem]]:
        """Raw image [H, W, 3] and label ids [H, W] of one sample, and every problem found.

        An unreadable file comes back as None with its error in the list (nothing is raised).
        """
        sample = self.samples[index]
        problems: list[Problem] = []
        image = _read_or_report(read_image, sample.image, problems)
        ids = None if sample.label is None else _read_or_report(self.read_label_ids, sample.label, problems)
        if image is not None and ids is not None:
            problems += size_mismatch(sample, image, ids)
        if ids is not None:
            problems += ids_out_of_range(sample.label, ids, self.max_label_id, self.kind)
        return image, ids, problems

    def read_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``load`` that raises a ``DataError`` naming the file(s) on any error."""
        image, ids, problems = self.load(index)
        errors = [p.message for p in problems if p.severity == ERROR]
        if errors:
            raise DataError("; ".join(errors))
        return image, ids

    def __getitem__(self, index: int) -> dict:
        image, ids = self.read_arrays(index)
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        label = None if ids is None else torch.from_numpy(self.lut[ids].astype(np.int64))
        if self.transform is not None:
            image, label = self.transform(image, label, generator=self.generator(index))
        item = {"image": image, "name": self.samples[index].name}
        if label is not None:
            item["label"] = label
        return item

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, num_classes={self.num_classes})"


def collate(items: list[dict]) -> dict:
    """``default_collate`` for dataset items, refusing samples of different sizes by name.

    Without a resize, frames of another size than the rest (GTA5 has 1914x1046 frames among
    its 1914x1052 ones) cannot share a batch; PyTorch would stop with "stack expects each
    tensor to be equal size". This names the samples and their sizes instead.
    """
    from torch.utils.data import default_collate

    for key in ("image", "label"):
        shapes = [tuple(item[key].shape) for item in items if key in item]
        if len(set(shapes)) > 1:
            sizes = ", ".join(f"{item.get('name', '?')} {'x'.join(map(str, item[key].shape[-2:][::-1]))}"
                              for item in items)
            raise DataError(f"cannot batch {key}s of different sizes (W x H): {sizes}; set the "
                            "configuration's resize for this dataset or a batch size of 1")
    return default_collate(items)


def loader_workers(num_workers: int, batches: int) -> int:
    """Loader processes for a loader that hands out ``batches`` batches per pass:
    ``data.num_workers``, but never more than it has batches to give (the numbers do not depend on
    it). Each worker is a fork of the training process; on a CPU run at real size that process
    holds gigabytes, and idle workers that copy part of it (three loaders of 8 for a validation of
    one image and two streams of one batch per epoch) pushed two runs side by side out of 24 GB."""
    return max(0, min(int(num_workers), int(batches)))


def read_list_file(path, suffix: str = ".png") -> list[str]:
    """Entries of an AdaptSegNet-style list file: one relative image name per line, blanks skipped.

    docs/data.md §1-§3: ``00001.png`` (GTA5), ``0000000.png`` (SYNTHIA),
    ``frankfurt/frankfurt_000000_000294_leftImg8bit.png`` (Cityscapes, under ``leftImg8bit/<split>/``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        if Path(entry).is_absolute() or ".." in Path(entry).parts or not entry.endswith(suffix):
            raise DataError(
                f"{path}:{number}: entry {entry!r} should be a relative image name ending in {suffix!r}"
            )
        entries.append(entry)
    return entries


class GTA5(SegmentationDataset):
    """GTA5 ("Playing for Data"): ``images/NNNNN.png`` + palette ``labels/NNNNN.png``.

    docs/data.md §2: the palette index is the Cityscapes labelId, mapped with
    ``cag.labels.gta5_lut`` (void ids, 34 included, become 255). Real copies miss about 25
    label files; those entries are dropped with one warning. The released pipeline resizes
    frames to 1914x1052: pass ``train_transform(resize=(1914, 1052))``.
    """

    kind = "GTA5"
    image_dir = "images"
    label_dir = "labels"
    max_label_id = 34
    frame_size_wh = (1914, 1052)
    expected_count = 24966

    def __init__(self, root, list_file=None, transform=None, num_classes: int = 19, seed: int = 0):
        super().__init__(root, gta5_lut(num_classes), num_classes, list_file, transform, seed)


class Synthia(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/NNNNNNN.png`` + 16-bit ``GT/LABELS/NNNNNNN.png``.

    docs/data.md §3: the class id is in the red channel of a 16-bit 3-channel PNG, read with
    OpenCV (Pillow silently returns zeros); mapped to 16, 13 or 19 classes by
    ``cag.labels.synthia_lut`` (docs/data.md §4).
    """

    kind = "SYNTHIA"
    image_dir = "RGB"
    label_dir = "GT/LABELS"
    max_label_id = 22
    frame_size_wh = (1280, 760)
    expected_count = 9400

    def __init__(self, root, num_classes: int = 16, list_file=None, transform=None, seed: int = 0):
        super().__init__(root, synthia_lut(num_classes), num_classes, list_file, transform, seed)

    def read_label_ids(self, path: Path) -> np.ndarray:
        """SYNTHIA class ids from the 16-bit red channel (docs/data.md §3)."""
        return read_synthia_label(path)


CITYSCAPES_COUNTS = {"train": 2975, "val": 500, "test": 1525}


class Cityscapes(SegmentationDataset):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    docs/data.md §1 and §4: labelIds mapped with ``cag.labels.cityscapes_lut``
    (16/13 classes for the SYNTHIA protocols ignore the excluded classes). ``labels=False``
    reads the images only (the unlabeled adaptation split): no ``label`` key, no gtFine needed.
    """

    kind = "Cityscapes"
    image_suffix = "_leftImg8bit.png"
    label_suffix = "_gtFine_labelIds.png"
    pattern_prefix = "*/"
    max_label_id = 34
    frame_size_wh = (2048, 1024)

    def __init__(self, root, split: str = "train", labels: bool = True, list_file=None, transform=None,
                 num_classes: int = 19, seed: int = 0):
        self.split = split
        self.image_dir = f"leftImg8bit/{split}"
        self.label_dir = f"gtFine/{split}"
        self.expected_count = CITYSCAPES_COUNTS.get(split)
        super().__init__(root, cityscapes_lut(num_classes), num_classes, list_file, transform, seed, labels)

    @property
    def release(self) -> str:
        """``Cityscapes <split>``, used in messages."""
        return f"Cityscapes {self.split}"


DATASETS = {"gta5": GTA5, "synthia": Synthia, "cityscapes": Cityscapes}


def dataset_class(kind: str) -> type[SegmentationDataset]:
    """The dataset class named ``kind`` (``gta5``, ``synthia`` or ``cityscapes``, any case)."""
    if kind.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[kind.lower()]


def open_dataset(kind: str, root, list_file=None, split: str = "train", labels: bool = True,
                 transform=None, num_classes: int | None = None, seed: int = 0) -> SegmentationDataset:
    """Build the dataset named ``kind`` (``gta5``, ``synthia`` or ``cityscapes``) with its defaults.

    ``split`` and ``labels`` apply to Cityscapes only; ``num_classes=None`` keeps the
    dataset's default (19 for GTA5 and Cityscapes, 16 for SYNTHIA).
    """
    cls = dataset_class(kind)
    kwargs = {"list_file": list_file, "transform": transform, "seed": seed}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cls is Cityscapes:
        kwargs.update(split=split, labels=labels)
    return cls(root, **kwargs)


# ---- checking a user's copy ---------------------------------------------------------------------
@dataclass
class DatasetReport:
    """Everything ``check_dataset`` found: usable pairs, files checked and all problems."""

    kind: str
    root: str
    pairs: int = 0
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems that make the copy unusable."""
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """Findings worth knowing that do not stop training (gaps, counts, frame sizes)."""
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable(self) -> bool:
        """True when there is at least one sample and no error (warnings allowed)."""
        return self.pairs > 0 and not self.errors

    def summary(self) -> str:
        """One line: samples, files checked, error and warning counts, and the verdict."""
        verdict = "usable" if self.usable else "NOT usable"
        return (f"{self.kind} at {self.root}: {self.pairs} samples, {self.checked} checked, "
                f"{len(self.errors)} errors, {len(self.warnings)} warnings: {verdict}")


def incomplete_problems(dataset: SegmentationDataset) -> list[Problem]:
    """One warning per entry dropped for a missing image or label (docs/data.md §2 gaps)."""
    return [Problem(WARNING, str(dataset.root / dataset.image_dir / name), f"{name}: {why}")
            for name, why in dataset.incomplete]


def count_problems(dataset: SegmentationDataset) -> list[Problem]:
    """A warning when a full (no list file) copy has another sample count than the release."""
    expected = dataset.expected_count
    if dataset.list_file is not None or expected is None or len(dataset) == expected:
        return []
    return [Problem(WARNING, str(dataset.root), (
        f"{dataset.root}: {len(dataset)} complete samples, the full {dataset.release} has {expected}"
    ))]


def frame_size_problems(dataset: SegmentationDataset, index: int, image: np.ndarray) -> list[Problem]:
    """A warning for a frame whose size differs from the dataset's usual one (docs/data.md §1-§3)."""
    expected = dataset.frame_size_wh
    height, width = image.shape[:2]
    if expected is None or (width, height) == tuple(expected):
        return []
    path = dataset.samples[index].image
    return [Problem(WARNING, str(path), (
        f"{path}: frame is {width}x{height}, {dataset.kind} frames are usually {expected[0]}x{expected[1]}"
    ))]


def check_dataset(kind: str, root, list_file=None, split: str = "train", labels: bool = True,
                  max_files: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    """Check a copy of ``kind`` at ``root`` and collect every problem (docs/data.md §1-§3).

    Layout and list file first (an error there stops the check), then one warning per
    incomplete pair, the sample count against the release (GTA5 24,966; SYNTHIA 9,400;
    Cityscapes train 2,975 / val 500), and for each of the first ``max_files`` samples
    (all by default): readability, image/label size, label id range (errors) and frame size
    (warning). ``progress(done, total)`` is called after each sample.
    """
    report = DatasetReport(dataset_class(kind).kind, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MissingFilesWarning)
            dataset = open_dataset(kind, root, list_file=list_file, split=split, labels=labels)
    except DataError as err:
        report.problems.append(Problem(ERROR, str(root), str(err)))
        return report
    report.kind = dataset.release
    report.pairs = len(dataset)
    report.problems += incomplete_problems(dataset) + count_problems(dataset)
    total = len(dataset) if max_files is None else min(max_files, len(dataset))
    for index in range(total):
        image, _, problems = dataset.load(index)
        report.problems += problems
        if image is not None:
            report.problems += frame_size_problems(dataset, index, image)
        if progress is not None:
            progress(index + 1, total)
    report.checked = total
    return report
