"""Check a local copy of GTA5, SYNTHIA-RAND-CITYSCAPES or Cityscapes before training on it.

    python data_scripts/check_dataset.py gta5 /data/gta5
    python data_scripts/check_dataset.py cityscapes /data/cityscapes --split val
    python data_scripts/check_dataset.py synthia /data/RAND_CITYSCAPES --max-files 200

Prints every problem found (layout, counts against the release, image/label pairing, sizes,
label values, unreadable files), then a summary. Exit code 0 when the copy is usable
(warnings allowed), 1 otherwise, 2 when the command itself cannot run (e.g. an unreadable list
file; one line, no traceback). The checks are ``cag.data.datasets.check_dataset``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cag.data.datasets import DATASETS, check_dataset  # noqa: E402
from cag.errors import cli_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(DATASETS), help="which dataset layout to expect")
    parser.add_argument("root", help="the dataset root folder")
    parser.add_argument("--list-file", help="check only the entries of this AdaptSegNet-style list file")
    parser.add_argument("--split", default="train", help="Cityscapes split (default: train)")
    parser.add_argument("--no-labels", action="store_true", help="Cityscapes: check the images only")
    parser.add_argument("--max-files", type=int, help="read only the first N samples (default: all)")
    return parser.parse_args(argv)


def _progress(done: int, total: int) -> None:
    if done % 1000 == 0 or done == total:
        print(f"checked {done}/{total}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    return cli_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    report = check_dataset(args.kind, args.root, list_file=args.list_file, split=args.split,
                           labels=not args.no_labels, max_files=args.max_files, progress=_progress)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.usable else 1


if __name__ == "__main__":
    sys.exit(main())
