"""The channel through a NAT that changes the source port: the ESP flow, port learning,
NAT keepalives (vppmesh/agent/secrecy.py, channel/transport.py), without VPP.

Two agents' Secrecy objects talk through unix sockets standing in for their VPPs' punt
sockets; a relay between them plays the underlay and a NAT in front of node2 that maps
node2's UDP 4500 to a port of its own choosing and lets in only what answers it. The real
VPPs and an nftables NAT do the same in test_forward_secrecy_nat_vpp.py.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretBytes

from vppmesh.agent.nat import NAT_KEEPALIVE_INTERVAL
from vppmesh.agent.secrecy import Secrecy
from vppmesh.channel import messages as m
from vppmesh.channel import transport as t
from vppmesh.channel.endpoint import TUNNEL, UNDERLAY
from vppmesh.config import Mesh, NatSettings, dump_mesh
from vppmesh.dataplane.state import SA_DIRECTION_BIT, SaSpec, sa_id_for, sa_peer
from vppmesh.dataplane.view import LocalView, build_view
from vppmesh.dataplane.vpp import ipsec
from vppmesh.host.underlay import NAT_T_PORT
from vppmesh.keying.agreement import NoAgreement
from vppmesh.keying.epochs import GenerationState, PeerGenerations
from vppmesh.testing.agents import Agents
from vppmesh.testing.fake_punt import Relayed, punted
from vppmesh.testing.fake_vpp import FakeVpp
from vppmesh.testing.meshes import make_mesh

PUBLIC = "192.0.2.250"
def udp_fields(packet: bytes) -> tuple[t.Address, t.Address, bytes]:
    """(source, destination, payload) of an IPv4 UDP packet without options."""
    src, dst = ipaddress.IPv4Address(packet[12:16]), ipaddress.IPv4Address(packet[16:20])
    sport, dport = struct.unpack("!HH", packet[20:24])
    return (str(src), sport), (str(dst), dport), packet[28:]


# ---- the transport on the ESP flow --------------------------------------------------------
def test_forward_secrecy_nat_datagrams_on_4500_carry_the_non_esp_marker(tmp_path: Path) -> None:
    vpp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    vpp.bind(str(tmp_path / "vpp.sock"))
    with t.PuntTransport(tmp_path / "agent.sock", tmp_path / "vpp.sock") as agent:
        agent.send(("192.0.2.1", NAT_T_PORT), ("192.0.2.2", 23456), b"channel")
        agent.send(("192.0.2.1", 4501), ("192.0.2.2", 4501), b"channel")
        agent.keepalive(("192.0.2.1", NAT_T_PORT), ("192.0.2.2", NAT_T_PORT))
        sent = [udp_fields(vpp.recv(4096)[t.PACKETDESC.size:]) for _ in range(3)]
        assert sent == [(("192.0.2.1", 4500), ("192.0.2.2", 23456), bytes(4) + b"channel"),
                        (("192.0.2.1", 4501), ("192.0.2.2", 4501), b"channel"),
                        (("192.0.2.1", 4500), ("192.0.2.2", 4500), b"\xff")]
        assert (agent.sent, agent.keepalives) == (2, 1)
    vpp.close()


def test_forward_secrecy_nat_punted_esp_flow_datagrams_lose_the_marker() -> None:
    source, ours = (PUBLIC, 23456), ("192.0.2.1", NAT_T_PORT)
    biggest = bytes(4) + b"x" * m.MAX_DATAGRAM
    parsed = t.parse_punted(punted(t.build_packet(source, ours, biggest)))
    assert isinstance(parsed, t.Punted) and parsed.payload == b"x" * m.MAX_DATAGRAM
    assert parsed.source == source
    # Without the marker it is not the channel's (VPP punts only SPI 0, but say so).
    assert t.parse_punted(punted(t.build_packet(source, ours, b"\x00\x00\x00\x01abc"))) \
        == m.Drop.MALFORMED
    assert t.parse_punted(punted(t.build_packet(source, ours, biggest + b"x"))) == \
        m.Drop.OVERSIZED
    # On the channel's own port nothing is stripped.
    plain = t.parse_punted(punted(t.build_packet(source, ("192.0.2.1", 4501), bytes(6))))
    assert isinstance(plain, t.Punted) and plain.payload == bytes(6)


# ---- two agents through a NAT ---------------------------------------------------------------
@dataclass
class Nat:
    """The underlay between node1 (outside) and node2 (behind the NAT at PUBLIC)."""

    inside: str
    remotes: list[str]  # node1's addresses: tunnel i's flow goes to the i-th
    mapped: int  # the public port of node2's 4500 flow to node1's first address now
    delivered: list[tuple[int, t.Address, t.Address, bytes]] = field(default_factory=list)
    dropped: int = 0

    def port(self, tunnel: int) -> int:
        """Where the NAT maps node2's UDP 4500 flow to node1's address of `tunnel`: each
        flow has a port of its own, as with a NAT that randomises them."""
        return self.mapped + 1000 * tunnel

    def out(self, source: t.Address, destination: t.Address) -> t.Address:
        tunnel = self.remotes.index(destination[0])
        return PUBLIC, self.port(tunnel) if source[1] == NAT_T_PORT else 31000

    def answers(self, source: t.Address, destination: t.Address) -> bool:
        """Whether a packet from node1 matches a mapping (the flow's reply tuple)."""
        return source[1] == NAT_T_PORT and source[0] in self.remotes and \
            destination == (PUBLIC, self.port(self.remotes.index(source[0])))


@dataclass
class Pair:
    mesh: Mesh
    views: dict[int, LocalView]
    agents: dict[int, Secrecy]
    vpps: dict[int, socket.socket]
    nat: Nat
    tmp: Path
    clock: list[float]

    def learned(self, n: int, state: GenerationState | None = None) -> LocalView:
        """node n's view for a run: with the ports its agent learned."""
        return self.agents[n].nat.learned_view(self.views[n], state or GenerationState())

    def relay(self) -> int:
        """Move what each agent wrote to its "VPP" across the underlay and the NAT."""
        moved = 0
        for sender, vpp in self.vpps.items():
            while True:
                try:
                    written = vpp.recv(4096)
                except BlockingIOError:
                    break
                source, destination, payload = udp_fields(written[t.PACKETDESC.size:])
                if sender == 2:  # out through the NAT: one mapping per flow
                    source, receiver = self.nat.out(source, destination), 1
                elif self.nat.answers(source, destination):
                    destination, receiver = (self.nat.inside, NAT_T_PORT), 2
                else:  # nothing at the NAT answers it
                    self.nat.dropped += 1
                    continue
                self.nat.delivered.append((sender, source, destination, payload))
                moved += 1
                if payload == t.NAT_KEEPALIVE:
                    continue  # VPP drops it ("NAT Keepalive")
                packet = t.build_packet(source, destination, payload)
                vpp.sendto(punted(packet), str(self.tmp / f"agent{receiver}.sock"))
        return moved

    def run(self, seconds: float, step: float = 0.25) -> bool:
        """Both agents' loops for `seconds`: True if either wanted a run."""
        wanted = False
        for _ in range(int(seconds / step)):
            self.clock[0] += step
            for agent in self.agents.values():
                wanted |= agent.service()
            self.relay()
        return wanted


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    mesh, secrets = make_mesh(2, tunnels=2)
    behind = mesh.nodes[1].model_copy(update={"nat": NatSettings(
        public=ipaddress.ip_address(PUBLIC), port=NAT_T_PORT)})
    mesh = mesh.model_copy(update={"nodes": [mesh.nodes[0], behind]})
    clock = [1000.0]
    views, agents, vpps = {}, {}, {}
    for n in (1, 2):
        views[n] = build_view(mesh, f"node{n}", secrets[f"node{n}"])
        vpp = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        vpp.bind(str(tmp_path / f"vpp{n}.sock"))
        vpp.setblocking(False)
        vpps[n] = vpp
        fake = FakeVpp()
        fake.punt_socket = str(tmp_path / f"vpp{n}.sock")
        agents[n] = Secrecy(tmp_path / f"agent{n}.sock", clock=lambda: clock[0])
        agents[n].on_vpp_met(fake, 1, restarted=False, view=views[n])
        assert fake.punt_exceptions == {1: str(tmp_path / f"agent{n}.sock"),
                                        4: str(tmp_path / f"agent{n}.sock")}
    nat = Nat(inside=str(behind.underlay[0].ip),
              remotes=[str(a.ip) for a in mesh.nodes[0].underlay], mapped=23456)
    yield Pair(mesh, views, agents, vpps, nat, tmp_path, clock)
    for n in (1, 2):
        agents[n].close()
        vpps[n].close()


def test_forward_secrecy_nat_peer_learns_the_port_the_nat_chose(pair: Pair) -> None:
    one, two = pair.agents[1], pair.agents[2]
    wanted = pair.run(3.0)
    assert one.agreement.established(pair.views[1]) == {"node2"}
    assert two.agreement.established(pair.views[2]) == {"node1"}
    assert wanted
    # node1 reaches node2 where the NAT maps node2's 4500, not at its record's port:
    # tunnel 0's mapping from the channel, tunnel 1's from node2's probe on that flow.
    assert one.nat.learned == {2: {0: 23456, 1: 24456}} and two.nat.learned == {}
    assert one.channel is not None and one.channel.endpoint(2) == (PUBLIC, 23456)
    learned = pair.learned(1)
    path = learned.peer("node2").path
    assert [path.dst_port(i) for i in (0, 1)] == [23456, 24456]
    assert path.endpoints == pair.views[1].peer("node2").path.endpoints
    base = pair.views[1].peer("node2").path  # the record's
    assert [base.dst_port(i) for i in (0, 1)] == [NAT_T_PORT, NAT_T_PORT]
    assert pair.learned(1) is learned  # unchanged: plan() keeps its cache
    assert pair.learned(2) is pair.views[2]
    # Every channel datagram of the pair ran on the ESP flow, from and to UDP 4500.
    channel = [d for d in pair.nat.delivered if d[3] != t.NAT_KEEPALIVE]
    assert channel and all(d[3][:4] == bytes(4) for d in channel)
    assert {d[1][1] for d in channel if d[0] == 2} == {23456, 24456}  # through the NAT
    assert {d[1][1] for d in channel if d[0] == 1} == {NAT_T_PORT}
    # node1's first handshake went to the record's port and died at the NAT; node2's
    # (the higher node number's) was answered all the same.
    assert pair.nat.dropped >= 1
    malformed = f"drop_{m.Drop.MALFORMED.value}"
    assert not one.counters().get(malformed) and not two.counters().get(malformed)


def test_forward_secrecy_nat_a_new_mapping_is_followed(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vppmesh")
    one, two = pair.agents[1], pair.agents[2]
    pair.run(3.0)
    assert "NAT maps its ESP in UDP (tunnel 1) to 192.0.2.250 port 24456" in caplog.text
    pair.nat.mapped = 27001  # the mappings expired and the NAT chose other ports
    assert two.endpoint is not None
    two.endpoint.send(pair.clock[0], 1, m.Keepalive())
    assert pair.relay() == 1
    assert one.service() is True  # the SAs towards node2 must follow: a run is due
    assert one.nat.learned == {2: {0: 27001, 1: 24456}}
    pair.run(NAT_KEEPALIVE_INTERVAL)  # tunnel 1's probe comes with the next keepalives
    assert one.nat.learned == {2: {0: 27001, 1: 28001}}
    path = pair.learned(1).peer("node2").path
    assert [path.dst_port(i) for i in (0, 1)] == [27001, 28001]
    assert one.agreement.established(pair.views[1]) == {"node2"}
    # Learning is for peers behind NAT, at their public address, for their tunnels only.
    assert not two.nat.learn(1, "10.0.0.17", 40000) and two.nat.learned == {}
    assert not one.nat.learn(2, "192.0.2.99", 40000) and not one.nat.learn(2, PUBLIC, 40000, 2)
    assert one.nat.learn(2, PUBLIC, NAT_T_PORT) and one.nat.learned == {2: {1: 28001}}
    assert one.nat.learn(2, PUBLIC, NAT_T_PORT, 1) and one.nat.learned == {}  # the record's
    assert pair.learned(1) is pair.views[1]


def test_forward_secrecy_nat_node_behind_nat_sends_keepalives_on_every_tunnel(
        pair: Pair) -> None:
    view = pair.views[2]
    flows = {((str(src), NAT_T_PORT), (str(dst), NAT_T_PORT))
             for src, dst in view.peer("node1").path.endpoints}
    assert len(flows) == 2  # one mapping per tunnel: from its first address to each peer's

    def keepalives() -> list[tuple[t.Address, t.Address]]:
        return [(d[1], d[2]) for d in pair.nat.delivered if d[3] == t.NAT_KEEPALIVE]

    pair.run(0.25)
    assert {(src, dst) for src, dst in keepalives()} == {
        ((PUBLIC, pair.nat.port(t)), dst)
        for t, (_, dst) in enumerate(sorted(flows))}  # as node1 sees them
    rounds, seen = [pair.clock[0]], len(keepalives())
    for _ in range(int(2.5 * NAT_KEEPALIVE_INTERVAL / 0.25)):
        pair.run(0.25)
        if len(keepalives()) > seen:
            new = len(keepalives()) - seen
            assert new % 2 == 0  # one per tunnel, a round at a time
            rounds += [pair.clock[0]] * (new // 2)
            seen = len(keepalives())
    # Every 20 s, and once more as the session came up (tunnel 1's probe goes with it;
    # twice when both agents' handshakes crossed and both completed).
    sent = len(rounds)
    rounds = [r for i, r in enumerate(rounds)
              if i + 1 == len(rounds) or rounds[i + 1] - r > 0.5]  # a burst counts once
    assert len(rounds) == 4 and rounds[1] - rounds[0] <= 2.0
    assert [b - a for a, b in itertools.pairwise(rounds[1:])] == [NAT_KEEPALIVE_INTERVAL] * 2
    assert all(d[0] == 2 for d in pair.nat.delivered if d[3] == t.NAT_KEEPALIVE)  # node1: none
    assert pair.agents[2].counters()["nat_keepalives"] == 2 * sent
    assert pair.agents[1].counters()["nat_keepalives"] == 0


def generations(view: LocalView) -> GenerationState:
    return GenerationState(peers={p.name: PeerGenerations(
        public_key=p.node.public_key, out=0, out_since=0.0, floor=0, in_base=0)
        for p in view.peers})


def test_forward_secrecy_nat_a_restarted_agent_sends_where_the_last_one_learned(
        pair: Pair, tmp_path: Path) -> None:
    one = pair.agents[1]
    pair.run(3.0)
    state = generations(pair.views[1])
    one.agreement.applied(one.agreement.claim(state, {}), pair.learned(1, state), state, {})
    assert state.peers["node2"].nat_ports == [23456, 24456]  # saved with the generations
    # node1's agent restarts: nothing learned in memory, node2's session is stale.
    one.close()
    fake = FakeVpp()
    fake.punt_socket = str(tmp_path / "vpp1.sock")
    again = pair.agents[1] = Secrecy(tmp_path / "agent1.sock", clock=lambda: pair.clock[0])
    again.on_vpp_met(fake, 2, restarted=False, view=pair.views[1])
    assert again.channel is not None and again.channel.endpoint(2) == (PUBLIC, NAT_T_PORT)
    path = pair.learned(1, state).peer("node2").path
    assert [path.dst_port(i) for i in (0, 1)] == [23456, 24456]  # not back to the record's
    assert again.channel.endpoint(2) == (PUBLIC, 23456)
    dropped = pair.nat.dropped
    pair.run(1.0)
    assert again.agreement.established(pair.views[1]) == {"node2"}  # its handshake got through
    assert pair.nat.dropped == dropped
    # Taken once: a later move back to the record's port is not undone by the file.
    assert again.nat.learn(2, PUBLIC, NAT_T_PORT) and again.nat.learn(2, PUBLIC, NAT_T_PORT, 1)
    assert pair.learned(1, state) is pair.views[1]
    again.agreement.applied(again.agreement.claim(state, {}), pair.views[1], state, {})
    assert state.peers["node2"].nat_ports == []


def test_forward_secrecy_nat_one_shot_up_sends_to_the_saved_port(pair: Pair,
                                                                 tmp_path: Path) -> None:
    """`up --watch` runs a one-shot `up` before its agent starts, and `vppmesh rekey` is
    one: neither has a channel, so both take the port an agent saved."""
    from vppmesh.agent.node import NodeOptions, up
    from vppmesh.config import dump_mesh
    from vppmesh.keying.epochs import GenerationStore
    from vppmesh.keying.keys import private_key_b64, write_secret_file

    mesh_file, key = tmp_path / "mesh.yaml", tmp_path / "node1.key"
    mesh_file.write_text(dump_mesh(pair.mesh))
    write_secret_file(key, private_key_b64(pair.views[1].secrets.private_key))
    options = NodeOptions(mesh_file=mesh_file, node="node1", private_key=key,
                          host_link="none", workers=0, state_dir=tmp_path / "state")
    vpp = FakeVpp.with_uplink(pair.mesh.node("node1").primary)

    def outbound_ports() -> set[int]:
        return {sa["entry"]["udp_dst_port"] for sa_id, sa in vpp.sas.items()
                if sa_id & SA_DIRECTION_BIT and sa_peer(sa_id) == 2}

    up(options, api=vpp, agreement=NoAgreement(options.clock))
    assert outbound_ports() == {NAT_T_PORT}  # nothing learned yet: the record's port
    store = GenerationStore(tmp_path / "state", "node1")
    state = store.load()
    state.peers["node2"].nat_ports = [23456, 24456]  # what node1's agent learned
    store.save(state)
    generation = state.peers["node2"].out
    result = up(options, api=vpp, agreement=NoAgreement(options.clock))
    assert outbound_ports() == {23456, 24456}
    # The SA's encapsulation changed, so its key is not reused: a new generation.
    assert store.load().peers["node2"].out == generation + 1, result.notes
    up(options, api=vpp, agreement=NoAgreement(options.clock))
    assert outbound_ports() == {23456, 24456}
    assert store.load().peers["node2"].out == generation + 1


def test_forward_secrecy_nat_flow_probe_is_reported_and_moves_nothing() -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from vppmesh.channel import session as s
    from vppmesh.channel.noise import public_bytes
    from vppmesh.keying.keys import NodeSecrets

    keys = {1: X25519PrivateKey.generate(), 2: X25519PrivateKey.generate()}
    where = {1: ("192.0.2.1", NAT_T_PORT), 2: (PUBLIC, 23456)}
    node = {n: s.Channel(n, NodeSecrets(keys[n], bytes(32)), [s.PeerConfig(
        3 - n, public_bytes(keys[3 - n]), where[3 - n])], boot_id=n) for n in (1, 2)}
    assert node[2].probe(1000.0, 1, 1) is None  # no session yet
    ((_, init),) = node[2].tick(1000.0).datagrams
    ((_, response), *_) = node[1].receive(1000.0, where[2], init).datagrams
    ((_, confirmation),) = node[2].receive(1000.0, where[1], response).datagrams
    node[1].receive(1000.0, where[2], confirmation)
    probe = node[2].probe(1001.0, 1, 1)
    assert probe is not None
    out = node[1].receive(1001.0, (PUBLIC, 24456), probe)
    assert out.events == [s.FlowSeen(2, 1, (PUBLIC, 24456))] and not out.datagrams
    assert node[1].endpoint(2) == where[2]  # the channel stays on tunnel 0's flow
    assert node[1].receive(1001.0, (PUBLIC, 24456), probe).events == []  # replayed
    assert node[1].drops[m.Drop.REPLAY] == 1


# ---- a NAT's mappings lost under traffic ---------------------------------------------------
def sa_counts(peer: int, sent: int, received: int, tunnels: int = 2,
              ) -> tuple[dict[int, ipsec.SaState], dict[int, int]]:
    """One generation's SAs towards and from `peer` as a run reads them (by SA id), and
    their stats segment counts (by stat index): `sent` on the outbound SAs of tunnel 0
    (the others idle), `received` on tunnel 1's inbound SA (the pair's traffic need not
    come back on the tunnel it left on)."""
    sas, packets = {}, {}
    for tunnel in range(tunnels):
        for direction in ("out", "in"):
            sa_id = sa_id_for(direction, peer, tunnel, 0, agreed=True)
            spec = SaSpec(sa_id=sa_id, spi=1000 + sa_id % 1000, key=SecretBytes(bytes(32)),
                          salt=1, anti_replay_window=1024)
            index = len(sas)
            sas[sa_id] = ipsec.SaState(spec=spec, flags=0, crypto_algorithm=0,
                                       thread_index=0, seq_outbound=0, last_seq_inbound=0,
                                       stat_index=index)
            packets[index] = (sent if tunnel == 0 else 0) if direction == "out" else \
                (received if tunnel == 1 else 0)
    return sas, packets


def test_forward_secrecy_nat_lost_mappings_are_probed_within_one_poll(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """node2's NAT forgets its mappings under two-way traffic (a router's conntrack
    flushed): node2's ESP leaves from new ports, node1's goes to the dead ones. node2's
    next poll sees its outbound SAs counting and its inbound ones not, and probes every
    tunnel's flow at once: node1 learns both new ports then, not at the next keepalive."""
    caplog.set_level(logging.INFO, logger="vppmesh")
    one, two = pair.agents[1], pair.agents[2]
    pair.run(3.0)
    assert one.nat.learned == {2: {0: 23456, 1: 24456}}
    sent = received = 1000

    def poll(node: int, out: int, back: int, peer: int) -> list[int]:
        pair.clock[0] += 2.0  # the agent's poll
        probed = pair.agents[node].nat.watch_flows(*sa_counts(peer, out, back))
        pair.relay()
        one.service()
        return probed

    # Two-way traffic: nothing but the ESP.
    for _ in range(3):
        sent, received = sent + 200, received + 200
        assert poll(2, sent, received, 1) == []
    assert two.counters()["nat_probes"] == 0
    pair.nat.mapped = 27001  # the mappings are gone: node2's next packets get new ports
    before = len(pair.nat.delivered)
    # The control: the channel alone, over a poll, tells node1 nothing (its keepalive is
    # KEEPALIVE_AFTER away, tunnel 1's probe NAT_KEEPALIVE_INTERVAL).
    pair.run(2.0)
    assert one.nat.learned == {2: {0: 23456, 1: 24456}}
    sent += 200  # node2 sends; node1's replies die at the NAT
    assert poll(2, sent, received, 1) == [1]
    assert one.nat.learned == {2: {0: 27001, 1: 28001}}  # both tunnels' new mappings
    assert one.channel is not None and one.channel.endpoint(2) == (PUBLIC, 27001)
    probes = [d for d in pair.nat.delivered[before:] if d[0] == 2 and d[3] != t.NAT_KEEPALIVE]
    assert {d[1] for d in probes} == {(PUBLIC, 27001), (PUBLIC, 28001)}
    assert two.counters()["nat_probes"] == 1
    assert "NAT maps its ESP in UDP (tunnel 1) to 192.0.2.250 port 28001" in caplog.text
    # node1 follows; the traffic comes back: no more probes.
    sent, received = sent + 200, received + 200
    assert poll(2, sent, received, 1) == []
    # Idle (nothing either way): nothing.
    assert poll(2, sent, received, 1) == []
    # An early run (the channel asked for one) is too short a window to judge.
    sent += 10
    pair.clock[0] += 0.5
    assert two.nat.watch_flows(*sa_counts(1, sent, received)) == []
    # Traffic one-way by nature (node2 streams, nothing answers): probed at once and
    # then backing off to one round per NAT_KEEPALIVE_INTERVAL.
    rounds = []
    for _ in range(60):
        sent += 200
        if poll(2, sent, received, 1):
            rounds.append(pair.clock[0])
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert gaps == [2.0, 4.0, 6.0, 12.0, 20.0, 20.0, 20.0, 20.0], gaps  # 2 min of polls
    # node1 is not behind NAT: whatever its counts say, it sends nothing of the kind.
    quiet = len(pair.nat.delivered)
    for n in range(3):
        pair.clock[0] += 2.0
        assert one.nat.watch_flows(*sa_counts(2, 5000 + 200 * n, 0)) == []
    assert one.counters()["nat_probes"] == 0
    assert all(d[0] == 2 for d in pair.nat.delivered[quiet:])


def test_forward_secrecy_nat_a_run_probes_a_pair_whose_esp_goes_unanswered() -> None:
    """The agent's runs (fake VPPs, their stats segments, one fake clock): node2 is behind
    a NAT (one that keeps its address and port, so the fake underlay routes it), node1
    not. ESP from node2 that nothing answers over a poll makes node2's next run send its
    channel keepalive and tunnel 1's probe to node1; two-way traffic, idle pairs and
    node1's unanswered ESP send nothing of the kind."""
    agents = Agents(2, counters=True)
    try:
        mesh = agents.mesh
        two = mesh.nodes[1]
        behind = two.model_copy(update={"nat": NatSettings(public=two.primary.ip,
                                                           port=NAT_T_PORT)})
        agents.mesh = mesh.model_copy(update={"nodes": [mesh.nodes[0], behind]})
        agents.mesh_file.write_text(dump_mesh(agents.mesh))
        agents.until(agents.forward_secret, "the pair on agreed keys")

        def probes(name: str) -> int:
            return agents.secrecy[name].counters().get("nat_probes", 0)

        for _ in range(3):  # two-way traffic
            agents.step()
        assert [probes(n) for n in agents.names] == [0, 0]

        def one_way(sender: str) -> list[tuple[str, m.Message | None]]:
            """`sender`'s ESP over a poll, none back; then its run: the keepalives and probes
            its agent sent (acknowledgements aside)."""
            agents.traffic(sender, "node2" if sender == "node1" else "node1")
            agents.clock.now += 2.0
            agents.relay.pump()  # what the agents wrote before (a keepalive round's probes)
            before = len(agents.relay.relayed)
            agents.run(sender)
            agents.relay.pump()
            sent = [(r.sender, sent_message(agents, r)) for r in agents.relay.relayed[before:]]
            return [(who, what) for who, what in sent
                    if isinstance(what, m.Keepalive | m.FlowProbe)]

        for _ in range(2):  # the last traffic seen, then idle: nothing
            agents.clock.now += 2.0
            for name in agents.names:
                agents.run(name)
            agents.settle()
        assert [probes(n) for n in agents.names] == [0, 0]
        endpoint = agents.secrecy["node2"].endpoint
        assert endpoint is not None and 1 in endpoint.tunnel_usable
        endpoint.last_path[1] = TUNNEL  # node1 spoke last through the tunnel
        before = len(agents.relay.relayed)
        assert one_way("node2") == [("node2", m.Keepalive()), ("node2", m.FlowProbe(1))]
        assert probes("node2") == 1
        # ... yet the probe goes on the underlay: a datagram from the tunnel moves no
        # endpoint, so through the tunnel node1 would learn no new port.
        assert {r.path for r in agents.relay.relayed[before:]
                if r.sender == "node2" and isinstance(sent_message(agents, r), m.Keepalive)} \
            == {UNDERLAY}
        agents.clock.now += 2.0
        agents.run("node1")  # its baseline: node2's ESP came in
        agents.settle()
        assert one_way("node1") == []  # not behind NAT: nothing to probe
        assert probes("node1") == 0
    finally:
        agents.close()


def sent_message(agents: Agents, relayed: Relayed) -> m.Message | None:
    """The message in a channel datagram the relay carried (read with the receiver's
    session keys; None: not a transport message)."""
    channel = agents.secrecy[relayed.receiver].channel
    assert channel is not None
    parsed = m.parse_datagram(relayed.payload)
    if not isinstance(parsed, m.Transport):
        return None
    found = channel._sessions.get(parsed.receiver_index)
    assert found is not None
    plain = found[1].receive.decrypt_at(parsed.counter, parsed.header, parsed.ciphertext)
    return m.decode(plain)
