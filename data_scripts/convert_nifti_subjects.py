"""Convert BraTS-like NIfTI folders (root/<subject>/<modality>.nii.gz + labels CSV) into one cohort file.

Example::

    python data_scripts/convert_nifti_subjects.py ~/data/brats ~/data/brats/labels.csv cohort_brats.npz \
        --image-size 64 --modalities T1 T2 FLAIR --slices-per-subject 3

The loading rules (file names, slice choice, missing sequences, labels CSV) are documented in
``mmpfl_core.data.loaders.nifti.load_nifti_subjects``; this script only parses arguments and saves.
"""
from __future__ import annotations

import argparse
import sys

from mmpfl_core.data.convert_subjects import convert_subject_folders, subject_folder_parser
from mmpfl_core.data.loaders import load_nifti_subjects


def build_parser() -> argparse.ArgumentParser:
    return subject_folder_parser(__doc__.splitlines()[0], "folder with one sub-folder per subject")


def main(argv: list[str] | None = None) -> int:
    return convert_subject_folders(load_nifti_subjects, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
