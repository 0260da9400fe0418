"""One vocabulary of notebook parameters, shared by every notebook and by the papermill tests.

Each notebook's ``parameters`` cell assigns a subset of these UPPER_CASE names with teaching-size
defaults that run on a CPU in minutes. The test suite injects :data:`SMOKE_PARAMETERS` into every
notebook (papermill ignores names a notebook does not use), so the whole suite stays fast.
"""

from __future__ import annotations

from typing import Any

#: What a notebook uses when run by hand on a laptop or Binder (2 CPU cores).
TEACHING_DEFAULTS: dict[str, Any] = {
    "SEED": 0,
    "DEVICE": "auto",
    "IMAGE_SIZE": 64,
    "NUM_SUBJECTS": 3000,
    "NUM_CLIENTS": 5,
    "ALPHA": 0.5,
    "NUM_ROUNDS": 30,
    "LOCAL_EPOCHS": 1,
    "DATA_FRACTION": 1.0,
    "MODEL_PRESET": "teaching",
    "OUTPUT_DIR": None,
}

#: What CI injects: tiny images, few subjects and rounds. Numbers recorded under these settings
#: are checked against wide bands in tests/test_notebooks.py.
SMOKE_PARAMETERS: dict[str, Any] = {
    "SEED": 0,
    "DEVICE": "cpu",
    "IMAGE_SIZE": 32,
    "NUM_SUBJECTS": 600,
    "NUM_CLIENTS": 4,
    "ALPHA": 0.5,
    "NUM_ROUNDS": 3,
    "LOCAL_EPOCHS": 1,
    "DATA_FRACTION": 1.0,
    "MODEL_PRESET": "tiny",
    "SMOKE": True,
}
