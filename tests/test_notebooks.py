"""Execute every notebook with papermill under the shared smoke parameters and check what it recorded.

Each notebook writes its key numbers with ``record_results``; :data:`EXPECTATIONS` holds the checks
per notebook. Stochastic results get bands; deterministic ones exact values. A notebook without
expectations fails the suite, so no notebook goes unchecked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import papermill as pm
import pytest

from mmpfl_core.notebook_tools import SMOKE_PARAMETERS, load_results

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _expect_00(r: dict[str, Any]) -> None:
    assert r["num_sites"] == SMOKE_PARAMETERS["NUM_CLIENTS"]
    assert r["num_subjects_total"] == SMOKE_PARAMETERS["NUM_SUBJECTS"]
    # Contrasts follow MRI physics on the generated data.
    assert r["flair_lesion_over_wm"] > 1.2
    assert r["t1_lesion_over_wm"] < 1.0
    # Lesion load rises with disease class.
    load = r["mean_lesion_pixels_by_class"]
    assert load["healthy"] < load["rrms"] < load["progressive_ms"]
    # Extreme heterogeneity diverges more than near-IID.
    assert r["label_divergence_alpha_0.1"] > r["label_divergence_alpha_100"]
    assert r["missing_sequence_sites"], "the default federation has a site without T2"


EXPECTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "00_data_and_institutions": _expect_00,
}


@pytest.mark.notebook
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_records(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert path.stem in EXPECTATIONS, f"add expectations for {path.stem} to tests/test_notebooks.py"
    monkeypatch.setenv("MMPFL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMPFL_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    params = dict(SMOKE_PARAMETERS, OUTPUT_DIR=str(tmp_path))
    pm.execute_notebook(str(path), str(tmp_path / path.name), parameters=params, kernel_name="python3",
                        cwd=str(NOTEBOOK_DIR), progress_bar=False)
    EXPECTATIONS[path.stem](load_results(path.stem, tmp_path))
