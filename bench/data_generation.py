"""Data generation throughput: subjects per second for the clean cohort and the full federation.

    python bench/data_generation.py [--subjects 3000] [--image-size 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_results  # noqa: E402

from mmpfl_core.data import FederationConfig, SyntheticCohortConfig, build_federation, generate_subjects  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cohort = SyntheticCohortConfig(num_subjects=args.subjects, image_size=args.image_size)
    rows = []
    for step, fn in (("clean subjects", lambda: generate_subjects(cohort)),
                     ("federation (scanners, splits)", lambda: build_federation(cohort, FederationConfig()))):
        seconds = median_seconds(fn, repeats=args.repeats, warmup=0)
        rows.append({"step": step, "subjects": args.subjects, "image_size": args.image_size,
                     "median_s": round(seconds, 3), "subjects_per_s": round(args.subjects / seconds, 1)})
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    print("wrote", write_results("data_generation", frame))


if __name__ == "__main__":
    main()
