"""Reading and writing images and label maps in the datasets' exact on-disk formats.

docs/data.md §1-§3: GTA5 labels are 8-bit palette PNGs whose palette index is the
Cityscapes labelId (never ``.convert("L")``); Cityscapes ``*_gtFine_labelIds.png`` are 8-bit
single-channel; SYNTHIA ``GT/LABELS`` are 16-bit 3-channel PNGs with the class in the red
channel, which Pillow silently reads as zeros, so they are read with OpenCV.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserInputError
from ..labels import label_id_palette


class DataError(UserInputError, ValueError):
    """A dataset file is missing, unreadable or not in the expected format."""

    kind = "data error"


def read_image(path) -> np.ndarray:
    """An RGB image as uint8 [H, W, 3]."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from err


def read_index_label(path, allowed_modes=("P", "L")) -> np.ndarray:
    """A palette or grey 8-bit label PNG as uint8 [H, W] of raw indices (no colour conversion)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in allowed_modes:
                raise DataError(
                    f"{path}: label PNG has mode {im.mode!r}, expected one of {allowed_modes} "
                    "(an 8-bit map of label ids, not a colour image)"
                )
            return np.asarray(im).copy()
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot read label ({err})") from err


def read_synthia_label(path) -> np.ndarray:
    """SYNTHIA ``GT/LABELS`` class ids (red channel of a 16-bit 3-channel PNG) as uint16 [H, W].

    Read with OpenCV's ``IMREAD_UNCHANGED`` (channels come back as BGR). An 8-bit file is
    refused: it is a colour visualisation or a Pillow re-save, not the original labels.
    """
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"{path}: cannot read SYNTHIA label (missing or corrupt PNG)")
    if raw.dtype != np.uint16:
        raise DataError(
            f"{path}: SYNTHIA label is {raw.dtype}, expected 16-bit; use the original "
            "GT/LABELS files (GT/COLOR and 8-bit re-saves do not hold class ids)"
        )
    if raw.ndim == 2:
        return raw
    return raw[..., 2]


def write_image(path, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3] RGB as PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(path)


def write_gta5_label(path, label_ids: np.ndarray) -> None:
    """Write Cityscapes labelIds as a GTA5-style palette PNG (index = labelId)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(label_ids, dtype=np.uint8), "P")
    im.putpalette(label_id_palette())
    im.save(path)


def write_cityscapes_label(path, label_ids: np.ndarray) -> None:
    """Write Cityscapes labelIds as an 8-bit single-channel ``*_gtFine_labelIds.png``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(label_ids, dtype=np.uint8), "L").save(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path, array: np.ndarray) -> None:
    """Write uint16 [H, W, 3] as a 16-bit RGB PNG (numpy + zlib; the SYNTHIA label format)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError("write_png16 expects [H, W, 3]")
    h, w, _ = array.shape
    rows = array.astype(">u2").reshape(h, w * 3).tobytes()
    stride = w * 6
    raw = b"".join(b"\x00" + rows[i * stride:(i + 1) * stride] for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


def write_synthia_label(path, class_ids: np.ndarray, instance_ids: np.ndarray | None = None) -> None:
    """Write SYNTHIA class ids as a 16-bit 3-channel PNG: class in R, instance in G, 0 in B."""
    class_ids = np.asarray(class_ids, dtype=np.uint16)
    inst = np.zeros_like(class_ids) if instance_ids is None else np.asarray(instance_ids, dtype=np.uint16)
    write_png16(path, np.stack([class_ids, inst, np.zeros_like(class_ids)], axis=-1))
