"""Every refusal kltd can print, read from its source: the table in docs/reliability.md is made by this script.

A refusal is a user error reported as one line (`kltd: error: ...`): a `raise` of one of kltd's user-error
classes, or a call of the command's `fail(...)`. Their messages are f-strings; here a `{value}` placeholder is
shown as <value>. Each row names the module and function that raises it.

    python scripts/list_refusals.py            # rewrite the table in docs/reliability.md
    python scripts/list_refusals.py --check    # exit 1 if the table is out of date (the test suite runs this)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- refusals: made by scripts/list_refusals.py -->", "<!-- end of refusals -->"
# user errors: one line, no traceback (kltd.app.train_command.USER_ERRORS and the command's fail())
USER_ERRORS = {"ConfigError", "DataError", "BadRow", "TrainingError", "DirectoryBusy", "CompareError", "StorageFull",
               "TeacherServerError"}
CALLS = {"fail"}
# functions that return the text of a refusal for their caller to raise ("model.teacher: <problem>")
PROBLEM_FUNCTIONS = re.compile(r"(_problem|_error|^check_model_reference)$")
PLACEHOLDER_LIMIT = 40


def _placeholder(node: ast.FormattedValue, source: str) -> str:
    text = ast.get_source_segment(source, node.value) or "…"
    text = re.sub(r"\s+", " ", text)
    return f"<{text if len(text) <= PLACEHOLDER_LIMIT else '…'}>"


def message_text(node: ast.AST, source: str) -> str | None:
    """The message of a string, an f-string or their concatenation; None for anything else (a variable)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else _placeholder(part, source)
                       for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = message_text(node.left, source), message_text(node.right, source)
        if left is not None or right is not None:
            return (left or "<…>") + (right or "<…>")
    return None


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def refusals(package: Path = ROOT / "kltd") -> list[tuple[str, str]]:
    """(where, message) for every refusal in the package, in file order."""
    found = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(function):
                call = None
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                        _called_name(node.exc) in USER_ERRORS:
                    call = node.exc
                elif isinstance(node, ast.Call) and _called_name(node) in CALLS:
                    call = node
                argument = call.args[0] if call is not None and call.args else None
                if isinstance(node, ast.Return) and node.value is not None and PROBLEM_FUNCTIONS.search(function.name):
                    argument = node.value
                text = None if argument is None else message_text(argument, source)
                if text is not None:
                    found.append((f"`{module}.{function.name}`", text))
    unique = list(dict.fromkeys(found))  # a nested function is walked from its parent too
    return unique


def table(rows: list[tuple[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [START, "", "| where | message |", "|---|---|"]
    lines += [f"| {where} | {cell(message)} |" for where, message in rows]
    return "\n".join(lines + ["", END])


def updated(doc: str, rows: list[tuple[str, str]]) -> str:
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} has no refusal table markers ({START} ... {END})")
    head, rest = doc.split(START, 1)
    return head + table(rows) + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reliability.md's table is out of date")
    args = parser.parse_args(argv)
    doc = DOC.read_text()
    new = updated(doc, refusals())
    if args.check:
        if new != doc:
            print(f"{DOC} does not list kltd's refusals as the code has them; run python scripts/list_refusals.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote {len(refusals())} refusals to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
