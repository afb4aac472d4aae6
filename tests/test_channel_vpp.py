"""The agents' channel through real VPPs: punt socket in, VPP's own address out.

Two testbed nodes (their VPPs and uplinks, no mesh): each registers VPP's punt socket for
the channel's UDP port (IPv4 and IPv6), and two channel endpoints in this process run a
full Noise handshake, a generation key exchange and acknowledgements through the two
VPPs over the underlay. The receiver sees the peer VPP's node address as the source: an
address only VPP holds. Hostile datagrams from a namespace on the underlay (replayed,
forged, from a node outside the mesh, truncated, oversized, a burst of thousands) are
dropped, counted, and change nothing; the channel still works right after.

Skipped with the reason when no VPP binary is found or when not root. Prefix vch-.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.channel import VppPair, register_punt, vpp_pair
from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PORT
from vppmesh.dataplane.vpp import punt
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import errors

pytestmark = [pytest.mark.vpp]
PREFIX = "vch-"
BASE = Path("/run/vppmesh-vch")
ATTACKER_NS = f"{PREFIX}evil"
BURST = 5000


@pytest.fixture(scope="module", params=["ipv4", "ipv6"])
def pair(request: pytest.FixtureRequest) -> Iterator[VppPair]:
    with vpp_helpers.testbed(nodes=2, tunnels=1, pods=0, prefix=PREFIX, base_dir=BASE,
                             join=False, underlay_family=request.param) as bed, \
            vpp_pair(bed) as built:
        yield built


def test_channel_vpp_punt_registrations_are_listed_and_removable(pair: VppPair) -> None:
    node = pair.bed.nodes[0]
    with VppClient(node.instance.api_socket).connect() as api:
        listed = {(r.port, r.ipv6, r.path) for r in punt.registrations(api)}
        client = str(node.dir / "channel.sock")
        assert {(PORT, False, client), (PORT, True, client)} <= listed
        api.call(punt.register(PORT + 1, False, Path(client)))
        assert (PORT + 1, False, client) in {
            (r.port, r.ipv6, r.path) for r in punt.registrations(api)}
        api.call(punt.deregister(PORT + 1, False))
        assert (PORT + 1, False, client) not in {
            (r.port, r.ipv6, r.path) for r in punt.registrations(api)}


def test_channel_vpp_handshake_keys_and_acks_through_vpp(pair: VppPair) -> None:
    # The first handshakes may have crossed while VPP resolved its neighbours (a few
    # datagrams dropped, then one session): from here on nothing may be dropped.
    dropped = {n: e.drops() for n, e in pair.endpoints.items()}
    # Both agents' events came through VPP, from the peer VPP's own address.
    assert s.HandshakeComplete(2) in pair.events[1] and s.HandshakeComplete(1) in pair.events[2]
    assert pair.channel(1).endpoint(2) == pair.addresses[2]
    assert pair.channel(2).endpoint(1) == pair.addresses[1]
    # A fresh handshake (the rekey) once ARP/ND is resolved: its round trip through VPP.
    before = pair.channel(1).stats["handshakes_completed"]
    now = time.time()
    pair.emit(1, pair.channel(1).tick(now + s.REKEY_AFTER))
    took = pair.pump(lambda: pair.channel(1).stats["handshakes_completed"] > before)
    print(json.dumps({"channel_handshake_rtt_ms": round(took * 1000, 2),
                      "family": pair.bed.spec.underlay_family}))
    assert took < 2.0
    # A generation's ephemeral key exchange, then the receiver's acknowledgements.
    pair.channel(2).accept_generations(1, 5, 3)  # node 2's window for node 1's keys
    pair.emit(1, pair.channel(1).start_generation(time.time(), 2, 5))
    pair.pump(lambda: pair.channel(1).generation_secret(2, 5, outbound=True) is not None)
    assert pair.channel(1).generation_secret(2, 5, outbound=True) == \
        pair.channel(2).generation_secret(1, 5, outbound=False)
    pair.emit(2, pair.channel(2).acknowledge(time.time(), 1, "installed", 5))
    pair.emit(2, pair.channel(2).acknowledge(time.time(), 1, "slid", 5))
    pair.pump(lambda: s.PeerAcked(2, "slid", 5) in pair.events[1])
    assert s.PeerAcked(2, "installed", 5) in pair.events[1]
    assert {n: e.drops() for n, e in pair.endpoints.items()} == dropped


# ---- hostile datagrams from the underlay ------------------------------------------------
SENDER = """
import json, socket, sys, time
spec = json.load(sys.stdin)
family = socket.AF_INET6 if ":" in spec["target"] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.bind((spec["source"], spec["port"]))
for hexdata, count in spec["datagrams"]:
    data = bytes.fromhex(hexdata)
    for i in range(count):
        sock.sendto(data, (spec["target"], spec["port"]))
        if i % 200 == 199:
            time.sleep(0.005)  # af_packet's ring, not the channel, would drop a raw blast
"""


def send_from_underlay(source: str, target: str, datagrams: list[tuple[bytes, int]]) -> None:
    spec = {"source": source, "target": target, "port": PORT,
            "datagrams": [(d.hex(), c) for d, c in datagrams]}
    subprocess.run(["ip", "netns", "exec", ATTACKER_NS, sys.executable, "-c", SENDER],
                   input=json.dumps(spec), text=True, check=True, timeout=120)


@pytest.fixture(scope="module")
def evil(pair: VppPair) -> Iterator[str]:
    """An attacker's namespace on the underlay switch, with an address of its own (anyone on
    the path between the nodes); its address."""
    bed = pair.bed
    node = bed.nodes[0].underlay[0]
    address = node.network.network_address + (0xEE if node.version == 4 else 0xEEEE)
    vpp_helpers.add_namespaces(ATTACKER_NS)
    try:
        in_ns(bed.underlay_ns, "ip", "link", "add", "ul-evil", "type", "veth", "peer", "name",
              "eth0", "netns", ATTACKER_NS)
        in_ns(bed.underlay_ns, "ip", "link", "set", "ul-evil", "master", "br0", "up")
        if node.version == 6:
            in_ns(ATTACKER_NS, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0")
        in_ns(ATTACKER_NS, "ip", "address", "add", f"{address}/{node.network.prefixlen}",
              "dev", "eth0", *(["nodad"] if node.version == 6 else []))
        in_ns(ATTACKER_NS, "ip", "link", "set", "eth0", "up")
        # Fill in UDP checksums in the kernel: VPP's af_packet gets a veth's frames as
        # sent, and ip4-local drops a partial checksum as bad.
        in_ns(ATTACKER_NS, "ethtool", "-K", "eth0", "tx", "off")
        yield str(address)
    finally:
        in_ns(bed.underlay_ns, "ip", "link", "del", "ul-evil", check=False)
        vpp_helpers.sh("ip", "netns", "del", ATTACKER_NS, check=False)


def test_channel_vpp_hostile_datagrams_are_dropped_and_counted(pair: VppPair, evil: str) -> None:
    target = pair.addresses[1][0]
    node1 = pair.endpoints[1]
    # Real datagrams of node 2 to node 1, recorded: a handshake init and a transport.
    recorded: list[bytes] = []
    original = pair.endpoints[2].transport.send

    def record(source: tuple[str, int], destination: tuple[str, int], payload: bytes) -> None:
        recorded.append(payload)
        original(source, destination, payload)

    pair.endpoints[2].transport.send = record  # type: ignore[method-assign]
    try:
        pair.emit(2, pair.channel(2).tick(time.time() + s.REKEY_AFTER + s.REKEY_RESPONDER_SLACK))
        before = pair.channel(1).stats["handshakes_completed"]
        pair.pump(lambda: pair.channel(1).stats["handshakes_completed"] > before)
        pair.emit(2, pair.channel(2).acknowledge(time.time(), 1, "slid", 6))
        pair.pump(lambda: s.PeerAcked(2, "slid", 6) in pair.events[1])
    finally:
        pair.endpoints[2].transport.send = original  # type: ignore[method-assign]
    init = next(d for d in recorded if d[1] == m.DatagramType.INIT)
    transport = next(d for d in recorded if d[1] == m.DatagramType.TRANSPORT)
    forged_init = init[:40] + bytes(len(init) - 40)
    # The genuine ciphertext under an unused counter: past the replay window, not the AEAD.
    parsed = m.parse_datagram(transport)
    assert isinstance(parsed, m.Transport)
    forged_transport = m.transport_header(2, 1, parsed.receiver_index, parsed.counter + 1000) \
        + parsed.ciphertext
    stranger = m.build_init(9, 1, 1, 1, bytes(m.NOISE_INIT_BYTES)) + bytes(m.MAC_BYTES)
    cases = [(init, 1), (transport, 1), (forged_init, 1), (forged_transport, 1),
             (stranger, 1), (init[:30], 1), (bytes(1200), 1)]
    expected = {m.Drop.REPLAY: 2, m.Drop.AUTH: 2, m.Drop.UNKNOWN_PEER: 1,
                m.Drop.TRUNCATED: 1, m.Drop.OVERSIZED: 1}
    node1.channel.drops.clear()
    node1.transport.drops.clear()
    events = len(pair.events[1])
    dh = node1.channel.stats["dh"]
    send_from_underlay(evil, target, cases)
    pair.pump(lambda: sum(node1.drops().values()) >= sum(expected.values()))
    assert node1.drops() == expected
    assert len(pair.events[1]) == events  # nothing happened
    assert node1.channel.stats["dh"] == dh

    # A burst of thousands of forged handshakes. VPP hands the agent what its socket's
    # queue takes (net.unix.max_dgram_qlen) and counts the rest as "Socket TX error", so a
    # flood queues no work for the agent; what arrives costs a MAC check each, no DH.
    def drain() -> None:
        """Node 1 alone takes what comes until nothing has come for 0.5 s."""
        quiet = time.monotonic()
        while time.monotonic() - quiet < 0.5:
            if select.select([node1], [], [], 0.05)[0]:
                pair.events[1] += node1.receive(time.time(), limit=BURST)
                quiet = time.monotonic()

    drain()  # nothing of before stays queued to be taken for the burst's
    events = len(pair.events[1])
    node1.channel.drops.clear()
    node1.transport.drops.clear()
    received = node1.transport.received
    punt_node = f"ip{6 if ':' in target else 4}-udp-punt-socket"
    with VppClient(pair.bed.nodes[0].instance.api_socket).connect() as api:
        before = errors(api)
        started = time.process_time()
        send_from_underlay(evil, target, [(forged_init, BURST)])
        drain()
        cpu = time.process_time() - started
        after = errors(api)
    handed = after[(punt_node, "Socket TX")] - before[(punt_node, "Socket TX")]
    refused = after[(punt_node, "Socket TX error")] - before[(punt_node, "Socket TX error")]
    delivered = node1.transport.received - received
    print(json.dumps({"channel_burst": BURST, "vpp_handed": handed, "vpp_refused": refused,
                      "agent_counted": sum(node1.drops().values()),
                      "agent_cpu_s": round(cpu, 3), "family": pair.bed.spec.underlay_family}))
    assert handed + refused >= BURST * 0.9  # what reached VPP (af_packet may lose some)
    assert delivered == handed > 0
    assert node1.drops() == {m.Drop.AUTH: delivered}
    assert node1.channel.stats["dh"] == dh
    assert len(pair.events[1]) == events
    # ... and the channel carries on: a message goes through right after.
    pair.emit(2, pair.channel(2).acknowledge(time.time(), 1, "sending", 6))
    pair.pump(lambda: s.PeerAcked(2, "sending", 6) in pair.events[1])


def test_channel_vpp_restart_reaches_the_peer(pair: VppPair) -> None:
    """Node 2's VPP restarts: its agent registers the punt socket again and says so; node
    1 hears it through the new VPP (the first packets of which find no neighbour yet)."""
    node2 = pair.bed.nodes[1]
    pair.bed.restart_vpp(node2)
    assert register_punt(node2, node2.dir / "channel.sock") == str(node2.instance.punt_socket)
    pair.emit(2, pair.channel(2).restarted(time.time(), 2000))
    took = pair.pump(lambda: s.PeerRestarted(2, 2000) in pair.events[1])
    print(json.dumps({"channel_restart_heard_s": round(took, 3),
                      "family": pair.bed.spec.underlay_family}))
    assert took < 5.0
    pair.emit(2, pair.channel(2).acknowledge(time.time(), 1, "slid", 7))
    pair.pump(lambda: s.PeerAcked(2, "slid", 7) in pair.events[1])
