"""docs/reliability.md lists every refusal kltd can print, as the code has it (scripts/list_refusals.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import list_refusals  # noqa: E402


def test_the_documented_refusals_are_the_codes():
    assert list_refusals.main(["--check"]) == 0, "run: python scripts/list_refusals.py"


def test_raises_fails_and_problem_functions_are_found_with_their_messages(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(
        "def check(cfg):\n"
        "    if cfg.x < 0:\n"
        "        raise ConfigError(f'x={cfg.x} must be >= 0; ' 'set x=0')\n"
        "    raise ValueError('an internal error, not a refusal')\n"
        "def main(path):\n"
        "    fail(f'{path} is missing')\n"
        "def path_problem(path):\n"
        "    return f\"'{path}' is a file\"\n")
    found = list_refusals.refusals(package)
    assert found == [("`pkg.mod.check`", "x=<cfg.x> must be >= 0; set x=0"), ("`pkg.mod.main`", "<path> is missing"),
                     ("`pkg.mod.path_problem`", "'<path>' is a file")]
