"""A CPU-time sampling profiler for this process, from inside it: no ptrace needed.

Lent GPU hosts refuse ptrace, so py-spy cannot attach to the bench's workers there. This samples
instead with the kernel's profiling timer (``ITIMER_PROF``): every ``interval_s`` of CPU time this
process spends, ``SIGPROF`` interrupts it and the handler, which Python runs in the main thread,
counts the interrupted stack, outermost first, in py-spy's collapsed ("raw") format, so
``bench/profile_summary.py`` reads both. Samples follow CPU time, not wall time: a process waiting
for I/O is not sampled, and time spent in C (the tokenizer, a socket send) is charged to the
Python frame that called it. CPU of other threads (the tokenizer's executor) is charged to wherever
the main thread is at the time, often the event loop's ``select``, counted as ``(idle: ...)`` (asyncio's
selector loop; under uvloop that wait is in C and shows as the frame that started the loop).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType

IDLE = "(idle: main thread in select, other threads' CPU)"


def _stack(frame: FrameType | None) -> str:
    # Runs in the sampled process, its CPU counted with the worker's: plain string work, no Path per frame.
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_qualname} ({os.path.basename(code.co_filename)}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


class StackSampler:
    """Counts the main thread's stacks every ``interval_s`` of process CPU time while ``active()`` is true.

    Enter it from the main thread (signal handlers can only be set there); one at a time per process.
    """

    def __init__(self, interval_s: float = 0.002, active: Callable[[], bool] | None = None) -> None:
        self.interval_s = interval_s
        self._active = active  # None: always
        self.stacks: Counter[str] = Counter()
        self._previous: object = None

    def __enter__(self) -> StackSampler:
        self._previous = signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        # None: the previous handler was not set from Python. Ignored, not SIG_DFL: SIGPROF's default action
        # ends the process, should a signal already on its way arrive after this.
        previous = self._previous if self._previous is not None else signal.SIG_IGN
        signal.signal(signal.SIGPROF, previous)  # type: ignore[arg-type]

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        if frame is None or (self._active is not None and not self._active()):
            return
        if frame.f_code.co_name in ("select", "poll") and "selectors" in frame.f_code.co_filename:
            self.stacks[IDLE] += 1
        else:
            self.stacks[_stack(frame)] += 1

    def write(self, path: Path, prefix: str = "") -> None:
        """The counted stacks in py-spy's raw format, each under ``prefix`` (e.g. ``process 12:"role=worker"``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        head = f"{prefix};" if prefix else ""
        with path.open("a") as out:
            for stack, count in self.stacks.most_common():
                out.write(f"{head}{stack} {count}\n")
