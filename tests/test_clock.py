"""The node's clock (vppmesh/agent/clock.py): immune to wall-clock steps, one anchor per boot
shared by every process, and handshake timestamps that strictly increase across agent
restarts, reboots and steps, with a write to the state directory only now and then."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from vppmesh.agent.clock import (
    TIMESTAMP_GRAIN,
    TIMESTAMP_RESERVE,
    AgentClock,
    TimestampFile,
    Timestamps,
    boot_id,
    boottime,
)

HOUR = 3600.0


class Host:
    """A host's clocks: a wall clock an attacker (or NTP) may step, and a boot clock."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.boot = "boot-a"
        self.up = 50.0  # seconds since boot

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.up += seconds

    def reboot(self, *, wall_step: float = 0.0) -> None:
        self.boot = f"{self.boot}+"
        self.up = 5.0
        self.wall += 5.0 + wall_step

    def clock(self, path: Path | None) -> AgentClock:
        """A new process's clock."""
        return AgentClock(path, boottime=lambda: self.up, wall=lambda: self.wall,
                          boot_id=lambda: self.boot)


def test_clock_wall_steps_move_nothing(tmp_path: Path) -> None:
    host = Host()
    clock = host.clock(tmp_path / "n1.clock.json")
    start = clock()
    assert start == pytest.approx(host.wall)  # wall-like while nobody steps it
    for step in (HOUR, -2 * HOUR, 300.0):
        host.wall += step
        host.advance(10.0)
        start += 10.0
        assert clock() == pytest.approx(start)


def test_clock_processes_of_one_boot_share_the_anchor_whatever_the_wall_says(
        tmp_path: Path) -> None:
    host = Host()
    path = tmp_path / "n1.clock.json"
    agent = host.clock(path)
    first = agent()
    host.wall -= HOUR  # stepped back, then the agent restarts (and a one-shot `rekey`)
    host.advance(3.0)
    assert host.clock(path)() == pytest.approx(first + 3.0) == agent()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_clock_a_new_boot_takes_a_new_anchor(tmp_path: Path) -> None:
    host = Host()
    path = tmp_path / "n1.clock.json"
    before = host.clock(path)()
    host.reboot(wall_step=-HOUR)  # the wall clock came up an hour behind
    after = host.clock(path)
    assert after() == pytest.approx(host.wall)
    assert after() == pytest.approx(before + 5.0 - HOUR)
    assert json.loads(path.read_text())["boot_id"] == host.boot


def test_clock_a_damaged_anchor_file_is_replaced(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    host = Host()
    path = tmp_path / "n1.clock.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="vppmesh"):
        assert host.clock(path)() == pytest.approx(host.wall)
    assert "not a clock anchor" in caplog.text
    assert json.loads(path.read_text())["boot_id"] == host.boot


def test_clock_real_sources() -> None:
    assert boot_id() and boot_id() == boot_id()
    first = boottime()
    assert 0 < first <= boottime()
    clock = AgentClock(None)
    assert abs(clock() - time.time()) < 5.0


def timestamps(host: Host, directory: Path) -> tuple[Timestamps, TimestampFile, list[int]]:
    """An agent's timestamps (as Secrecy makes them), and the reservations it wrote."""
    store = TimestampFile(directory / "n1.handshakes.json")
    issued, _marks = store.load()
    writes: list[int] = []

    def reserve(up_to: int) -> bool:
        writes.append(up_to)
        return store.save(up_to, {})

    clock = host.clock(directory / "n1.clock.json")
    return Timestamps(clock, issued=issued, reserve=reserve), store, writes


def test_timestamps_strictly_increase_across_restarts_reboots_and_steps(
        tmp_path: Path) -> None:
    host = Host()
    issued: list[int] = []
    stamps, _, _ = timestamps(host, tmp_path)
    for _ in range(3):
        issued.append(stamps())
        host.advance(1.0)
    # The agent crashes (nothing recorded on the way out), the wall clock is stepped
    # back, the host reboots with it an hour behind, and the agent starts again.
    host.wall -= HOUR
    host.reboot(wall_step=-HOUR)
    stamps, _, _ = timestamps(host, tmp_path)
    issued += [stamps(), stamps()]
    # ... and once more after a clean stop (what was really issued is recorded).
    stamps, store, _ = timestamps(host, tmp_path)
    issued.append(stamps())
    store.save(stamps.issued, {})
    stamps, _, _ = timestamps(host, tmp_path)
    issued.append(stamps())
    assert issued == sorted(set(issued)), issued
    assert issued[-1] == issued[-2] + 1  # the clean stop costs no reservation's jump


def test_timestamps_are_reserved_rarely_and_tell_only_milliseconds(tmp_path: Path) -> None:
    host = Host()
    host.wall += 0.123456789
    stamps, _, writes = timestamps(host, tmp_path)
    first = stamps()
    assert first % TIMESTAMP_GRAIN == 0  # the clock's millisecond, not its nanoseconds
    for _ in range(1000):  # a busy node: 1000 handshakes in 100 s
        host.advance(0.1)
        stamps()
    assert writes == [first + TIMESTAMP_RESERVE]  # one write, not one per handshake
    host.advance(TIMESTAMP_RESERVE / 1e9)
    stamps()
    assert len(writes) == 2


def test_timestamp_file_keeps_marks_and_says_when_it_cannot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = TimestampFile(tmp_path / "n1.handshakes.json")
    assert store.load() == (0, {})
    assert store.save(42, {3: 7, 2: 9})
    assert store.load() == (42, {2: 9, 3: 7})
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    store.path.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="vppmesh"):
        assert store.load() == (0, {})
    assert "not recognised as replays" in caplog.text
    blocked = TimestampFile(tmp_path / "file" / "n1.handshakes.json")
    (tmp_path / "file").write_text("")  # its directory cannot be made
    assert not blocked.save(1, {})
