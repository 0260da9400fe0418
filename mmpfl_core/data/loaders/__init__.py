"""Real-data loaders: one import path for every loader that turns files a user brings into a Cohort.

The loaders live in one module per file kind (images, NIfTI, DICOM; volumes and common hold what they share); this module re-exports them so that callers write
``from mmpfl_core.data.loaders import load_slice_folders`` whatever the file kind:

=============================  ================================================  =======================
loader                         reads                                             module
=============================  ================================================  =======================
:func:`load_slice_folders`     ``root/<class>/<subject>_<modality>.png|jpg|tif``  :mod:`images`
:func:`load_medmnist_npz`      a MedMNIST ``.npz`` (``train_images`` ...)          :mod:`images`
:func:`load_nifti_subjects`    ``root/<subject>/<modality>.nii.gz`` + labels CSV  :mod:`nifti`
:func:`load_dicom_subjects`    ``root/<subject>/<modality>/*.dcm`` + labels CSV   :mod:`dicom`
:func:`load_image_file`        one 2D image (forced decode)                      :mod:`images`
:func:`load_nifti_volume`      one 3D NIfTI volume (forced read, NaN check)      :mod:`nifti`
:func:`read_dicom_series`      one DICOM series folder -> 3D volume + affine     :mod:`dicom`
=============================  ================================================  =======================

All return arrays that satisfy the sample contract (:mod:`mmpfl_core.data.contract`): images
float32 (N, M, H, W) in [0, 1] normalised per subject and sequence, missing sequences as zeros with
``modality_mask`` False, clinical values standardised with fixed constants (missing -> 0, mask
False). Every failure is a :class:`~mmpfl_core.errors.DataError` naming the file and the fix; a loader
never downloads anything and never returns partial data silently.
"""

from __future__ import annotations

from .common import read_subject_table, resize_images
from .images import IMAGE_SUFFIXES, load_image_file, load_medmnist_npz, load_slice_folders
from .dicom import load_dicom_subjects, load_dicom_volume, read_dicom_series
from .nifti import load_nifti_image, load_nifti_subjects, load_nifti_volume

__all__ = [
    "IMAGE_SUFFIXES",
    "load_dicom_subjects",
    "load_dicom_volume",
    "load_image_file",
    "load_medmnist_npz",
    "load_nifti_image",
    "load_nifti_subjects",
    "load_nifti_volume",
    "load_slice_folders",
    "read_dicom_series",
    "read_subject_table",
    "resize_images",
]
