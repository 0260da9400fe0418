"""The command line shared by the subject-folder converters (``data_scripts/convert_{nifti,dicom}_subjects.py``).

Both converters take the same arguments (a folder of subjects, a labels CSV, an output cohort file
and the slicing options) and differ only in the loader they call; this module holds the parser and
the load-then-save step once, so the two scripts cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable

from ..errors import DataError
from .contract import MODALITIES, Cohort

__all__ = ["convert_subject_folders", "subject_folder_parser"]


def _slice_index(value: str) -> int | str:
    """'middle' or an integer axial index."""
    return value if value == "middle" else int(value)


def subject_folder_parser(description: str, root_help: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("root", type=Path, help=root_help)
    parser.add_argument("labels_csv", type=Path, help="CSV with columns subject,label[,site,age,...]")
    parser.add_argument(
        "out", type=Path, help="output cohort file (written by mmpfl_core.data.cohort_files.save_cohort)"
    )
    parser.add_argument("--image-size", type=int, default=64, help="output side length H = W (default 64)")
    parser.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="sequence names, in order")
    parser.add_argument("--class-names", nargs="+", default=None, help="fixed class list (default: labels in CSV)")
    parser.add_argument("--slice-index", type=_slice_index, default="middle", help="'middle' or an axial index")
    parser.add_argument("--slices-per-subject", type=int, default=1, help="consecutive axial slices per subject")
    parser.add_argument("--site", type=int, default=0, help="site id where the CSV gives none (default 0)")
    parser.add_argument("--require-all", action="store_true", help="fail when a subject lacks a sequence")
    parser.add_argument(
        "--resample",
        action="store_true",
        help="resample sequences on another voxel grid onto the first sequence's (default: refuse)",
    )
    parser.add_argument(
        "--site-column", default=None, help="CSV column with integer site ids, -1 = public (default: 'site' if present)"
    )
    return parser


def convert_subject_folders(loader: Callable[..., Cohort], args: argparse.Namespace) -> int:
    """Load with ``loader`` and save the cohort; a data defect prints one error line and returns 2."""
    from .cohort_files import save_cohort

    try:
        cohort = loader(
            args.root,
            args.labels_csv,
            image_size=args.image_size,
            modalities=args.modalities,
            class_names=args.class_names,
            slice_index=args.slice_index,
            slices_per_subject=args.slices_per_subject,
            site=args.site,
            require_all=args.require_all,
            resample=args.resample,
            site_column=args.site_column,
        )
        save_cohort(cohort, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"saved {len(cohort)} slices, images {cohort.images.shape}, classes {cohort.class_names} -> {args.out}")
    return 0
