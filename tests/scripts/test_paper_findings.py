"""scripts/paper_findings.py's writers: the Markov task's section (exact figures per cell, every contrast with its
seed spread) goes between its markers; the addition task's report replaces only the page's top; neither run erases
the other."""

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import paper_findings  # noqa: E402

from kltd.report.aggregate import MethodSummary  # noqa: E402
from kltd.report.records import Run  # noqa: E402

FIGURES = ["exact_reverse_kl", "exact_accepted"]


def fake_result(tmp_path: Path) -> SimpleNamespace:
    """Two seeds per cell. Every cell has exact_reverse_kl 2 and 4 (mean 3, std sqrt(2)) and exact_accepted 0.5
    and 0.5 (std 0), except DAgger: reverse KL 10 and 12 (mean 11), accepted 0.9 and 0.9; before training every run
    has reverse KL 30 and the teacher's entropy rate 0.8."""
    rows = []
    for label in paper_findings.CELLS:
        runs = []
        for seed in (0, 1):
            kl = (10.0 if label == "DAgger" else 2.0) + 2 * seed
            after = {"exact_reverse_kl": kl, "exact_accepted": 0.9 if label == "DAgger" else 0.5, "accuracy": 1.0}
            summary = {"steps": 200, "eval_before": {"exact_reverse_kl": 30.0, "exact_accepted": 0.25,
                                                     "exact_teacher_entropy_rate": 0.8}, "eval_after": after}
            runs.append(Run(tmp_path / f"{label}{seed}", "completed", label, None, None, seed, None, summary=summary))
        rows.append(MethodSummary(label, label, None, None, runs))
    return SimpleNamespace(rows=rows, runs=[run for row in rows for run in row.runs])


def test_the_markov_section_follows_the_runs(tmp_path):
    args = argparse.Namespace(seeds=[0, 1], overrides=["data=markov"], doc=tmp_path / "results.md")
    text = paper_findings.markov_section(args, fake_result(tmp_path), 2.0, FIGURES, "python scripts/x.py data=markov")
    assert text.startswith(paper_findings.MARKOV_START) and text.endswith(paper_findings.MARKOV_END)
    assert "| the student before training | 30 | 0.25 |" in text
    assert "| SFT | 3 ± 1.4 | 0.5 ± 0 |" in text  # std of 2 and 4: sqrt(2) = 1.41
    assert "| DAgger | 11 ± 1.4 | 0.9 ± 0 |" in text
    # DAgger - SeqKD: reverse KL +8 against a spread of 2 sqrt(2) = 2.83 -> ratio 2.8; accepted +0.4, spread 0: inf
    assert "| student - teacher states, forward KL (DAgger vs SeqKD) | +8 ± 2.8 (**2.8**) | +0.4 ± 0 (**inf**) |" in text
    assert "- student - teacher states, forward KL: resolved 2 of 2 (exact_reverse_kl +8, exact_accepted +0.4)" in text
    # OPD - Teacher-prefix RKL: 0 on both, not above a spread of 2.83 (nor of 0)
    assert ("- student - teacher states, reverse KL: resolved 0 of 2; not resolved: exact_reverse_kl +0, "
            "exact_accepted +0") in text
    assert "teacher's entropy rate is 0.8 nats" in text and "seeds 0, 1, 200 steps each" in text


def test_neither_report_erases_the_other(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text("# old top\n\nold verdicts\n\n<!-- paper-table:start -->\ntable\n<!-- paper-table:end -->\n\nnote\n")
    markov = f"{paper_findings.MARKOV_START}\nmarkov one\n{paper_findings.MARKOV_END}"
    paper_findings.write_section(doc, markov, paper_findings.MARKOV_START, paper_findings.MARKOV_END)
    paper_findings.write_top(doc, "# new top\n\nnew verdicts\n")
    paper_findings.write_section(doc, markov.replace("one", "two"), paper_findings.MARKOV_START,
                                 paper_findings.MARKOV_END)
    page = doc.read_text()
    assert page == ("# new top\n\nnew verdicts\n\n<!-- paper-table:start -->\ntable\n<!-- paper-table:end -->\n\n"
                    f"note\n\n{paper_findings.MARKOV_START}\nmarkov two\n{paper_findings.MARKOV_END}\n")
    fresh = tmp_path / "new.md"  # no page yet: each writer starts one
    paper_findings.write_section(fresh, markov, paper_findings.MARKOV_START, paper_findings.MARKOV_END)
    assert fresh.read_text() == markov + "\n"
    paper_findings.write_top(fresh, "# top")
    assert fresh.read_text() == "# top\n\n" + markov + "\n"
