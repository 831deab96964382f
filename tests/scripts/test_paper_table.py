"""scripts/paper_table.py: the paper's Table 1 layout from a sweep=paper directory, read at equal steps (with
intervals and paired verdicts) and at equal FLOPs."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import paper_table  # noqa: E402

from kltd.report.bootstrap import paired_interval  # noqa: E402


def write_cell(root: Path, name: str, prefix: str, divergence: str, per_question: list[float], curve: list[tuple]):
    """A finished run: `per_question` Avg@k after training, `curve` = (step, flops, avg_at_k) evaluations."""
    run = root / name
    run.mkdir(parents=True)
    mean = sum(per_question) / len(per_question)
    figures = {"avg_at_k": mean, "pass_at_k": min(1.0, mean + 0.2), "response_length": 30.0, "questions": 4,
               "pass_k": 4, "samples": 8, "intervals": {"avg_at_k": [mean - 0.1, mean + 0.1]},
               "per_question": {"avg_at_k": per_question}}
    after = {**{k: v for k, v in figures.items() if k != "per_question"}, "set": "heldout", "sets": {"heldout": figures}}
    summary = {"status": "completed", "method": name, "prefix": prefix, "trajectory": "expert", "seed": 0,
               "eval_after": after, "compute": {"flops": {"total": curve[-1][1]}},
               "config": {"loss": {"divergence": divergence}, "sampling": {"max_new_tokens": 24}, "seed": 0}}
    (run / "metrics.json").write_text(json.dumps(summary))
    rows = [{"step": step, "eval/avg_at_k": value, "cost/flops": flops} for step, flops, value in curve]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_table_and_the_verdicts_follow_the_runs(tmp_path):
    sweep = tmp_path / "sweep"
    student, teacher = [1.0, 0.5, 0.25, 0.75], [0.5, 0.5, 0.0, 0.5]
    write_cell(sweep, "a", "student", "forward_kl", student, [(0, 0, 0.1), (200, 4e11, 0.625)])
    # the teacher prefix costs more: its curve is read at 4e11, half way between 2e11 (0.2) and 6e11 (0.4)
    write_cell(sweep, "b", "teacher", "forward_kl", teacher, [(0, 0, 0.1), (100, 2e11, 0.2), (200, 6e11, 0.4)])
    text = paper_table.section(sweep)
    low, high = paired_interval(student, teacher)
    assert "Avg@k at 4e11 FLOPs" in text  # the largest budget both reached
    assert "| student | forward_kl | 24 | 0.625 [0.525, 0.725] |" in text
    line = next(l for l in text.splitlines() if l.startswith("- forward_kl, horizon 24"))
    assert f"+0.250 [{low:+.3f}, {high:+.3f}]" in line  # 0.625 - 0.375, paired over the four questions
    assert line.endswith("at equal FLOPs +0.325")  # 0.625 - 0.3
    doc = tmp_path / "results.md"
    doc.write_text("# page\n\nkept\n")
    for _ in range(2):  # written once, then replaced between its markers
        sys.argv = ["paper_table.py", str(sweep), "--doc", str(doc)]
        paper_table.main()
    page = doc.read_text()
    assert page.startswith("# page\n\nkept\n") and page.count(paper_table.START) == 1
