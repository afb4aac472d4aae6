"""Counters from VPP's stats segment (per-SA packets and bytes, interface counters)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vppmesh.errors import VppUnavailableError

SA_COUNTERS = "/net/ipsec/sa"


@dataclass(frozen=True)
class Counter:
    packets: int
    bytes: int


class StatsReader:
    """Reads the stats segment over its socket (no API round trip, no lock in VPP)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._stats: Any = None

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
