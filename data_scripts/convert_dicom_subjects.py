"""Convert DICOM series folders (root/<subject>/<modality>/*.dcm + labels CSV) into one cohort file.

Example::

    python data_scripts/convert_dicom_subjects.py ~/data/dicom ~/data/dicom/labels.csv cohort_dicom.npz \
        --image-size 64 --modalities T1 T2 FLAIR

The loading rules (folder names, slice order, geometry, missing sequences, labels CSV) are documented
in ``mmpfl_core.data.loaders_dicom``; this script only parses arguments and saves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpfl_core.data.contract import MODALITIES
from mmpfl_core.data.loaders import load_dicom_subjects
from mmpfl_core.errors import DataError


def _slice_index(value: str) -> int | str:
    """'middle' or an integer axial index."""
    return value if value == "middle" else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder with one sub-folder per subject, one series folder per sequence")
    parser.add_argument("labels_csv", type=Path, help="CSV with columns subject,label[,site,age,...]")
    parser.add_argument("out", type=Path, help="output cohort file (written by mmpfl_core.data.io.save_cohort)")
    parser.add_argument("--image-size", type=int, default=64, help="output side length H = W (default 64)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="sequence names, in order")
    parser.add_argument("--class-names", nargs="+", default=None, help="fixed class list (default: labels in CSV)")
    parser.add_argument("--slice-index", type=_slice_index, default="middle", help="'middle' or an axial index")
    parser.add_argument("--slices-per-subject", type=int, default=1, help="consecutive axial slices per subject")
    parser.add_argument("--site", type=int, default=0, help="site id where the CSV gives none (default 0)")
    parser.add_argument("--require-all", action="store_true", help="fail when a subject lacks a sequence")
    parser.add_argument("--resample", action="store_true",
                        help="resample sequences on another voxel grid onto the first sequence's (default: refuse)")
    parser.add_argument("--site-column", default=None,
                        help="CSV column with integer site ids, -1 = public (default: 'site' if present)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmpfl_core.data.io import save_cohort  # imported here so that --help works without the io module

    try:
        cohort = load_dicom_subjects(args.root, args.labels_csv, image_size=args.image_size,
                                     modalities=args.modalities, class_names=args.class_names,
                                     slice_index=args.slice_index, slices_per_subject=args.slices_per_subject,
                                     site=args.site, require_all=args.require_all, resample=args.resample,
                                     site_column=args.site_column)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        save_cohort(cohort, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {len(cohort)} slices, images {cohort.images.shape}, classes {cohort.class_names} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
