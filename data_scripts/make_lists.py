"""Write an AdaptSegNet-style list file of the complete samples of a local dataset copy.

    python data_scripts/make_lists.py gta5 /data/gta5 lists/gta5_all.txt
    python data_scripts/make_lists.py cityscapes /data/cityscapes lists/city_val.txt --split val

One entry per line, sorted, relative to the image folder (``00001.png``, ``0000000.png``,
``frankfurt/frankfurt_000000_000294_leftImg8bit.png``): the ``list_file`` format the
``cag.data`` datasets read. Entries missing their image or label are left out (with a warning).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cag.data.datasets import DATASETS, open_dataset  # noqa: E402
from cag.errors import OutputError, cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(DATASETS), help="which dataset layout to expect")
    parser.add_argument("root", help="the dataset root folder")
    parser.add_argument("out", help="the list file to write")
    parser.add_argument("--split", default="train", help="Cityscapes split (default: train)")
    parser.add_argument("--no-labels", action="store_true", help="Cityscapes: list images without gtFine")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Exit status 0, or 2 with one line naming the folder or file (``cag.errors``)."""
    return cli_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    dataset = open_dataset(args.kind, args.root, split=args.split, labels=not args.no_labels)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{name}\n" for name in dataset.names))
    except OSError as err:
        raise OutputError(f"cannot write the list file {out} ({err.strerror or err})") from None
    print(f"wrote {len(dataset)} entries to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
