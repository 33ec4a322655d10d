"""A spawned rank process that dies with the process that spawned it (Linux).

The ranks of `launch.launch` and of `epinfer serve` notice a launcher that went away through the
rendezvous store, but only while they run Python: a rank that is stopped (SIGSTOP) or stuck
in a C call when the launcher is SIGKILLed would outlive it forever. On Linux each rank asks the
kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), which also ends a stopped process.

The request must come early: a spawned child first unpickles its target and arguments, which
imports torch and the model code (seconds), and a rank stopped or stuck there would never make it.
So `RankProcess` makes the child call `die_with_parent` as the first step of unpickling the process
object, before its target and arguments. A launcher that died before the request was made is seen
through the parent pid (the child has been handed to another process) and the rank exits at once.

Elsewhere nothing is asked: the lost store still ends every rank that runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from multiprocessing.context import SpawnProcess

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exits now if `parent_pid` is already gone."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        return  # (refused, e.g. by a seccomp filter: the lost store still ends a running rank)
    if os.getppid() != parent_pid:
        os._exit(1)  # the launcher died before the request: nobody is left to report to


def _in_child(parent_pid: int | None) -> RankProcess:
    if parent_pid is not None:
        die_with_parent(parent_pid)
    return RankProcess.__new__(RankProcess)  # (its state, target and arguments are unpickled next)


class RankProcess(SpawnProcess):
    """A `spawn` process whose child dies with this process (see the module docstring). Start it
    from the main thread: the kernel sends the signal when the *thread* that started the child
    ends, so a rank started from another thread (an application calling `LLM` from a worker thread)
    asks for nothing rather than die with that thread."""

    def __reduce__(self):  # (called in this process while `start()` hands the object to the child)
        main = threading.current_thread() is threading.main_thread()
        return _in_child, (os.getpid() if main else None,), self.__dict__
