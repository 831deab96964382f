"""`kltd`: the command-line entry point. Subcommands dispatch to their own modules."""

from __future__ import annotations

import signal
import sys

USAGE = """usage: kltd <command> [args]

Knowledge distillation as a grid: which states the student trains on (prefix) x whose next-token
choice supervises it there (trajectory).

commands:
  train     train one cell, or a sweep with -m (Hydra overrides; `kltd train --help` lists them)
  eval      evaluate a model on the evaluation sets: kltd eval target=teacher 'eval.sets=[heldout]'
  compare   compare finished runs: kltd compare DIR [DIR ...]
  make-data write a JSONL dataset of responses sampled from a model, for offline RL
  serve-teacher  serve a teacher over HTTP to training runs: kltd serve-teacher toy/teacher --port 8765

examples:
  kltd train prefix=student trajectory=expert            # DAgger
  kltd train -m prefix=fixed,student trajectory=expert,student
"""


def main(argv: list[str] | None = None) -> None:
    if argv is None and hasattr(signal, "SIGPIPE"):  # `kltd ... | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    try:
        _dispatch(command, rest)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops after its step and says so itself)
        print(f"kltd: {command} stopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)


def _dispatch(command: str, rest: list[str]) -> None:
    if command == "train":
        from kltd.app.train_command import main as train_main

        train_main(rest)
    elif command == "eval":
        from kltd.app.eval_command import main as eval_main

        eval_main(rest)
    elif command == "compare":
        from kltd.app.compare_command import main as compare_main

        compare_main(rest)
    elif command == "make-data":
        from kltd.app.make_data_command import main as make_data_main

        make_data_main(rest)
    elif command == "serve-teacher":
        from kltd.app.serve_command import main as serve_main

        serve_main(rest)
    else:
        print(f"kltd: error: unknown command '{command}'; run `kltd --help` for the list", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
