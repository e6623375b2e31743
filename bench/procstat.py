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


def cpu_seconds(pids: list[int], *, main_thread: bool = False) -> float:
    """User + system CPU seconds of these processes (exited ones count as 0); with
    ``main_thread``, of their main threads only (the thread whose id is the process id: in a
    Granian worker, the one running the Python event loop; the others are Granian's own)."""
    total = 0
    for pid in pids:
        fields = _stat(pid, pid if main_thread else None)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


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
    ``since_split()`` (all threads, and the workers' main threads)."""

    root: int

    def __post_init__(self) -> None:
        self.pids = descendants(self.root)
        self.workers = self.leaves()
        self._mark = 0.0
        self._mark_main = 0.0

    def mark(self) -> None:
        self._mark = cpu_seconds(self.pids)
        self._mark_main = cpu_seconds(self.workers, main_thread=True)

    def since(self) -> float:
        return cpu_seconds(self.pids) - self._mark

    def since_split(self) -> tuple[float, float]:
        """(all threads, the event loops' threads) since ``mark()``: the second is the main
        threads of the workers (the tree's leaves), not of a supervisor above them. Each is counted in
        10 ms ticks, read a moment apart: the main threads' share is kept within the whole."""
        total = self.since()
        main = cpu_seconds(self.workers, main_thread=True) - self._mark_main
        return total, min(max(main, 0.0), total)

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
