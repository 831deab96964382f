"""`kltd compare DIR [DIR ...]`: the command line of kltd.report.compare (arguments, one-line errors)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kltd.report.budget import AXES
from kltd.report.compare import DEFAULT_METRICS, compare, print_result
from kltd.report.records import CompareError


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"kltd: error: {message} (see `kltd compare --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="kltd compare",
        description="Compare finished runs: the prefix x trajectory method matrix, quality next to cost, "
                    "and plots. Reads only local files (metrics.json, metrics.jsonl); no network.",
        epilog="examples:\n"
               "  kltd compare outputs/multirun/2026-11-28_09-00-00\n"
               "  kltd compare outputs/ --metric accuracy,reverse_kl_student_states --out report/\n"
               "  kltd compare outputs/multirun/2026-11-28_09-00-00 --at flops   # the largest FLOPs every cell reached\n"
               "  kltd compare outputs/multirun/2026-11-28_09-00-00 --at tokens --budget 3.5e9\n"
               "  kltd compare outputs/multirun/2026-11-28_09-00-00 outputs/evals/ --against SFT --metric avg_at_k\n"
               "with --at, each run's evaluation curve is read at one budget of that cost (linear interpolation "
               "between the two evaluations around it; a run that stops short is marked 'does not reach', never "
               "extrapolated), the matrix at that budget is printed and written beside the usual tables, and "
               "pareto_<metric>_<at>.png plots quality against cost.\n"
               "failed cells are shown as 'failed: <error>', unfinished ones as 'missing'; the exit code is 0 "
               "whenever a report was written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="a run directory, or any directory with run directories below it (e.g. a sweep)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help=f"eval_after metric for the matrix (default: those of {','.join(DEFAULT_METRICS)} the "
                             "runs have); repeat or comma-separate for several tables, e.g. "
                             "accuracy,pass_at_k,student_entropy")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where results.md, results.csv and the PNGs go (default: the first DIR if it is a "
                             "sweep directory, else the current directory)")
    parser.add_argument("--at", choices=list(AXES),
                        help="also compare at equal compute: read every run's evaluation curve at one budget of "
                             "cost/flops, cost/tokens_processed or cost/wall_time_s (metrics.jsonl) and plot quality "
                             "against that cost (pareto_<metric>_<at>.png)")
    parser.add_argument("--against", metavar="LABEL",
                        help="also give each method's difference from this one (a method label as the tables show "
                             "it, e.g. SFT), question by question on the same questions, with a 95%% paired interval")
    parser.add_argument("--budget", type=_budget, metavar="X",
                        help="the budget for --at, e.g. 1e12 (default: the largest budget every finished run reached)")
    return parser


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number (e.g. 1e12)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"'{text}' must be a positive number (e.g. 1e12)")
    return value


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    metrics = [name.strip() for value in args.metric or [] for name in value.split(",") if name.strip()]
    try:
        result = compare(args.dirs, args.out, metrics, at=args.at, budget=args.budget, against=args.against)
    except CompareError as error:
        print(f"kltd: error: {error}", file=sys.stderr)
        sys.exit(2)
    print_result(result)
