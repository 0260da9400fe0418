"""How learnable the synthetic cohort is: every source alone and fused, at a chosen resolution.

Why this exists: issue 16 asks that the lesion signal the generator plants be learnable but not
trivially so at 64 px (a CNN does not reach 1.0, FLAIR alone is above chance, images fused with the
clinical variables beat every single source). This trains, with notebook 01's recipe
(:func:`mmpfl_core.centralized.train_centralized`, warm-up + cosine, AdamW), on the pooled training splits of
the quickstart federation and prints balanced accuracy on the global test set per variant, with a
95% Student-t interval over seeds (bootstrap over test subjects with one seed). It also sweeps the
CNN's learning rate (``--cnn-lrs``), so notebook 01 compares its ViT with the CNN at the CNN's best.

    python bench/cohort_signal.py --image-size 64 --seeds 0 1 2          # cohort realism at 64 px
    python bench/cohort_signal.py --image-size 32 --variants cnn --cnn-lrs 1e-3 3e-3 1e-2 2e-2 --seeds 0 1 2 3 4

Accuracy, not time, is the result here (seconds are printed for planning only); it writes
``bench/results/cohort_signal_<size>px.{csv,md}``.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import pandas as pd
import torch
from common import write_results

from mmpfl_core.data.contract import concatenate
from mmpfl_core.data.transforms import clinical_only, select_modalities
from mmpfl_core.experiment import ExperimentConfig, make_federation
from mmpfl_core.models import create_model
from mmpfl_core.centralized import TrainingRecipe, compare_over_seeds

#: Model presets per resolution: the hybrid ViT and the CNN baseline of that size.
PRESETS = {32: ("hybrid-tiny", "cnn"), 64: ("hybrid-teaching", "cnn-teaching")}
VARIANTS = ("cnn", "vit-images", "t1", "t2", "flair", "clinical", "vit-fused", "cnn-fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, choices=sorted(PRESETS), default=64)
    parser.add_argument("--subjects", type=int, default=1500, help="cohort size (quickstart: 1500)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="ViT peak learning rate")
    parser.add_argument("--cnn-lrs", type=float, nargs="+", default=[2e-2], help="CNN peak learning rates")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ExperimentConfig.from_dict({
        "name": "cohort-signal",
        "data": {"num_subjects": args.subjects, "image_size": args.image_size, "seed": 0},
        "federation": {"num_sites": 5, "alpha": 0.5, "seed": 0},
    })
    federation = make_federation(config)
    train, test = concatenate([site.train for site in federation.sites]), federation.global_test
    shape = dict(image_size=train.image_size, num_modalities=train.num_modalities,
                 num_clinical=len(train.clinical_names), num_classes=train.num_classes)
    vit, cnn = PRESETS[args.image_size]
    recipe = TrainingRecipe(epochs=args.epochs, lr=args.lr, warmup_epochs=min(2.0, args.epochs / 4))

    def maker(preset: str, **overrides):
        return lambda seed: create_model(preset, seed=seed, **shape, **overrides)

    def only(names, cohort):
        return select_modalities(cohort, names)

    images = dict(use_clinical=False)
    table = {
        "vit-images": ("ViT, images", maker(vit, **images), recipe, train, test),
        "t1": ("ViT, T1 only", maker(vit, **images), recipe, only(["T1"], train), only(["T1"], test)),
        "t2": ("ViT, T2 only", maker(vit, **images), recipe, only(["T2"], train), only(["T2"], test)),
        "flair": ("ViT, FLAIR only", maker(vit, **images), recipe, only(["FLAIR"], train), only(["FLAIR"], test)),
        "clinical": ("clinical only", maker(vit), recipe, clinical_only(train), clinical_only(test)),
        "vit-fused": ("ViT, images + clinical", maker(vit), recipe, train, test),
    }
    variants = {label: rest for key, (label, *rest) in table.items() if key in args.variants}
    for lr in args.cnn_lrs:
        cnn_recipe = replace(recipe, lr=lr)
        if "cnn" in args.variants:
            variants[f"CNN, images (lr {lr:g})"] = (maker(cnn, **images), cnn_recipe, train, test)
        if "cnn-fused" in args.variants:
            variants[f"CNN, images + clinical (lr {lr:g})"] = (maker(cnn), cnn_recipe, train, test)

    runs, summary, _ = compare_over_seeds(variants, args.seeds, num_resamples=1000)
    if len(args.seeds) == 1:  # one seed: report the bootstrap interval over test subjects
        summary = summary.assign(seed_low=runs["low"].to_numpy(), seed_high=runs["high"].to_numpy())
    summary.insert(1, "seeds", len(args.seeds))
    summary["per_seed"] = [", ".join(f"{x:.3f}" for x in runs.loc[runs["variant"] == v, "balanced_accuracy"])
                           for v in summary["variant"]]
    frame = summary.rename(columns={"mean": "balanced_accuracy", "seed_low": "low", "seed_high": "high"})
    frame = frame[["variant", "seeds", "balanced_accuracy", "low", "high", "per_seed", "seconds"]].round(3)
    print(frame.to_string(index=False))
    notes = (f"{args.image_size} px, {args.subjects} subjects ({len(train)} pooled training, {len(test)} test), "
             f"{args.epochs} epochs, ViT lr {args.lr:g}, seeds {args.seeds}; chance balanced accuracy 0.333. "
             "Intervals: Student-t over seeds (bootstrap over test subjects with one seed).")
    write_results(f"cohort_signal_{args.image_size}px", pd.DataFrame(frame), notes)


if __name__ == "__main__":
    main()
