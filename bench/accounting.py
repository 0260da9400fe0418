"""Accounting: time and epsilon of RDP vs PRV vs PLD in the kit's typical settings.

Tightness is each epsilon's ratio to PLD's (the tightest of the three here); the limit is 1.0.

    python bench/accounting.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from mmpfl_core.privacy.accounting import compute_epsilon  # noqa: E402

# (label, noise multiplier, sample rate, steps): client-level rounds with few and many sites, and
# sample-level DP-SGD inside a site.
SETTINGS = [
    ("10 sites, all, 100 rounds", 6.0, 1.0, 100),
    ("1000 sites, q=0.1, 100 rounds", 1.0, 0.1, 100),
    ("many sites, q=0.1, z=0.94, 300 rounds", 0.94, 0.1, 300),
    ("DP-SGD, q=0.05, 2000 steps", 1.1, 0.05, 2000),
]
DELTA = 1e-5


def main() -> None:
    rows = []
    for label, z, q, steps in SETTINGS:
        results = {}
        for accountant in ("pld", "prv", "rdp"):
            start = time.perf_counter()
            eps = compute_epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
            results[accountant] = (eps, time.perf_counter() - start)
        for accountant, (eps, seconds) in results.items():
            rows.append({"setting": label, "accountant": accountant, "epsilon": round(eps, 4),
                         "epsilon / PLD": round(eps / results["pld"][0], 4), "seconds": round(seconds, 3)})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    print("wrote", write_results("accounting", frame, notes=f"delta = {DELTA}. PLD: Google dp-accounting; RDP, PRV: Opacus."))


if __name__ == "__main__":
    main()
