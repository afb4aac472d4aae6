"""verify's capture classification, on frames built the way they appear on an uplink."""

from __future__ import annotations

import ipaddress

import dpkt

from vppmesh.keying.keys import spi_for, spi_sender, spi_tunnel
from vppmesh.ops.verify import (
    CaptureVerdict,
    PeerVerdict,
    VerifyReport,
    classify_capture,
)
from vppmesh.testing.meshes import make_mesh

MAC_A = b"\x02\xfe\x00\x00\x00\x01"
MAC_B = b"\x02\xfe\x00\x00\x00\x02"


def frame(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    ip = dpkt.ip.IP(src=ipaddress.IPv4Address(src).packed, dst=ipaddress.IPv4Address(dst).packed,
                    p=proto, data=payload)
    ip.len = len(bytes(ip))
    return bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=MAC_B, type=dpkt.ethernet.ETH_TYPE_IP,
                                        data=ip))


def test_classifies_esp_clear_ipip_and_pod_addresses() -> None:
    mesh, _ = make_mesh(3)
    n1, n2 = mesh.nodes[0], mesh.nodes[1]
    a, b = str(n1.underlay[0].ip), str(n2.underlay[0].ip)
    pod1, pod2 = str(n1.pod_cidr[10]), str(n2.pod_cidr[10])
    inner = bytes(dpkt.ip.IP(src=ipaddress.IPv4Address(pod1).packed,
                             dst=ipaddress.IPv4Address(pod2).packed, p=17, data=b"x" * 8))
    arp = bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=MAC_B, type=dpkt.ethernet.ETH_TYPE_ARP,
                                       data=b"\x00" * 28))
    frames = [
        frame(a, b, 50, b"\x01\x00\x01\x00" + b"\x00" * 40),   # ESP node -> node
        frame(b, a, 50, b"\x01\x00\x02\x00" + b"\x00" * 40),   # and back
        frame(a, "203.0.113.9", 50, b"\x00" * 44),             # ESP to someone else
        frame(a, b, 4, inner),                                 # IPIP: a pod packet in clear
        frame(pod1, pod2, 17, b"payload"),                     # a pod packet routed in clear
        frame(a, "203.0.113.9", 6, b"\x00" * 20),              # the host's own traffic
        arp,
    ]
    verdict = classify_capture(frames, mesh, "eth0")
    assert (verdict.frames, verdict.esp_between_nodes, verdict.esp_elsewhere,
            verdict.ipip_in_clear, verdict.pod_address_in_clear, verdict.other) == \
        (7, 2, 1, 1, 1, 2)
    assert not verdict.ok
    assert f"(inner {pod1} > {pod2})" in verdict.offenders[0]
    assert pod1 in verdict.offenders[1]


def test_only_esp_passes_and_no_traffic_is_inconclusive() -> None:
    mesh, _ = make_mesh(2)
    a, b = str(mesh.nodes[0].underlay[0].ip), str(mesh.nodes[1].underlay[0].ip)
    assert classify_capture([frame(a, b, 50, b"\x00" * 44)], mesh, "eth0").ok
    empty = classify_capture([], mesh, "eth0")
    assert not empty.ok
    report = VerifyReport(node="node1", window_seconds=1, probes=0, peers=[], capture=empty)
    assert report.verdict.startswith("FAIL") and "no ESP" in report.verdict


def test_verdict_names_the_broken_peer() -> None:
    peer = PeerVerdict(name="node2", node_number=2, tunnels_expected=2, tunnels_ok=1,
                       route_paths=2, out_packets=5, in_packets=0,
                       problems=["tunnel 1 is up WITHOUT protection: its traffic is in clear"])
    ok = CaptureVerdict(interface="eth0", frames=1, esp_between_nodes=1, esp_elsewhere=0,
                        ipip_in_clear=0, pod_address_in_clear=0, other=0, offenders=[])
    report = VerifyReport(node="node1", window_seconds=1, probes=1, peers=[peer], capture=ok)
    assert not report.ok
    assert report.verdict == "FAIL: node2: tunnel 1 is up WITHOUT protection: its traffic " \
                             "is in clear"


def test_spi_fields_round_trip() -> None:
    for sender in (1, 255, 4000):
        for tunnel in range(8):
            spi = spi_for(sender, tunnel, 7)
            assert (spi_sender(spi), spi_tunnel(spi)) == (sender, tunnel)


def test_capture_after_an_uplink_takeover_records_the_nic_not_the_bvi() -> None:
    """With the NIC taken (vppmesh/host/uplink/), VPP's underlay addresses sit on the bridge's BVI,
    a loopback: the wire, where clear text would show, is the bridged NIC."""
    from vppmesh.host.uplink import TAG_NIC
    from vppmesh.ops.verify import find_uplink_interface
    from vppmesh.testing.fake_vpp import FakeVpp

    mesh, _ = make_mesh(2)
    local = mesh.node("node1")
    plain = FakeVpp.with_uplink(local.primary)
    assert find_uplink_interface(plain, local).name == "host-eth0"
    taken = FakeVpp()
    bvi = taken._new_iface("loop0", "Loopback", mac="02:fe:ff:00:00:01")
    taken.addresses[bvi] = [str(local.primary)]
    nic = taken._new_iface("host-eth0-nic", "af-packet", mac="02:00:00:00:00:01",
                           tag=TAG_NIC)
    assert find_uplink_interface(taken, local).sw_if_index == nic
