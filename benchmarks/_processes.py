"""The benchmark's own processes: children it talks to over stdin/stdout, freezing a process
group, memory peaks of a process tree, and how much of the machine other processes took during
each step (for ``benchmarks/extract.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psutil
from _common import peak_rss

T = TypeVar("T")

#: Above this share of the CPUs taken by other processes during a step, a warning is printed.
NOISY_SHARE = 0.05

class TreeSampler(threading.Thread):
    """Polls this process's descendants: the last ``VmHWM`` seen of each (it only grows) and
    the peak of the tree's summed RSS."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stop_event = threading.Event()
        self.peaks: dict[int, int] = {}
        self.tree = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop_event.is_set():
            try:
                total = me.memory_info().rss
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        continue
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0),
                                                peak_rss(child.pid))
                self.tree = max(self.tree, total)
            except psutil.Error:
                pass
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()

def reap_forkserver() -> None:
    """Stop and wait for the forkserver that forked the LocalCluster's workers (it reaps them),
    so their CPU time counts as this benchmark's in the steps' share of others, not as another
    process's."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # private: no public API
    if stop is not None:
        stop()

def child_failed(label: str, returncode: int | None, stdout: str, stderr: str) -> SystemExit:
    """The error that ends the benchmark when one of its processes failed."""
    return SystemExit(f"{label}: the benchmark process failed ({returncode}):\n"
                      f"{stdout[-3000:]}\n{stderr[-3000:]}")

class Conversation:
    """A child process that takes commands on stdin and answers with marked
    lines on stdout; its stderr is kept in a file, shown if it fails."""

    def __init__(self, label: str, command: list[str], new_session: bool = False) -> None:
        self.label = label
        self.errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self.errors, text=True,
                                      start_new_session=new_session)

    def send(self, line: str) -> None:
        """Write one command line."""
        assert self.child.stdin is not None
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()

    def read_until(self, mark: str) -> str:
        """The rest of the first output line that starts with ``mark``."""
        assert self.child.stdout is not None
        seen = []
        for line in self.child.stdout:
            if line.startswith(mark):
                return line[len(mark):]
            seen.append(line)
        self.child.wait()
        self.errors.seek(0)
        raise child_failed(self.label, self.child.returncode, "".join(seen), self.errors.read())

    def close(self) -> None:
        """End the process (EOF on its stdin)."""
        if self.child.stdin is not None:
            self.child.stdin.close()
        try:
            self.child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
        self.errors.close()

def group_processes(pgid: int) -> list[psutil.Process]:
    """The live processes of process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members

@contextmanager
def frozen(pgid: int) -> Iterator[None]:
    """Every process of group ``pgid`` stopped (``SIGSTOP``, waiting until all are) inside the
    block, resumed (``SIGCONT``) after it."""
    os.killpg(pgid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while any(process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
                  for process in group_processes(pgid)):
            if time.monotonic() > deadline:
                raise SystemExit(f"the processes of group {pgid} did not stop")
            time.sleep(0.005)
        yield
    finally:
        os.killpg(pgid, signal.SIGCONT)

def loadavg() -> str:
    """The 1-minute load average (other work on the machine shows here)."""
    return f"{os.getloadavg()[0]:.2f}"

def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (any process), from /proc/stat."""
    with open("/proc/stat") as stat:
        user, nice, system, _, _, irq, softirq, steal = (
            int(v) for v in stat.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

def _stat_cpu_seconds(path: str) -> float:
    """User plus system CPU seconds from a /proc ``stat`` file (a process's or a thread's)."""
    with open(path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def thread_cpu_seconds() -> tuple[float, dict[int, float]]:
    """This process's CPU seconds (its ended threads included) and each live thread's, from
    /proc; run on Dask workers (``client.run``) to see where their CPU time went."""
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            threads[int(tid)] = _stat_cpu_seconds(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile: its time is in the process's
            continue
    return _stat_cpu_seconds("/proc/self/stat"), threads

def own_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants: the live ones' own and the reaped
    ones' (counted in their parents' ``children_*``)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total

def measured(function: Callable[[], T]) -> tuple[T, float, float]:
    """(result, wall seconds, share of all cores that other processes (or the hypervisor's
    steal) took meanwhile) of ``function()``: the machine's busy CPU time minus this
    benchmark's."""
    wall, busy, own = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()
    result = function()
    wall = time.perf_counter() - wall
    others = (cpu_busy_seconds() - busy) - (own_cpu_seconds() - own)
    return result, wall, max(0.0, others) / (wall * (os.cpu_count() or 1))

class Steps:
    """Each step's wall time and the share of the machine other processes took meanwhile."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, float]] = []

    def run(self, label: str, function: Callable[[], T]) -> T:
        print(f"{label}… (load {loadavg()})", flush=True)
        result, wall, share = measured(function)
        self.records.append((label, wall, share))
        return result

    @property
    def noisy(self) -> list[str]:
        """The steps during which others took more than ``NOISY_SHARE`` of the CPUs."""
        return [f"{label} ({share:.0%})" for label, _, share in self.records
                if share > NOISY_SHARE]
