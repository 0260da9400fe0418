"""Cohort transforms for ablations: keep some MRI sequences, drop the clinical variables.

Each transform returns a new :class:`~.contract.Cohort` that still satisfies the sample contract, so
every model and every strategy accepts it unchanged. A removed sequence follows the contract's rule
for a missing one: its pixels become zeros **and** its modality-mask entry becomes False (never a
silent imputation), so a model that honours the mask cannot tell "removed here" from "never
acquired". Removed clinical variables become 0 (the population mean after standardisation) with
``clinical_mask`` False, as a missing value would.

:func:`map_federation` applies a transform to every split of every site (and the public and global
test sets), so an ablation is trained and evaluated on the same subjects as the full model.

These functions never touch labels, sites or subject ids, and never mix subjects: they only hide
information.
"""

from __future__ import annotations

from dataclasses import replace
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import DataError
from .contract import Cohort
from .federation import Federation

__all__ = ["select_modalities", "drop_clinical", "images_only", "clinical_only", "map_federation"]


def _modality_indices(cohort: Cohort, names: Sequence[str]) -> list[int]:
    lookup = {n.lower(): i for i, n in enumerate(cohort.modality_names)}
    out = []
    for name in names:
        if name.lower() not in lookup:
            raise DataError(
                f"unknown sequence {name!r}; this cohort has {cohort.modality_names}. "
                "Pass names from cohort.modality_names (case does not matter)."
            )
        out.append(lookup[name.lower()])
    return out


def select_modalities(cohort: Cohort, keep: Sequence[str]) -> Cohort:
    """The cohort with only the sequences in ``keep``; the others are zeroed and masked out.

    Args:
        cohort: any cohort.
        keep: sequence names to keep (e.g. ``["FLAIR"]``); an empty list removes all images
            (see :func:`clinical_only`). A kept sequence that a subject never had stays missing.

    Returns:
        A new cohort (the input is not modified).
    """
    if isinstance(keep, str):
        raise DataError(f"keep={keep!r} is a string; pass a list of sequence names, e.g. [{keep!r}].")
    kept = np.zeros(cohort.num_modalities, dtype=bool)
    kept[_modality_indices(cohort, keep)] = True
    mask = cohort.modality_mask & kept[None, :]  # (N, M)
    images = cohort.images * mask[:, :, None, None].astype(np.float32)  # (N, M, H, W)
    return replace(cohort, images=images.astype(np.float32, copy=False), modality_mask=mask)


def drop_clinical(cohort: Cohort) -> Cohort:
    """The cohort with every clinical variable recorded as missing (value 0, mask False).

    A model built with ``use_clinical=False`` ignores clinical data altogether; this transform is
    for evaluating a model that was trained *with* clinical data on subjects without it.
    """
    return replace(cohort, clinical=np.zeros_like(cohort.clinical), clinical_mask=np.zeros_like(cohort.clinical_mask))


def images_only(cohort: Cohort) -> Cohort:
    """Alias of :func:`drop_clinical`: all sequences kept, no clinical information."""
    return drop_clinical(cohort)


def clinical_only(cohort: Cohort) -> Cohort:
    """The cohort with every sequence removed (zeros, mask False): only clinical data remain."""
    return select_modalities(cohort, [])


def map_federation(federation: Federation, transform: Callable[[Cohort], Cohort]) -> Federation:
    """Apply ``transform`` to every site's train/val/test split, the global test and the public set."""
    sites = tuple(
        replace(s, train=transform(s.train), val=transform(s.val), test=transform(s.test)) for s in federation.sites
    )
    public = None if federation.public is None else transform(federation.public)
    return replace(federation, sites=sites, global_test=transform(federation.global_test), public=public)
