"""``python -m benchmarks.channel_rotation``: what rotating pair keys costs one agent with
many peers, at several rotation intervals (settings.rekey_interval).

In process (no VPP, no root): one node's `Channel` and N peers' `Channel`s (no sockets,
as benchmarks.channel), driven through a stretch of simulated time by a fake clock: the
channels' own timers (session rekeys every REKEY_AFTER, keepalives carrying the repeated
acknowledgements) and, per pair and both ways, the rotation the agents run
(vppmesh/agent/secrecy.py, epochs.py): KeyInit/KeyResponse, the receiver's "installed", the
sender's switch and "sending", the receiver's "slid" after rekey_grace, the retired
generations. Rotations start at steady-state phases (each pair's key age uniform over the
interval). Measured: the CPU of the node's side alone (its Channel calls and the SA key
derivation of every generation it agrees), the datagrams it sends and receives, and the
wakeups of the agent's loop the arriving datagrams cause. Each interval runs `--repeats`
times; medians.

With ``--vpp`` (root, VPPMESH_VPP): one VPP holding the node's N peers (the control-plane
benchmark's synthetic mesh), the reconcile of each step of one pair's rotation (the
receiver replacing its inbound SAs of the generation with the agreed keys, the sender
switching its outbound SAs, the receiver sliding its window), and the agent's runs at
this size (agent_runs: a quiet poll, a run deciding one peer again, one deciding
SPOKEN). The node's run-waking events and time rules of the simulation are replayed
through the agent loop's own EarlyRuns and its polls (replay), each run costed with
these: what rotation costs the agent, against the issue's target (TARGET).
Without it, the channel only.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.capacity.report import machine
from benchmarks.channel import PSK, T0, channels, write_results
from benchmarks.report import DEFAULT_RESULTS_DIR
from benchmarks.stats import median
from vppmesh.agent.loop import WATCH_FILE_CHECK_SECONDS, WATCH_POLL_SECONDS, EarlyRuns
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PORT
from vppmesh.config import MeshSettings
from vppmesh.keying.keys import derive_sa_key_ephemeral

INTERVALS = (120, 300, 600)
HUB = 1  # the measured node
HUB_TICK = WATCH_FILE_CHECK_SECONDS  # the agent's loop ticks the channel at least this often
PEER_TICK = 1.0  # the peers' ticks (their timing only, not measured)
RUN_DELAY = 0.2  # from an event to the agent's run acting on it
WARMUP = 30.0  # sessions up and one rotation each way before the measured stretch
# The channel events after which Secrecy.service asks for a run at once
# (ChannelAgreement.heard): the steps of a rotation (GenerationKeyed, PeerAcked) and a
# peer's restart; a completed handshake (a session rekey) does not.
RUN_EVENTS = ("GenerationKeyed", "PeerAcked", "PeerRestarted")
ONE_CORE = 100.0  # percent
# Issue 30: rotation every 120 s at 1000 peers costs the agent (channel and runs) at most
# this share of a core over an agent that does not rotate.
TARGET = {"rekey_interval_s": 120.0, "peers": 1000, "delta_pct": 1.0}
SPOKEN = 32  # the peers a batched run decides again, measured (about a run's at 120 s)


def address(node: int) -> tuple[str, int]:
    """A node's channel address in benchmarks.channel.channels()."""
    return (f"10.{node >> 8}.{node & 0xFF}.1", PORT)


def node_of(destination: tuple[str, int]) -> int:
    parts = destination[0].split(".")
    return int(parts[1]) << 8 | int(parts[2])


@dataclass
class Meter:
    """The node's side over the measured stretch."""

    cpu_s: float = 0.0
    sent: int = 0
    received: int = 0
    wakeups: int = 0  # batches of datagrams arriving at once (one loop wakeup each)
    ticks: int = 0
    out_steps: int = 0  # the node switched its outbound generation towards a peer
    in_slides: int = 0  # the node slid its window for a peer's traffic
    derivations: int = 0  # generations whose SA keys the node derived
    events: dict[str, int] = field(default_factory=dict)  # the node's channel events
    # What the node's agent has to run for, in time order (not in the report).
    work: list[Work] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Work:
    """Something the node's agent acts on in a run: a channel event that asks for a run
    at once (`wakes`), or a time rule that comes due (the pair's rotation, the window's
    slide after rekey_grace: the next run, whatever woke it, acts on it). `step`: the
    rotation step whose reconcile the run carries (STEPS), if any."""

    at: float
    peer: int
    wakes: bool
    step: str | None = None


class Simulation:
    """One node (HUB) and `peers` peers, every action of both ends in simulated time."""

    def __init__(self, peers: int, interval: float, *, grace: float, tunnels: int,
                 seed: int) -> None:
        self.nodes = channels(peers + 1)
        self.hub = self.nodes[HUB]
        self.interval, self.grace, self.tunnels = interval, grace, tunnels
        self.random = random.Random(seed)
        self.queue: list[tuple[float, int, Callable[[float], None]]] = []
        self.sequence = 0
        self.meter = Meter()
        self.measuring = False
        self.start = self.next_hub = self.next_peer = 0.0
        self.handshake_cpu_s = 0.0  # both ends of every first handshake (setup)

    # ---- plumbing ---------------------------------------------------------------------
    def at(self, when: float, action: Callable[[float], None]) -> None:
        self.sequence += 1
        heapq.heappush(self.queue, (when, self.sequence, action))

    def call(self, node: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a node's Channel; the node's own CPU is counted while measuring."""
        if node != HUB or not self.measuring:
            return fn(*args, **kwargs)
        started = time.process_time()
        out = fn(*args, **kwargs)
        self.meter.cpu_s += time.process_time() - started
        return out

    def emit(self, sender: int, out: s.Output, now: float) -> None:
        """Deliver `out`'s datagrams at once, each receiver's batch in one go (the
        agent's loop drains its socket per wakeup), then the answers; handle events."""
        self.on_events(sender, out.events, now)
        batches: dict[int, list[bytes]] = {}
        for destination, data in out.datagrams:
            batches.setdefault(node_of(destination), []).append(data)
        for receiver, batch in batches.items():
            if self.measuring:
                if sender == HUB:
                    self.meter.sent += len(batch)
                if receiver == HUB:
                    self.meter.received += len(batch)
                    self.meter.wakeups += 1
            answer = s.Output()
            for data in batch:
                answer.extend(self.call(receiver, self.nodes[receiver].receive, now,
                                        address(sender), data))
            self.emit(receiver, answer, now)

    def on_events(self, node: int, events: list[s.Event], now: float) -> None:
        for event in events:
            if node == HUB and self.measuring:
                kind = type(event).__name__
                self.meter.events[kind] = self.meter.events.get(kind, 0) + 1
                if kind in RUN_EVENTS:
                    self.meter.work.append(Work(now, event.peer, True, run_step(event)))
            match event:
                case s.GenerationKeyed(peer=peer, generation=g, outbound=outbound,
                                       secret=secret):
                    self.derive(node, peer, g, outbound, secret)
                    if not outbound:  # the receiver's run installs the agreed SAs
                        self.at(now + RUN_DELAY, lambda t, n=node, p=peer, g=g:
                                self.acknowledge(n, p, "installed", g, t))
                case s.PeerAcked(peer=peer, what="installed", generation=g):
                    self.at(now + RUN_DELAY, lambda t, n=node, p=peer, g=g: self.step(n, p, g, t))
                case s.PeerAcked(peer=peer, what="sending", generation=g):
                    self.at(now + self.grace, lambda t, n=node, p=peer, g=g:
                            self.slide(n, p, g, t))

    def derive(self, node: int, peer: int, generation: int, outbound: bool,
               secret: bytes) -> None:
        """What KeyBook.add does with an agreed secret (only the node's is timed)."""
        if node != HUB:
            return
        started = time.process_time()
        sender, receiver = (node, peer) if outbound else (peer, node)
        for tunnel in range(self.tunnels):
            derive_sa_key_ephemeral(PSK, secret, PSK, sender=f"n{sender}",
                                    receiver=f"n{receiver}", tunnel=tunnel, epoch=generation)
        if self.measuring:
            self.meter.cpu_s += time.process_time() - started
            self.meter.derivations += 1

    # ---- the agents' steps of a rotation (sender S towards receiver R) ------------------
    def offer(self, sender: int, receiver: int, generation: int, now: float) -> None:
        if sender == HUB and self.measuring:  # the rotation's time rule came due
            self.meter.work.append(Work(now, receiver, False))
        node = self.nodes[sender]
        self.emit(sender, self.call(sender, node.start_generation, now, receiver, generation),
                  now)

    def acknowledge(self, node: int, peer: int, what: str, generation: int,
                    now: float) -> None:
        channel = self.nodes[node]
        self.emit(node, self.call(node, channel.acknowledge, now, peer, what, generation), now)

    def step(self, sender: int, receiver: int, generation: int, now: float) -> None:
        """The sender's run switched its outbound SAs: it says so, retires the old
        generation, and rotates again `interval` later."""
        self.acknowledge(sender, receiver, "sending", generation, now)
        self.call(sender, self.nodes[sender].retire_generation, receiver, generation - 1,
                  outbound=True)
        if sender == HUB and self.measuring:
            self.meter.out_steps += 1
        if self.interval:
            # The first (warm-up) rotation puts every pair at a random phase.
            later = self.interval if generation > 1 else \
                self.start - now + self.random.uniform(0, self.interval)
            self.at(now + later, lambda t: self.offer(sender, receiver, generation + 1, t))

    def slide(self, receiver: int, sender: int, generation: int, now: float) -> None:
        self.acknowledge(receiver, sender, "slid", generation, now)
        self.call(receiver, self.nodes[receiver].accept_generations, sender, generation,
                  s.MAX_WINDOW)
        self.call(receiver, self.nodes[receiver].retire_generation, sender, generation - 1,
                  outbound=False)
        if receiver == HUB and self.measuring:
            self.meter.in_slides += 1
            self.meter.work.append(Work(now, sender, False, "slide"))

    # ---- the run ------------------------------------------------------------------------
    def setup(self) -> None:
        """Every session up (200 handshakes a second: inside the node's DH budget), one
        rotation each way per pair, the clock at the start of the measured stretch."""
        started = time.process_time()
        for n in self.nodes:
            if n != HUB:
                now = T0 + n * 0.005
                self.emit(n, self.nodes[n].tick(now), now)
        self.handshake_cpu_s = (time.process_time() - started) / (len(self.nodes) - 1)
        if not all(self.hub.established(p) for p in self.hub.peers()):
            raise RuntimeError(f"handshakes were refused: {self.hub.drops}")
        first = T0 + len(self.nodes) * 0.005
        self.start = first + WARMUP
        self.next_hub = self.next_peer = first
        for n in self.hub.peers():
            self.at(first, lambda t, n=n: self.offer(HUB, n, 1, t))
            self.at(first, lambda t, n=n: self.offer(n, HUB, 1, t))
        self.advance(self.start)

    def advance(self, end: float) -> None:
        """Run every action and timer due before `end`, in order."""
        peers = [n for n in self.nodes if n != HUB]
        while True:
            due = self.queue[0][0] if self.queue else end
            now = min(due, self.next_hub, self.next_peer)
            if now >= end:
                return
            if due == now:
                heapq.heappop(self.queue)[2](now)
            elif self.next_hub == now:
                if self.measuring:
                    self.meter.ticks += 1
                self.emit(HUB, self.call(HUB, self.hub.tick, now), now)
                self.next_hub += HUB_TICK
            else:
                for n in peers:
                    self.emit(n, self.nodes[n].tick(now), now)
                self.next_peer += PEER_TICK

    def measure(self, duration: float) -> Meter:
        self.measuring = True
        self.advance(self.start + duration)
        self.measuring = False
        return self.meter


def run_step(event: s.Event) -> str | None:
    """The rotation step the run an event asks for reconciles: the receiver installs a
    generation agreed with it, the sender switches once the receiver installed."""
    match event:
        case s.GenerationKeyed(outbound=False):
            return "install"
        case s.PeerAcked(what="installed"):
            return "switch"
    return None


# ---- the agent's runs -------------------------------------------------------------------
@dataclass(frozen=True)
class RunCosts:
    """What one run of the agent costs, (wall, CPU) seconds, measured on a real VPP at
    the benchmark's size (measure_vpp): a poll with nothing new (`quiet`), a run that
    decides one peer again (`one_peer`), each further peer the same run decides again
    (`per_peer`: from a run deciding SPOKEN peers), and the reconcile of each rotation
    step (STEPS) the run carries."""

    quiet: tuple[float, float]
    one_peer: tuple[float, float]
    per_peer: tuple[float, float]
    steps: dict[str, tuple[float, float]]

    @classmethod
    def of(cls, vpp: dict[str, Any]) -> RunCosts:
        def pair(found: dict[str, float]) -> tuple[float, float]:
            return found["wall_s"], found["cpu_s"]

        runs = vpp["agent_runs"]
        one, many = pair(runs["one_peer"]), pair(runs["peers"])
        spoken = runs["peers"]["spoken"]
        return cls(quiet=pair(runs["quiet"]), one_peer=one,
                   per_peer=tuple(max(0.0, (m - o) / (spoken - 1))  # type: ignore[arg-type]
                                  for m, o in zip(many, one, strict=True)),
                   steps={step: pair(vpp[step]) for step in STEPS})

    def run(self, peers: int, steps: Sequence[str]) -> tuple[float, float]:
        """(wall, CPU) of a run that decides `peers` peers again and reconciles `steps`."""
        if not peers:
            return self.quiet
        return tuple(self.one_peer[i] + (peers - 1) * self.per_peer[i]  # type: ignore[return-value]
                     + sum(self.steps[step][i] for step in steps) for i in (0, 1))


@dataclass
class Runs:
    """The agent's runs over a stretch (replay)."""

    deciding_polls: int = 0  # polls after which something had arrived or come due
    quiet_polls: int = 0  # polls with nothing new (QuietRuns)
    early: int = 0  # runs the channel asked for before the poll (EarlyRuns allowed them)
    decided: int = 0  # peers decided again, over all runs
    steps: int = 0  # rotation steps reconciled
    cpu_s: float = 0.0
    wall_s: float = 0.0
    longest_wait_s: float = 0.0  # from a run-waking event to the run that acted on it


def replay(work: Sequence[Work], start: float, end: float,
           cost: Callable[[int, Sequence[str]], tuple[float, float]],
           poll: float = WATCH_POLL_SECONDS) -> Runs:
    """The agent's loop (loop.poll_ticks stepping Loop.run) over `work`, from a run that
    ended at `start` until `end`: a poll `poll` seconds after each run ends; before it, a
    run as soon as a run-waking item has arrived and the product's EarlyRuns allows one
    (the loop waits exactly that long). A run acts on everything that arrived or came due
    since the last one (batched) and takes `cost(peers decided again, steps)`; runs never
    overlap, so what arrives during one waits for the next."""
    early, runs = EarlyRuns(), Runs()
    waking = [i for i, w in enumerate(work) if w.wakes]
    times = [w.at for w in work]
    ended, first = start, 0  # the first item no run has acted on
    while True:
        at, kind = ended + poll, "poll"
        w = bisect.bisect_left(waking, first)
        if w < len(waking):
            woken = max(work[waking[w]].at, ended)
            allowed = woken + max(0.0, early.wait(woken))
            if allowed < at:
                at, kind = allowed, "early"
        if at >= end:
            return runs
        last = bisect.bisect_right(times, at, lo=first)
        acted = work[first:last]
        steps = [x.step for x in acted if x.step is not None]
        peers = len({x.peer for x in acted})
        wall, cpu = cost(peers, steps)
        if kind == "early":
            runs.early += 1
        elif acted:
            runs.deciding_polls += 1
        else:
            runs.quiet_polls += 1
        runs.decided += peers
        runs.steps += len(steps)
        runs.cpu_s += cpu
        runs.wall_s += wall
        if acted and w < len(waking) and waking[w] < last:
            runs.longest_wait_s = max(runs.longest_wait_s, at - work[waking[w]].at)
        early.ran(at + wall, wall, plain=True)
        ended, first = at + wall, last


def idle_tick_ms(sim: Simulation, now: float, rounds: int = 20) -> float:
    """One timer tick of the node with nothing due (what every wakeup of the loop costs),
    at `now`: the end of the measured stretch (the channel's clock never goes back)."""
    sim.hub.tick(now)  # what is due then, not timed
    started = time.process_time()
    for _ in range(rounds):
        sim.hub.tick(now)
    return (time.process_time() - started) / rounds * 1000


def simulate(peers: int, interval: float, duration: float, *, grace: float, tunnels: int,
             seed: int, costs: RunCosts | None = None) -> dict[str, Any]:
    """One repeat; with `costs`, the agent's runs over the measured stretch (replay)."""
    sim = Simulation(peers, interval, grace=grace, tunnels=tunnels, seed=seed)
    sim.setup()
    meter = sim.measure(duration)
    work, meter.work = meter.work, []
    found = {**asdict(meter), "duration_s": duration,
             "idle_tick_ms": idle_tick_ms(sim, sim.start + duration),
             "handshake_cpu_ms_both_ends": sim.handshake_cpu_s * 1000,
             "drops": {str(k): v for k, v in sim.hub.drops.items()}}
    del found["work"]
    if costs is not None:
        found["agent"] = asdict(replay(work, sim.start, sim.start + duration, costs.run))
    return found


def summarize(interval: float, tunnels: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats, per second of simulated time, as % of one core."""
    def rate(key: str) -> float:
        return median(r[key] / r["duration_s"] for r in runs) or 0.0

    tick_ms = median(r["idle_tick_ms"] for r in runs) or 0.0
    wakeups = rate("wakeups")
    rotations = rate("out_steps") + rate("in_slides")  # the node's ends, both directions
    row: dict[str, Any] = {
        "rekey_interval_s": interval,
        "repeats": len(runs),
        "rotations_per_s": round(rotations, 3),
        "channel_cpu_pct": round(rate("cpu_s") * ONE_CORE, 3),
        "datagrams_sent_per_s": round(rate("sent"), 1),
        "datagrams_received_per_s": round(rate("received"), 1),
        "wakeups_per_s": round(wakeups, 1),
        # The loop (Secrecy.wait/service) ticks the channel on every wakeup; the
        # simulation ticked it every HUB_TICK only, so the rest is added from the
        # measured cost of an idle tick.
        "wakeup_ticks_cpu_pct": round(wakeups * tick_ms / 1000 * ONE_CORE, 3),
        "idle_tick_ms": round(tick_ms, 3),
        "handshake_cpu_ms_both_ends": round(median(
            r["handshake_cpu_ms_both_ends"] for r in runs) or 0.0, 3),
        "run_events_per_s": round(median(
            sum(r["events"].get(k, 0) for k in RUN_EVENTS) / r["duration_s"]
            for r in runs) or 0.0, 2),
        "runs": runs,
    }
    if interval:
        # Every switch records the pair's new outbound keys; nothing is ever dropped.
        row["ledger_after_a_day"] = measure_ledger(
            round(rate("out_steps") * tunnels * 86400))
    if all("agent" in r for r in runs):
        # The agent's runs (replay of the run-waking events through EarlyRuns and the
        # polls, each run's cost measured on a real VPP): per second, medians.
        def agent(key: str) -> float:
            return median(r["agent"][key] / r["duration_s"] for r in runs) or 0.0

        row["polls_per_s"] = round(agent("deciding_polls") + agent("quiet_polls"), 3)
        row["deciding_polls_per_s"] = round(agent("deciding_polls"), 3)
        row["early_runs_per_s"] = round(agent("early"), 3)
        row["peers_per_run"] = round(agent("decided") / max(
            agent("deciding_polls") + agent("early"), 1e-9), 1)
        row["longest_wait_s"] = round(median(r["agent"]["longest_wait_s"] for r in runs)
                                      or 0.0, 2)
        row["runs_cpu_pct"] = round(agent("cpu_s") * ONE_CORE, 3)
        row["total_cpu_pct"] = round(row["channel_cpu_pct"] + row["wakeup_ticks_cpu_pct"]
                                     + row["runs_cpu_pct"], 3)
    return row


def measure_ledger(entries: int) -> dict[str, float]:
    """The used-key ledger holding `entries` fingerprints (what one day of rotations adds):
    its size, and what recording one switch's new outbound keys costs (one line appended
    and synced before the keys reach VPP)."""
    import secrets

    from pydantic import SecretBytes

    from vppmesh.dataplane.state import SaSpec
    from vppmesh.keying.ledger import KeyLedger

    directory = Path(tempfile.mkdtemp(prefix="vppmesh-ledger-"))
    try:
        path = directory / "n1.used-keys.json"
        path.write_text(json.dumps({"outbound": sorted(
            secrets.token_hex(16) for _ in range(entries))}))
        ledger = KeyLedger(path)
        ledger.record([SaSpec.model_construct(key=SecretBytes(os.urandom(32)), salt=2)])
        spec = SaSpec.model_construct(key=SecretBytes(os.urandom(32)), salt=1)
        wall, cpu = time.perf_counter(), time.process_time()
        ledger.record([spec])
        return {"entries": entries, "bytes": path.stat().st_size,
                "record_cpu_s": time.process_time() - cpu,
                "record_wall_s": time.perf_counter() - wall}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


STEPS = ("install", "switch", "slide")


def rotation_steps(api: Any, reconciler: Any, view: Any, host: Any, keying: dict[str, Any],
                   agreed: dict[str, Any], peer: str, revision: int,
                   ) -> dict[str, tuple[float, float, int, float]]:
    """One pair's rotation through `reconciler`, step by step: (wall, CPU, messages,
    plan CPU) of each. `keying` and `agreed` are updated in place."""
    from benchmarks.controlplane import timed_cpu
    from vppmesh.dataplane.plan import plan_by_peer
    from vppmesh.dataplane.view import AgreedKeys
    from vppmesh.keying.epochs import PeerKeying

    tunnels = view.settings.tunnels_per_peer
    number = view.peer(peer).node.node_number
    keys: dict[tuple[bool, int, int], Any] = {}
    found = {}
    for step in STEPS:
        if step == "install":  # the peer's generation 1, agreed: replaces the static SAs
            keys.update({(False, t, 1): fresh_key(t) for t in range(tunnels)})
        elif step == "switch":  # ours, agreed: the node sends on it
            keys.update({(True, t, 1): fresh_key(t) for t in range(tunnels)})
            keying[peer] = PeerKeying(outbound=1, inbound=keying[peer].inbound)
        else:  # the window moves up by one
            keying[peer] = PeerKeying(outbound=1, inbound=(1, 2, 3))
        agreed[peer] = AgreedKeys(revision * 10 + len(keys), dict(keys))
        # The plan is rebuilt by every run of the agent, changed or not; the reconcile
        # is what the step itself adds to the run it happens in.
        (desired, parts), _, plan_cpu = timed_cpu(plan_by_peer, view, host=host,
                                                  keying=keying, agreed=agreed)
        sent = api.messages_sent
        changes, wall, cpu = timed_cpu(reconciler.reconcile, desired, by_peer=parts)
        assert changes and reconciler.last_scope == {number}, step
        found[step] = (wall, cpu, api.messages_sent - sent, plan_cpu)
    return found


def fresh_key(tunnel: int) -> Any:
    return derive_sa_key_ephemeral(os.urandom(32), os.urandom(32), PSK, sender="a",
                                   receiver="b", tunnel=tunnel, epoch=1)


# ---- through a real VPP -----------------------------------------------------------------
def measure_vpp(peers: int, tunnels: int, rounds: int, prefix: str, base_dir: Path,
                heap: str, spoken: int = SPOKEN) -> dict[str, Any]:
    """One pair's rotation steps reconciled against a VPP holding `peers` peers, and the
    agent's runs at that size (see the module and agent_runs)."""
    from benchmarks.controlplane import give_uplink, statseg, synthetic_mesh, with_nodes
    from vppmesh.dataplane.plan import HostOptions, plan_by_peer
    from vppmesh.dataplane.reconcile import Reconciler
    from vppmesh.dataplane.view import AgreedKeys, build_view
    from vppmesh.dataplane.vpp.client import VppClient
    from vppmesh.keying.epochs import PeerKeying
    from vppmesh.lab.testbed import single_vpp

    mesh, secrets = synthetic_mesh(peers, tunnels)
    mesh = with_nodes(mesh, mesh.nodes[:-1])
    view = build_view(mesh, "n1", secrets)
    host = HostOptions(kind="none")
    keying = {p.name: PeerKeying(outbound=0, inbound=(0, 1, 2)) for p in view.peers}
    agreed: dict[str, AgreedKeys] = {}
    steps: list[dict[str, tuple[float, float, int, float]]] = []
    with single_vpp(f"{prefix}rot", base_dir / "rotation", main_heap_size=heap,
                    statseg_size=statseg(peers, tunnels)) as instance:
        with VppClient(instance.api_socket, timeout=60).connect() as api:
            give_uplink(api, mesh.node("n1").primary)  # type: ignore[arg-type]
            reconciler = Reconciler(api)
            desired, parts = plan_by_peer(view, host=host, keying=keying)
            reconciler.reconcile(desired, by_peer=parts)
            for revision, peer in enumerate(view.peers[:rounds], start=1):
                # The peer's generation 1 arrives with an agreed key; then ours, and the
                # node switches to it; then the node slides its window for the peer.
                steps.append(rotation_steps(api, reconciler, view, host, keying, agreed,
                                            peer.name, revision))
            desired, _ = plan_by_peer(view, host=host, keying=keying, agreed=agreed)
            converged = Reconciler(api).reconcile(desired, dry_run=True) == []
        runs = agent_runs(mesh, secrets, instance, rounds, min(spoken, peers))

    def summary(samples: list[tuple[float, ...]]) -> dict[str, float]:
        return {"wall_s": median(x[0] for x in samples) or 0.0,
                "cpu_s": median(x[1] for x in samples) or 0.0,
                "messages": max(x[2] for x in samples),
                "plan_cpu_s": median(x[3] for x in samples) or 0.0}

    return {"peers": peers, "tunnels_per_peer": tunnels, "rounds": rounds,
            **{name: summary([s[name] for s in steps]) for name in STEPS},
            "agent_runs": runs, "converged": converged}


def peers_spoke(count: int) -> Any:
    """controlplane.OnePeerSpoke deciding `count` peers again per run: a run woken by
    the channel that acts on what several peers said meanwhile (batched)."""
    from benchmarks.controlplane import OnePeerSpoke

    quiet = OnePeerSpoke()
    clean = quiet.peers.clean

    def spoke(*args: Any, **kwargs: Any) -> dict[str, Any]:
        found = clean(*args, **kwargs)
        for name in sorted(found)[:count - 1]:
            found.pop(name)
        return found
    quiet.peers.clean = spoke  # type: ignore[method-assign]
    return quiet


def agent_runs(mesh: Any, secrets: Any, instance: Any, rounds: int,
               spoken: int) -> dict[str, dict[str, float]]:
    """The agent (Agent with the stats segment's SA counters, as `up --watch` makes it)
    on the VPP, nothing to change (it holds the static plan again after the agent's
    first run): per kind of run, a new agent, two runs, then `rounds` timed: a poll with
    nothing new ("quiet": QuietRuns), a run that decides one peer again ("one_peer":
    controlplane.OnePeerSpoke, as measure_idle's channel mode) and one that decides
    `spoken` peers again ("peers"). CPU is this process's, whatever else runs."""
    from benchmarks.controlplane import OnePeerSpoke, timed_cpu
    from vppmesh.agent.node import Agent, NodeOptions
    from vppmesh.config import dump_mesh
    from vppmesh.dataplane.vpp.stats import SaCounters
    from vppmesh.keying.keys import private_key_b64, write_secret_file

    work = Path(tempfile.mkdtemp(prefix="vppmesh-rotation-"))
    key = work / "n1.key"
    write_secret_file(key, private_key_b64(secrets.private_key))
    mesh_file = work / "mesh.yaml"
    mesh_file.write_text(dump_mesh(mesh))
    options = NodeOptions(mesh_file=mesh_file, node="n1", private_key=key,
                          api_socket=instance.api_socket, host_link="none", workers=0,
                          state_dir=work)
    kinds: dict[str, Callable[[], Any] | None] = {
        "quiet": None, "one_peer": OnePeerSpoke, "peers": lambda: peers_spoke(spoken)}
    found: dict[str, dict[str, float]] = {}
    try:
        for name, quiet in kinds.items():
            counters = SaCounters(instance.stats_socket)
            session = Agent(options, counters=counters, full_every=1e9)
            if quiet is not None:
                session._quiet = quiet()
            try:
                session.run()
                session.run()
                samples = []
                for _ in range(rounds):
                    result, wall, cpu = timed_cpu(session.run)
                    assert result.changes == [], [str(c) for c in result.changes[:5]]
                    samples.append((wall, cpu))
                assert counters.unavailable is None, counters.unavailable
            finally:
                session.close()
            found[name] = {"wall_s": median(w for w, _ in samples) or 0.0,
                           "cpu_s": median(c for _, c in samples) or 0.0}
        found["peers"]["spoken"] = spoken
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return found


# ---- report -----------------------------------------------------------------------------
def render_table(result: dict[str, Any]) -> str:
    rows = result["intervals"]
    vpp = result.get("vpp")
    head = ["rekey_interval", "rotations/s (node's ends)", "datagrams/s out / in",
            "channel CPU", "loop wakeups/s (their ticks)", "key ledger after a day"]
    if vpp:
        head += ["agent runs/s: polls (deciding) + early", "peers decided a run",
                 "agent runs CPU", "total", "over none"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        interval = f"{r['rekey_interval_s']:g} s" if r["rekey_interval_s"] else "none"
        cells = [interval, f"{r['rotations_per_s']:.2f}",
                 f"{r['datagrams_sent_per_s']:.1f} / {r['datagrams_received_per_s']:.1f}",
                 f"{r['channel_cpu_pct']:.2f} %",
                 f"{r['wakeups_per_s']:.1f} ({r['wakeup_ticks_cpu_pct']:.2f} %)",
                 ledger_cell(r.get("ledger_after_a_day"))]
        if vpp:
            cells += [f"{r['polls_per_s']:.2f} ({r['deciding_polls_per_s']:.2f}) + "
                      f"{r['early_runs_per_s']:.2f}", f"{r['peers_per_run']:.1f}",
                      f"{r['runs_cpu_pct']:.2f} %", f"{r['total_cpu_pct']:.2f} %",
                      f"{r['delta_cpu_pct']:+.2f} %"]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    lines += ["", f"{result['peers']} peers, {result['tunnels_per_peer']} tunnels each, "
              f"rekey_grace {result['rekey_grace_s']:g} s, {result['duration_s']:g} s "
              f"simulated per repeat, medians of {first['repeats']}; CPU in % of one core, "
              "the node's side only. One pair's handshake: "
              f"{first['handshake_cpu_ms_both_ends']:.2f} ms CPU (both ends); an idle timer "
              f"tick of the node {first['idle_tick_ms']:.2f} ms."]
    if vpp:
        runs = vpp["agent_runs"]
        lines.append(
            f"The agent's runs: the node's run-waking channel events ({', '.join(RUN_EVENTS)})"
            " and time rules (its rotation due, its window's slide) from the simulation, "
            "replayed through the agent loop's own EarlyRuns and its "
            f"{WATCH_POLL_SECONDS:g} s polls (a run acts on all that arrived since the "
            "last); each run's cost measured on a real VPP at "
            f"{vpp['peers']} peers (CPU, wall; medians of {vpp['rounds']}): a quiet poll "
            f"{ms(runs['quiet'])}, a run deciding one peer again {ms(runs['one_peer'])}, "
            f"{runs['peers']['spoken']:.0f} peers {ms(runs['peers'])}; plus the reconcile "
            f"of each rotation step it carries: receiver installs {ms(vpp['install'])} "
            f"({vpp['install']['messages']:.0f} messages), sender switches "
            f"{ms(vpp['switch'])} ({vpp['switch']['messages']:.0f}), receiver slides "
            f"{ms(vpp['slide'])} ({vpp['slide']['messages']:.0f}); converged: "
            f"{'yes' if vpp['converged'] else 'NO'}. Total: channel + its wakeup ticks + "
            "the agent's runs; over none: the total minus the row without rotation.")
        target = result.get("target")
        if target is not None:
            lines.append(
                f"Target (rotation every {target['rekey_interval_s']:g} s at "
                f"{target['peers']} peers costs <= {target['delta_pct']:g} % of a core over "
                f"none): {target['measured_pct']:.2f} %, "
                f"{'MET' if target['met'] else 'MISSED'}.")
    else:
        lines.append("Without --vpp: the channel only; the agent's runs (polls, early "
                     "runs, reconciles) are not measured, so no total.")
    lines.append(f"Notes: {result['notes']}")
    return "\n".join(lines) + "\n"


def ms(found: dict[str, float]) -> str:
    return f"{found['cpu_s'] * 1000:.1f} ms ({found['wall_s'] * 1000:.1f} ms)"


def target_check(rows: list[dict[str, Any]], peers: int) -> dict[str, Any] | None:
    """TARGET against the rows (each with its delta over the first, the baseline): None
    when the run does not have the target's interval and size."""
    row = next((r for r in rows if r["rekey_interval_s"] == TARGET["rekey_interval_s"]),
               None)
    if row is None or peers != TARGET["peers"] or "delta_cpu_pct" not in row:
        return None
    return {**TARGET, "measured_pct": row["delta_cpu_pct"],
            "met": row["delta_cpu_pct"] <= TARGET["delta_pct"]}


def ledger_cell(ledger: dict[str, float] | None) -> str:
    if ledger is None:
        return ""
    return (f"{ledger['bytes'] / 1e6:.1f} MB, {ledger['record_cpu_s'] * 1000:.0f} ms CPU "
            f"({ledger['record_wall_s'] * 1000:.0f} ms wall) a record")


def render_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["intervals"]
    labels = [f"{r['rekey_interval_s']:g} s" if r["rekey_interval_s"] else "none"
              for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(rows)
    parts = [("channel", "channel_cpu_pct"), ("its wakeup ticks", "wakeup_ticks_cpu_pct"),
             ("agent runs", "runs_cpu_pct")]
    for name, key in parts:
        values = [r.get(key, 0.0) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("% of one core")
    ax.set_xlabel("rekey_interval")
    ax.legend()
    ax.set_title(f"key rotation at {result['peers']} peers, one node "
                 f"({result['machine']['cpu_model']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.channel_rotation",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--intervals", default=",".join(map(str, INTERVALS)),
                        help="rekey_interval values in seconds (default %(default)s); a "
                        "baseline without rotations (none) always runs too")
    parser.add_argument("--duration", type=float, default=3600.0,
                        help="simulated seconds per repeat (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tunnels", type=int, default=4, help="tunnels per peer")
    parser.add_argument("--grace", type=float,
                        default=MeshSettings.model_fields["rekey_grace"].default)
    parser.add_argument("--vpp", action="store_true",
                        help="also measure the agent's runs and the rotation steps' "
                        "reconcile against a real VPP (root, VPPMESH_VPP); without it, the "
                        "channel only")
    parser.add_argument("--vpp-rounds", type=int, default=5)
    parser.add_argument("--prefix", default="vcr-", help="VPP namespace prefix")
    parser.add_argument("--base-dir", type=Path, default=Path("/run/vppmesh-vcr"))
    parser.add_argument("--heap", default="2G", help="VPP main heap size")
    parser.add_argument("--notes", default="", help="added to the report (the machine's load)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    intervals = [0.0] + [float(v) for v in args.intervals.split(",") if v.strip()]
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    vpp = measure_vpp(args.peers, args.tunnels, args.vpp_rounds, args.prefix, args.base_dir,
                      args.heap) if args.vpp else None
    costs = RunCosts.of(vpp) if vpp is not None else None
    rows = []
    for interval in intervals:
        print(f"rekey_interval {interval:g} s: {args.repeats} x {args.duration:g} s "
              f"simulated ...", file=sys.stderr, flush=True)
        runs = [simulate(args.peers, interval, args.duration, grace=args.grace,
                         tunnels=args.tunnels, seed=repeat, costs=costs)
                for repeat in range(args.repeats)]
        rows.append(summarize(interval, args.tunnels, runs))
    for row in rows:
        if "total_cpu_pct" in row:
            row["delta_cpu_pct"] = round(row["total_cpu_pct"] - rows[0]["total_cpu_pct"], 3)
    result: dict[str, Any] = {
        "machine": machine(), "command": " ".join(
            ["python -m benchmarks.channel_rotation", *(argv if argv is not None
                                                        else sys.argv[1:])]),
        "peers": args.peers, "tunnels_per_peer": args.tunnels, "rekey_grace_s": args.grace,
        "duration_s": args.duration, "agent_poll_s": WATCH_POLL_SECONDS,
        "session_rekey_s": s.REKEY_AFTER, "keepalive_s": s.KEEPALIVE_AFTER,
        "notes": f"load average {load} at the start. {args.notes}".strip(),
        "intervals": rows}
    if vpp is not None:
        result["vpp"] = vpp
        result["target"] = target_check(rows, args.peers)
    print(json.dumps({k: v for k, v in result.items() if k != "intervals"}, indent=1))
    write_results(args.out, "channel-rotation", result, render_table(result), render_png)
    return 0 if vpp is None or vpp["converged"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
