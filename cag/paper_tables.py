"""The CAG-UDA paper's published tables, quoted as printed, for scale next to the benchmark's.

Chapter 8 shows them after the benchmark's own table. They are never mixed with the project's
numbers: another task, network and scale, and selected on the validation set they report.
"""
from __future__ import annotations

#: Published per-class IoU (%) quoted verbatim from the CAG-UDA poster (``QimingZHANG-NIPS_UDA.pdf`` in the release); never
#: mixed with our numbers. DeepLab-v3+ / ResNet-101 on GTA5 -> Cityscapes val, 19 classes.
PAPER_GTA5 = {
    "source": "CAG-UDA poster, Table 1 (GTA5 -> Cityscapes, 19 classes), transcribed from QimingZHANG-NIPS_UDA.pdf in RogerZhangzz/CAG_UDA (not re-read since)",
    "classes": ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                "motorcycle", "bicycle", "mIoU"],
    "rows": {
        "Source only": [75.8, 16.8, 77.2, 12.5, 21.0, 25.5, 30.1, 20.1, 81.3, 24.6, 70.3, 53.8, 26.4, 49.9,
                        17.2, 25.9, 6.5, 25.3, 36.0, 36.6],
        "AdaptSegNet": [86.5, 25.9, 79.8, 22.1, 20.0, 23.6, 33.1, 21.8, 81.8, 25.9, 75.9, 57.3, 26.2, 76.3,
                        29.8, 32.1, 7.2, 29.5, 32.5, 41.4],
        "CLAN": [87.0, 27.1, 79.6, 27.3, 23.3, 28.3, 35.5, 24.2, 83.6, 27.4, 74.2, 58.6, 28.0, 76.2, 33.1,
                 36.7, 6.7, 31.9, 31.4, 43.2],
        "BLF (BDL)": [91.0, 44.7, 84.2, 34.6, 27.6, 30.2, 36.0, 36.0, 85.0, 43.6, 83.0, 58.6, 31.6, 83.3,
                      35.3, 49.7, 3.3, 28.8, 35.6, 48.5],
        "CAG-UDA": [90.4, 51.6, 83.8, 34.2, 27.8, 38.4, 25.3, 48.4, 85.4, 38.2, 78.1, 58.6, 34.6, 84.7,
                    21.9, 42.7, 41.1, 29.3, 37.2, 50.2],
    },
}

#: SYNTHIA -> Cityscapes, 13 classes (poster Table 2). No source-only row.
PAPER_SYNTHIA13 = {
    "source": "CAG-UDA poster, Table 2 (SYNTHIA -> Cityscapes, 13 classes), transcribed from QimingZHANG-NIPS_UDA.pdf in RogerZhangzz/CAG_UDA (not re-read since)",
    "classes": ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky", "person",
                "rider", "car", "bus", "motorcycle", "bicycle", "mIoU13"],
    "rows": {
        "AdaptSegNet": [79.2, 37.2, 78.8, 9.9, 10.5, 78.2, 80.5, 53.5, 19.6, 67.0, 29.5, 21.6, 31.3, 45.9],
        "CLAN": [81.3, 37.0, 80.1, 16.1, 13.7, 78.2, 81.5, 53.4, 21.2, 73.0, 32.9, 22.6, 30.7, 47.8],
        "BLF": [86.0, 46.7, 80.3, 14.1, 11.6, 79.2, 81.3, 54.1, 27.9, 73.7, 42.2, 25.7, 45.3, 51.4],
        "CAG-UDA(13)": [84.8, 41.7, 85.5, 13.7, 23.0, 86.5, 78.1, 66.3, 28.1, 81.8, 21.8, 22.9, 49.0, 52.6],
    },
}


def paper_table(table: dict) -> str:
    """A published table as Markdown, numbers as printed (%), with its source underneath."""
    lines = ["| method | " + " | ".join(table["classes"]) + " |", "|" + "---|" * (len(table["classes"]) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for name, values in table["rows"].items()]
    return "\n".join(lines) + f"\n\nSource: {table['source']}."
