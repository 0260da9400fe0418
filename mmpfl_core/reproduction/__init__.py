"""The paper-style reproduction: every method, three heterogeneity levels, seeds, and a federation-size sweep.

``mmpfl reproduce --preset smoke|teaching|paper`` reads ``configs/reproduce_<preset>.yaml``: an
experiment (data, federation, model, round loop, methods) plus a ``reproduction`` section::

    reproduction:
      alphas: [0.1, 0.5, 1.0]         # Dirichlet label skew: extreme, moderate, mild
      seeds: [0, 1, 2]                # repeats; CIs across seeds when there are several
      site_sweep:                     # client-level DP as the federation grows, at a fixed epsilon
        num_sites: [10, 50, 200]
        subjects_per_site: 30
        client_fraction: 0.2          # Poisson sampling rate (amplification by subsampling)
        methods: [dp-fedavg, mm-pfl-adp]   # labels of methods above
      membership_inference:           # attack the released global model and one site's deployed model
        methods: [fedavg, dp-fedavg, mm-pfl-adp]
        personal_site: 0
        num_shadows: 0                # 0: loss attack only; >= 2 adds offline LiRA (shadow runs)

It writes ``<out>/REPORT.md`` with the main table (at the config's alpha), accuracy per alpha, the
sweep, figures, and a side-by-side with the paper's headline claims that says plainly where our
numbers agree and where they do not. Every run keeps its own run directory, so an interrupted
reproduction resumes where it stopped.
"""

from __future__ import annotations

from .claims import PAPER_CLAIMS, claims_table
from .plan import ReproductionPlan, SiteSweep, load_reproduction
from .run import ReproductionReport, run_reproduction

__all__ = [
    "PAPER_CLAIMS",
    "ReproductionPlan",
    "ReproductionReport",
    "SiteSweep",
    "claims_table",
    "load_reproduction",
    "run_reproduction",
]
