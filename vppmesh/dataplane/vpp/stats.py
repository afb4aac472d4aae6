"""Counters from VPP's stats segment (per-SA packets and bytes, interface counters)."""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Collection
from dataclasses import dataclass
from operator import add
from pathlib import Path
from typing import Any

from vppmesh.errors import VppUnavailableError

log = logging.getLogger("vppmesh")

SA_COUNTERS = "/net/ipsec/sa"
SA_NAME = SA_COUNTERS.encode() + b"\0"
COMBINED = 3  # STAT_DIR_TYPE_COUNTER_VECTOR_COMBINED


@dataclass(frozen=True)
class Counter:
    packets: int
    bytes: int


class StatsReader:
    """Reads the stats segment over its socket (no API round trip, no lock in VPP)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._stats: Any = None
        self._sa_entry: int | None = None  # the SA counters' place in the directory

    def __enter__(self) -> StatsReader:
        from vpp_papi.vpp_stats import VPPStats

        if not self.socket_path.exists():
            raise VppUnavailableError(f"no VPP stats socket at {self.socket_path}; pass "
                                      "--stats-socket (the `statseg` socket-name)")
        self._stats = VPPStats(socketname=str(self.socket_path))
        self._stats.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stats is not None:
            self._stats.disconnect()

    def combined(self, name: str, indexes: list[int]) -> dict[int, Counter]:
        """Sum over threads of a combined counter, for each index asked."""
        data = self._stats[name]
        result = {}
        for index in indexes:
            packets = octets = 0
            for per_thread in data:
                if index < len(per_thread):
                    packets += per_thread[index][0]
                    octets += per_thread[index][1]
            result[index] = Counter(packets, octets)
        return result

    def per_thread(self, name: str, index: int) -> list[Counter]:
        """One combined counter (such as /if/rx) per thread: main first, then workers."""
        return [Counter(per_thread[index][0], per_thread[index][1])
                if index < len(per_thread) else Counter(0, 0)
                for per_thread in self._stats[name]]

    def sa_counters(self, stat_indexes: list[int]) -> dict[int, Counter]:
        """The SAs' counters; none while VPP has no SA (a VPP restarted under a pair that
        fails closed): VPP makes the counter vector with its first SA."""
        if not stat_indexes:
            return {}
        try:
            return self.combined(SA_COUNTERS, stat_indexes)
        except KeyError:
            return {}

    def sa_packets(self, stat_indexes: Collection[int]) -> dict[int, int]:
        """Packets counted by each SA (by stat index, summed over threads), read straight
        from the counter vector: unlike `stats[name]`, no re-read of the directory when
        its epoch moved (it moves whenever VPP adds an interface or grows a counter
        vector, and reading a 1000-peer VPP's directory costs hundreds of ms: a peer
        joining would pay it). Retried while VPP is writing the directory."""
        if not stat_indexes:
            return {}
        for _attempt in range(100):
            try:
                with self._stats.lock:
                    return self._sa_packets(stat_indexes)
            except OSError:  # VPP wrote the directory meanwhile: read again
                continue
            except KeyError:  # moved, or not there yet (VPP makes it with its first SA)
                self._sa_entry = None
        raise VppUnavailableError("VPP's stats segment kept changing under the reader")

    def _sa_packets(self, stat_indexes: Collection[int]) -> dict[int, int]:
        from vpp_papi.vpp_stats import StatsVector

        stats = self._stats
        directory = StatsVector(stats, stats.directory_vector, stats.elementfmt)
        index = self._sa_entry
        if index is None:
            if stats.last_epoch != stats.epoch or SA_COUNTERS not in stats.directory:
                stats.refresh()  # the whole directory: at most once, and when it moved
            if SA_COUNTERS not in stats.directory:
                return {i: 0 for i in stat_indexes}  # no SA yet: no counter vector yet
            index = self._sa_entry = stats.directory[SA_COUNTERS].index
        kind, value, name = directory[index]
        if kind != COMBINED or name[:len(SA_NAME)] != SA_NAME:
            raise KeyError(SA_COUNTERS)  # the entry moved: look it up again
        size = max(stat_indexes, default=-1) + 1
        totals = [0] * size
        for (per_thread,) in StatsVector(stats, value, "P"):
            vector = StatsVector(stats, per_thread, "QQ")
            start = vector.vec_start
            words = array("Q", stats.statseg[start:start + 16 * min(vector.vec_len, size)])
            packets = words[0::2]  # (packets, bytes) pairs
            totals[:len(packets)] = map(add, totals[:len(packets)], packets)  # (C loops)
        return dict(zip(stat_indexes, map(totals.__getitem__, stat_indexes), strict=True))

    def counters(self, names: list[str]) -> dict[str, int]:
        """Sum over threads of each named simple counter that exists (no directory scan:
        listing a big VPP's directory costs far more than reading a few entries)."""
        result = {}
        for name in names:
            try:
                value = self._stats[name]
            except KeyError:
                continue
            result[name] = int(sum(value)) if isinstance(value, list) else int(value)
        return result

    def close(self) -> None:
        self.__exit__()

    def error_counters(self, pattern: str) -> dict[str, int]:
        """Sum over threads of every error counter whose name contains `pattern`."""
        names = self._stats.ls([pattern])
        values = self._stats.dump(names)
        return {name: int(sum(v)) if isinstance(v, list) else int(v)
                for name, v in values.items()}


class SaCounters:
    """The SAs' packet counts for a long-running agent's key generations, from the stats
    segment: reading one counter vector costs a small fraction of dumping every SA over
    the API (at 1000 peers x 4 tunnels the dump is most of an idle run), so a run with
    nothing to change reads these and the SAs it remembers instead.

    The reader is opened once per VPP: the Agent tells of another VPP (a restarted one
    has a new segment) through on_vpp_met and on_vpp_gone, which close it.
    `read` answers None when the segment cannot be read: the caller then dumps the SAs,
    as it did before; that is logged once per outage and `unavailable` says why, so a
    node whose limits come from dumps is never taken for one reading counters.
    """

    def __init__(self, socket_path: Path | None,
                 open_reader: Callable[[Path], Any] | None = None) -> None:
        self.socket_path = socket_path
        self._open = open_reader or (lambda path: StatsReader(path).__enter__())
        self._reader: Any = None
        self.unavailable: str | None = None  # why the last read fell back to the dump
        self.fallbacks = 0  # reads that fell back, since the agent started

    def read(self, stat_indexes: Collection[int]) -> dict[int, int] | None:
        """Packets counted so far by each SA (by stat index); None: unreadable."""
        try:
            reader = self._connected()
            counted = reader.sa_packets(stat_indexes)
        except Exception as exc:  # a torn or remapped segment: connect again next time
            self.close()
            return self._fell_back(f"{type(exc).__name__}: {exc}")
        if self.unavailable is not None:
            log.info("SA counters read from VPP's stats segment again")
            self.unavailable = None
        return counted

    def _connected(self) -> Any:
        if self._reader is None:
            if self.socket_path is None:
                raise VppUnavailableError("no stats socket configured (--stats-socket)")
            self._reader = self._open(self.socket_path)
        return self._reader

    def _fell_back(self, why: str) -> None:
        self.fallbacks += 1
        if self.unavailable is None:
            log.warning("VPP's stats segment is unavailable (%s): key limits are read from "
                        "full SA dumps on every run until it is back", why)
        self.unavailable = why
        return None

    def on_vpp_met(self, api: Any, pid: int, *, restarted: bool, view: Any) -> None:
        """node.VppHooks: another VPP has another segment; opened again at the next read."""
        self.close()

    def on_vpp_gone(self, reason: str) -> None:
        self.close()

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # an unmapped segment may fail to close; it is dropped
                log.debug("closing the stats reader failed", exc_info=True)
