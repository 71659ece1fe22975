"""Fixture writers: tiny GTA5, SYNTHIA and Cityscapes copies in the exact on-disk formats.

Nothing binary is committed (docs/data.md §1-§3 describes the formats); tests write what they need under ``tmp_path``
with the ``cag.data.io`` writers (GTA5 palette PNGs, Cityscapes 8-bit ``labelIds`` plus 16-bit
``instanceIds`` and colour PNGs, SYNTHIA 16-bit 3-channel PNGs with the class in R and a non-zero
instance in G). Import from a test as ``from formats import make_gta5`` (pytest puts ``tests/``
on ``sys.path``).

Label maps are given per sample as raw dataset ids (Cityscapes labelIds for GTA5/Cityscapes,
SYNTHIA class ids), keyed by the sample's list-file name for GTA5 and SYNTHIA
(``"00001.png"``, ``"0000000.png"``) and by the frame stem for Cityscapes
(``"aachen_000000_000019"``). Images are derived from the labels unless given.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cag.data import io
from cag.labels import LABELS, label_id_palette

_LABEL_COLOURS = np.asarray(label_id_palette(), dtype=np.uint8).reshape(256, 3)
_HAS_INSTANCES = {label.id for label in LABELS if label.hasInstances}


def id_cycle(num_ids: int, shape: tuple[int, int] = (16, 32)) -> np.ndarray:
    """A [H, W] uint8 map holding every id 0..num_ids-1, cycling in raster order."""
    height, width = shape
    return (np.arange(height * width).reshape(height, width) % num_ids).astype(np.uint8)


def fixture_image(ids: np.ndarray, salt: int = 0) -> np.ndarray:
    """A deterministic uint8 [H, W, 3] image for a label map: label colour plus a small ramp."""
    ids = np.asarray(ids)
    height, width = ids.shape
    ramp = (np.arange(height)[:, None] * 3 + np.arange(width)[None, :] + salt) % 40
    return ((_LABEL_COLOURS[ids.astype(np.int64) % 256].astype(np.int64) + ramp[..., None]) % 256).astype(np.uint8)


def _write_pairs(root: Path, labels: dict, images: dict | None, skip_images, skip_labels,
                 image_path, write_label) -> Path:
    images = images or {}
    for name, ids in labels.items():
        if name not in skip_images:
            io.write_image(image_path(name), images.get(name, fixture_image(ids)))
        if name not in skip_labels:
            write_label(name, ids)
    return root


def make_gta5(root, labels: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None,
              skip_images=(), skip_labels=()) -> Path:
    """Write ``images/<name>`` and palette-mode ``labels/<name>`` (index = labelId) under root."""
    root = Path(root)
    return _write_pairs(
        root, labels, images, skip_images, skip_labels,
        image_path=lambda name: root / "images" / name,
        write_label=lambda name, ids: io.write_gta5_label(root / "labels" / name, ids),
    )


def synthia_instances(class_ids: np.ndarray) -> np.ndarray:
    """A non-zero uint16 instance channel (values above 255, so both bytes are set)."""
    return (300 + np.arange(np.asarray(class_ids).size).reshape(np.shape(class_ids)) % 7).astype(np.uint16)


def make_synthia(root, labels: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None,
                 skip_images=(), skip_labels=()) -> Path:
    """Write ``RGB/<name>`` and 16-bit ``GT/LABELS/<name>`` (class in R, instance in G) under root."""
    root = Path(root)

    def write_label(name, ids):
        io.write_synthia_label(root / "GT" / "LABELS" / name, ids, synthia_instances(ids))

    return _write_pairs(
        root, labels, images, skip_images, skip_labels,
        image_path=lambda name: root / "RGB" / name,
        write_label=write_label,
    )


def cityscapes_stem(city: str, sequence: int, frame: int) -> str:
    """``<city>_<seq:06d>_<frame:06d>``, the Cityscapes frame stem."""
    return f"{city}_{sequence:06d}_{frame:06d}"


def cityscapes_entry(stem: str) -> str:
    """The list-file entry of a frame: ``<city>/<stem>_leftImg8bit.png``."""
    return f"{stem.split('_')[0]}/{stem}_leftImg8bit.png"


def cityscapes_instance_ids(label_ids: np.ndarray) -> np.ndarray:
    """16-bit ``instanceIds``: ``id * 1000 + k`` for classes with instances (k = 0 here), else the id."""
    ids = np.asarray(label_ids).astype(np.uint16)
    return np.where(np.isin(ids, list(_HAS_INSTANCES)), ids * 1000, ids).astype(np.uint16)


def write_png16_gray(path, array: np.ndarray) -> None:
    """A 16-bit single-channel PNG (Pillow mode ``I;16``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint16)).save(path)


def make_cityscapes(root, split: str, labels: dict[str, np.ndarray], images: dict[str, np.ndarray] | None = None,
                    skip_images=(), skip_labels=()) -> Path:
    """Write ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` and the gtFine files of each stem.

    gtFine gets ``_gtFine_labelIds.png`` (8-bit L), ``_gtFine_instanceIds.png`` (16-bit) and
    ``_gtFine_color.png`` (RGBA), as in the download, so loaders must pick the labelIds file.
    """
    root = Path(root)

    def write_label(stem, ids):
        folder = root / "gtFine" / split / stem.split("_")[0]
        io.write_cityscapes_label(folder / f"{stem}_gtFine_labelIds.png", ids)
        write_png16_gray(folder / f"{stem}_gtFine_instanceIds.png", cityscapes_instance_ids(ids))
        colour = np.concatenate([_LABEL_COLOURS[ids], np.full(ids.shape + (1,), 255, np.uint8)], axis=-1)
        Image.fromarray(colour, "RGBA").save(folder / f"{stem}_gtFine_color.png")

    return _write_pairs(
        root, labels, images, skip_images, skip_labels,
        image_path=lambda stem: root / "leftImg8bit" / split / cityscapes_entry(stem),
        write_label=write_label,
    )


def write_list_file(path, entries) -> Path:
    """An AdaptSegNet-style list file: one entry per line."""
    path = Path(path)
    path.write_text("".join(f"{entry}\n" for entry in entries))
    return path


def truncate(path, keep: float = 0.5) -> Path:
    """Cut a file to the first ``keep`` fraction of its bytes (a truncated download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
