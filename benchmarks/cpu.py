"""CPU accounting: how many CPU-seconds it costs to move a gigabyte.

Two views are recorded because neither is complete on its own:

* machine: the /proc/stat aggregate (user+nice+system+irq+softirq) before and after a
  test. It sees every kernel path the packets took, wherever they ran, but also any
  unrelated load on the machine.
* attributed: iperf3 itself (rusage of the children we reaped), the contender's processes
  (tincd, wireguard-go, vpp...) and the ksoftirqd threads, from /proc/<pid>/stat. It
  ignores unrelated load but misses softirq work that happened to interrupt an unrelated
  process.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.models import BYTES_PER_GB, CpuSample

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat, in jiffies."""

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def busy(self) -> int:
        """Jiffies doing work; idle, iowait and steal (the hypervisor's) are excluded."""
        return self.user + self.nice + self.system + self.irq + self.softirq

    @property
    def total(self) -> int:
        """All jiffies of all CPUs."""
        return self.busy + self.idle + self.iowait + self.steal


def parse_proc_stat(text: str) -> CpuTimes:
    """Parse the aggregate ``cpu`` line; older kernels' missing columns count as 0."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            nums = [int(x) for x in fields[1:9]]
            nums += [0] * (8 - len(nums))
            return CpuTimes(*nums)
    raise ValueError("no aggregate 'cpu' line in /proc/stat text")


def read_proc_stat(path: str = "/proc/stat") -> CpuTimes:
    """Current aggregate CPU times of the machine."""
    return parse_proc_stat(Path(path).read_text())


def busy_seconds(before: CpuTimes, after: CpuTimes, hz: int = CLK_TCK) -> float:
    """CPU-seconds of work done between two snapshots, summed over all CPUs."""
    delta = after.busy - before.busy
    if delta < 0:
        raise ValueError("/proc/stat went backwards; snapshots swapped?")
    return delta / hz


def busy_fraction(before: CpuTimes, after: CpuTimes) -> float:
    """Share of the machine's capacity that was busy between two snapshots."""
    total = after.total - before.total
    return (after.busy - before.busy) / total if total > 0 else 0.0


def parse_pid_stat(text: str, hz: int = CLK_TCK) -> tuple[str, float]:
    """``(comm, utime+stime+cutime+cstime in seconds)`` from a /proc/<pid>/stat line.

    The command name may itself contain spaces and parentheses, so split at the last ')'.
    """
    head, _, tail = text.rpartition(")")
    comm = head.partition("(")[2]
    fields = tail.split()
    # fields[0] is the state (field 3); utime..cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return comm, (utime + stime + cutime + cstime) / hz


def pid_cpu_seconds(pid: int) -> tuple[str, float] | None:
    """``(comm, CPU-seconds)`` of a live process, its reaped children included."""
    try:
        return parse_pid_stat(Path(f"/proc/{pid}/stat").read_text())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def pids_by_comm(match: Callable[[str], bool]) -> list[int]:
    """Pids whose command name satisfies ``match``."""
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if match(comm):
            out.append(int(entry.name))
    return sorted(out)


def pids_named(names: Iterable[str]) -> list[int]:
    """Pids of processes called exactly one of ``names`` (comm is cut at 15 chars)."""
    wanted = {n[:15] for n in names}
    return pids_by_comm(lambda comm: comm in wanted)


def ksoftirqd_pids() -> list[int]:
    """The per-CPU softirq threads, where packet processing lands under load."""
    return pids_by_comm(lambda comm: comm.startswith("ksoftirqd/"))


def children_cpu_seconds() -> float:
    """User+system time of all children this process has reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def per_gb(cpu_s: float, nbytes: int) -> float | None:
    """CPU-seconds per 10^9 bytes moved; ``None`` when nothing moved."""
    if nbytes <= 0:
        return None
    return cpu_s / (nbytes / BYTES_PER_GB)


class CpuMeter:
    """Measure CPU over a window: ``start()``, run the test, reap its processes, ``stop()``.

    ``contender_pids`` is called at start so that processes a contender restarts are
    picked up per test.
    """

    def __init__(self, contender_pids: Callable[[], Sequence[int]] = lambda: ()) -> None:
        self._contender_pids = contender_pids
        self._t0 = 0.0
        self._stat0: CpuTimes | None = None
        self._children0 = 0.0
        self._procs0: dict[int, tuple[str, float]] = {}
        self._soft0: dict[int, float] = {}

    def start(self) -> None:
        """Take the 'before' snapshots."""
        self._procs0 = {}
        for pid in self._contender_pids():
            got = pid_cpu_seconds(pid)
            if got is not None:
                self._procs0[pid] = got
        self._soft0 = {}
        for pid in ksoftirqd_pids():
            got = pid_cpu_seconds(pid)
            if got is not None:
                self._soft0[pid] = got[1]
        self._children0 = children_cpu_seconds()
        self._stat0 = read_proc_stat()
        self._t0 = time.monotonic()

    def stop(self) -> CpuSample:
        """Take the 'after' snapshots and return the differences."""
        if self._stat0 is None:
            raise RuntimeError("CpuMeter.stop() without start()")
        wall = time.monotonic() - self._t0
        stat1 = read_proc_stat()
        iperf_s = children_cpu_seconds() - self._children0
        contender: dict[str, float] = {}
        for pid, (comm, before) in self._procs0.items():
            got = pid_cpu_seconds(pid)
            if got is not None:
                contender[f"{comm}[{pid}]"] = max(0.0, got[1] - before)
        soft = 0.0
        for pid, before in self._soft0.items():
            got = pid_cpu_seconds(pid)
            if got is not None:
                soft += max(0.0, got[1] - before)
        machine = busy_seconds(self._stat0, stat1)
        cpus = os.cpu_count() or 1
        return CpuSample(
            wall_s=wall,
            machine_busy_s=machine,
            machine_capacity_s=wall * cpus,
            iperf_s=iperf_s,
            contender_s=contender,
            ksoftirqd_s=soft,
            attributed_s=iperf_s + sum(contender.values()) + soft,
        )


def measure_background(seconds: float = 0.5) -> float:
    """Busy fraction of the machine while we do nothing: how noisy the numbers will be."""
    before = read_proc_stat()
    time.sleep(seconds)
    return busy_fraction(before, read_proc_stat())
