"""The SA packet counters read straight from the stats segment's counter vector."""

from __future__ import annotations

import threading
from array import array
from typing import Any

import pytest

from vppmesh.dataplane.vpp import stats as stats_module
from vppmesh.dataplane.vpp.stats import COMBINED, SA_NAME, StatsReader


class Segment:
    """A stats segment holding the directory (one entry: the SA counters) and one
    (packets, bytes) vector per thread, of any length; pointers are offsets."""

    def __init__(self, threads: list[list[int]]) -> None:
        self.base, self.lock, self.epoch, self.last_epoch = 0, threading.Lock(), 1, 1
        self.directory = {"/net/ipsec/sa": type("E", (), {"index": 0})()}
        self.elementfmt, self.directory_vector = "", "dir"
        data = b""
        self.vectors: dict[Any, tuple[int, int]] = {}
        for n, packets in enumerate(threads):
            words = array("Q", [w for p in packets for w in (p, 7 * p)]).tobytes()
            self.vectors[("thread", n)] = (len(data), len(packets))
            data += words
        self.statseg = data
        self.threads = [(("thread", n),) for n in range(len(threads))]


class Vector:
    def __init__(self, stats: Segment, ptr: Any, fmt: str) -> None:
        self.stats, self.ptr = stats, ptr
        if ptr != "dir" and ptr != "threads":
            self.vec_start, self.vec_len = stats.vectors[ptr]

    def __getitem__(self, index: int) -> Any:
        return (COMBINED, "threads", SA_NAME + b"more")

    def __iter__(self) -> Any:
        return iter(self.stats.threads)


@pytest.mark.parametrize("threads", [
    [[5, 0, 9]],
    [[1, 2, 3, 4, 5, 6], [10, 20], [100, 200, 300, 400, 500, 600, 700, 800]],
    [[], [3]],
])
def test_sa_packets_sum_each_index_over_threads(monkeypatch: pytest.MonkeyPatch,
                                                 threads: list[list[int]]) -> None:
    """Per stat index asked (in any order), the packets of every thread whose vector
    reaches it (a worker's vector may be shorter or longer than another's)."""
    import vpp_papi.vpp_stats

    monkeypatch.setattr(vpp_papi.vpp_stats, "StatsVector", Vector)
    reader = StatsReader(stats_module.Path("/nonexistent"))
    reader._stats = Segment(threads)
    asked = [4, 0, 2, 5, 1]
    expected = {i: sum(t[i] for t in threads if i < len(t)) for i in asked}
    assert reader.sa_packets(asked) == expected
