"""`kltd compare DIR [DIR ...]`: the command line of kltd.report.compare (arguments, one-line errors)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
               "failed cells are shown as 'failed: <error>', unfinished ones as 'missing'; the exit code is 0 "
               "whenever a report was written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="a run directory, or any directory with run directories below it (e.g. a sweep)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help=f"eval_after metric for the matrix (default: {','.join(DEFAULT_METRICS)}); repeat or "
                             "comma-separate for several tables, e.g. accuracy,pass_at_k,student_entropy")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where results.md, results.csv and the PNGs go (default: the first DIR if it is a "
                             "sweep directory, else the current directory)")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    metrics = [name.strip() for value in args.metric or [] for name in value.split(",") if name.strip()]
    try:
        result = compare(args.dirs, args.out, metrics)
    except CompareError as error:
        print(f"kltd: error: {error}", file=sys.stderr)
        sys.exit(2)
    print_result(result)
