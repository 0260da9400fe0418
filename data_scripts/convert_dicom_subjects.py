"""Convert DICOM series folders (root/<subject>/<modality>/*.dcm + labels CSV) into one cohort file.

Example::

    python data_scripts/convert_dicom_subjects.py ~/data/dicom ~/data/dicom/labels.csv cohort_dicom.npz \
        --image-size 64 --modalities T1 T2 FLAIR

The loading rules (folder names, slice order, geometry, missing sequences, labels CSV) are documented
in ``mmpfl_core.data.loaders.dicom``; this script only parses arguments and saves.
"""
from __future__ import annotations

import argparse
import sys

from mmpfl_core.data.convert_subjects import convert_subject_folders, subject_folder_parser
from mmpfl_core.data.loaders import load_dicom_subjects


def build_parser() -> argparse.ArgumentParser:
    return subject_folder_parser(__doc__.splitlines()[0], "folder with one sub-folder per subject, one series folder per sequence")


def main(argv: list[str] | None = None) -> int:
    return convert_subject_folders(load_dicom_subjects, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
