"""The channel's timers: a heap, so that a tick visits only the peers with something due,
and keepalives only towards peers that need them (channel/session.py)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.noise import public_bytes
from vppmesh.keying.keys import NodeSecrets
from vppmesh.testing.channel_net import ADDRESSES, PSK, Net, up

KEYS = {n: X25519PrivateKey.generate() for n in (1, 2)}


def clear(data: bytes) -> bytes:
    """A datagram's clear header (the rest is each world's own crypto)."""
    fields = m.RESPONSE_FIELDS if data[1] == m.DatagramType.RESPONSE else m.TRANSPORT_FIELDS
    return data[:m.HEADER.size + fields.size]


class EveryPeer(s.Channel):
    """The reference: every tick visits every peer (as before the heap)."""

    def tick(self, now: float) -> s.Output:
        return self._tick_every_peer(now)


def config(peer: int, keepalive: bool) -> s.PeerConfig:
    return s.PeerConfig(peer, public_bytes(KEYS[peer]), ADDRESSES[peer], keepalive=keepalive)


class World:
    """Two channels of one kind, deterministic indices, a wire that drops on request."""

    def __init__(self, kind: type[s.Channel]) -> None:
        self.nodes = {n: kind(n, NodeSecrets(KEYS[n], PSK), [config(3 - n, True)],
                              boot_id=100 + n, new_index=itertools.count(n * 1000).__next__)
                      for n in (1, 2)}
        for n, node in self.nodes.items():
            node.accept_generations(3 - n, 0, s.MAX_WINDOW)
        self.trace: list[Any] = []
        self.lose = 0

    def run(self, sender: int, out: s.Output, now: float) -> None:
        self.trace.append((sender, [summary(e) for e in out.events]))
        for destination, data in out.datagrams:
            receiver = 1 if destination == ADDRESSES[1] else 2
            self.trace.append((sender, receiver, len(data), clear(data)))
            if self.lose:
                self.lose -= 1
                continue
            self.run(receiver, self.nodes[receiver].receive(now, ADDRESSES[sender], data), now)

    def step(self, action: tuple[Any, ...], now: float) -> None:
        kind, node = action[0], self.nodes[action[1]]
        peer = 3 - action[1]
        match kind:
            case "tick":
                self.run(action[1], node.tick(now), now)
            case "offer":
                self.run(action[1], node.start_generation(now, peer, action[2]), now)
            case "ack":
                self.run(action[1], node.acknowledge(now, peer, action[2], action[3]), now)
            case "retire":
                node.retire_generation(peer, action[2], outbound=action[3])
            case "slide":
                node.accept_generations(peer, action[2], s.MAX_WINDOW)
            case "restart":
                self.run(action[1], node.restarted(now, action[2]), now)
            case "ask":
                self.run(action[1], node.ask_rekey(now, peer), now)
            case "keepalive":
                node.set_peers([config(peer, action[2])])
            case "lose":
                self.lose = action[2]
        self.trace.append((dict(node.stats), dict(node.drops)))


def summary(event: s.Event) -> dict[str, Any]:
    """An event without its secrets (each world agrees its own keys)."""
    found = {k: v for k, v in dataclasses.asdict(event).items() if k not in ("secret", "psk")}
    found["kind"] = type(event).__name__
    return found


NODE = st.sampled_from([1, 2])
GEN = st.integers(0, 5)
ACTION = st.one_of(
    st.tuples(st.just("tick"), NODE),
    st.tuples(st.just("tick"), NODE),
    st.tuples(st.just("offer"), NODE, GEN),
    st.tuples(st.just("ack"), NODE, st.sampled_from(["installed", "slid", "sending"]), GEN),
    st.tuples(st.just("retire"), NODE, GEN, st.booleans()),
    st.tuples(st.just("slide"), NODE, GEN),
    st.tuples(st.just("restart"), NODE, st.integers(500, 503)),
    st.tuples(st.just("ask"), NODE),
    st.tuples(st.just("keepalive"), NODE, st.booleans()),
    st.tuples(st.just("lose"), NODE, st.integers(1, 4)),
)
# Seconds the clock moves before each action: around every timer, and steps back.
DELAY = st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 9.9, 10.0, 15.0, 30.0,
                         60.0, 120.0, 130.0, 180.0, -0.5, -60.0, -3600.0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(DELAY, ACTION), max_size=60))
def test_channel_timers_tick_as_visiting_every_peer(script: list[tuple[float, Any]]) -> None:
    """Whatever happens in whatever order (losses, acknowledgements, offers, restarts,
    retirements, keepalive needs changing, the clock stepping back), the heap-driven tick
    sends and reports exactly what a tick visiting every peer does."""
    heap, reference = World(s.Channel), World(EveryPeer)
    now = 1000.0
    for world in (heap, reference):
        world.run(1, world.nodes[1].tick(now), now)
    for delay, action in script:
        now += delay
        heap.step(action, now)
        reference.step(action, now)
        assert heap.trace == reference.trace
    for later in (s.KEEPALIVE_AFTER, s.REKEY_AFTER, s.REJECT_AFTER, 400.0):
        for n in (1, 2):
            heap.step(("tick", n), now + later)
            reference.step(("tick", n), now + later)
    assert heap.trace == reference.trace


def test_channel_idle_tick_visits_no_peer() -> None:
    """200 established peers, nothing due: a tick looks at none of them; at the first
    rekey it looks at that peer alone."""
    keys = {n: X25519PrivateKey.generate() for n in range(1, 202)}
    where = {n: (f"10.0.{n}.1", 4501) for n in keys}
    hub = s.Channel(1, NodeSecrets(keys[1], PSK),
                    [s.PeerConfig(n, public_bytes(k), where[n], keepalive=False)
                     for n, k in keys.items() if n != 1], boot_id=1)
    peers = {n: s.Channel(n, NodeSecrets(keys[n], PSK),
                          [s.PeerConfig(1, public_bytes(keys[1]), where[1])], boot_id=n)
             for n in keys if n != 1}
    for n, peer in peers.items():
        now = 1000.0 + n * 0.01
        for _, init in peer.tick(now).datagrams:
            for _, response in hub.receive(now, where[n], init).datagrams:
                for _, confirm in peer.receive(now, where[1], response).datagrams:
                    hub.receive(now, where[n], confirm)
    assert all(hub.established(n) for n in peers)
    visited: list[int] = []
    tick_peer = hub._tick_peer

    def counting(now: float, state: Any) -> s.Output:
        visited.append(state.config.node_number)
        return tick_peer(now, state)

    hub._tick_peer = counting  # type: ignore[method-assign]
    assert hub.tick(1010.0) == s.Output() and visited == []
    first = 1000.0 + 2 * 0.01 + s.REKEY_AFTER + s.REKEY_RESPONDER_SLACK  # peer 2's session
    assert hub.next_due() == first
    assert hub.tick(first).datagrams and visited == [2]


# ---- keepalives only where needed ---------------------------------------------------------
def pair(keepalive: bool) -> Net:
    net = Net()
    for n, node in net.nodes.items():
        node.set_peers([s.PeerConfig(3 - n, public_bytes(net.keys[3 - n]), ADDRESSES[3 - n],
                                     keepalive=keepalive)])
    return up(net)


def idle(net: Net, start: float, end: float) -> int:
    """Both nodes ticking every second from `start` to `end`; the datagrams sent."""
    sent = len(net.wire)
    for second in range(int(start), int(end)):
        for n in (1, 2):
            net.run(n, net.nodes[n].tick(float(second)), float(second))
    return len(net.wire) - sent


def test_channel_idle_pair_without_a_nat_is_silent_between_rekeys() -> None:
    """No middlebox keeps state for the pair: nothing crosses the wire between rekeys
    (before: a keepalive each way every KEEPALIVE_AFTER); with one (ESP in UDP), the
    keepalives go on."""
    assert idle(pair(keepalive=False), 1001.0, 1000.0 + s.REKEY_AFTER - 1) == 0
    assert idle(pair(keepalive=True), 1001.0, 1000.0 + s.REKEY_AFTER - 1) >= 2 * 7


def test_channel_new_acknowledgement_repeated_then_silent() -> None:
    """A lost acknowledgement still arrives within KEEPALIVE_AFTER (repeated ACK_REPEATS
    times), and goes again over every new session; in between the idle pair is silent."""
    net = pair(keepalive=False)
    net.lose = {len(net.wire)}  # the acknowledgement itself
    net.run(2, net.nodes[2].acknowledge(1001.0, 1, "slid", 4), 1001.0)
    assert idle(net, 1002.0, 1001.0 + s.KEEPALIVE_AFTER + 1) == 1
    assert [e for e in net.events[1] if isinstance(e, s.PeerAcked)] == [
        s.PeerAcked(2, "slid", 4)]
    repeats_end = 1001.0 + (s.ACK_REPEATS + 1) * s.KEEPALIVE_AFTER
    assert idle(net, 1017.0, repeats_end) == s.ACK_REPEATS - 1
    assert idle(net, repeats_end, 1000.0 + s.REKEY_AFTER - 1) == 0
    sent = len(net.wire)
    idle(net, 1000.0 + s.REKEY_AFTER, 1000.0 + s.REKEY_AFTER + 1)
    kinds = [(sender, data[1]) for sender, _, data in net.wire[sent:]]
    assert kinds == [(1, m.DatagramType.INIT), (2, m.DatagramType.RESPONSE),
                     (1, m.DatagramType.TRANSPORT), (2, m.DatagramType.TRANSPORT)]


def test_channel_silent_peer_session_expires_without_keepalives() -> None:
    """An attacker (or a dead agent) makes the peer silent: its session is no longer
    used REJECT_AFTER after it was made, keepalives or not, and handshakes are retried."""
    net = pair(keepalive=False)
    net.lose = set(range(len(net.wire), 100_000))
    idle(net, 1001.0, 1000.0 + s.REJECT_AFTER)
    assert net.nodes[1].established(2, 1000.0 + s.REJECT_AFTER - 1)
    assert not net.nodes[1].established(2, 1000.0 + s.REJECT_AFTER)
    assert net.nodes[1].stats["handshakes_initiated"] > 3


def test_channel_keepalive_need_changes_without_a_new_session() -> None:
    """The mesh changing only whether the pair needs keepalives keeps its sessions."""
    net = pair(keepalive=False)
    one = net.nodes[1]
    one.set_peers([s.PeerConfig(2, public_bytes(net.keys[2]), ADDRESSES[2], keepalive=True)])
    assert one.established(2, 1001.0)
    assert idle(net, 1001.0, 1000.0 + 2 * s.KEEPALIVE_AFTER + 1) >= 2
