"""A scanner for released files: finds per-site metrics, masks, byte counts and site patients outside ``private/``.

Used by tests/test_release_scan.py (a comparison, its report and notebook records) and tests/test_reproduction.py
(the reproduction's folder). It reads what an adversary reading the released folder would read:

* names (JSON keys, CSV / Markdown-table headers) of per-site metrics (``site<k>_...``, a ``site`` column),
  masks and mask scores, byte counts and timings;
* values: maps keyed by site ids, lists of parameter-group names (a mask), cells naming a group, any site
  subject id (a patient of a site, test patients included);
* notebooks' recording cells, statically (:func:`recording_findings`): the released dict's keys and the names
  its values read;
* PNGs by provenance: every figure must have been drawn, in this process, by a plotting call whose inputs
  are pooled or public (:class:`FigureProvenance` spies on the writers' plotting functions).
"""
from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

#: Names that say a quantity is per site, a mask or its scores, a byte count or a timing.
#: (Masks themselves are found by value: a list of group names, a map keyed by site ids; a key named "masks"
#: may be a setting, e.g. the ablation switch ``masks: false``.)
#: Also a site's figure picked out of the per-site ones (worst / best site), one site's update norms, and the
#: figures of the noise-subtraction attack and of gradient inversion (functions of the unnoised sum of clipped
#: updates, and of a site's patients).
PRIVATE_NAME = re.compile(r"(^|[^a-z])site\d+_|^site$|^site_(?!sweep$)|partitions?$|kl_score|mask_changes|"
                          r"personal_fraction|bytes|megabytes|(^|\W)MB(\W|$)|seconds|num_clients|"
                          r"(worst|best)[ _]site|update_norm|clipped_norm|noise_to_signal|noise_subtraction|"
                          r"relative_error|psnr", re.I)
#: Lists of group names that are public: all of the model's groups, and the noise gate's decision (computed from
#: public quantities only, personalization/noise_gate.py).
PUBLIC_GROUP_LISTS = {"groups", "gate_drowned"}
#: Figures whose drawing inputs are pooled over sites or public.
PUBLIC_PROVENANCE = {"pooled accuracy", "public cohort", "epsilon"}


def _name_finding(where: str, name: str) -> list[str]:
    return [f"{where}: private name {name!r}"] if PRIVATE_NAME.search(str(name)) else []


def scan_json(value: Any, where: str, groups: set[str], subject_ids: set[str], key: str = "") -> list[str]:
    found: list[str] = []
    if isinstance(value, dict):
        if value and all(re.fullmatch(r"-?\d+", str(k)) for k in value):
            found.append(f"{where}: map keyed by site ids {sorted(value)[:4]}")
        for k, v in value.items():
            found += _name_finding(where, k)
            found += scan_json(v, f"{where}.{k}", groups, subject_ids, str(k))
    elif isinstance(value, list):
        if value and all(isinstance(v, str) for v in value) and set(value) & groups and key not in PUBLIC_GROUP_LISTS:
            found.append(f"{where}: list of parameter groups (a mask) {value}")
        for i, v in enumerate(value):
            found += scan_json(v, f"{where}[{i}]", groups, subject_ids, key)
    elif isinstance(value, str) and value in subject_ids:
        found.append(f"{where}: site subject id {value!r}")
    return found


def scan_table(header: list[str], rows: Iterable[list[str]], where: str, groups: set[str],
               subject_ids: set[str]) -> list[str]:
    found = [f for name in header for f in _name_finding(where, name.strip())]
    for row in rows:
        for cell in row:
            cell = cell.strip()
            if cell in groups:
                found.append(f"{where}: cell names a parameter group {cell!r}")
            if cell in subject_ids:
                found.append(f"{where}: site subject id {cell!r}")
    return found


def _markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            rows = [r for r in current[1:] if not all(set(c) <= set("-: ") for c in r)]
            tables.append((current[0], rows))
            current = []
    return tables


def scan_file(path: Path, root: Path, groups: set[str], subject_ids: set[str], provenance: dict[str, str]) -> list[str]:
    where = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if suffix == ".png":
        kind = provenance.get(str(path.resolve()), "unknown")
        return [] if kind in PUBLIC_PROVENANCE else [f"{where}: figure drawn from {kind} data"]
    text = path.read_text(encoding="utf-8")
    found = [f"{where}: site subject id {sid!r}" for sid in sorted(subject_ids) if sid in text][:3]
    if suffix == ".json":
        return found + scan_json(json.loads(text), where, groups, subject_ids)
    if suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        return found + (scan_table(rows[0], rows[1:], where, groups, subject_ids) if rows else [])
    if suffix == ".md":
        found += [f"{where}: per-site name {m!r}" for m in sorted(set(re.findall(r"\bsite\d+_\w+", text)))]
        for header, rows in _markdown_tables(text):
            found += scan_table(header, rows, where, groups, subject_ids)
        return found
    return found + [f"{where}: unknown file type (classify it before releasing it)"]


def released_files(root: Path) -> list[Path]:
    """Every file under ``root`` outside any ``private/`` folder (hidden files included)."""
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and "private" not in p.relative_to(root).parts)


def scan_released(root: Path, *, groups: Iterable[str], federation, provenance: dict[str, str]) -> list[str]:
    """All findings in the files of ``root`` outside ``private/`` (empty: nothing private was released)."""
    subject_ids = {str(i) for s in federation.sites for c in (s.train, s.val, s.test) for i in c.subject_ids}
    return [f for p in released_files(Path(root)) for f in scan_file(p, Path(root), set(groups), subject_ids, provenance)]


class FigureProvenance:
    """Spies on the plotting functions the writers call and records, per saved PNG, what it was drawn from.

    ``install(monkeypatch, federation)`` wraps ``mmpfl_core.plots.training`` (accuracy: pooled; site accuracy:
    per-site; communication: bytes), ``plots.cohort.plot_cohort_preview`` (public cohort only if every image
    is a public-set image, else site patients), the reproduction's epsilon figure, and ``save_axes``.
    """

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}

    def install(self, monkeypatch, federation) -> FigureProvenance:
        import mmpfl_core.plots.cohort as cohort_plots
        import mmpfl_core.plots.training as training
        import mmpfl_core.reproduction.run as reproduction_run
        public = set() if federation.public is None else {r.tobytes() for r in federation.public.images}

        def tagged(fn, kind):
            def wrapper(*args, **kwargs):
                ax = fn(*args, **kwargs)
                ax._provenance = kind
                return ax
            return wrapper

        for name, kind in (("plot_accuracy_vs_round", "pooled accuracy"), ("plot_site_accuracy", "per-site"),
                           ("plot_communication_vs_accuracy", "byte-count")):
            monkeypatch.setattr(training, name, tagged(getattr(training, name), kind))
        monkeypatch.setattr(reproduction_run, "plot_epsilon", tagged(reproduction_run.plot_epsilon, "epsilon"))
        save_axes = training.save_axes

        def spy_save(ax, path):
            self.by_path[str(Path(path).resolve())] = getattr(ax, "_provenance", "unknown")
            return save_axes(ax, path)
        monkeypatch.setattr(training, "save_axes", spy_save)
        preview = cohort_plots.plot_cohort_preview

        def spy_preview(cohort, path_or_ax=None):
            if isinstance(path_or_ax, (str, Path)):
                rows = {r.tobytes() for r in np.asarray(cohort.images)}
                self.by_path[str(Path(path_or_ax).resolve())] = ("public cohort" if rows <= public
                                                                 else "site patients'")
            return preview(cohort, path_or_ax)
        monkeypatch.setattr(cohort_plots, "plot_cohort_preview", spy_preview)
        return self


def scan_notebook_records(folder: Path, *, groups: Iterable[str], subject_ids: Iterable[str]) -> list[str]:
    """All findings in a notebooks' records folder outside ``private/`` (every file there, not only the records:
    a figure or a stray file is a finding too, since nothing there has a provenance)."""
    return [f for p in released_files(Path(folder))
            for f in scan_file(p, Path(folder), set(groups), set(map(str, subject_ids)), provenance={})]


def _call_name(node: ast.AST) -> str:
    func = node.func if isinstance(node, ast.Call) else None
    return getattr(func, "id", getattr(func, "attr", ""))


def recording_findings(source: str, where: str) -> list[str]:
    """Static check of a notebook cell: every ``record_results(notebook, values, ...)`` call releases a dict
    literal (so it can be read here) whose keys, and every string inside each value's expression (the keys
    it reads, e.g. ``row["site0_..."]``, and the names of nested keys), pass the :data:`PRIVATE_NAME` rule.
    What goes to ``private=`` is not checked: it is written under ``private/``."""
    found: list[str] = []
    for call in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and _call_name(n) == "record_results"):
        released = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "values"), None)
        if not isinstance(released, ast.Dict) or any(k is None for k in released.keys):
            shown = ast.unparse(released)[:60] if released is not None else "nothing"
            found.append(f"{where}: record_results releases {shown}, not a dict literal: write the released "
                         "values as {...} so the scan can read them")
            continue
        for key, value in zip(released.keys, released.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                found.append(f"{where}: released key {ast.unparse(key)} is not a string literal")
                continue
            found += _name_finding(where, key.value)
            found += [f for c in ast.walk(value) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                      for f in _name_finding(f"{where}.{key.value}", c.value)]
    return found
