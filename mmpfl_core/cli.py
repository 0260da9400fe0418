"""The ``mmpfl`` command: generate data, train one method, compare methods, run the demo.

Only argument parsing and printing live here; every computation is a call into mmpfl_core.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import MMPFLError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="quickstart", help="preset name in configs/ or a YAML path")
    parser.add_argument("--rounds", type=int, help="override federated.num_rounds")
    parser.add_argument("--seed", type=int, help="override the seed of data, federation and training")
    parser.add_argument("--out", type=Path, help="results folder (default results/<experiment name>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _load(args: argparse.Namespace):
    from .experiment import load_experiment
    config = load_experiment(args.config)
    if args.rounds is not None:
        config = config.replace(federated={"num_rounds": args.rounds})
    if args.seed is not None:
        config = config.replace(data={"seed": args.seed}, federation={"seed": args.seed},
                                federated={"seed": args.seed})
    return config


def _results_dir(args: argparse.Namespace, name: str) -> Path:
    from .paths import results_root
    return args.out if args.out is not None else results_root() / name


def cmd_generate(args: argparse.Namespace) -> int:
    from .data.io import save_federation
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
    from .experiment import MethodSpec, comparison_table, run_method
    config = _load(args)
    method = next((m for m in config.methods if m.label == args.method), None) or MethodSpec(args.method)
    out = _results_dir(args, config.name)
    run = run_method(config, method, results_dir=out, progress=not args.no_progress)
    print(comparison_table({method.label: run}).to_string(index=False))
    print(f"\nrun written to {out / method.label}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .reporting import write_comparison_report
    from .tables import markdown_table
    config = _load(args)
    out = _results_dir(args, config.name)
    report = write_comparison_report(config, out, progress=not args.no_progress)
    print(markdown_table(report.table))
    print(f"\nreport written to {report.path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .paths import results_root
    from .reproduction import load_reproduction, run_reproduction
    from .tables import markdown_table
    plan = load_reproduction(args.preset)
    out = args.out if args.out is not None else results_root() / plan.experiment.name
    report = run_reproduction(plan, out, progress=not args.no_progress)
    print(markdown_table(report.main_table))
    print()
    print(markdown_table(report.claims))
    print(f"\nreport written to {report.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpfl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="generate the synthetic cohort and its federation into the data root")
    _common(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("train", help="train one method")
    _common(p)
    p.add_argument("--method", default="fedavg", help="a method label of the config, or a strategy name")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="train every method of the config and write a report")
    _common(p)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("reproduce", help="the paper-style comparison: all methods, alphas, seeds, site sweep")
    p.add_argument("--preset", default="teaching", help="smoke | teaching | paper, or a YAML path")
    p.add_argument("--out", type=Path, help="results folder (default results/reproduce-<preset>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("demo", help="the quickstart comparison on the embedded cohort (what `make demo` runs)")
    _common(p)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MMPFLError as exc:
        print(f"mmpfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
