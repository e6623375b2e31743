"""CPU time and memory of process trees, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int, tid: int | None = None) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (of thread ``tid`` when given)."""
    try:
        raw = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces: split after its closing parenthesis.
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


#: A reading of some processes' CPU, by process: its user and system time in seconds (10 ms
#: ticks), the system time alone (the kernel's part), and each of its live threads' time on a CPU
#: in nanoseconds (None without ``schedstat``).
Reading = dict[int, tuple[float, float, dict[int, int] | None]]


def _runtime_ns(pid: int, tid: int) -> int | None:
    """Thread ``tid``'s time on a CPU so far, in nanoseconds (the first field of its
    ``schedstat``: the scheduler's own sum, which ``stat`` rounds to ticks); None without it."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _threads_ns(pid: int, main_thread: bool) -> dict[int, int] | None:
    """The live threads' nanoseconds of process ``pid`` (its main thread's only, with
    ``main_thread``); None where the kernel keeps no ``schedstat``."""
    try:
        tids = [pid] if main_thread else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None
    threads = {}
    for tid in tids:
        ns = _runtime_ns(pid, tid)
        if ns is not None:
            threads[tid] = ns
        elif os.path.exists(f"/proc/{pid}/task/{tid}"):
            return None  # a live thread without schedstat: this kernel keeps none
    return threads


def read_cpu(pids: list[int], *, main_thread: bool = False) -> Reading:
    """The CPU of these processes now (of their main threads only, with ``main_thread``);
    processes that have exited are left out."""
    out: Reading = {}
    for pid in pids:
        fields = _stat(pid, pid if main_thread else None)
        if fields is not None:
            user, system = int(fields[11]), int(fields[12])
            out[pid] = ((user + system) / TICK, system / TICK, _threads_ns(pid, main_thread))
    return out


def cpu_between(before: Reading, after: Reading) -> float:
    """Seconds on a CPU from ``before`` to ``after``, process by process: the sum of its
    threads' nanoseconds (a thread new since ``before`` counts whole), or its ticks where there
    are no nanoseconds or where the ticks tell of more than their rounding can hide (a thread
    that ended in between took its nanoseconds with it; the process's ticks keep them)."""
    total = 0.0
    for pid, (ticks, _, threads) in after.items():
        ticks_before, _, threads_before = before.get(pid, (0.0, 0.0, {}))
        coarse = ticks - ticks_before
        if threads is None or threads_before is None:
            total += coarse
            continue
        precise = sum(ns - threads_before.get(tid, 0) for tid, ns in threads.items()) / 1e9
        total += coarse if coarse - precise > 2 / TICK else precise
    return total


def kernel_between(before: Reading, after: Reading) -> float:
    """Seconds of system time from ``before`` to ``after`` (``stat``'s, in 10 ms ticks, the threads
    that ended in between included): the kernel's part of the CPU, its system calls and the
    scheduling it does for these processes."""
    return sum(system - before.get(pid, (0.0, 0.0, None))[1] for pid, (_, system, _) in after.items())


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[21]) * PAGE  # rss in pages
    return total


@dataclass
class Tree:
    """A process tree whose CPU we meter between ``mark()`` and ``since()`` (all threads) or
    ``since_split()`` (all threads, and the workers' main threads); ``since_kernel()`` is the part
    of it spent in the kernel.

    Each thread's ``schedstat`` gives its time on a CPU in nanoseconds; ``stat``'s user and system
    times count 10 ms ticks, some 31 us a request in a 3 s round of 64 paced streams, which is
    more than many a change to the hot path. Ticks are read too, and used when nanoseconds are
    not to be had (no ``schedstat``, or a thread exited between the readings, taking its time)."""

    root: int

    def __post_init__(self) -> None:
        self.pids = descendants(self.root)
        self.workers = self.leaves()
        self._mark: Reading = {}
        self._mark_main: Reading = {}

    def mark(self) -> None:
        self._mark = read_cpu(self.pids)
        self._mark_main = read_cpu(self.workers, main_thread=True)

    def since(self) -> float:
        return cpu_between(self._mark, read_cpu(self.pids))

    def since_split(self) -> tuple[float, float]:
        """(all threads, the event loops' threads) since ``mark()``: the second is the main
        threads of the workers (the tree's leaves), not of a supervisor above them. Read a moment
        apart, the main threads' share is kept within the whole."""
        total = self.since()
        main = cpu_between(self._mark_main, read_cpu(self.workers, main_thread=True))
        return total, min(max(main, 0.0), total)

    def since_kernel(self) -> float:
        """Seconds of system time since ``mark()`` (in ticks: some tens of microseconds a request
        in a short round, so a median over rounds, not one round, says what it is)."""
        return max(0.0, kernel_between(self._mark, read_cpu(self.pids)))

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def leaves(self) -> list[int]:
        """The processes with no child of their own: for the gateway, its Granian workers."""
        parents = set()
        for pid in self.pids:
            fields = _stat(pid)
            if fields is not None:
                parents.add(int(fields[1]))
        return [pid for pid in self.pids if pid not in parents]


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
