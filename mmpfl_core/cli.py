"""The ``mmpfl`` command: generate data, train one method, compare methods, reproduce, list methods.

Only argument parsing and printing live here; every computation is a call into mmpfl_core. The
method and preset lists are read from the registries (strategies, model presets, configs/), so a
newly registered strategy appears in ``mmpfl methods`` and is accepted by ``--method`` without an
edit here. A failed command exits with status 2, prints one ``mmpfl: error:`` line, and leaves no
empty results folder behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .errors import ConfigError, MMPFLError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="quickstart", help="preset name in configs/ or a YAML path")
    parser.add_argument(
        "--data",
        type=Path,
        help="a cohort file converted from your own images "
        "(data_scripts/convert_*.py); sites come from its site column. Default: the synthetic cohort",
    )
    parser.add_argument("--rounds", type=int, help="override federated.num_rounds and every method's own num_rounds")
    parser.add_argument(
        "--sites",
        type=int,
        help="number of sites (synthetic data); with --data: re-split the "
        "cohort into this many sites by Dirichlet label skew instead of its site column",
    )
    parser.add_argument("--epsilon", type=float, help="client-level privacy budget (target_epsilon) of the DP methods")
    parser.add_argument("--delta", type=float, help="delta of the DP methods' (epsilon, delta) guarantee")
    parser.add_argument("--seed", type=int, help="override the seed of data, federation and training")
    parser.add_argument(
        "--engine",
        choices=["loop", "vectorized"],
        help="override federated.engine: 'loop' (the "
        "reference) or 'vectorized' (a round's sites trained together; many sites per round)",
    )
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="turn on the public pretraining stage (the config's pretraining section): every method starts from "
        "a model pretrained on public subjects and trains only its private part",
    )
    parser.add_argument(
        "--private-part", help="with --pretrain: the parameters trained on site data (e.g. head, head+norm, all)"
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/<experiment name>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _privacy_overrides(args: argparse.Namespace) -> dict[str, float]:
    return {k: v for k, v in (("target_epsilon", args.epsilon), ("delta", args.delta)) if v is not None}


def _load(args: argparse.Namespace):
    from .experiment_config import load_experiment, with_cohort

    config = with_cohort(load_experiment(args.config), args.data)
    if args.rounds is not None:
        config = config.replace(federated={"num_rounds": args.rounds})
        # one round count for all (a method's own num_rounds, e.g. cross-silo DP-SGD's, would outlast a smoke run)
        config = dataclasses.replace(
            config, methods=tuple(dataclasses.replace(m, num_rounds=None) for m in config.methods)
        )
    if args.seed is not None:
        config = config.replace(data={"seed": args.seed}, federation={"seed": args.seed}, federated={"seed": args.seed})
    if getattr(args, "engine", None) is not None:
        config = config.replace(federated={"engine": args.engine})
    if args.sites is not None:
        config = config.replace(federation={"num_sites": args.sites})
        if args.data is not None:
            config = config.replace(data={"partition": "dirichlet"})
    if getattr(args, "private_part", None) is not None and not getattr(args, "pretrain", False):
        raise ConfigError("--private-part needs --pretrain (it picks what is trained on top of the public model).")
    if getattr(args, "pretrain", False):
        part = {} if args.private_part is None else {"private_part": args.private_part}
        config = config.replace(pretraining={"enabled": True, **part})
    return config


def _results_dir(args: argparse.Namespace, name: str) -> Path:
    from .paths import results_root

    return args.out if args.out is not None else results_root() / name


def select_method(config, name: str, privacy: dict[str, float]):
    """The method ``--method NAME`` means: a label of the config, else the config's first method with
    that strategy (its arguments kept), else the registered strategy with default arguments.
    ``privacy`` (``target_epsilon``/``delta``) overrides the method's arguments; the label says the budget."""
    import dataclasses

    from .experiment_config import MethodSpec
    from .federated.strategies import available_strategies

    method = next((m for m in config.methods if m.label == name), None) or next(
        (m for m in config.methods if m.strategy == name), None
    )
    if method is None:
        if name not in available_strategies():
            labels = [m.label for m in config.methods]
            raise ConfigError(
                f"--method {name!r} is unknown: neither a registered method {available_strategies()} nor a "
                f"label of the config {labels}; run `mmpfl methods` for the list."
            )
        method = MethodSpec(name)
    elif method.label != name:
        method = dataclasses.replace(method, label=name)
    if privacy:  # checked where the strategy is built, once (experiment_checks.build_checked_strategy)
        method = dataclasses.replace(method, kwargs={**method.kwargs, **privacy})
        if "target_epsilon" in privacy:
            method = dataclasses.replace(method, label=f"{name}-eps{privacy['target_epsilon']:g}")
    return method


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.cohort_files import save_federation
    from .data.summary import cohort_summary_table
    from .experiment import make_federation
    from .paths import data_root

    config = _load(args)
    federation = make_federation(config)
    out = args.out if args.out is not None else data_root() / config.name
    save_federation(federation, out)
    print(cohort_summary_table(federation).to_string(index=False))
    print(f"\ncohort written to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one method and write its report (REPORT.md, figures) beside the run."""
    import dataclasses

    from .reporting import write_comparison_report
    from .tables import markdown_table

    config = _load(args)
    method = select_method(config, args.method, _privacy_overrides(args))
    out = _results_dir(args, config.name)
    report = write_comparison_report(dataclasses.replace(config, methods=(method,)), out, progress=not args.no_progress)
    print(markdown_table(report.table))
    print(f"\nrun written to {out / method.label}; report written to {report.path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiment_config import with_privacy_budget
    from .reporting import write_comparison_report
    from .tables import markdown_table

    config = _load(args)
    config = with_privacy_budget(config, args.epsilon, delta=args.delta)  # the budget of every DP method
    out = _results_dir(args, config.name)
    report = write_comparison_report(config, out, progress=not args.no_progress, workers=args.workers)
    print(markdown_table(report.table))
    print(f"\nreport written to {report.path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    import dataclasses

    from .experiment import with_cohort
    from .paths import results_root
    from .reproduction import load_reproduction, run_reproduction
    from .tables import markdown_table

    plan = load_reproduction(args.preset)
    if args.data is not None:
        # Your cohort's sites come from its site column, so there is no label skew to sweep, and the site
        # sweep (10-200 sites) and the shadow-model attacks need the synthetic generator: the main
        # comparison (every method, every seed) and its claims are what runs on your data.
        experiment = with_cohort(plan.experiment, args.data)
        plan = dataclasses.replace(
            plan,
            experiment=experiment,
            alphas=(experiment.federation.alpha,),
            site_sweep=None,
            membership_inference=None,
        )
        print(
            "reproduce --data: the main comparison on your cohort's sites; the alpha and site sweeps and the "
            "membership-inference section need the synthetic cohort and are skipped."
        )
    out = args.out if args.out is not None else results_root() / plan.experiment.name
    report = run_reproduction(plan, out, progress=not args.no_progress)
    print(markdown_table(report.main_table))
    print()
    print(markdown_table(report.claims))
    print(f"\nreport written to {report.path}")
    return 0


def method_listing() -> str:
    """The registered methods, model presets and experiment presets, as ``mmpfl methods`` prints them."""
    from .experiment import CONFIG_DIR
    from .federated.strategies import available_strategies
    from .models.presets import list_presets

    configs = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    return "\n".join(
        [
            "methods (--method):        " + ", ".join(available_strategies()),
            "model presets (model.preset): " + ", ".join(list_presets()),
            "experiment presets (--config): " + ", ".join(configs),
            "DP methods take --epsilon and --delta; e.g. mmpfl train --method dp-fedavg --epsilon 8 --rounds 5",
        ]
    )


def cmd_methods(args: argparse.Namespace) -> int:
    print(method_listing())
    return 0


def _epilog() -> str:
    try:
        return method_listing()
    except Exception as exc:  # --help must work even if a registry fails to import; say why
        return f"(method list unavailable: {type(exc).__name__}: {exc})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpfl",
        description=__doc__.splitlines()[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func, *, common: bool = True, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, **kwargs)
        if common:
            _common(p)
        p.set_defaults(func=func)
        return p

    command("generate", "generate the synthetic cohort and its federation into the data root", cmd_generate)
    command(
        "train",
        "train one method and write its report",
        cmd_train,
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_argument("--method", default="fedavg", help="a method name (see `mmpfl methods`) or a label of the config")
    workers_help = "methods trained at a time, each in a process of one thread (default %(default)s)"
    command("compare", "train every method of the config and write a report", cmd_compare).add_argument(
        "--workers", type=int, default=1, help=workers_help
    )
    p = command(
        "reproduce", "the paper-style comparison: all methods, alphas, seeds, site sweep", cmd_reproduce, common=False
    )
    p.add_argument("--preset", default="teaching", help="smoke | teaching | paper, or a YAML path")
    p.add_argument("--data", type=Path, help="a converted cohort file for the main comparison (see train --data)")
    p.add_argument("--out", type=Path, help="results folder (default results/reproduce-<preset>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # the headline: 40 data-starved hospitals, public pretraining, patients as the unit (configs/headline.yaml);
    # `mmpfl compare` keeps the 5-hospital quickstart, where client-level DP shows why it needs many sites
    # two methods at a time on the 2 cores the demo is sized for (it stays within 10 minutes so)
    demo = command("demo", "the headline comparison on the embedded cohort (what `make demo` runs)", cmd_compare)
    demo.set_defaults(config="headline")
    demo.add_argument("--workers", type=int, default=2, help=workers_help)
    command("methods", "list the registered methods, model presets and experiment presets", cmd_methods, common=False)
    return parser


def _remove_if_empty(path: Path | None) -> None:
    """Remove ``path`` and its empty sub-folders if they hold no file (a failed command's leftovers)."""
    if path is None or not path.is_dir() or any(p.is_file() for p in path.rglob("*")):
        return
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    path.rmdir()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None)
    existed = out is not None and Path(out).exists()
    try:
        return args.func(args)
    except MMPFLError as exc:
        if not existed:
            _remove_if_empty(out)
        print(f"mmpfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
