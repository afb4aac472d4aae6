"""The agent's clock: one per node and boot, step-free, in seconds since the epoch.

Every time the agent compares or persists (key ages and receiver grace periods in the
generation file: epochs.py; channel sessions, retries and token buckets: channel/;
handshake timestamps) comes from one `AgentClock`. Why not the wall clock: an NTP step,
an operator's `date`, or an attacker answering unauthenticated NTP moves it by hours in
either direction, and every age computed from it moves too: a backward step of an hour
left the handshake token bucket empty for an hour, and sessions and keys started "in
the future" never reached their rekey or their limit. Why not CLOCK_MONOTONIC alone: it
stops during suspend, restarts at each boot and means nothing to another process, while
the generation file's times must compare across agent restarts, and `vppmesh up` and
`vppmesh rekey` (one-shot processes) share that file with the agent.

So: CLOCK_BOOTTIME (never steps, counts suspend) plus an anchor, the wall clock minus
BOOTTIME taken once per boot and kept in the state directory with the kernel's boot id
(/proc/sys/kernel/random/boot_id). Every process of the node in one boot (the agent, a
restarted agent, `up`, `rekey`) reads the same clock, and a wall-clock step after the
anchor was taken moves nothing. A new boot takes a new anchor (BOOTTIME restarted at 0),
as right as the wall clock was when it was taken; a later correction of the wall clock is
ignored for the rest of the boot, on purpose. Times persisted under another boot (or by
an older vppmesh that used the wall clock) may lie in the future of this clock: their
users clamp them (epochs.clamp_future, the channel's ages).

`Timestamps` issues the channel's handshake timestamps from this clock: strictly
increasing per node across agent restarts, reboots and clock steps (a peer refuses an Init
whose timestamp is not above the last it accepted from the node), at millisecond grain so
they no longer tell the clock to the nanosecond. `TimestampFile` keeps what must survive a
restart: how far timestamps were reserved, and the responder's marks per peer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from vppmesh.keying.files import replace_file

log = logging.getLogger("vppmesh")

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# Handshake timestamps: nanoseconds since the epoch (the wire's unit, messages.Init), in
# steps of a millisecond; a restarted agent starts above what was reserved, and a new
# reservation reaches this far ahead of the timestamp that needed it.
TIMESTAMP_GRAIN = 1_000_000
TIMESTAMP_RESERVE = 600 * 1_000_000_000


def boottime() -> float:
    """CLOCK_BOOTTIME in seconds: never steps, counts suspend, 0 at boot."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """The kernel's id of this boot (new at every boot)."""
    return BOOT_ID.read_text().strip()


def _write_json(path: Path, data: object) -> None:
    """`path` replaced atomically by `data` (0600, synced)."""
    replace_file(path, json.dumps(data).encode())


class AgentClock:
    """The node's clock (see the module): `clock()` is seconds since the epoch, as the
    wall clock read when this boot's anchor was taken, advancing with CLOCK_BOOTTIME.

    `path`: the anchor's file in the state directory (`<node>.clock.json`); None keeps
    the anchor in memory (step-free, but each process takes its own). The sources are
    injectable for tests.
    """

    def __init__(self, path: Path | None, *, boottime: Callable[[], float] = boottime,
                 wall: Callable[[], float] = time.time,
                 boot_id: Callable[[], str] = boot_id) -> None:
        self.path = path
        self._boottime, self._wall, self._boot_id = boottime, wall, boot_id
        self._anchor: float | None = None

    def __call__(self) -> float:
        return self.anchor + self._boottime()

    @property
    def anchor(self) -> float:
        """Wall time minus boot time, taken once per boot: read from the file when it was
        taken in this boot, else taken now (and kept)."""
        if self._anchor is None:
            self._anchor = self._load()
        return self._anchor

    def _take(self) -> float:
        return self._wall() - self._boottime()

    def _load(self) -> float:
        if self.path is None:
            return self._take()
        boot = self._boot_id()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("cannot keep the clock's anchor in %s (%s): this process's clock "
                        "is step-free but not shared with other vppmesh processes",
                        self.path, exc)
            return self._take()
        with os.fdopen(fd, "r+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # one anchor, whoever comes first
            text = handle.read()
            try:
                saved = json.loads(text) if text else {}
                if saved.get("boot_id") == boot:
                    return float(saved["anchor"])
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("%s is not a clock anchor: taking a new one", self.path)
            anchor = self._take()
            handle.seek(0)
            handle.truncate()
            json.dump({"boot_id": boot, "anchor": anchor}, handle)
            handle.flush()
            os.fsync(handle.fileno())
            return anchor


class Timestamps:
    """The channel's handshake timestamps (`timestamps()`: the next one): the clock at
    millisecond grain, or one more than the last issued when that is higher, so they
    strictly increase whatever the clock does.

    `issued`: the highest timestamp issued before (by an earlier agent: what it reserved).
    `reserve(up_to)` (None: nothing persists) must make `up_to` survive a restart before
    a timestamp beyond the last reservation goes out; it is asked rarely, for
    TIMESTAMP_RESERVE ahead (no write per handshake), and returns False when it could not
    (then it is asked again next time). An agent that stops cleanly records what it
    really issued (TimestampFile.save with `issued`); one that crashed starts above its
    reservation, up to TIMESTAMP_RESERVE ahead of its clock, which the clock catches up.
    """

    def __init__(self, clock: Callable[[], float] | None = None, *, issued: int = 0,
                 reserve: Callable[[int], bool] | None = None) -> None:
        self._clock = clock
        self.issued = issued
        self.reserved = issued
        self._reserve = reserve

    def __call__(self) -> int:
        assert self._clock is not None
        return self.next(self._clock())

    def next(self, now: float) -> int:
        """The next timestamp at clock reading `now` (seconds)."""
        timestamp = max(int(now * 1000) * TIMESTAMP_GRAIN, self.issued + 1)
        if self._reserve is not None and timestamp > self.reserved:
            up_to = timestamp + TIMESTAMP_RESERVE
            if self._reserve(up_to):
                self.reserved = up_to
        self.issued = timestamp
        return timestamp


class TimestampFile:
    """`<state_dir>/<node>.handshakes.json` (0600): how far this node's handshake
    timestamps were reserved (Timestamps), and the highest timestamp accepted from each
    peer (the channel's marks: a restarted agent still refuses a handshake recorded
    before). One writer: the node's agent (Secrecy)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False  # told once until a write succeeds again

    def load(self) -> tuple[int, dict[int, int]]:
        """(reserved, marks by peer node number); nothing yet: (0, {})."""
        try:
            saved = json.loads(self.path.read_text())
            return int(saved["issued"]), {int(p): int(t) for p, t in saved["marks"].items()}
        except FileNotFoundError:
            return 0, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Without it, a replayed handshake from before could be accepted once per
            # peer, and this node's timestamps start from its clock: said, not hidden.
            log.warning("%s unreadable (%s): handshake timestamps start from the clock "
                        "and earlier handshakes are not recognised as replays", self.path, exc)
            return 0, {}

    def save(self, issued: int, marks: Mapping[int, int]) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(self.path, {"issued": issued,
                                    "marks": {str(p): t for p, t in sorted(marks.items())}})
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write %s (%s): handshake timestamps and replay marks "
                            "may not survive an agent restart", self.path, exc)
            self._failing = True
            return False
        self._failing = False
        return True
