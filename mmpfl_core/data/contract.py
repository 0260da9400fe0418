"""The sample contract: what every data source in mmpfl yields, synthetic or real.

A :class:`Cohort` is a set of subjects held as arrays (one row per subject):

========================  ====================  =====================================================
field                     shape / dtype         meaning
========================  ====================  =====================================================
``images``                (N, M, H, W) float32  M co-registered MRI sequences (default T1, T2, FLAIR),
                                                each normalised per subject and sequence into [0, 1]
                                                (MRI intensities have no absolute unit; the loader
                                                divides by the 99.5th percentile and clips).
``modality_mask``         (N, M) bool           True where the sequence was acquired. A missing
                                                sequence is all zeros with mask False, never imputed.
``clinical``              (N, K) float32        Clinical variables standardised with fixed, documented
                                                population constants (:data:`CLINICAL_REFERENCE`), not
                                                with statistics of the data (so no leakage across
                                                splits). A missing value becomes 0 (the population
                                                mean) and is flagged in ``clinical_mask``.
``clinical_mask``         (N, K) bool           True where the clinical value was recorded.
``labels``                (N,) int64            Index into ``class_names``.
``sites``                 (N,) int64            Institution id, -1 for data that belongs to no site
                                                (e.g. a public server-side set).
``subject_ids``           (N,) str              Unique subject identifier (file name stem for real data).
========================  ====================  =====================================================

``lesion_masks`` (N, H, W) bool is optional: the synthetic generator fills it (for tests and figures);
real loaders leave it ``None``.

:class:`CohortDataset` wraps a cohort as a ``torch.utils.data.Dataset`` whose items are dicts with
keys ``images``, ``modality_mask``, ``clinical``, ``label``, ``site`` (tensors), so that PyTorch's
default collate, Opacus and Flower all see the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

MODALITIES: tuple[str, ...] = ("T1", "T2", "FLAIR")
CLASS_NAMES: tuple[str, ...] = ("healthy", "rrms", "progressive_ms")
CLINICAL_FEATURES: tuple[str, ...] = ("age", "sex_female", "edss", "symptom_score")

#: Fixed standardisation constants (mean, std) per clinical feature, in the feature's raw unit:
#: age in years, sex_female in {0, 1}, EDSS on the Kurtzke 0-10 scale, symptom_score a 0-10
#: patient-reported fatigue/symptom scale. Values are round population figures, not fitted to data.
CLINICAL_REFERENCE: dict[str, tuple[float, float]] = {
    "age": (45.0, 15.0),
    "sex_female": (0.5, 0.5),
    "edss": (2.5, 2.0),
    "symptom_score": (3.0, 2.5),
}


def standardise_clinical(raw: np.ndarray, names: Sequence[str] = CLINICAL_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """Standardise raw clinical values (N, K) with :data:`CLINICAL_REFERENCE`.

    Returns ``(clinical, clinical_mask)``: NaN entries become 0 with mask False.
    Unknown feature names raise :class:`DataError`.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(names):
        raise DataError(
            f"clinical array has shape {raw.shape}; expected (N, {len(names)}) for features {tuple(names)}."
        )
    out = np.zeros(raw.shape, dtype=np.float32)
    for k, name in enumerate(names):
        if name not in CLINICAL_REFERENCE:
            raise DataError(
                f"unknown clinical feature {name!r}; known: {sorted(CLINICAL_REFERENCE)}. "
                "Add its reference (mean, std) to CLINICAL_REFERENCE."
            )
        mean, std = CLINICAL_REFERENCE[name]
        out[:, k] = (raw[:, k] - mean) / std
    mask = np.isfinite(raw)
    out[~mask] = 0.0
    return out, mask


def normalise_intensity(volume: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale one image (any shape) into [0, 1] by its ``percentile``-th intensity, then clip.

    Raises :class:`DataError` on NaN/Inf. An all-zero image stays zero.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if not np.all(np.isfinite(volume)):
        raise DataError("image contains NaN or Inf voxels; fix or drop the file before loading.")
    scale = float(np.percentile(volume, percentile)) if volume.size else 0.0
    if scale <= 0:
        return np.zeros_like(volume)
    return np.clip(volume / scale, 0.0, 1.0)


@dataclass(frozen=True)
class Cohort:
    """A set of subjects that satisfies the sample contract (see module docstring)."""

    images: np.ndarray
    modality_mask: np.ndarray
    clinical: np.ndarray
    clinical_mask: np.ndarray
    labels: np.ndarray
    sites: np.ndarray
    subject_ids: np.ndarray
    modality_names: tuple[str, ...] = MODALITIES
    class_names: tuple[str, ...] = CLASS_NAMES
    clinical_names: tuple[str, ...] = CLINICAL_FEATURES
    lesion_masks: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_modalities(self) -> int:
        return len(self.modality_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def validate(self) -> None:
        """Check shapes, dtypes and value ranges; raise :class:`DataError` naming the field."""
        n = self.labels.shape[0]
        m, k = len(self.modality_names), len(self.clinical_names)
        expect = {
            "images": (self.images, 4, np.float32),
            "modality_mask": (self.modality_mask, 2, np.bool_),
            "clinical": (self.clinical, 2, np.float32),
            "clinical_mask": (self.clinical_mask, 2, np.bool_),
            "labels": (self.labels, 1, np.int64),
            "sites": (self.sites, 1, np.int64),
        }
        for name, (arr, ndim, dtype) in expect.items():
            if not isinstance(arr, np.ndarray) or arr.ndim != ndim or arr.dtype != dtype:
                got = f"{type(arr).__name__} {getattr(arr, 'shape', None)} {getattr(arr, 'dtype', None)}"
                raise DataError(f"Cohort.{name} must be a {ndim}-d {np.dtype(dtype).name} array; got {got}.")
            if arr.shape[0] != n:
                raise DataError(f"Cohort.{name} has {arr.shape[0]} rows but labels has {n}.")
        if self.images.shape[1] != m:
            raise DataError(
                f"images have {self.images.shape[1]} sequences but modality_names lists {m}: {self.modality_names}."
            )
        if self.images.shape[2] != self.images.shape[3]:
            raise DataError(
                f"images must be square (H == W); got {self.images.shape[2:]}. Resize or crop when loading."
            )
        if self.modality_mask.shape[1] != m:
            raise DataError(f"modality_mask has {self.modality_mask.shape[1]} columns; expected {m}.")
        if self.clinical.shape[1] != k or self.clinical_mask.shape[1] != k:
            raise DataError(
                f"clinical arrays must have {k} columns ({self.clinical_names}); got {self.clinical.shape[1]}."
            )
        if len(self.subject_ids) != n:
            raise DataError(f"subject_ids has {len(self.subject_ids)} entries; expected {n}.")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(
                f"labels must lie in [0, {len(self.class_names) - 1}] ({self.class_names}); "
                f"got range [{self.labels.min()}, {self.labels.max()}]."
            )
        if not np.all(np.isfinite(self.clinical)):
            raise DataError(
                "clinical contains NaN/Inf; use standardise_clinical(), which maps missing values to 0 with mask False."
            )
        if self.lesion_masks is not None and self.lesion_masks.shape != (n, *self.images.shape[2:]):
            raise DataError(
                f"lesion_masks shape {self.lesion_masks.shape} does not match images {(n, *self.images.shape[2:])}."
            )

    def subset(self, index: np.ndarray | Sequence[int]) -> Cohort:
        """The cohort restricted to ``index`` (integer positions or a boolean mask), same order."""
        idx = np.asarray(index)
        if idx.dtype == np.bool_:
            idx = np.flatnonzero(idx)
        return replace(
            self,
            meta=_subset_meta(self.meta, len(self), idx),
            images=self.images[idx],
            modality_mask=self.modality_mask[idx],
            clinical=self.clinical[idx],
            clinical_mask=self.clinical_mask[idx],
            labels=self.labels[idx],
            sites=self.sites[idx],
            subject_ids=self.subject_ids[idx],
            lesion_masks=None if self.lesion_masks is None else self.lesion_masks[idx],
        )

    def class_counts(self) -> np.ndarray:
        """Number of subjects per class, shape (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes)


#: The one per-row entry of ``Cohort.meta``: the patient of each row when a loader takes several
#: slices per patient. :meth:`Cohort.subset` and :func:`concatenate` keep it aligned with the rows.
_ROW_META = "groups"


def _subset_meta(meta: dict[str, Any], n: int, idx: np.ndarray) -> dict[str, Any]:
    rows = meta.get(_ROW_META)
    if rows is None or len(rows) != n:
        return meta
    return {**meta, _ROW_META: [str(rows[i]) for i in idx.tolist()]}


def concatenate(cohorts: Sequence[Cohort]) -> Cohort:
    """Stack cohorts with identical modality/class/clinical names into one."""
    if not cohorts:
        raise DataError("concatenate() needs at least one cohort.")
    first = cohorts[0]
    for c in cohorts[1:]:
        if (c.modality_names, c.class_names, c.clinical_names) != (
            first.modality_names,
            first.class_names,
            first.clinical_names,
        ):
            raise DataError("cannot concatenate cohorts with different modality, class or clinical names.")
        if c.images.shape[1:] != first.images.shape[1:]:
            raise DataError(
                f"cannot concatenate cohorts with image shapes {first.images.shape[1:]} and {c.images.shape[1:]}."
            )
    has_lesions = all(c.lesion_masks is not None for c in cohorts)
    meta = {k: v for k, v in first.meta.items() if k != _ROW_META}
    if all(c.meta.get(_ROW_META) is not None and len(c.meta[_ROW_META]) == len(c) for c in cohorts):
        meta[_ROW_META] = [g for c in cohorts for g in c.meta[_ROW_META]]
    return replace(
        first,
        meta=meta,
        images=np.concatenate([c.images for c in cohorts]),
        modality_mask=np.concatenate([c.modality_mask for c in cohorts]),
        clinical=np.concatenate([c.clinical for c in cohorts]),
        clinical_mask=np.concatenate([c.clinical_mask for c in cohorts]),
        labels=np.concatenate([c.labels for c in cohorts]),
        sites=np.concatenate([c.sites for c in cohorts]),
        subject_ids=np.concatenate([c.subject_ids for c in cohorts]),
        lesion_masks=np.concatenate([c.lesion_masks for c in cohorts]) if has_lesions else None,
    )


class CohortDataset(Dataset):
    """A :class:`Cohort` as a torch ``Dataset`` of dict samples (tensors share the cohort's memory)."""

    def __init__(self, cohort: Cohort) -> None:
        self.cohort = cohort
        self.images = torch.from_numpy(cohort.images)
        self.modality_mask = torch.from_numpy(cohort.modality_mask)
        self.clinical = torch.from_numpy(cohort.clinical)
        self.labels = torch.from_numpy(cohort.labels)
        self.sites = torch.from_numpy(cohort.sites)

    def __len__(self) -> int:
        return len(self.cohort)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "images": self.images[i],  # (M, H, W)
            "modality_mask": self.modality_mask[i],  # (M,)
            "clinical": self.clinical[i],  # (K,)
            "label": self.labels[i],
            "site": self.sites[i],
        }

    def batch(self, index: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """A whole batch by fancy indexing: much faster than collating single items on CPU."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return {
            "images": self.images[idx],  # (B, M, H, W)
            "modality_mask": self.modality_mask[idx],  # (B, M)
            "clinical": self.clinical[idx],  # (B, K)
            "label": self.labels[idx],  # (B,)
            "site": self.sites[idx],  # (B,)
        }

    def input_batches(
        self, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
        """Consecutive batches in dataset order as ``((images, modality_mask, clinical), labels)`` on ``device``.

        The ``(inputs, labels)`` form :func:`~mmpfl_core.privacy.fisher.diagonal_fisher` reads (the
        server's public-set Fisher, a site's Fisher scores). Lazy: a caller that stops after
        ``max_batches`` never indexes the rest.
        """
        n = len(self)
        for start in range(0, n, batch_size):
            b = self.batch(torch.arange(start, min(n, start + batch_size)))
            inputs = (b["images"].to(device), b["modality_mask"].to(device), b["clinical"].to(device))
            yield inputs, b["label"].to(device)
