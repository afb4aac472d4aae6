"""Underlays beyond one IPv4 LAN: IPv6 and mixed meshes, ESP in UDP for nodes behind NAT.

Pure parts only (MTU, validation, plan, verify's classification, the SA requests and the
reconcile against the fake VPP); the real-VPP checks are in test_vpp_underlays.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

import dpkt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from vppmesh.config import Mesh, MeshSettings, Node, dump_mesh, parse_mesh
from vppmesh.dataplane.overhead import encrypted_size, max_overhead, pod_mtu_for
from vppmesh.dataplane.plan import HostOptions, plan
from vppmesh.dataplane.reconcile import reconcile
from vppmesh.dataplane.state import SA_DIRECTION_BIT, SaSpec
from vppmesh.dataplane.view import build_view
from vppmesh.dataplane.vpp import ipsec
from vppmesh.errors import ConfigError
from vppmesh.host.underlay import pair_family, path
from vppmesh.keying.keys import NodeSecrets, public_key_b64
from vppmesh.ops.verify import classify_capture
from vppmesh.testing.fake_vpp import FakeVpp

MAC = b"\x02\xfe\x00\x00\x00\x01"


def node(i: int, underlay: list[str], **extra: Any) -> tuple[Node, NodeSecrets]:
    key = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"u%d" % i).digest())
    return Node(name=f"n{i}", node_number=i, underlay=underlay,  # type: ignore[arg-type]
                pod_cidr=ipaddress.IPv4Network(f"198.18.{i}.0/24"),
                public_key=public_key_b64(key), **extra), NodeSecrets(private_key=key)


def mesh_of(*nodes: tuple[Node, NodeSecrets], tunnels: int = 1,
            **settings: Any) -> tuple[Mesh, dict[str, NodeSecrets]]:
    mesh = Mesh(settings=MeshSettings(tunnels_per_peer=tunnels, **settings),
                nodes=[n for n, _ in nodes])
    return mesh, {n.name: s for n, s in nodes}


def v6(i: int, count: int = 1) -> list[str]:
    return [f"2001:db8::{i}:{t + 1}/64" for t in range(count)]


def v4(i: int, count: int = 1) -> list[str]:
    return [f"192.0.2.{i * 10 + t + 1}/24" for t in range(count)]


# ---- MTU ------------------------------------------------------------------------------

@pytest.mark.parametrize(("ipv6", "udp", "overhead", "mtu"), [
    (False, False, 57, 1440),  # 20 IPv4 + 8 ESP + 8 IV + 16 ICV + 2 trailer + 3 padding
    (True, False, 77, 1416),   # IPv6: 20 more
    (False, True, 65, 1432),   # ESP in UDP: 8 more
    (True, True, 85, 1408),
])
def test_mtu_per_family_ipv6_and_with_udp_encapsulation_nat(ipv6: bool, udp: bool,
                                                             overhead: int, mtu: int) -> None:
    assert max_overhead(ipv6_underlay=ipv6, udp_encap=udp) == overhead
    assert pod_mtu_for(1500, ipv6_underlay=ipv6, udp_encap=udp) == mtu
    assert encrypted_size(mtu, ipv6_underlay=ipv6, udp_encap=udp) <= 1500
    # The overhead is exact but for the 0-3 padding bytes: 4 bytes more never fit.
    assert encrypted_size(1500 - overhead + 4, ipv6_underlay=ipv6, udp_encap=udp) > 1500
    assert encrypted_size(100, ipv6_underlay=ipv6, udp_encap=True) - \
        encrypted_size(100, ipv6_underlay=ipv6, udp_encap=False) == 8


def test_mesh_mtu_is_the_worst_pair_ipv6_and_nat() -> None:
    only4, _ = mesh_of(node(1, v4(1)), node(2, v4(2)))
    only6, _ = mesh_of(node(1, v6(1)), node(2, v6(2)))
    nat4, _ = mesh_of(node(1, v4(1), nat={"public": "203.0.113.7"}), node(2, v4(2)))
    udp6, _ = mesh_of(node(1, v6(1), udp_encap=True), node(2, v6(2)))
    assert [m.pod_mtu() for m in (only4, only6, nat4, udp6)] == [1440, 1416, 1432, 1408]
    # A dual-stack node talks IPv4 to IPv4 nodes: no IPv6 pair, no IPv6 overhead.
    mixed, _ = mesh_of(node(1, [*v4(1), *v6(1)]), node(2, v4(2)), node(3, v4(3)))
    assert mixed.pod_mtu() == 1440
    # One node alone behind NAT still costs its pairs 8 bytes; the UDP node alone: none.
    lone, _ = mesh_of(node(1, v4(1), udp_encap=True))
    assert lone.pod_mtu() == 1440


def test_pod_mtu_above_the_ipv6_udp_ceiling_names_the_overhead() -> None:
    with pytest.raises(ValueError, match=r"overhead of a pair of this mesh .* is 85 bytes"):
        mesh_of(node(1, v6(1), udp_encap=True), node(2, v6(2)), pod_mtu=1416)
    mesh, _ = mesh_of(node(1, v6(1), udp_encap=True), node(2, v6(2)), pod_mtu=1408)
    assert mesh.pod_mtu() == 1408


# ---- families -------------------------------------------------------------------------

def test_ipv6_pair_family_is_symmetric_and_prefers_the_shared_primary_family() -> None:
    a, _ = node(1, [*v4(1), *v6(1)])
    b, _ = node(2, [*v6(2), *v4(2)])
    c, _ = node(3, v4(3))
    d, _ = node(4, v6(4))
    e, _ = node(5, [*v4(5), *v6(5)])
    assert pair_family(a, c) == pair_family(c, a) == 4
    assert pair_family(a, d) == pair_family(d, a) == 6
    assert pair_family(a, e) == 4  # both primaries IPv4
    assert pair_family(a, b) == pair_family(b, a) == 6  # primaries disagree: IPv6
    assert pair_family(c, d) is None


def test_ipv6_mixed_mesh_needs_a_shared_family_per_pair() -> None:
    mesh, _ = mesh_of(node(1, [*v4(1), *v6(1)]), node(2, v4(2)), node(3, [*v6(3), *v4(3)]))
    assert mesh.pod_mtu() == 1416  # n1-n3 is an IPv6 pair
    with pytest.raises(ValueError, match=r"nodes\[n2\] \(IPv4 underlay\) and nodes\[n3\] "
                                         r"\(IPv6 underlay\) share no underlay family"):
        mesh_of(node(2, v4(2)), node(3, v6(3)))


def test_ipv6_tunnel_count_counts_addresses_of_the_pair_family() -> None:
    # Two IPv4 addresses do not make up for the single IPv6 one an IPv6 pair needs.
    with pytest.raises(ValueError, match=r"nodes\[n1\].underlay has 1 IPv6 address\(es\) "
                                         r"but settings.tunnels_per_peer=2"):
        mesh_of(node(1, [*v6(1, 1), *v4(1, 2)]), node(2, v6(2, 2)), tunnels=2)


def test_ipv6_a_node_alone_still_needs_its_tunnels_addresses() -> None:
    with pytest.raises(ValueError, match=r"nodes\[n1\].underlay has 1 IPv6 address"):
        mesh_of(node(1, v6(1, 1)), tunnels=2)


def test_ipv6_only_plan_tunnels_run_between_ipv6_addresses() -> None:
    mesh, secrets = mesh_of(node(1, v6(1, 2)), node(2, v6(2, 2)), node(3, v6(3, 2)),
                            tunnels=2)
    desired = plan(build_view(mesh, "n1", secrets["n1"]), host=HostOptions(kind="none"))
    assert desired.mtu == 1416
    ends = {(str(t.src), str(t.dst)) for t in desired.tunnels}
    assert ends == {("2001:db8::1:1", "2001:db8::2:1"), ("2001:db8::1:2", "2001:db8::2:2"),
                    ("2001:db8::1:1", "2001:db8::3:1"), ("2001:db8::1:2", "2001:db8::3:2")}
    assert not any(sa.udp_encap for sa in desired.sas)


def test_ipv6_mixed_plan_picks_the_family_per_peer() -> None:
    mesh, secrets = mesh_of(node(1, [*v4(1), *v6(1)]), node(2, v4(2)),
                            node(3, [*v6(3), *v4(3)]), node(4, [*v6(4), *v4(4)]))
    desired = plan(build_view(mesh, "n4", secrets["n4"]), host=HostOptions(kind="none"))
    by_peer = {t.peer_number: (str(t.src), str(t.dst)) for t in desired.tunnels}
    assert by_peer == {1: ("2001:db8::4:1", "2001:db8::1:1"), 2: ("192.0.2.41", "192.0.2.21"),
                       3: ("2001:db8::4:1", "2001:db8::3:1")}


def test_ipv6_mesh_file_round_trip() -> None:
    mesh, _ = mesh_of(node(1, v6(1)), node(2, v6(2), nat={"public": "2001:db8:ffff::2",
                                                        "port": 14500}))
    assert parse_mesh(yaml.safe_load(dump_mesh(mesh))) == mesh


# ---- ESP in UDP / NAT ------------------------------------------------------------------

def nat_mesh() -> tuple[Mesh, dict[str, NodeSecrets]]:
    return mesh_of(node(1, v4(1, 2)), node(2, v4(2, 2)),
                   node(3, ["10.9.0.3/24", "10.9.0.4/24"],
                        nat={"public": "203.0.113.7", "port": 14500}), tunnels=2)


def test_nat_peers_send_to_the_public_address_and_port() -> None:
    mesh, secrets = nat_mesh()
    desired = plan(build_view(mesh, "n1", secrets["n1"]), host=HostOptions(kind="none"))
    to_nat = [t for t in desired.tunnels if t.peer_number == 3]
    assert [(str(t.src), str(t.dst)) for t in to_nat] == [("192.0.2.11", "203.0.113.7"),
                                                         ("192.0.2.12", "203.0.113.7")]
    sas = {sa.sa_id: sa for sa in desired.sas}
    for t in to_nat:
        out = sas[t.sa_out]
        assert (out.udp_encap, out.udp_src_port, out.udp_dst_port) == (True, 4500, 14500)
        # Inbound SAs carry no flag: VPP takes UDP/4500 to ESP input regardless.
        assert not any(sas[i].udp_encap for i in t.sa_in)
    to_plain = [t for t in desired.tunnels if t.peer_number == 2]
    assert not any(sas[t.sa_out].udp_encap or sas[t.sa_in[0]].udp_encap for t in to_plain)
    assert desired.mtu == 1432


def test_nat_node_sends_from_its_private_addresses_in_udp_to_4500() -> None:
    mesh, secrets = nat_mesh()
    desired = plan(build_view(mesh, "n3", secrets["n3"]), host=HostOptions(kind="none"))
    # Every tunnel starts at the address the NAT forwards to: flows from a second inside
    # address would meet the first ones on the NAT's one public address and port.
    assert {(str(t.src), str(t.dst)) for t in desired.tunnels if t.peer_number == 1} == \
        {("10.9.0.3", "192.0.2.11"), ("10.9.0.3", "192.0.2.12")}
    outs = [sa for sa in desired.sas if sa.direction == "out"]
    assert outs and all((sa.udp_encap, sa.udp_src_port, sa.udp_dst_port) == (True, 4500, 4500)
                        for sa in outs)


def test_nat_both_ends_agree_on_keys_and_spis() -> None:
    mesh, secrets = nat_mesh()
    one = plan(build_view(mesh, "n1", secrets["n1"]), host=HostOptions(kind="none"))
    three = plan(build_view(mesh, "n3", secrets["n3"]), host=HostOptions(kind="none"))
    out_1 = {(sa.spi, sa.key.get_secret_value()) for sa in one.sas
             if sa.direction == "out" and sa.peer_number == 3}
    in_3 = {(sa.spi, sa.key.get_secret_value()) for sa in three.sas
            if sa.direction == "in" and sa.peer_number == 1}
    assert out_1 and out_1 == in_3


def test_nat_node_needs_one_address_and_two_nat_nodes_need_one_tunnel() -> None:
    mesh, secrets = mesh_of(node(1, v4(1, 2)), node(2, v4(2, 2)),
                            node(3, ["10.9.0.3/24"], nat={"public": "203.0.113.7"}),
                            tunnels=2)
    desired = plan(build_view(mesh, "n3", secrets["n3"]), host=HostOptions(kind="none"))
    assert len({(t.src, t.dst) for t in desired.tunnels}) == 4
    with pytest.raises(ValueError, match=r"nodes n2 and n3 are both behind NAT, which needs "
                                         r"settings\.tunnels_per_peer=1"):
        mesh_of(node(1, v4(1, 2)), node(2, v4(2, 2), nat={"public": "203.0.113.8"}),
                node(3, ["10.9.0.3/24"], nat={"public": "203.0.113.7"}), tunnels=2)
    one, _ = mesh_of(node(1, v4(1)), node(2, v4(2), nat={"public": "203.0.113.8"}),
                     node(3, ["10.9.0.3/24"], nat={"public": "203.0.113.7"}))
    assert len(one.nodes) == 3


def test_udp_encap_without_nat_keeps_the_peer_addresses() -> None:
    mesh, _ = mesh_of(node(1, v4(1)), node(2, v4(2), udp_encap=True))
    pair = path(mesh.nodes[0], mesh.nodes[1], 1)
    assert (pair.endpoints, pair.udp_encap, pair.udp_dst_port) == (
        ((ipaddress.ip_address("192.0.2.11"), ipaddress.ip_address("192.0.2.21")),), True,
        4500)
    assert pair.overhead == 65


def test_nat_sa_request_sets_vpps_udp_encap_flag_and_ports() -> None:
    mesh, secrets = nat_mesh()
    desired = plan(build_view(mesh, "n1", secrets["n1"]), host=HostOptions(kind="none"))
    udp = next(sa for sa in desired.sas if sa.direction == "out" and sa.peer_number == 3)
    plain = next(sa for sa in desired.sas if sa.direction == "out" and sa.peer_number == 2)
    entry = ipsec.add_sa(udp).args["entry"]
    assert entry["flags"] == ipsec.FLAG_USE_ESN | ipsec.FLAG_USE_ANTI_REPLAY | 0x10
    assert (entry["udp_src_port"], entry["udp_dst_port"]) == (4500, 14500)
    assert ipsec.add_sa(plain).args["entry"]["flags"] == ipsec.SA_FLAGS


def test_nat_switching_encapsulation_moves_the_outbound_key_forward(tmp_path: Path) -> None:
    """Turning ESP in UDP on for a node needs new outbound SAs: the same key again would
    restart the sequence numbers (GCM nonces), so both ends step to a new generation by
    themselves; the inbound SAs stay as they are (their anti-replay windows too)."""
    from vppmesh.testing.agents import Pair

    pair = Pair(tmp_path)
    for name in ("node1", "node2"):
        pair.run(name, now=0)
    pair.traffic("node1", "node2")
    pair.traffic("node2", "node1")
    inbound_before = {i: dict(sa["entry"]) for i, sa in pair.vpp["node1"].sas.items()
                      if not i & SA_DIRECTION_BIT}
    assert not any(sa["entry"]["flags"] & 0x10 for sa in pair.vpp["node1"].sas.values())

    data = yaml.safe_load(pair.mesh_file.read_text())
    data["nodes"][1]["nat"] = {"public": "203.0.113.7", "port": 14500}
    pair.mesh_file.write_text(yaml.safe_dump(data))
    first = pair.run("node1", now=1)
    assert any("outbound generation 0 -> 1 (UDP encapsulation changed)" in n
               for n in first.notes), first.notes
    assert any("esp-in-udp 4500->14500" in str(c) for c in first.changes)
    second = pair.run("node2", now=1)
    assert any("(UDP encapsulation changed)" in n for n in second.notes), second.notes
    for name, port in (("node1", 14500), ("node2", 4500)):
        out = [sa["entry"] for i, sa in pair.vpp[name].sas.items() if i & SA_DIRECTION_BIT]
        assert out and all(e["flags"] & 0x10 and e["udp_dst_port"] == port for e in out)
        assert pair.out_generation(name) == {1}
    assert {i: dict(sa["entry"]) for i, sa in pair.vpp["node1"].sas.items()
            if not i & SA_DIRECTION_BIT and i in inbound_before} == inbound_before
    assert pair.link_ok("node1", "node2") and pair.link_ok("node2", "node1")
    assert {str(t["dst"]) for t in pair.vpp["node1"].tunnels.values()} == {"203.0.113.7"}
    # And the next run changes nothing: the dump reads the flag and ports back.
    assert pair.run("node1", now=2).changes == []


def test_sa_content_includes_udp_ports() -> None:
    base = SaSpec(sa_id=1, spi=2, key=b"k" * 32, salt=3,  # type: ignore[arg-type]
                  anti_replay_window=64, udp_encap=True)
    assert base.same_content(base.model_copy())
    assert not base.same_content(base.model_copy(update={"udp_dst_port": 14500}))
    assert not base.same_content(base.model_copy(update={"udp_encap": False}))


# ---- verify's capture -------------------------------------------------------------------

def eth(ip: dpkt.Packet, ipv6: bool) -> bytes:
    kind = dpkt.ethernet.ETH_TYPE_IP6 if ipv6 else dpkt.ethernet.ETH_TYPE_IP
    return bytes(dpkt.ethernet.Ethernet(src=MAC, dst=MAC, type=kind, data=ip))


def ip6(src: str, dst: str, nxt: int, payload: bytes) -> bytes:
    pkt = dpkt.ip6.IP6(src=ipaddress.IPv6Address(src).packed,
                       dst=ipaddress.IPv6Address(dst).packed, nxt=nxt, hlim=64, data=payload,
                       plen=len(payload))
    pkt.extension_hdrs = {}
    return eth(pkt, True)


def ip4(src: str, dst: str, p: int, payload: bytes) -> bytes:
    pkt = dpkt.ip.IP(src=ipaddress.IPv4Address(src).packed,
                     dst=ipaddress.IPv4Address(dst).packed, p=p, data=payload)
    pkt.len = len(bytes(pkt))
    return eth(pkt, False)


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return bytes(dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload))


def test_ipv6_capture_counts_esp_and_catches_ipip_in_clear() -> None:
    mesh, _ = mesh_of(node(1, v6(1)), node(2, v6(2)))
    a, b = "2001:db8::1:1", "2001:db8::2:1"
    inner = bytes(dpkt.ip.IP(src=ipaddress.IPv4Address("198.18.1.10").packed,
                             dst=ipaddress.IPv4Address("198.18.2.10").packed, p=17,
                             data=b"x" * 8))
    esp = b"\x01\x00\x01\x00" + b"\x00" * 40
    # MLD behind a hop-by-hop header: control traffic, neither ESP nor an offender.
    hop_by_hop = bytes([58, 0, 5, 2, 0, 0, 1, 0])
    mld = hop_by_hop + bytes(dpkt.icmp6.ICMP6(type=143, code=0, data=b"\0" * 4))
    ok = classify_capture([ip6(a, b, 50, esp), ip6(b, a, 50, esp),
                           ip6("fe80::1", "ff02::16", 0, mld)], mesh, "eth0")
    assert (ok.esp_between_nodes, ok.other, ok.ok) == (2, 1, True)
    bad = classify_capture([ip6(a, b, 50, esp), ip6(a, b, 4, inner),
                            ip6("2001:db8::99", b, 50, esp)], mesh, "eth0")
    assert (bad.esp_between_nodes, bad.ipip_in_clear, bad.esp_elsewhere, bad.ok) == \
        (1, 1, 1, False)
    assert "(inner 198.18.1.10 > 198.18.2.10)" in bad.offenders[0]


def test_nat_capture_counts_esp_in_udp_to_the_public_address() -> None:
    mesh, _ = nat_mesh()
    esp = b"\x01\x00\x01\x00" + b"\x00" * 40
    frames = [
        ip4("192.0.2.11", "203.0.113.7", 17, udp(4500, 14500, esp)),  # to the NAT's port
        ip4("203.0.113.7", "192.0.2.11", 17, udp(14500, 4500, esp)),  # back through it
        ip4("10.9.0.3", "192.0.2.11", 17, udp(4500, 4500, esp)),      # inside the NAT
        ip4("192.0.2.11", "203.0.113.7", 17, udp(4500, 14500, b"\xff")),  # NAT keepalive
        ip4("192.0.2.11", "203.0.113.7", 17, udp(4500, 14500, b"\0" * 40)),  # IKE
        ip4("192.0.2.11", "192.0.2.21", 17, udp(5000, 5001, esp)),    # other UDP
    ]
    verdict = classify_capture(frames, mesh, "eth0")
    assert (verdict.esp_between_nodes, verdict.esp_in_udp, verdict.other) == (3, 3, 3)
    assert verdict.ok


# ---- testbed shapes ---------------------------------------------------------------------

def test_ipv6_testbed_nodes_get_ipv6_underlays_and_a_valid_mesh() -> None:
    from vppmesh.lab.testbed import NodeHandle, TestbedSpec

    spec = TestbedSpec(nodes=3, tunnels=2, underlay_family="ipv6")
    handles = [NodeHandle(i, spec) for i in (1, 2, 3)]
    assert [str(a) for a in handles[0].underlay] == ["2001:db8:ee::11/64", "2001:db8:ee::12/64"]
    assert not any(h.behind_nat for h in handles)


def test_nat_testbed_puts_the_last_node_behind_the_router() -> None:
    from vppmesh.lab.testbed import (
        NAT_STATIC_PORT,
        NodeHandle,
        Testbed,
        TestbedError,
        TestbedSpec,
        nat_ruleset,
    )

    spec = TestbedSpec(nodes=3, tunnels=1, nat="static")
    last = NodeHandle(3, spec)
    assert last.behind_nat and not NodeHandle(2, spec).behind_nat
    assert [str(a) for a in last.underlay] == ["198.51.100.31/24"]
    assert last.nat is not None and (str(last.nat.public), last.nat.port) == \
        ("192.0.2.250", NAT_STATIC_PORT)
    rules = nat_ruleset("static", last.underlay[0].ip, NAT_STATIC_PORT)
    assert "udp dport 14500 dnat to 198.51.100.31:4500" in rules
    assert "udp sport 4500 snat to 192.0.2.250:14500" in rules
    masq = nat_ruleset("masquerade", last.underlay[0].ip, 4500)
    assert "dnat to" not in masq and "snat to" not in masq and "masquerade" in masq
    with pytest.raises(TestbedError, match="NAT router is IPv4 only"):
        Testbed(TestbedSpec(nat="static", underlay_family="ipv6"))


# ---- the datastore: a node publishes its public address ---------------------------------

def test_nat_public_option_parses_address_and_port() -> None:
    from vppmesh.agent.datastore.membership import parse_local, parse_nat

    assert parse_nat(None) is None
    nat = parse_nat("203.0.113.7:14500")
    assert nat is not None and (str(nat.public), nat.port) == ("203.0.113.7", 14500)
    nat = parse_nat("203.0.113.7")
    assert nat is not None and nat.port == 4500
    nat = parse_nat("[2001:db8::7]:4501")
    assert nat is not None and (str(nat.public), nat.port) == ("2001:db8::7", 4501)
    nat = parse_nat("2001:db8::7")
    assert nat is not None and (str(nat.public), nat.port) == ("2001:db8::7", 4500)
    for bad in ("203.0.113.7:0", "203.0.113.7:http", "nat.example", "[2001:db8::7]:99999"):
        with pytest.raises(ConfigError, match="--nat-public"):
            parse_nat(bad)
    local = parse_local(["10.9.0.3/24"], "198.18.3.0/24", None, None, "203.0.113.7:14500")
    assert local.nat == parse_nat("203.0.113.7:14500") and not local.udp_encap


def test_nat_record_round_trip_and_a_shared_public_address_is_rejected() -> None:
    from vppmesh.agent.datastore.records import Record, assemble, encode_record, parse_record

    mesh, _ = mesh_of(node(1, v4(1)), node(2, v4(2)),
                      node(3, ["10.9.0.3/24"], nat={"public": "203.0.113.7", "port": 14500}))
    n1, n2, n3 = mesh.nodes
    assert b"nat" not in encode_record(n1) and b"udp_encap" not in encode_record(n1)
    assert parse_record(Record(name="n3", value=encode_record(n3), create_revision=1)) == n3
    numbers = {n.node_number: n.name for n in mesh.nodes}
    thief = n2.model_copy(update={"nat": n3.nat})
    records = [Record(name="n1", value=encode_record(n1), create_revision=1),
               Record(name="n3", value=encode_record(n3), create_revision=2),
               Record(name="n2", value=encode_record(thief), create_revision=3)]
    membership = assemble(mesh.settings, records, numbers)
    assert membership.has("n3") and not membership.has("n2")
    assert "203.0.113.7 is already an address of node n3" in membership.rejected["n2"]


def test_ipv6_record_that_shares_no_family_with_the_mesh_is_rejected() -> None:
    from vppmesh.agent.datastore.records import Record, assemble, encode_record

    mesh, _ = mesh_of(node(1, v4(1)), node(2, [*v4(2), *v6(2)]))
    lone6, _ = node(3, v6(3))
    records = [Record(name=n.name, value=encode_record(n), create_revision=i)
               for i, n in enumerate([*mesh.nodes, lone6])]
    membership = assemble(mesh.settings, records, {1: "n1", 2: "n2", 3: "n3"})
    assert membership.has("n2") and not membership.has("n3")
    assert "share no underlay family" in membership.rejected["n3"]


def test_ipv6_mixed_testbed_is_a_valid_mesh_with_both_kinds_of_pairs() -> None:
    from vppmesh.lab.testbed import NodeHandle, TestbedSpec

    spec = TestbedSpec(nodes=3, tunnels=1, underlay_family="mixed")
    nodes = [node(i, [str(a) for a in NodeHandle(i, spec).underlay])[0] for i in (1, 2, 3)]
    mesh = Mesh(settings=MeshSettings(), nodes=nodes)
    assert [pair_family(nodes[0], n) for n in nodes[1:]] == [4, 4]
    assert pair_family(nodes[1], nodes[2]) == 6
    assert mesh.pod_mtu() == 1416


def test_nat_verify_structure_checks_each_outbound_sas_encapsulation() -> None:
    from vppmesh.ops.verify import check_structure

    mesh, secrets = nat_mesh()
    local = mesh.node("n1")
    vpp = FakeVpp.with_uplink(local.primary)
    reconcile(vpp, plan(build_view(mesh, "n1", secrets["n1"]), host=HostOptions(kind="none")))
    assert all(p.ok for p in check_structure(vpp, mesh, local).peers)
    out_to_3 = next(sa for i, sa in vpp.sas.items()
                    if i & SA_DIRECTION_BIT and (i >> 8) & 0xFFFF == 3)
    out_to_3["entry"]["udp_dst_port"] = 4500  # the NAT's port is 14500
    problems = {p.name: p.problems for p in check_structure(vpp, mesh, local).peers}
    assert problems["n2"] == []
    assert any("sends ESP in UDP to port 4500, but the pair needs ESP in UDP to port 14500"
               in p for p in problems["n3"]), problems
    # The agent learned that n3's NAT maps its ESP to 4500 (the generation file's nat_ports)
    # and both tunnels' SAs send there.
    for i, sa in vpp.sas.items():
        if i & SA_DIRECTION_BIT and (i >> 8) & 0xFFFF == 3:
            sa["entry"]["udp_dst_port"] = 4500
    assert all(p.ok for p in check_structure(vpp, mesh, local, {"n3": (4500, 4500)}).peers)
    problems = {p.name: p.problems for p in check_structure(vpp, mesh, local,
                                                            {"n3": (4500, 23456)}).peers}
    assert any("but the pair needs ESP in UDP to port 23456" in p for p in problems["n3"])
    out_to_3["entry"]["flags"] &= ~0x10
    problems = {p.name: p.problems for p in check_structure(vpp, mesh, local).peers}
    assert any("sends plain ESP, but the pair needs ESP in UDP to port 14500" in p
               for p in problems["n3"]), problems
