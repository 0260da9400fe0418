"""Convert 2D slices in class folders (root/<class>/<subject>_<modality>.png) into one cohort file.

Example::

    python data_scripts/convert_slice_folders.py ~/data/ms_slices cohort_ms_slices.npz \
        --image-size 64 --modalities T1 T2 FLAIR --clinical-csv ~/data/ms_slices/clinical.csv

The loading rules (modality suffixes, missing sequences, clinical CSV) are documented in
``mmpfl_core.data.loaders.images.load_slice_folders``; this script only parses arguments and saves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpfl_core.data.contract import MODALITIES
from mmpfl_core.data.loaders import load_slice_folders
from mmpfl_core.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder with one sub-folder per class")
    parser.add_argument("out", type=Path, help="output cohort file (written by mmpfl_core.data.cohort_files.save_cohort)")
    parser.add_argument("--image-size", type=int, default=64, help="output side length H = W (default 64)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="sequence names, in order")
    parser.add_argument("--class-names", nargs="+", default=None, help="fixed class list (default: folder names)")
    parser.add_argument("--single-modality", default=None,
                        help="the sequence of files that carry no _<modality> suffix")
    parser.add_argument("--site", type=int, default=0, help="site id where the CSV gives none (default 0)")
    parser.add_argument("--clinical-csv", type=Path, default=None, help="CSV: subject,age,sex_female,edss,...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmpfl_core.data.cohort_files import save_cohort  # imported here so that --help works without the io module

    try:
        cohort = load_slice_folders(args.root, image_size=args.image_size, modalities=args.modalities,
                                    class_names=args.class_names, single_modality=args.single_modality,
                                    site=args.site, clinical_csv=args.clinical_csv)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_cohort(cohort, args.out)
    print(f"saved {len(cohort)} subjects, images {cohort.images.shape}, classes {cohort.class_names} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
