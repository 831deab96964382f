"""SIGTERM and SIGINT during training: finish the step, save a checkpoint, stop cleanly; in a sweep, every job.

A cluster that preempts a job sends SIGTERM (SLURM: some time before the kill); Ctrl-C sends SIGINT. Either
sets a flag that the training loop reads after each step; the loop then saves a checkpoint, records
status "interrupted" and raises Interrupted, which the command turns into one line and exit code
128 + the signal (143 for SIGTERM, 130 for SIGINT). Rerunning the same command resumes.

A sweep whose jobs run on this machine (Hydra's basic, joblib or submitit_local launcher) is one command to
stop: sweep_stops() in its parent process, sweep_job() around each job. How the signal reaches
every job, the simplest way that holds for all three launchers:

- The parent blocks SIGTERM and SIGINT in its main thread before the launcher starts anything, and takes them
  in a thread of its own (sigtimedwait). A blocked signal mask is inherited by every process started from
  then on (loky's workers, submitit's processes, data-parallel ranks) and kept across exec, so no process of
  the sweep can be killed by a signal before kltd's code runs in it: not an idle joblib worker that a
  terminal's Ctrl-C reaches too (it used to die, and loky then killed every other worker with its job), not
  a submitit controller (whose Ctrl-C handling kills its job a second later).
- When a job starts in a process of the sweep, that process installs handlers that only record the signal
  (a repeat, e.g. the terminal's Ctrl-C and the parent's copy of it, changes nothing) and unblocks the
  signals: one that arrived while it was blocked is taken then. A job that finds a stop recorded does not
  start; the training loop stops after its step (the same flag), saves a checkpoint and marks the run
  interrupted. The process also watches the parent: if the parent is gone (killed with -9, crashed), its job
  stops the same way and the process exits, instead of training on (or idling) with nobody to wait for it.
- On the first signal the parent records it and passes it on to its descendants (found in /proc): to every
  process that handles it (a job; not below it: a job's own children are its business, e.g. the ranks of
  torch's launcher) and to every process that blocks it (it stays pending there until a job starts, which
  then does not), also to processes started after the signal. Processes that ignore the signal or would
  die of it (loky's resource tracker, a shell) are left alone. With the basic launcher the jobs run in the
  parent itself and read the parent's flag. The parent waits for the jobs as the launcher always does, so
  nothing is left behind; a second Ctrl-C kills every process of the sweep and exits at once (130).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The process id of a sweep's parent, set by sweep_stops() and inherited by every process it starts: a process
# that finds it set (and is not that parent) runs jobs of the sweep.
SWEEP_PARENT = "KLTD_SWEEP_PARENT"
LISTEN_S = 0.2  # how often the parent's signal thread looks for processes started after a stop was asked
WATCH_S = 1.0  # how often a process of a sweep looks whether the sweep's parent is still there


class Interrupted(Exception):
    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step}; checkpoint saved in {checkpoint}; rerun the "
                         "same command (or kltd train resume=RUN_DIR) to continue")

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (kltd.train.data_parallel)
        return Interrupted, (self.signum, self.step, self.checkpoint)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalFlag:
    signum: int | None = None


class _SweepFlag(SignalFlag):
    """The stop asked of this process of a sweep (the parent's own flag with the basic launcher)."""

    @property
    def signum(self) -> int | None:
        return stop_asked()


_LOCK = threading.RLock()  # re-entrant: a handler may run in the main thread while it holds the lock
_asked: int | None = None  # the first signal this process of a sweep received


def _record(signum: int) -> bool:
    """Record a stop asked of this process of a sweep; True if it is the first."""
    global _asked
    with _LOCK:
        if _asked is None:
            _asked = int(signum)
            return True
        return False


def stop_asked() -> int | None:
    """The signal that asked this process of a sweep to stop, if one did."""
    return _asked


def sweep_role() -> str | None:
    """'parent' in a sweep's parent process (while sweep_stops() runs), 'job' in a process it started, None
    outside a sweep."""
    parent = os.environ.get(SWEEP_PARENT)
    if not parent:
        return None
    return "parent" if parent == str(os.getpid()) else "job"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _take_signals_here() -> None:
    """In a process that runs jobs of a sweep: record SIGTERM / SIGINT from now on (never die of them, never
    raise), including one that waits blocked since the process started."""
    if not _in_main_thread():
        return
    for pending in signal.sigpending() & set(SIGNALS):
        _record(pending)
    for s in SIGNALS:
        signal.signal(s, lambda signum, _frame: _record(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")  # a zombie has ended
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the system
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


_in_job = threading.Event()
_watching: list[threading.Thread] = []


def _watch_parent(parent: int) -> None:
    while _running(parent):
        time.sleep(WATCH_S)
    _record(signal.SIGTERM)  # a running job stops after its step, with a checkpoint; none starts
    while _in_job.is_set():
        time.sleep(WATCH_S)
    os._exit(128 + signal.SIGTERM)


@contextmanager
def sweep_job() -> Iterator[int | None]:
    """Around a job of a sweep: yields the signal that stopped the sweep before the job began (then it must not
    start), or None. In a process the parent started, this process takes the signals from now on and watches
    the parent (see the module's docstring)."""
    role = sweep_role()
    if role == "job":
        _take_signals_here()
        if not _watching:
            _watching.append(threading.Thread(target=_watch_parent, args=(int(os.environ[SWEEP_PARENT]),),
                                              name="kltd-sweep-parent", daemon=True))
            _watching[0].start()
    _in_job.set()
    try:
        yield stop_asked() if role else None
    finally:
        _in_job.clear()


@contextmanager
def stop_requests() -> Iterator[SignalFlag]:
    """A flag that SIGTERM / SIGINT set while the block runs (main thread only); the old handlers come back.
    In a sweep the flag is the process's (see the module's docstring) and stays set."""
    flag = SignalFlag()
    if not _in_main_thread():
        yield flag
        return
    role = sweep_role()
    if role is not None:
        if role == "job":  # e.g. a data-parallel rank, which starts no job of its own
            _take_signals_here()
        yield _SweepFlag()
        return

    def handler(signum, _frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- the parent of a sweep --------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int | None = None) -> list[int]:
    """The processes below `pid` (this process by default), parents before their children."""
    children, found = _children(), []
    stack = list(children.get(pid or os.getpid(), []))
    while stack:
        child = stack.pop(0)
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _signal_state(pid: int, signum: int) -> tuple[bool, bool]:
    """(blocked, handled) for `signum` in process `pid` (its main thread's mask)."""
    masks = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("SigBlk:", "SigCgt:")):
                    masks[line[:6]] = int(line.split()[1], 16)
    except (OSError, ValueError):
        return False, False
    bit = 1 << (signum - 1)
    return bool(masks.get("SigBlk", 0) & bit), bool(masks.get("SigCgt", 0) & bit)


def _pass_on(signum: int, done: set[int]) -> None:
    """Send `signum` to the processes below this one that take it (see the module's docstring), once each."""
    children = _children()
    stack = list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        blocked, handled = _signal_state(pid, signum)
        if (blocked or handled) and pid not in done:
            done.add(pid)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue
        if blocked or not handled:  # a job handles it for its own children
            stack.extend(children.get(pid, []))


def _stop_at_once() -> None:
    """A second Ctrl-C: every process of the sweep is killed and the command ends (130)."""
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print("kltd: stopped at once by a second Ctrl-C; the jobs keep their last checkpoints (rerun the same "
          "command to resume them)", file=sys.stderr, flush=True)
    os._exit(128 + signal.SIGINT)


def _parent_received(signum: int) -> None:
    if not _record(signum) and signum == signal.SIGINT:
        _stop_at_once()


@contextmanager
def sweep_stops() -> Iterator[None]:
    """Hold SIGTERM and SIGINT for a sweep whose jobs run on this machine while the block runs (see the module's
    docstring); afterwards stop_asked() says whether one came. Main thread of a POSIX system only (elsewhere
    nothing changes)."""
    global _asked
    if not _in_main_thread() or not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "sigtimedwait"):
        yield
        return
    # multiprocessing's resource tracker, started by the first process pool, unblocks both signals in the thread
    # that starts it (Python 3.11-3.13): started now, before they are blocked, it is not started again later
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    _asked = None
    os.environ[SWEEP_PARENT] = str(os.getpid())
    # taken here too if one reaches a thread that was started before the block (the handler runs in this thread)
    previous = {s: signal.signal(s, lambda signum, _frame: _parent_received(signum)) for s in SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    finished = threading.Event()

    def listen() -> None:  # started after the block, so it has them blocked too, as sigtimedwait needs
        passed_on: set[int] = set()
        while not finished.is_set():
            info = signal.sigtimedwait(SIGNALS, LISTEN_S)
            if info is not None:
                _parent_received(info.si_signo)
            if stop_asked() is not None:  # again each time: processes started since get it too
                _pass_on(stop_asked(), passed_on)

    listener = threading.Thread(target=listen, name="kltd-sweep-signals", daemon=True)
    listener.start()
    try:
        yield
    finally:
        finished.set()
        listener.join()
        while (info := signal.sigtimedwait(SIGNALS, 0)) is not None:  # one that came meanwhile
            _parent_received(info.si_signo)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in previous.items():
            signal.signal(s, h)
        os.environ.pop(SWEEP_PARENT, None)
