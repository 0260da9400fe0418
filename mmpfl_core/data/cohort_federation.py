"""A federation from a cohort file a user converted: sites from its site column (natural partition).

What it is for: training on real data. ``data_scripts/convert_*.py`` write a cohort file whose
``sites`` column says which institution holds each subject (from the labels CSV); this module turns
it into the same :class:`~mmpfl_core.data.federation.Federation` the synthetic generator builds:

* **natural partition** (default): one site per distinct site id >= 0, in increasing id order
  (site ids are renumbered 0..K-1; the original id is kept in the site's name);
* **dirichlet re-split** (``partition="dirichlet"``): ignore the site column and split the
  non-public patients with :func:`~mmpfl_core.data.federation.dirichlet_label_partition` into
  ``FederationConfig.num_sites`` sites, as for the synthetic cohort (for experiments on skew);
* the **public server set** (what Fisher allocation may use, docs/DESIGN.md 4.3) is every subject with
  site id -1, plus the subjects named in ``public_subjects``. They belong to no site. Marking a
  subject public is the user's statement that the server may use its data without protection (an
  open dataset, or consent to that use): the Fisher weights cost no privacy only because they are
  computed from these subjects and released models, never from a site's patients;
* each site's patients are split train/val/test, stratified by label, with the fractions of the
  :class:`FederationConfig`. Splits are by PATIENT: with several slices per subject
  (``meta["groups"]``), all slices of a patient land in the same split and the same site.

What it must never do: put one patient in two sites or two splits, or put a site's patient in the
public set without the user marking it public (tests check both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..seeding import numpy_generator
from .contract import Cohort, concatenate
from .federation import Federation, FederationConfig, SiteData, _stratified_split, dirichlet_label_partition
from .scanners import ScannerProfile

PARTITIONS: tuple[str, ...] = ("natural", "dirichlet")
_MIN_PER_SITE = 3  # one patient each for train, validation and test


@dataclass(frozen=True)
class CohortSource:
    """Where a user's cohort lives and how it becomes sites (YAML: ``data: {cohort: PATH, ...}``)."""

    cohort: str  # a .npz written by save_cohort (data_scripts/convert_*.py), or a saved federation's folder
    partition: str = "natural"  # "natural": sites from the cohort's site column; "dirichlet": re-split
    public_subjects: tuple[str, ...] = ()  # patients moved to the public server set (besides site -1)
    seed: int = 0  # seed of the per-site train/val/test split (and of a dirichlet re-split)

    def __post_init__(self) -> None:
        if not isinstance(self.cohort, (str, Path)) or not str(self.cohort):
            raise ConfigError(
                f"data.cohort={self.cohort!r} must be the path of a cohort .npz written by data_scripts/convert_*.py."
            )
        object.__setattr__(self, "cohort", str(self.cohort))
        if self.partition not in PARTITIONS:
            raise ConfigError(f"data.partition={self.partition!r} is unknown; choose one of {PARTITIONS}.")
        object.__setattr__(self, "public_subjects", tuple(str(s) for s in self.public_subjects))


def patient_groups(cohort: Cohort) -> np.ndarray:
    """The patient of each row: ``meta["groups"]`` when a loader wrote it (several slices per
    patient), else the subject id. (N,) str."""
    groups = cohort.meta.get("groups")
    if groups is not None and len(groups) == len(cohort):
        return np.asarray(groups, dtype=str)
    return np.asarray(cohort.subject_ids, dtype=str)


def _group_labels(groups: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique patients, their label (first row's) and, for each row, its patient's index."""
    unique, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return unique, labels[first], inverse


def _split_site(
    cohort: Cohort, rows: np.ndarray, fc: FederationConfig, site_index: int, name: str, groups: np.ndarray, seed: int
) -> SiteData:
    """One site's rows split train/val/test by patient, stratified by label; ``sites`` set to the index."""
    patients, labels, inverse = _group_labels(groups[rows], cohort.labels[rows])
    if patients.size < _MIN_PER_SITE:
        raise DataError(
            f"{name} has {patients.size} patient(s) ({patients.tolist()}); every site needs at least "
            f"{_MIN_PER_SITE} (one each for train, validation and test). Give it more patients in the "
            "site column, merge it into another site, or mark its patients public (site -1)."
        )
    parts = _stratified_split(labels, fc.val_fraction, fc.test_fraction, numpy_generator(seed, 3, site_index))
    site_cohort = replace(cohort.subset(rows), sites=np.full(rows.size, site_index, dtype=np.int64))
    train, val, test = (site_cohort.subset(np.isin(inverse, part)) for part in parts)
    return SiteData(
        site_id=site_index,
        name=name,
        profile=ScannerProfile(name=f"{name} (real data)"),
        train=train,
        val=val,
        test=test,
    )


def federation_from_cohort(cohort: Cohort, source: CohortSource, federation_config: FederationConfig) -> Federation:
    """Split ``cohort`` into sites, splits and a public set (module docstring).

    Raises:
        DataError: a site id below -1, an unknown ``public_subjects`` entry, fewer than two classes,
            no site left after the public set, or a site with fewer than 3 patients.
    """
    where = source.cohort
    if len(cohort) == 0:
        raise DataError(f"cohort {where} holds no subjects; convert a folder with at least one subject per split.")
    if np.unique(cohort.labels).size < 2:
        raise DataError(
            f"cohort {where} has one label only ({cohort.class_names[int(cohort.labels[0])]!r}); a "
            f"classifier needs at least two classes in the data (class names {cohort.class_names})."
        )
    if cohort.sites.min() < -1:
        raise DataError(
            f"cohort {where} has site id {int(cohort.sites.min())}; site ids are integers >= 0, "
            "and -1 marks public subjects. Fix the site column of the labels CSV and convert again."
        )
    groups = patient_groups(cohort)
    unknown = sorted(set(source.public_subjects) - set(groups.tolist()))
    if unknown:
        raise DataError(
            f"data.public_subjects names {unknown[:5]}, not in cohort {where}; use its subject ids "
            f"(e.g. {sorted(set(groups.tolist()))[:3]})."
        )
    public_rows = (cohort.sites == -1) | np.isin(groups, source.public_subjects)
    # A patient is public as a whole: any of its rows marked public makes all of them public.
    public_rows = np.isin(groups, groups[public_rows])
    private = np.flatnonzero(~public_rows)
    if private.size == 0:
        raise DataError(
            f"every subject of cohort {where} is public (site -1 or public_subjects); give sites >= 0 "
            "to the patients that hospitals hold."
        )
    fc = federation_config
    if source.partition == "natural":
        site_ids = np.unique(cohort.sites[private])
        members = [private[cohort.sites[private] == k] for k in site_ids]
        names = [f"site {int(k)}" for k in site_ids]
    else:
        patients, labels, inverse = _group_labels(groups[private], cohort.labels[private])
        parts = dirichlet_label_partition(
            labels, fc.num_sites, fc.alpha, fc.quantity_skew, numpy_generator(source.seed, 1), _MIN_PER_SITE
        )
        members = [private[np.isin(inverse, part)] for part in parts]
        names = [f"site {k} (re-split)" for k in range(fc.num_sites)]
    sites = tuple(
        _split_site(cohort, rows, fc, k, name, groups, source.seed)
        for k, (rows, name) in enumerate(zip(members, names, strict=True))
    )
    public = None
    if public_rows.any():
        public_cohort = cohort.subset(public_rows)
        public = replace(public_cohort, sites=np.full(len(public_cohort), -1, dtype=np.int64))
    config = replace(
        fc,
        num_sites=len(sites),
        public_size=0 if public is None else len(public),
        missing_modality_sites=(),
        min_subjects_per_site=_MIN_PER_SITE,
    )
    return Federation(
        sites=sites,
        global_test=concatenate([s.test for s in sites]),
        public=public,
        cohort_config=None,
        federation_config=config,
    )
