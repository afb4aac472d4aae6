"""The punt socket's framing, the packets the agent hands VPP, and the punt requests."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel import transport as t
from vppmesh.channel.endpoint import PORT, ChannelEndpoint
from vppmesh.channel.messages import MAX_DATAGRAM, Drop
from vppmesh.channel.noise import public_bytes
from vppmesh.dataplane.startup import Instance, load_profile, render
from vppmesh.dataplane.vpp import punt
from vppmesh.keying.keys import NodeSecrets
from vppmesh.testing.fake_punt import punted


@pytest.mark.parametrize("source,destination", [
    (("192.0.2.11", 4501), ("192.0.2.21", 4501)),
    (("2001:db8:ee::11", 4501), ("2001:db8:ee::21", 4501)),
])
def test_channel_packets_round_trip_with_valid_checksums(source: t.Address,
                                                         destination: t.Address) -> None:
    payload = b"\x01\x03hello channel"
    packet = t.build_packet(source, destination, payload)
    parsed = t.parse_punted(punted(packet, sw_if_index=3))
    assert parsed == t.Punted(3, source, destination, payload)
    if packet[0] >> 4 == 4:
        assert t.checksum(packet[:20]) == 0  # header checksum verifies
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(packet) - 20)
        assert t.checksum(pseudo + packet[20:]) == 0
    else:
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(packet) - 40, 17)
        assert t.checksum(pseudo + packet[40:]) == 0


def test_channel_routed_descriptor_names_the_family() -> None:
    v4 = t.build_routed(("192.0.2.1", 1), ("192.0.2.2", 2), b"x", sw_if_index=5)
    v6 = t.build_routed(("2001:db8::1", 1), ("2001:db8::2", 2), b"x")
    assert t.PACKETDESC.unpack_from(v4) == (5, t.PUNT_IP4_ROUTED)
    assert t.PACKETDESC.unpack_from(v6) == (0, t.PUNT_IP6_ROUTED)
    with pytest.raises(ValueError, match="different families"):
        t.build_packet(("192.0.2.1", 1), ("2001:db8::2", 2), b"x")


def test_channel_punted_garbage_is_counted_not_raised() -> None:
    udp = t.build_packet(("192.0.2.1", 9), ("192.0.2.2", 9), b"abc")
    tcp = udp[:9] + b"\x06" + udp[10:]
    assert t.parse_punted(b"") is Drop.TRUNCATED
    assert t.parse_punted(punted(udp)[:30]) is Drop.TRUNCATED
    assert t.parse_punted(punted(tcp)) is Drop.MALFORMED
    assert t.parse_punted(punted(b"\x70" + udp[1:])) is Drop.MALFORMED
    big = t.build_packet(("192.0.2.1", 9), ("192.0.2.2", 9), bytes(MAX_DATAGRAM + 1))
    assert t.parse_punted(punted(big)) is Drop.OVERSIZED
    fragment = udp[:6] + b"\x20\x00" + udp[8:]
    assert t.parse_punted(punted(fragment)) is Drop.MALFORMED


@given(st.binary(max_size=200))
@settings(deadline=None)
def test_channel_parse_punted_never_raises(data: bytes) -> None:
    assert isinstance(t.parse_punted(data), (Drop, t.Punted))


def test_channel_transport_socket_reads_counts_and_writes(tmp_path: Path) -> None:
    vpp_side = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    vpp_side.bind(str(tmp_path / "vpp.sock"))
    with t.PuntTransport(tmp_path / "agent.sock", tmp_path / "vpp.sock") as agent:
        assert (tmp_path / "agent.sock").stat().st_mode & 0o077 == 0
        good = t.build_packet(("192.0.2.2", 4501), ("192.0.2.1", 4501), b"payload")
        for datagram in (punted(good), b"\x00" * 3, punted(good) + bytes(t.READ_BYTES)):
            vpp_side.sendto(datagram, str(tmp_path / "agent.sock"))
        got = agent.receive()
        assert [p.payload for p in got] == [b"payload"]
        assert agent.drops == {Drop.TRUNCATED: 1, Drop.OVERSIZED: 1}
        agent.send(("192.0.2.1", 4501), ("192.0.2.2", 4501), b"out")
        written = vpp_side.recv(4096)
        assert written == t.build_routed(("192.0.2.1", 4501), ("192.0.2.2", 4501), b"out")
        vpp_side.close()
        (tmp_path / "vpp.sock").unlink()
        agent.send(("192.0.2.1", 4501), ("192.0.2.2", 4501), b"lost")  # VPP gone
        assert agent.send_errors == 1 and agent.sent == 1
    assert not (tmp_path / "agent.sock").exists()


def test_channel_punt_requests() -> None:
    request = punt.register(4501, True, Path("/run/vpp/channel.sock"))
    assert request.name == "punt_socket_register"
    assert request.args == {"header_version": 1, "pathname": "/run/vpp/channel.sock",
                            "punt": {"type": 0, "punt": {"l4": {
                                "af": 1, "protocol": 17, "port": 4501}}}}
    assert punt.deregister(4501, False).args["punt"]["punt"]["l4"]["af"] == 0
    with pytest.raises(ValueError, match="longer than 107"):
        punt.register(4501, False, Path("/" + "x" * 120))


def test_channel_startup_conf_opens_the_punt_socket(tmp_path: Path) -> None:
    instance = Instance(name="n1", runtime_dir=tmp_path)
    text = render(load_profile("testbed"), instance)
    assert f"punt {{ socket {tmp_path / 'punt.sock'} }}" in text.splitlines()
    assert instance.punt_socket == tmp_path / "punt.sock"


def test_channel_endpoints_talk_through_a_relay_standing_in_for_vpp(tmp_path: Path) -> None:
    """Two endpoints whose VPPs are one relay: it takes what an agent writes to "its
    VPP's" socket and punts it, framed as VPP frames it, to the agent owning the
    destination address. The real VPPs do the same in test_channel_vpp."""
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    relay.bind(str(tmp_path / "vpp.sock"))
    relay.setblocking(False)
    keys = {1: X25519PrivateKey.generate(), 2: X25519PrivateKey.generate()}
    address = {1: "192.0.2.11", 2: "192.0.2.21"}
    endpoints = {}
    for n in (1, 2):
        peer = 3 - n
        channel = s.Channel(n, NodeSecrets(keys[n], bytes(32)),
                            [s.PeerConfig(peer, public_bytes(keys[peer]), (address[peer], PORT))],
                            boot_id=n)
        endpoints[n] = ChannelEndpoint(
            channel, t.PuntTransport(tmp_path / f"agent{n}.sock", tmp_path / "vpp.sock"),
            {4: address[n]})
    events: dict[int, list[s.Event]] = {1: [], 2: []}

    def relay_all() -> int:
        moved = 0
        while True:
            try:
                written = relay.recv(4096)
            except BlockingIOError:
                return moved
            packet = written[t.PACKETDESC.size:]
            destination = ".".join(str(b) for b in packet[16:20])
            owner = next(n for n, a in address.items() if a == destination)
            relay.sendto(punted(packet), str(tmp_path / f"agent{owner}.sock"))
            moved += 1

    events[1] += endpoints[1].tick(100.0)
    for _ in range(4):
        relay_all()
        for n in (1, 2):
            events[n] += endpoints[n].receive(100.0)
    assert s.HandshakeComplete(2) in events[1] and s.HandshakeComplete(1) in events[2]
    assert endpoints[1].channel.endpoint(2) == (address[2], PORT)  # the relayed source
    events[2] += endpoints[2].send(101.0, 1, m.WindowSlid(4))
    relay_all()
    events[1] += endpoints[1].receive(101.0)
    assert s.PeerAcked(2, "slid", 4) in events[1]
    # A destination of a family the node has no address of: counted, not sent.
    endpoints[1].local.pop(4)
    endpoints[1].send(102.0, 2, m.Keepalive())
    assert endpoints[1].channel.stats["no_local_address"] == 1 and relay_all() == 0
    assert not endpoints[1].drops() and not endpoints[2].drops()
    for endpoint in endpoints.values():
        endpoint.transport.close()
    relay.close()


def test_channel_socket_is_never_writable_by_others(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a loose umask (0: a unit or container that sets none), a local user who
    writes to the agent's socket between its bind and a chmod feeds it datagrams as
    VPP. The socket is created 0600: its mode as bind leaves it is checked."""
    import os
    import stat

    seen: list[int] = []
    bind = socket.socket.bind

    def spying_bind(sock: socket.socket, address: str) -> None:
        bind(sock, address)
        if sock.family == socket.AF_UNIX:
            seen.append(stat.S_IMODE(os.stat(address).st_mode))

    monkeypatch.setattr(socket.socket, "bind", spying_bind)
    loose = os.umask(0)
    try:
        with t.PuntTransport(tmp_path / "agent.sock", tmp_path / "vpp.sock"):
            assert stat.S_IMODE((tmp_path / "agent.sock").stat().st_mode) == 0o600
        assert os.umask(loose) == 0  # the process's own umask is given back
    finally:
        os.umask(loose)
    assert seen == [0o600]


def test_the_tunnel_path_is_tried_only_after_the_path_that_worked_went_unanswered() -> None:
    """A peer heard on the underlay gets the next messages on the underlay, even with its
    tunnel usable: one unanswered datagram is usually the first one VPP dropped while it
    resolved the next hop, and a message lost into the tunnel is only repeated 15 s later
    (on three real VPPs a receiver missed its sender's "sending" that way and never slid).
    From SWITCH_AFTER unanswered messages on, the paths alternate; hearing the peer again
    starts over, on the path it spoke on."""
    from vppmesh.channel.endpoint import SWITCH_AFTER, TUNNEL, UNDERLAY, ChannelEndpoint

    endpoint = ChannelEndpoint(None, None, {4: "192.0.2.1"})  # type: ignore[arg-type]
    endpoint.tunnel_source, endpoint.tunnel_sw_if_index = "198.18.1.255", 3
    endpoint.tunnel_peers, endpoint.tunnel_usable = {2: "198.18.2.255"}, frozenset({2})
    endpoint._heard(2, UNDERLAY)
    paths = [endpoint.path(2) for _ in range(SWITCH_AFTER + 4)]
    assert paths[:SWITCH_AFTER] == [UNDERLAY] * SWITCH_AFTER
    assert paths[SWITCH_AFTER:] == [TUNNEL, UNDERLAY, TUNNEL, UNDERLAY]
    endpoint._heard(2, TUNNEL)  # answered through the tunnel: answers go back that way
    assert [endpoint.path(2) for _ in range(SWITCH_AFTER + 1)] == \
        [TUNNEL] * SWITCH_AFTER + [UNDERLAY]
    endpoint.tunnel_usable = frozenset()  # no agreed keys both ways: the underlay only
    assert {endpoint.path(2) for _ in range(6)} == {UNDERLAY}
