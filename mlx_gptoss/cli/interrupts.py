"""Ctrl-C that is never lost, whatever MLX is doing when it arrives.

MLX's CPU backend builds its fused kernels by running the system C++ compiler through
`system()` (a compiler check once per process, then one compile per new kernel, ~1 s each on a
loaded machine). POSIX `system()` sets SIGINT to "ignore" in the caller while the compiler
runs, and the kernel discards a signal that arrives for a process ignoring it: a Ctrl-C pressed
then (typically during the first prefill or decode step) vanished and generation went on.

A signal that the process *blocks* is never discarded, even while it is ignored; it stays
pending. So the command line blocks SIGINT in every thread (set before MLX, NumPy or BLAS start
theirs, so they inherit it) and one watcher thread takes it with `sigwait` and raises
KeyboardInterrupt in the main thread (`_thread.interrupt_main`), the same exception Python
would raise, then pokes the main thread with a harmless signal so that a blocking wait there
(`select`, a pipe read) returns to Python and raises it at once. While the main thread waits for the user's input, SIGINT is unblocked there, so
readline and `input()` see Ctrl-C exactly as usual (no compiler runs then).

Only the program's own entry point installs this (`mlx-gptoss` as a process); the library never
touches signal handling, so notebooks and servers keep theirs.
"""
from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from typing import Iterator

_installed = False
# Wakes the main thread out of a blocking system call; ignored by default, unused by MLX.
_POKE = getattr(signal, "SIGURG", None)


def install() -> None:
    """Route SIGINT through a watcher thread; call before anything else starts threads."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: nothing to fix
        return
    if _POKE is not None:
        signal.signal(_POKE, lambda signum, frame: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    main = threading.main_thread().ident
    threading.Thread(target=_watch, args=(main,), name="mlx-gptoss-sigint", daemon=True).start()
    _installed = True


def _watch(main: int) -> None:
    while True:
        signal.sigwait({signal.SIGINT})
        _thread.interrupt_main()
        if _POKE is not None:
            signal.pthread_kill(main, _POKE)


@contextlib.contextmanager
def deliverable() -> Iterator[None]:
    """Let SIGINT reach the main thread directly (around a blocking read of the user's input)."""
    if not _installed:
        yield
        return
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
