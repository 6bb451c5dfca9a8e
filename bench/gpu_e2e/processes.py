"""The parent's side of the child processes: a handle per child, and what is sampled about processes.

``Child`` starts one role of ``children`` with multiprocessing's ``spawn`` and turns its pipe into
awaitable events; ``proc_cpu_seconds`` reads any process's CPU time (the broker's, Redis's, the engine
server's); ``GpuSampler`` records the GPU's utilisation during a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_e2e.children import child_main
from bench.gpu_e2e.common import BenchError


class Child:
    """The parent's end of one child process: commands out, events in, death noticed."""

    def __init__(self, context: Any, role: str, index: int, options: dict[str, Any], name: str) -> None:
        self.name, self.role = name, role
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=child_main, args=(role, index, child_conn, options), name=name,
                                       daemon=True)
        self.process.start()
        child_conn.close()
        self.status: dict[str, Any] | None = None
        self.failure: str | None = None
        self.info: dict[str, Any] = {}
        self.exiting = False
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message["event"] == "status":
                    self.status = message
                    continue
                if message["event"] == "error":
                    self.failure = message["traceback"]
                self._events.put_nowait(message)
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            if not self.exiting and self.failure is None:
                self.process.join(1)
                self.failure = f"exited unexpectedly (exit code {self.process.exitcode})"
            self._events.put_nowait({"event": "exit"})

    def send(self, command: dict[str, Any]) -> None:
        self.check()
        self.conn.send(command)

    def check(self) -> None:
        if self.failure is None and not self.process.is_alive() and not self.exiting:
            self.failure = f"exited unexpectedly (exit code {self.process.exitcode})"
        if self.failure is not None:
            raise BenchError(f"{self.name} failed:\n{self.failure}")

    async def expect(self, event: str, limit_s: float) -> dict[str, Any]:
        try:
            message = await asyncio.wait_for(self._events.get(), limit_s)
        except TimeoutError:
            self.check()
            raise BenchError(f"{self.name}: no {event!r} within {limit_s:g} s") from None
        if message["event"] != event:
            self.check()
            raise BenchError(f"{self.name}: expected {event!r}, got {message['event']!r}")
        return message

    async def ask(self, command: dict[str, Any], limit_s: float) -> dict[str, Any]:
        self.send(command)
        return await self.expect("result", limit_s)

    def kill(self) -> None:
        """At once, no goodbye: on a failure elsewhere, before the broker it talks to goes away."""
        self.exiting = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.conn.fileno())
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)

    def stop(self, grace: float = 3.0) -> None:
        self.exiting = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.conn.fileno())
        with contextlib.suppress(Exception):
            self.conn.send({"cmd": "exit"})
        self.process.join(grace)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(grace)


def proc_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc; 0 where unreadable."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class GpuSampler:
    """GPU utilisation from ``nvidia-smi -lms`` while a run goes; nothing where there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        binary = shutil.which("nvidia-smi")
        if binary is None:
            return
        self._proc = subprocess.Popen([binary, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                       "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.split(",")[0]))

    def stop(self) -> float | None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)
            if self._proc.poll() is None:
                self._proc.kill()
            if self._thread is not None:
                self._thread.join(2)
        return round(float(np.mean(self.samples)), 1) if self.samples else None
