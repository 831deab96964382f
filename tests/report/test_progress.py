"""Progress for logs nobody watches live: plain lines every N steps or M seconds, and a heartbeat in phases
without steps. Time is a fake clock here: nothing depends on how fast the machine is."""

import io

from rich.console import Console

from kltd.report.progress import PlainProgress, RunProgress, StepFigures, clock_text, step_line


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(every_steps=10, every_s=30.0, total=100):
    clock, lines = FakeClock(), []
    return PlainProgress(lines.append, total_steps=total, every_steps=every_steps, every_s=every_s, clock=clock), clock, lines


def figures(step, elapsed=1.0):
    return StepFigures(step, loss=0.5, tokens_per_s=1000.0, elapsed_s=elapsed, session_steps=step, session_s=elapsed)


def test_a_line_every_n_steps_and_at_the_last_step():
    progress, clock, lines = plain(every_steps=10, total=25)
    for step in range(1, 26):
        clock.now += 0.1
        progress.step(figures(step, elapsed=clock.now))
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]


def test_a_slow_step_is_reported_when_m_seconds_have_passed():
    progress, clock, lines = plain(every_steps=1000, every_s=30)
    clock.now = 29.0
    progress.step(figures(1, elapsed=29.0))
    assert lines == []
    clock.now = 31.0
    progress.step(figures(2, elapsed=31.0))
    assert lines and lines[0].startswith("step 2/100")


def test_the_line_carries_loss_speed_elapsed_and_remaining():
    line = step_line(StepFigures(20, 0.12345, 4096.4, 65.0, session_steps=10, session_s=50.0), total=100)
    # 10 steps took 50 s this session: 80 steps left take about 400 s
    assert line == "step 20/100  loss 0.1235  4,096 tok/s  elapsed 0:01:05  remaining ~0:06:40"
    assert "remaining" not in step_line(StepFigures(100, 0.1, 1.0, 5.0, 100, 5.0), total=100)


def test_a_long_phase_prints_a_heartbeat_at_least_every_m_seconds():
    progress, clock, lines = plain(every_s=30)
    progress.begin_phase("evaluation after step 200")
    for second in range(1, 100):  # the thread beats about every second
        clock.now = float(second)
        progress.heartbeat()
        if second == 40:
            progress.phase_progress(200, 800)
    assert lines == ["evaluation after step 200: 0:00:30 so far",
                     "evaluation after step 200: 0:01:00 so far (200/800)",
                     "evaluation after step 200: 0:01:30 so far (200/800)"]
    clock.now = 100.0
    progress.end_phase()
    assert lines[-1] == "evaluation after step 200: done in 0:01:40"


def test_a_short_phase_prints_nothing():
    progress, clock, lines = plain(every_s=30)
    progress.begin_phase("teacher cache")
    clock.now = 5.0
    progress.heartbeat()
    progress.end_phase()
    assert lines == []


def test_a_single_long_step_is_not_silence():
    progress, clock, lines = plain(every_steps=10, every_s=30)
    progress.step(figures(1))
    clock.now = 45.0  # step 2 samples for minutes on a real model
    progress.heartbeat()
    assert lines == ["step 2/100 running; last: step 1/100  loss 0.5000  1,000 tok/s  elapsed 0:00:01  "
                     "remaining ~0:01:39"]


def test_clock_text():
    assert clock_text(0) == "0:00:00" and clock_text(3725.9) == "1:02:05"


def test_a_file_gets_plain_lines_and_labels_stay_whole():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with RunProgress(console, "DAgger [kl_mix(0.5)]", total_steps=4, every_steps=2, every_s=1000,
                     prefix="[3_dagger_s0] ") as progress:
        for step in range(1, 5):
            progress.step(figures(step))
    lines = out.getvalue().splitlines()
    assert lines == [line for line in lines if line.startswith("[3_dagger_s0] step ")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]


def test_a_terminal_gets_the_bar_with_the_whole_label():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with RunProgress(console, "DAgger [kl_mix(0.5)]", total_steps=2, every_steps=1, every_s=1000) as progress:
        progress.step(figures(1))
        progress.step(figures(2))
    assert "DAgger [kl_mix(0.5)]" in out.getvalue()
    assert "step 1/2" not in out.getvalue()  # no plain lines under the bar


def test_disabled_shows_nothing():
    out = io.StringIO()
    with RunProgress(Console(file=out), "SFT", total_steps=2, enabled=False) as progress:
        progress.step(figures(1))
        with progress.phase("evaluation before training") as report:
            report(1, 2)
    assert out.getvalue() == ""
