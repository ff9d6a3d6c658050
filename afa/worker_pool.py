"""Process pools for CPU work beside training: workers that leave stop signals to the trainer and
end with it.

:func:`make_pool` gives a ``ProcessPoolExecutor`` (spawn start method: safe in a process that
uses CUDA or threads) whose workers

- ignore the stop signals (:data:`afa.constants.STOP_SIGNALS`): Ctrl-C or SLURM's SIGTERM reach
  the whole process group, and the trainer, which finishes its step and saves, still needs its
  workers for that step;
- die with the process that started them. Ignoring SIGTERM means nobody else can stop them, and
  a worker waiting for work never sees its parent go (each worker holds both ends of the pool's
  call queue, so the queue never reports end-of-file). Without this, a trainer killed with
  SIGKILL (the out-of-memory killer, ``kill -9``, a scheduler's hard limit) leaves its workers
  running for ever, reparented to PID 1, each holding its own copy of the imported libraries.
  On Linux the kernel sends the worker SIGKILL when its parent ends (``prctl(PR_SET_PDEATHSIG)``);
  where that call is missing, a daemon thread in the worker polls its parent's pid
  (:data:`PARENT_POLL_SECONDS`) and ends the worker when it changes.

:func:`children_ignore_stop_signals` covers the seconds a spawned worker takes to reach its
initializer, and :func:`kill_pool` ends a pool whose workers would not stop on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

from afa.constants import STOP_SIGNALS

__all__ = ["PARENT_POLL_SECONDS", "children_ignore_stop_signals", "die_with_parent",
           "kill_pool", "make_pool", "worker_init"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0  # the fallback's delay between two looks at the parent's pid
_ORPHAN_EXIT_STATUS = 1


def _set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel for ``signum`` when the parent ends (Linux); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded: libc's among them
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc to load, or a libc without prctl
        return False


def _watch_parent(parent_pid: int, interval: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(_ORPHAN_EXIT_STATUS)  # no clean-up: the work it would finish has no one to go to


def die_with_parent(parent_pid: int, *, use_prctl: bool = True) -> str:
    """Make this process end when ``parent_pid``, its parent, does; returns the means used.

    ``"prctl"``: the kernel sends SIGKILL when the parent ends. That covers only a parent alive
    at the call, so a parent that has already gone (this process has been reparented: its
    parent's pid is no longer ``parent_pid``) ends this process at once. ``"watcher"``: a daemon
    thread compares the parent's pid with ``parent_pid`` every :data:`PARENT_POLL_SECONDS` and
    ends the process when they differ (``use_prctl=False`` asks for it; tests use that).

    The kernel's signal follows the *thread* that started this process: a pool must be started
    (its first ``submit``) from a thread that lives as long as the pool, as the trainer's main
    loop does.
    """
    if use_prctl and _set_parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent_pid:
            os._exit(_ORPHAN_EXIT_STATUS)
        return "prctl"
    if os.getppid() != parent_pid:
        os._exit(_ORPHAN_EXIT_STATUS)
    threading.Thread(target=_watch_parent, args=(parent_pid, PARENT_POLL_SECONDS),
                     name="watch-parent", daemon=True).start()
    return "watcher"


def worker_init(parent_pid: int, use_prctl: bool = True) -> None:
    """Pool initializer: stop signals are the parent's to handle; end with the parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid, use_prctl=use_prctl)


@contextlib.contextmanager
def children_ignore_stop_signals():
    """Processes started inside ignore the stop signals from birth.

    A signal to the whole process group (Ctrl-C, SLURM's SIGTERM) during the seconds a spawned
    worker takes to start would kill it before its initializer runs, break the pool and lose the
    step. An ignored disposition survives exec; a handler does not. The signals are blocked
    meanwhile, so one that arrives is delivered to this process afterwards, not lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; the initializer still protects
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def make_pool(workers: int, *, use_prctl: bool = True) -> ProcessPoolExecutor:
    """A spawn-context pool of ``workers`` processes set up by :func:`worker_init`; they start
    at the first ``submit`` (wrap it in :func:`children_ignore_stop_signals`)."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                               initializer=worker_init, initargs=(os.getpid(), use_prctl))


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """End ``pool`` without waiting: its workers ignore SIGTERM, which the pool's own clean-up
    of a broken pool sends before waiting for them (for ever), so they are killed."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
