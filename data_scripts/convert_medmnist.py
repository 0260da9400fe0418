"""Convert one split of a MedMNIST .npz already on disk into a single-sequence cohort file.

Example::

    python data_scripts/convert_medmnist.py ~/data/pneumoniamnist.npz cohort_pneumonia_train.npz \
        --split train --image-size 64 --class-names normal pneumonia

Nothing is downloaded. The loading rules are documented in
``mmpfl_core.data.loaders.images.load_medmnist_npz``; this script only parses arguments and saves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpfl_core.data.loaders import load_medmnist_npz
from mmpfl_core.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", type=Path, help="MedMNIST .npz file")
    parser.add_argument("out", type=Path, help="output cohort file (written by mmpfl_core.data.cohort_files.save_cohort)")
    parser.add_argument("--split", choices=("train", "val", "test"), default="train")
    parser.add_argument("--image-size", type=int, default=None, help="output side length (default: keep)")
    parser.add_argument("--class-names", nargs="+", default=None, help="the dataset's class names, in label order")
    parser.add_argument("--modality-name", default="T1", help="name of the single sequence (default T1)")
    parser.add_argument("--site", type=int, default=0, help="site id of every image (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmpfl_core.data.cohort_files import save_cohort  # imported here so that --help works without the io module

    try:
        cohort = load_medmnist_npz(args.npz, split=args.split, image_size=args.image_size,
                                   class_names=args.class_names, modality_name=args.modality_name, site=args.site)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_cohort(cohort, args.out)
    print(f"saved {len(cohort)} images, images {cohort.images.shape}, classes {cohort.class_names} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
