"""Volume loading: the kit's nibabel path vs MONAI's LoadImage + Orientation + percentile scaling.

Why this exists: issue 17 asks to use MONAI readers/transforms where they replace hand code, or to
keep the hand code for a measured reason. This prints MONAI's import time and its per-volume time
as a ratio to ours on nibabel's bundled ``anatomical.nii`` (33x41x25). MONAI is not a dependency;
install it into a scratch folder to run the comparison::

    pip install --no-deps --target /tmp/monai monai
    PYTHONPATH=/tmp/monai python bench/volume_loading.py
"""
from __future__ import annotations

import time

import numpy as np
from nibabel.testing import data_path

from mmpfl_core.data.contract import normalise_intensity
from mmpfl_core.data.loaders.nifti import load_nifti_image

PATH = f"{data_path}/anatomical.nii"
REPEATS = 50


def _per_call(fn) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    ours = _per_call(lambda: normalise_intensity(np.asarray(load_nifti_image(PATH).dataobj)))
    print(f"kit (nibabel, as_closest_canonical, /p99.5): {ours * 1e3:.2f} ms per volume")
    try:
        start = time.perf_counter()
        from monai.transforms import (Compose, EnsureChannelFirst, LoadImage, Orientation,
                                      ScaleIntensityRangePercentiles)
        imported = time.perf_counter() - start
    except ImportError:
        print("monai is not installed: see the module docstring to compare.")
        return
    pipe = Compose([LoadImage(image_only=True, reader="NibabelReader"), EnsureChannelFirst(),
                    Orientation(axcodes="RAS"),
                    ScaleIntensityRangePercentiles(lower=0, upper=99.5, b_min=0, b_max=1, clip=True)])
    theirs = _per_call(lambda: pipe(PATH))
    print(f"monai import: {imported:.2f} s; per volume {theirs * 1e3:.2f} ms; monai / kit = {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
