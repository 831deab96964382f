"""What a run shows while it works: a live bar on a terminal, plain lines at a steady pace anywhere else.

Rich draws its bar only on a terminal, so a run whose output goes to a file (nohup, SLURM, CI) would show
nothing between "run directory: ..." and the end. There, a plain line is printed every `every_steps`
training steps or every `every_s` seconds, whichever comes first; during phases without steps (an
evaluation, filling the teacher cache: minutes on a real model) a background thread prints what the run
is doing and for how long every `every_s` seconds, so a log never goes quiet for longer than that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.markup import escape


def clock_text(seconds: float) -> str:
    """0:01:05 for 65 s."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class StepFigures:
    """One training step as the progress line shows it."""

    step: int
    loss: float
    tokens_per_s: float
    elapsed_s: float  # training time so far, this session and any before a resume
    session_steps: int  # steps this session has taken (the remaining time is estimated from them)
    session_s: float


def step_line(figures: StepFigures, total: int) -> str:
    line = (f"step {figures.step}/{total}  loss {figures.loss:.4f}  {figures.tokens_per_s:,.0f} tok/s  "
            f"elapsed {clock_text(figures.elapsed_s)}")
    if figures.session_steps and figures.step < total:
        left = figures.session_s / figures.session_steps * (total - figures.step)
        line += f"  remaining ~{clock_text(left)}"
    return line


class PlainProgress:
    """The lines for a log that nobody watches live. `echo` prints one line; `clock` is time.monotonic (a test
    passes its own). Thread-safe: the heartbeat thread and the training loop both report through it."""

    def __init__(self, echo: Callable[[str], None], *, total_steps: int, every_steps: int, every_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.echo, self.total, self.every_steps, self.every_s, self.clock = echo, total_steps, every_steps, every_s, clock
        self.lock = threading.Lock()
        self.last_line = clock()
        self.last_step: StepFigures | None = None
        self.phase: str | None = None  # what the run is doing besides stepping, and since when
        self.phase_started = 0.0
        self.phase_done: tuple[int, int] | None = None  # (done, total) of the phase's own units, when it says

    def _say(self, line: str) -> None:
        self.last_line = self.clock()
        self.echo(line)

    def step(self, figures: StepFigures) -> None:
        with self.lock:
            self.last_step = figures
            due = self.clock() - self.last_line >= self.every_s
            if figures.step % self.every_steps == 0 or figures.step == self.total or due:
                self._say(step_line(figures, self.total))

    def begin_phase(self, name: str) -> None:
        with self.lock:
            self.phase, self.phase_started, self.phase_done = name, self.clock(), None

    def phase_progress(self, done: int, total: int) -> None:
        with self.lock:
            self.phase_done = (done, total)

    def end_phase(self) -> None:
        with self.lock:
            if self.phase is not None and self.clock() - self.phase_started >= self.every_s:
                self._say(f"{self.phase}: done in {clock_text(self.clock() - self.phase_started)}")
            self.phase = None

    def heartbeat(self) -> None:
        """Called every second or so by the thread: a line if the log has been quiet for every_s."""
        with self.lock:
            now = self.clock()
            if now - self.last_line < self.every_s:
                return
            if self.phase is not None:
                done = f" ({self.phase_done[0]}/{self.phase_done[1]})" if self.phase_done else ""
                self._say(f"{self.phase}: {clock_text(now - self.phase_started)} so far{done}")
            elif self.last_step is not None and self.last_step.step < self.total:  # one long step: still alive
                self._say(f"step {self.last_step.step + 1}/{self.total} running; "
                          f"last: {step_line(self.last_step, self.total)}")


class RunProgress:
    """A run's progress display: Rich's bar on a terminal, PlainProgress (with its heartbeat thread) elsewhere,
    nothing when disabled (trainer.progress=false, or a process of a data-parallel run other than the first).

        with RunProgress(console, label, total_steps=200, every_steps=10, every_s=30) as progress:
            with progress.phase("evaluation before training"):
                ...
            progress.step(StepFigures(...))
    """

    def __init__(self, console, label: str, *, total_steps: int, done_steps: int = 0, every_steps: int = 10,
                 every_s: float = 30.0, enabled: bool = True, prefix: str = ""):
        self.console, self.enabled = console, enabled
        self.terminal = enabled and console.is_terminal
        self.total = total_steps
        self.plain = None
        self.bar = self.task = None
        if self.terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
            self.bar = Progress(*columns, console=console, transient=False)
            # escape: a label such as "DAgger [kl_mix(0.5)]" is text, not Rich markup
            self.task = self.bar.add_task(escape(label), total=total_steps, completed=done_steps, status="")
        elif enabled:
            def echo(line: str) -> None:
                console.print(prefix + line, soft_wrap=True, highlight=False, markup=False)

            self.plain = PlainProgress(echo, total_steps=total_steps, every_steps=every_steps, every_s=every_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunProgress":
        if self.bar is not None:
            self.bar.__enter__()
        if self.plain is not None:
            self._thread = threading.Thread(target=self._beat, name="kltd-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def _beat(self) -> None:
        tick = max(0.05, min(1.0, self.plain.every_s / 4))
        while not self._stop.wait(tick):
            self.plain.heartbeat()

    def step(self, figures: StepFigures) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=figures.step,
                            status=f"loss {figures.loss:.4f}  {figures.tokens_per_s:,.0f} tok/s")
        elif self.plain is not None:
            self.plain.step(figures)

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[int, int], None]]:
        """While the block runs the display says `name`; the block may report (done, total) through the
        function it is given."""
        if self.bar is not None:
            self.bar.update(self.task, status=escape(name) + " ...")
        elif self.plain is not None:
            self.plain.begin_phase(name)
        try:
            yield self._phase_progress
        finally:
            if self.bar is not None:
                self.bar.update(self.task, status="")
            elif self.plain is not None:
                self.plain.end_phase()

    def _phase_progress(self, done: int, total: int) -> None:
        if self.plain is not None:
            self.plain.phase_progress(done, total)
