"""Tabular summaries of a federation (who holds how many of which class, on which scanner).

What it is for: the ``cohort_summary.csv`` written next to generated data and the tables shown in
notebook 00. Counts only; it never touches images.
"""
from __future__ import annotations

import pandas as pd

from .federation import Federation


def cohort_summary_table(federation: Federation) -> pd.DataFrame:
    """One row per site (plus a ``public`` row if there is a public set).

    Columns: ``site``, ``name``, ``field_strength_t``, ``n_train``, ``n_val``, ``n_test``, one
    ``n_<class>`` column per class (over all three splits), and ``missing_sequences``
    ("" when the site acquires every sequence).
    """
    rows = []
    for s in federation.sites:
        counts = s.train.class_counts() + s.val.class_counts() + s.test.class_counts()
        rows.append({
            "site": s.site_id, "name": s.name, "field_strength_t": s.profile.field_strength_t,
            "n_train": len(s.train), "n_val": len(s.val), "n_test": len(s.test),
            **{f"n_{c}": int(k) for c, k in zip(s.train.class_names, counts)},
            "missing_sequences": " ".join(s.profile.missing_modalities),
        })
    if federation.public is not None:
        pub = federation.public
        rows.append({"site": -1, "name": "public (reference 3T)", "field_strength_t": 3.0,
                     "n_train": 0, "n_val": 0, "n_test": 0,
                     **{f"n_{c}": int(k) for c, k in zip(pub.class_names, pub.class_counts())},
                     "missing_sequences": ""})
    return pd.DataFrame(rows)
