"""Worker processes that die with their parent: a `clean --workers N` whose parent is killed (kill -9, an
OOM kill, a closed terminal) must not leave its workers running on, writing files and holding memory.

Each worker asks the kernel for SIGKILL when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`); elsewhere a
daemon thread polls the parent's pid. Once the workers are gone, multiprocessing's resource tracker reads
EOF on its pipe and exits too (tests/test_fuzz_clean_app.py checks that no process of the job survives)."""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 0.5


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Make this process end when process `parent` does (call first thing in a worker)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def _init(parent: int, initializer: Callable[..., None], initargs: tuple) -> None:
    die_with_parent(parent)
    initializer(*initargs)


def orphan_safe_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> cf.ProcessPoolExecutor:
    """A spawn-context ProcessPoolExecutor whose workers end when this process ends, however it ends.

    Create, use and shut it down in one thread: on Linux the kernel's "parent" of a worker is the thread
    that started it, so workers also end when that thread exits (a pool kept across threads breaks)."""
    args: tuple[Any, ...] = (os.getpid(), initializer, initargs)
    return cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init, initargs=args)
