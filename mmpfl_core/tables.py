"""Plain-text tables for reports (no optional dependencies), and the privacy columns every comparison row carries.

The privacy columns (docs/DESIGN.md 4.7): for each method, the unit(s) it protects and, per unit, the epsilon and
delta its accountant reports, plus the private dimension d (the number of parameters trained on site data,
the dimension every DP noise vector has). :func:`privacy_columns` only arranges values it is given; the caller
reads them from the run's ledgers (:func:`mmpfl_core.experiment.run_privacy`), never types them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

#: The privacy columns, in order: the protected unit(s), then per unit epsilon and delta, then d.
PRIVACY_COLUMNS = ("privacy unit", "epsilon_client", "delta_client", "epsilon_patient_max", "delta_patient", "d")


def privacy_columns(
    *, client: tuple[float, float] | None, patient: tuple[float, float] | None, dimension: int
) -> dict[str, Any]:
    """The privacy columns of one method.

    Args:
        client: (epsilon, delta) of what leaves a site (add/remove-one-site adjacency), from the
            client-level accountant; None where the method has no such guarantee.
        patient: (epsilon, delta) of the patients in the deployed models (add/remove-one-patient,
            DP-SGD inside the sites), the max over the sites' ledgers; None where there is none.
        dimension: d, the number of parameters trained on site data.

    A unit is protected when its epsilon is finite. An unprotected unit shows epsilon ``inf`` and a
    blank delta (None: empty in CSV and Markdown); a method protecting neither unit shows ``none``.
    """

    def unit(pair: tuple[float, float] | None) -> tuple[float, float | None]:
        if pair is None or not math.isfinite(float(pair[0])):
            return math.inf, None
        return float(pair[0]), float(pair[1])

    eps_client, delta_client = unit(client)
    eps_patient, delta_patient = unit(patient)
    units = [name for name, eps in (("site", eps_client), ("patient", eps_patient)) if math.isfinite(eps)]
    return {
        "privacy unit": "+".join(units) or "none",
        "epsilon_client": eps_client,
        "delta_client": delta_client,
        "epsilon_patient_max": eps_patient,
        "delta_patient": delta_patient,
        "d": int(dimension),
    }


def worst_privacy(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One method's privacy columns over several runs (seeds): per unit the largest epsilon and delta of
    any run (a unit unprotected in one run is unprotected), d the largest."""

    def pair(eps: str, delta: str) -> tuple[float, float] | None:
        if any(not math.isfinite(float(r[eps])) for r in rows):
            return None
        return max(float(r[eps]) for r in rows), max(float(r[delta]) for r in rows)

    return privacy_columns(
        client=pair("epsilon_client", "delta_client"),
        patient=pair("epsilon_patient_max", "delta_patient"),
        dimension=max(int(r["d"]) for r in rows),
    )


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _epsilon_text(v: Any) -> str:
    return "" if _missing(v) else "inf" if v == math.inf else format(float(v), ".3f")


def _delta_text(v: Any) -> str:
    return "" if _missing(v) else "0" if v == 0 else format(float(v), ".1e")


#: How :func:`markdown_table` writes the privacy columns (the rest use its ``floatfmt``).
COLUMN_FORMATS: dict[str, Callable[[Any], str]] = {
    "epsilon_client": _epsilon_text,
    "epsilon_patient_max": _epsilon_text,
    "delta_client": _delta_text,
    "delta_patient": _delta_text,
    "d": lambda v: "" if _missing(v) else str(int(v)),
}


def markdown_table(
    frame: pd.DataFrame, floatfmt: str = ".3f", formats: Mapping[str, Callable[[Any], str]] | None = None
) -> str:
    """A GitHub-flavoured markdown table (pandas' to_markdown needs the optional tabulate package).

    ``formats`` maps column names to cell writers (default :data:`COLUMN_FORMATS`); other cells are
    written with ``floatfmt`` (floats) or ``str``, missing values as ``n/a``.
    """
    writers = COLUMN_FORMATS if formats is None else formats

    def cell(v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "n/a"
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    columns = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(writers.get(c, cell)(v) for c, v in zip(columns, row, strict=True)) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join(lines)
