"""scripts/markov_horizons.py: the short-against-long-horizon table from the sweeps' metrics.json files, the
sampled figures at every horizon with their bootstrap half-widths, the exact ones where the horizon has them."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import markov_horizons  # noqa: E402


def write_run(out: Path, horizon: int, name: str, method: str, kl: float, exact: bool) -> None:
    figures = {"avg_at_k": 0.5, "reverse_kl_student_states": kl, "forward_kl_teacher_states": 1.0, "truncated": 0.0,
               "intervals": {"reverse_kl_student_states": [kl - 0.5, kl + 0.5], "avg_at_k": [0.4, 0.6],
                             "forward_kl_teacher_states": [0.9, 1.1], "truncated": [0.0, 0.0]}}
    if exact:
        figures.update(exact_accepted=0.5, exact_reverse_kl=kl + 1, exact_forward_kl=1.0, exact_truncated=0.0)
    run = out / f"h{horizon}" / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "method": method, "eval_after": figures}))


def test_the_table_follows_the_runs(tmp_path):
    out = tmp_path / "runs"
    for seed, (teacher, student) in enumerate([(2.0, 3.0), (4.0, 5.0)]):  # DAgger - SeqKD = +1 at horizon 4
        write_run(out, 4, f"seqkd_s{seed}", "SeqKD", teacher, exact=True)
        write_run(out, 4, f"dagger_s{seed}", "DAgger", student, exact=True)
    for seed, (teacher, student) in enumerate([(2.0, 12.0), (2.0, 12.0)]):  # +10 at horizon 16, no seed spread
        write_run(out, 16, f"seqkd_s{seed}", "SeqKD", teacher, exact=False)
        write_run(out, 16, f"dagger_s{seed}", "DAgger", student, exact=False)
    write_run(out, 16, "failed", "DAgger", 99.0, exact=False)
    (out / "h16" / "failed" / "metrics.json").write_text(json.dumps({"status": "failed", "method": "DAgger"}))
    found = markov_horizons.load(out, [4, 16])
    assert {h: {m: len(e) for m, e in by.items()} for h, by in found.items()} == {4: {"SeqKD": 2, "DAgger": 2},
                                                                                  16: {"SeqKD": 2, "DAgger": 2}}
    text = markov_horizons.section(found, "python scripts/markov_horizons.py", 1.0)
    # horizon 4: reverse KL 3 ± sqrt(2) (1.4), half-width 0.5, exact 4 (kl + 1)
    assert "| 4 | SeqKD | 2 | 0.5 ± 0 [±0.1] (exact 0.5) | 3 ± 1.4 [±0.5] (exact 4) |" in text
    assert "| 16 | DAgger | 2 | 0.5 ± 0 [±0.1] (exact n/a) | 12 ± 0 [±0.5] (exact n/a) |" in text
    # differences: +1 against a spread of 2 sqrt(2) = 2.83 (ratio 0.4); +10 with no spread
    assert "| 4 | +0 ± 0 (**0.0**) | +1 ± 2.8 (**0.4**) |" in text
    assert "| 16 | +0 ± 0 (**0.0**) | +10 ± 0 (**inf**) |" in text
    doc = tmp_path / "results.md"
    doc.write_text("# page\n")
    for _ in range(2):
        sys.argv = ["markov_horizons.py", "--report-only", "--out", str(out), "--doc", str(doc), "--minutes", "2"]
        markov_horizons.main()
    page = doc.read_text()
    assert page.startswith("# page\n") and page.count(markov_horizons.START) == 1 and "in 2.0 minutes" in page
