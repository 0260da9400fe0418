"""One vocabulary of notebook parameters, shared by every notebook and by the papermill tests.

The values come from the one notebook configuration, ``configs/notebooks.yaml``
(:func:`~mmpfl_core.notebook_tools.config.load_notebook_config`). Each notebook's ``parameters`` cell
assigns a subset of these UPPER_CASE names, most of them ``None`` ("from configs/notebooks.yaml"); the
test suite injects :data:`SMOKE_PARAMETERS` (the file's ``smoke:`` overlay) into every notebook
(papermill ignores names a notebook does not use), so the whole suite stays fast.
"""

from __future__ import annotations

from typing import Any

from .config import load_notebook_config

#: What a notebook uses when run by hand on a laptop or Binder (2 CPU cores): configs/notebooks.yaml.
TEACHING_DEFAULTS: dict[str, Any] = {
    **load_notebook_config(smoke=False).parameters(),
    "DEVICE": "auto",
    "DATA_FRACTION": 1.0,
    "OUTPUT_DIR": None,
}

#: What CI injects: configs/notebooks.yaml with its smoke overlay (fewer subjects, sites and rounds, the same
#: model). Numbers recorded under these settings are checked against wide bands in tests/test_notebooks.py.
SMOKE_PARAMETERS: dict[str, Any] = {
    **load_notebook_config(smoke=True).parameters(),
    "DEVICE": "cpu",
    "DATA_FRACTION": 1.0,
    "SMOKE": True,
}
