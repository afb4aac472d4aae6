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
switching its outbound SAs, the receiver sliding its window), and one run of the agent
at this size (`Agent.run` with nothing to change: the SA dump key generations watch,
plan, reconcile), which is what every event that wakes a run costs.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.capacity.report import machine
from benchmarks.channel import PSK, T0, channels, write_results
from benchmarks.report import DEFAULT_RESULTS_DIR
from benchmarks.stats import median
from vppmesh.agent.loop import WATCH_FILE_CHECK_SECONDS, WATCH_POLL_SECONDS
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
# The channel events after which Secrecy.service asks for a run at once: the steps of a
# rotation (GenerationKeyed, PeerAcked) and every completed handshake (session rekeys
# included), besides a peer's restart.
RUN_EVENTS = ("GenerationKeyed", "PeerAcked", "HandshakeComplete", "PeerRestarted")
ONE_CORE = 100.0  # percent


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


def idle_tick_ms(sim: Simulation, now: float, rounds: int = 20) -> float:
    """One timer tick of the node with nothing due (what every wakeup of the loop costs),
    at `now`: the end of the measured stretch (the channel's clock never goes back)."""
    sim.hub.tick(now)  # what is due then, not timed
    started = time.process_time()
    for _ in range(rounds):
        sim.hub.tick(now)
    return (time.process_time() - started) / rounds * 1000


def simulate(peers: int, interval: float, duration: float, *, grace: float, tunnels: int,
             seed: int) -> dict[str, Any]:
    sim = Simulation(peers, interval, grace=grace, tunnels=tunnels, seed=seed)
    sim.setup()
    meter = sim.measure(duration)
    return {**asdict(meter), "duration_s": duration,
            "idle_tick_ms": idle_tick_ms(sim, sim.start + duration),
            "handshake_cpu_ms_both_ends": sim.handshake_cpu_s * 1000,
            "drops": {str(k): v for k, v in sim.hub.drops.items()}}


def summarize(interval: float, tunnels: int, runs: list[dict[str, Any]],
              reconcile: dict[str, Any] | None) -> dict[str, Any]:
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
    if reconcile is not None:
        # Per pair and direction: the sender switches, the receiver installs and slides;
        # the node is the sender of half its rotations and the receiver of the other half.
        per_out = reconcile["switch"]["cpu_s"]
        per_in = reconcile["install"]["cpu_s"] + reconcile["slide"]["cpu_s"]
        row["reconcile_cpu_pct"] = round(
            (rate("out_steps") * per_out + rate("in_slides") * per_in) * ONE_CORE, 3)
        run = reconcile["agent_run"]
        # Each event that wakes a run at once costs a whole run; runs never overlap, so
        # when they come faster than one run lasts, the agent runs back to back.
        row["event_runs_cpu_pct"] = round(min(row["run_events_per_s"] * run["cpu_s"],
                                              run["cpu_s"] / run["wall_s"]) * ONE_CORE, 1)
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
                heap: str) -> dict[str, Any]:
    """One pair's rotation steps reconciled against a VPP holding `peers` peers, and one
    run of the agent at that size (see the module)."""
    from benchmarks.controlplane import give_uplink, synthetic_mesh, timed_cpu, with_nodes
    from vppmesh.agent.node import Agent, NodeOptions
    from vppmesh.config import dump_mesh
    from vppmesh.dataplane.plan import HostOptions, plan_by_peer
    from vppmesh.dataplane.reconcile import Reconciler
    from vppmesh.dataplane.view import AgreedKeys, build_view
    from vppmesh.dataplane.vpp.client import VppClient
    from vppmesh.keying.epochs import PeerKeying
    from vppmesh.keying.keys import private_key_b64, write_secret_file
    from vppmesh.lab.testbed import single_vpp

    mesh, secrets = synthetic_mesh(peers, tunnels)
    mesh = with_nodes(mesh, mesh.nodes[:-1])
    view = build_view(mesh, "n1", secrets)
    host = HostOptions(kind="none")
    keying = {p.name: PeerKeying(outbound=0, inbound=(0, 1, 2)) for p in view.peers}
    agreed: dict[str, AgreedKeys] = {}
    steps: list[dict[str, tuple[float, float, int, float]]] = []
    work = Path(tempfile.mkdtemp(prefix="vppmesh-rotation-"))
    with single_vpp(f"{prefix}rot", base_dir / "rotation", main_heap_size=heap) as instance:
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
        # The agent's own run at this size, nothing to change (the VPP now holds the
        # static plan again after its first run).
        key = work / "n1.key"
        write_secret_file(key, private_key_b64(secrets.private_key))
        mesh_file = work / "mesh.yaml"
        mesh_file.write_text(dump_mesh(mesh))
        session = Agent(NodeOptions(mesh_file=mesh_file, node="n1", private_key=key,
                                      api_socket=instance.api_socket, host_link="none",
                                      workers=0, state_dir=work))
        try:
            session.run()
            session.run()
            runs = [timed_cpu(session.run)[1:] for _ in range(rounds)]
        finally:
            session.close()

    def summary(samples: list[tuple[float, ...]]) -> dict[str, float]:
        found = {"wall_s": median(x[0] for x in samples) or 0.0,
                 "cpu_s": median(x[1] for x in samples) or 0.0}
        if samples and len(samples[0]) > 2:
            found["messages"] = max(x[2] for x in samples)
            found["plan_cpu_s"] = median(x[3] for x in samples) or 0.0
        return found

    return {"peers": peers, "tunnels_per_peer": tunnels, "rounds": rounds,
            **{name: summary([s[name] for s in steps]) for name in STEPS},
            "agent_run": summary(runs), "converged": converged}


# ---- report -----------------------------------------------------------------------------
def render_table(result: dict[str, Any]) -> str:
    rows = result["intervals"]
    vpp = result.get("vpp")
    head = ["rekey_interval", "rotations/s (node's ends)", "datagrams/s out / in",
            "channel CPU", "loop wakeups/s (their ticks)", "key ledger after a day"]
    if vpp:
        head += ["reconcile CPU", "channel + reconcile", "run-waking events/s (as runs)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        interval = f"{r['rekey_interval_s']:g} s" if r["rekey_interval_s"] else "none"
        cells = [interval, f"{r['rotations_per_s']:.2f}",
                 f"{r['datagrams_sent_per_s']:.1f} / {r['datagrams_received_per_s']:.1f}",
                 f"{r['channel_cpu_pct']:.2f} %",
                 f"{r['wakeups_per_s']:.1f} ({r['wakeup_ticks_cpu_pct']:.2f} %)",
                 ledger_cell(r.get("ledger_after_a_day"))]
        if vpp:
            cells += [f"{r['reconcile_cpu_pct']:.3f} %",
                      f"{r['channel_cpu_pct'] + r['reconcile_cpu_pct']:.2f} %",
                      f"{r['run_events_per_s']:.2f} ({r['event_runs_cpu_pct']:.0f} %)"]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    lines += ["", f"{result['peers']} peers, {result['tunnels_per_peer']} tunnels each, "
              f"rekey_grace {result['rekey_grace_s']:g} s, {result['duration_s']:g} s "
              f"simulated per repeat, medians of {first['repeats']}; CPU in % of one core, "
              "the node's side only. One pair's handshake: "
              f"{first['handshake_cpu_ms_both_ends']:.2f} ms CPU (both ends); an idle timer "
              f"tick of the node {first['idle_tick_ms']:.2f} ms."]
    if vpp:
        lines.append(
            f"Reconcile of one pair's rotation steps at {vpp['peers']} peers (CPU, "
            f"median of {vpp['rounds']}): receiver installs the agreed inbound SAs "
            f"{vpp['install']['cpu_s'] * 1000:.1f} ms ({vpp['install']['messages']:.0f} "
            f"messages), sender switches {vpp['switch']['cpu_s'] * 1000:.1f} ms "
            f"({vpp['switch']['messages']:.0f}), receiver slides "
            f"{vpp['slide']['cpu_s'] * 1000:.1f} ms ({vpp['slide']['messages']:.0f}); the "
            f"plan a run builds around each {vpp['switch']['plan_cpu_s'] * 1000:.0f} ms. One "
            f"agent run with nothing to change {vpp['agent_run']['cpu_s'] * 1000:.0f} ms CPU "
            f"({vpp['agent_run']['wall_s'] * 1000:.0f} ms wall): every "
            f"{WATCH_POLL_SECONDS:g} s poll {vpp['agent_run']['cpu_s'] / WATCH_POLL_SECONDS:.0%}"
            f" of a core at any interval; converged: {'yes' if vpp['converged'] else 'NO'}.")
    lines.append(f"Notes: {result['notes']}")
    return "\n".join(lines) + "\n"


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
    parts = [("channel", "channel_cpu_pct"), ("reconcile", "reconcile_cpu_pct")]
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
                        help="also reconcile the rotation steps and an agent run against "
                        "a real VPP (root, VPPMESH_VPP)")
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
    rows = []
    for interval in intervals:
        print(f"rekey_interval {interval:g} s: {args.repeats} x {args.duration:g} s "
              f"simulated ...", file=sys.stderr, flush=True)
        runs = [simulate(args.peers, interval, args.duration, grace=args.grace,
                         tunnels=args.tunnels, seed=repeat) for repeat in range(args.repeats)]
        rows.append(summarize(interval, args.tunnels, runs, vpp))
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
    print(json.dumps({k: v for k, v in result.items() if k != "intervals"}, indent=1))
    write_results(args.out, "channel-rotation", result, render_table(result), render_png)
    return 0 if vpp is None or vpp["converged"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
