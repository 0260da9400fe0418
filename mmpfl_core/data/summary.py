"""Tabular summaries of a federation (who holds how many of which class, on which scanner).

What it is for: the ``cohort_summary.csv`` written next to generated data and the tables shown in
notebook 00. Counts only; it never touches images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .federation import Federation


def cohort_summary_table(federation: Federation) -> pd.DataFrame:
    """One row per site (plus a ``public`` row if there is a public set).

    Columns: ``site``, ``name``, ``field_strength_t``, ``n_train``, ``n_val``, ``n_test``, one
    ``n_<class>`` column per class (over all three splits), and ``missing_sequences``
    ("" when the site acquires every sequence). For a user's cohort (``cohort_config`` None) there is no
    simulated scanner: ``field_strength_t`` is empty and missing sequences are read off the modality masks.
    """
    rows = []
    real = federation.cohort_config is None  # a user's cohort: no simulated scanner to report
    for s in federation.sites:
        counts = s.train.class_counts() + s.val.class_counts() + s.test.class_counts()
        if real:  # sequences no subject of the site has, read off the modality masks
            present = np.concatenate([c.modality_mask for c in (s.train, s.val, s.test)]).any(axis=0)
            present_list = [bool(p) for p in np.atleast_1d(present)]
            missing = [m for m, p in zip(s.train.modality_names, present_list, strict=True) if not p]
        else:
            missing = list(s.profile.missing_modalities)
        rows.append(
            {
                "site": s.site_id,
                "name": s.name,
                "field_strength_t": None if real else s.profile.field_strength_t,
                "n_train": len(s.train),
                "n_val": len(s.val),
                "n_test": len(s.test),
                **{f"n_{c}": int(k) for c, k in zip(s.train.class_names, counts, strict=True)},
                "missing_sequences": " ".join(missing),
            }
        )
    if federation.public is not None:
        pub = federation.public
        rows.append(
            {
                "site": -1,
                "name": "public" if real else "public (reference 3T)",
                "field_strength_t": None if real else 3.0,
                "n_train": 0,
                "n_val": 0,
                "n_test": 0,
                **{f"n_{c}": int(k) for c, k in zip(pub.class_names, pub.class_counts(), strict=True)},
                "missing_sequences": "",
            }
        )
    return pd.DataFrame(rows)
