"""Data: the sample contract, the synthetic MS cohort, federation partitioning, real-data loaders."""

from .cohort_federation import CohortSource, federation_from_cohort
from .cohort_files import load_cohort, load_federation, save_cohort, save_federation
from .contract import (
    CLASS_NAMES,
    CLINICAL_FEATURES,
    CLINICAL_REFERENCE,
    MODALITIES,
    Cohort,
    CohortDataset,
    concatenate,
    normalise_intensity,
    standardise_clinical,
)
from .federation import (
    Federation,
    FederationConfig,
    SiteData,
    build_federation,
    dirichlet_label_partition,
    label_divergence,
    label_divergence_from_counts,
)
from .loaders import (
    load_dicom_subjects,
    load_image_file,
    load_medmnist_npz,
    load_nifti_subjects,
    load_nifti_volume,
    load_slice_folders,
    read_dicom_series,
)
from .scanners import ScannerProfile, apply_scanner, default_site_profiles, reference_profile
from .summary import cohort_summary_table
from .synthetic import TISSUE_LABELS, SyntheticCohortConfig, generate_subjects

__all__ = [
    "CLASS_NAMES",
    "CLINICAL_FEATURES",
    "CLINICAL_REFERENCE",
    "MODALITIES",
    "Cohort",
    "CohortDataset",
    "concatenate",
    "normalise_intensity",
    "standardise_clinical",
    "load_dicom_subjects",
    "load_image_file",
    "load_medmnist_npz",
    "load_nifti_subjects",
    "load_nifti_volume",
    "load_slice_folders",
    "read_dicom_series",
    "TISSUE_LABELS",
    "SyntheticCohortConfig",
    "generate_subjects",
    "ScannerProfile",
    "apply_scanner",
    "default_site_profiles",
    "reference_profile",
    "Federation",
    "FederationConfig",
    "SiteData",
    "build_federation",
    "dirichlet_label_partition",
    "label_divergence",
    "label_divergence_from_counts",
    "load_cohort",
    "load_federation",
    "save_cohort",
    "save_federation",
    "cohort_summary_table",
    "CohortSource",
    "federation_from_cohort",
]
