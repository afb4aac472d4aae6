"""An IPv6-only underlay against real VPPs: 3 nodes whose uplinks hold IPv6 addresses only.

IPv4 pods over IPIP-over-IPv6 tunnels protected by ESP: ping, DF ping at the computed
MTU, iperf3, a capture of the underlay (nothing but ESP over IPv6 between node
addresses), `verify --capture`, and the uplink guard against plain IPIP over IPv6.

Skipped with the reason when no VPP binary is found or when not root. Prefix vm6-.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import pytest

from benchmarks.netns import stop_process
from vppmesh.config import load_mesh
from vppmesh.dataplane.vpp import ipip, ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import Testbed, _uplink_mac, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import errors, record_raw_replies

pytestmark = [pytest.mark.vpp]
PREFIX = "vm6-"
BASE = Path("/run/vppmesh-vm6")
TUNNELS = 2
# ICMPv6 control between the uplinks: MLD (130-132, 143), router and neighbor discovery.
ICMPV6_CONTROL = {130, 131, 132, 133, 134, 135, 136, 143}


bed = vpp_helpers.bed_fixture(nodes=3, tunnels=TUNNELS, pods=1, workers=0, prefix=PREFIX,
                              base_dir=BASE, underlay_family="ipv6")


def mesh_mtu(bed: Testbed) -> int:
    return load_mesh(bed.mesh_file).pod_mtu()


def test_ipv6_tunnels_protected_and_second_up_changes_nothing(bed: Testbed) -> None:
    for node in bed.nodes:
        again = bed.run_vppmesh(node, "up", *bed.state_args(node))
        assert " 0 change(s)" in again.stdout, again.stdout
    status = json.loads(bed.run_vppmesh(bed.nodes[0], "status", "--json").stdout)
    assert status["missing_peers"] == []
    for peer in status["peers"]:
        assert len(peer["tunnels"]) == TUNNELS
        for t in peer["tunnels"]:
            assert t["admin_up"] and t["protected"] and t["encapsulation"] == "esp"
            assert ipaddress.ip_address(t["src"]).version == 6
            assert ipaddress.ip_address(t["dst"]).version == 6


def test_ipv6_pod_ping_every_pair(bed: Testbed) -> None:
    vpp_helpers.assert_pods_ping(vpp_helpers.every_pair(bed), count=2)


def test_ipv6_df_ping_at_the_computed_mtu_and_one_byte_more_fails(bed: Testbed) -> None:
    mtu = mesh_mtu(bed)
    assert mtu == 1416  # 1500 - 77 (40 IPv6 + 37 ESP worst case), aligned down to 8
    src, dst = bed.nodes[0], bed.nodes[2]
    payload = mtu - 28  # ICMP echo over IPv4
    ok = vpp_helpers.pod_ping(src, dst, count=3, size=payload)
    assert ok.returncode == 0, ok.stdout
    too_big = vpp_helpers.pod_ping(src, dst, count=1, size=payload + 1)
    assert too_big.returncode != 0
    assert "message too long" in (too_big.stdout + too_big.stderr).lower()


def test_ipv6_iperf3_and_only_esp_over_ipv6_on_the_wire(bed: Testbed) -> None:
    src, dst = bed.nodes[0], bed.nodes[1]
    capture = BASE / "underlay6.pcap"
    dump = vpp_helpers.tcpdump(bed.underlay_ns, capture)
    server = vpp_helpers.iperf3_server(dst.pod_netns(0))
    try:
        time.sleep(1.0)
        out = in_ns(src.pod_netns(0), "iperf3", "-c", str(dst.pod_address(0)), "-t", "3",
                    "-P", "4", "--json", check=False, timeout=60)
    finally:
        stop_process(server)
        time.sleep(0.5)
        stop_process(dump)
    result = json.loads(out.stdout)
    assert "error" not in result, result.get("error")
    rate = result["end"]["sum_received"]["bits_per_second"]
    print(f"iperf3 over the IPv6 underlay: {rate / 1e6:.0f} Mbit/s")
    assert rate > 10e6
    node_addrs = {a.ip for n in bed.nodes for a in n.underlay}
    esp = 0
    with capture.open("rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            assert not isinstance(eth.data, dpkt.ip.IP), "IPv4 on an IPv6-only underlay"
            if not isinstance(eth.data, dpkt.ip6.IP6):
                continue
            ip6 = eth.data
            src_ip = ipaddress.ip_address(ip6.src)
            dst_ip = ipaddress.ip_address(ip6.dst)
            proto = getattr(ip6, "p", ip6.nxt)  # dpkt sets no `p` when it stops at ESP
            if proto == 58 and isinstance(ip6.data, dpkt.icmp6.ICMP6) and \
                    ip6.data.type in ICMPV6_CONTROL:
                continue
            assert proto == 50, f"{src_ip} > {dst_ip} next header {proto}"
            assert {src_ip, dst_ip} <= node_addrs
            esp += 1
    assert esp > 1000
    assert b"iperf3" not in capture.read_bytes()


def test_ipv6_verify_capture_passes_with_esp_between_node_addresses(bed: Testbed) -> None:
    result = bed.run_vppmesh(bed.nodes[0], "verify", "--capture", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"], report
    assert [p["tunnels_ok"] for p in report["peers"]] == [TUNNELS, TUNNELS]
    capture = report["capture"]
    assert capture["esp_between_nodes"] > 0 and capture["esp_in_udp"] == 0
    assert capture["ipip_in_clear"] == capture["pod_address_in_clear"] == 0


CRAFT_IPIP6 = """
import sys
from scapy.all import ICMP, IP, IPv6, Ether, Raw, conf, sendp
conf.verb = 0
iface, mac, src, dst = sys.argv[1:5]
inner4 = IP(src="198.18.1.99", dst="198.18.2.10") / ICMP(id=4242) / Raw(b"hostile")
inner6 = IPv6(src="2001:db8:99::1", dst="2001:db8:99::2") / Raw(b"hostile")
sendp([Ether(dst=mac) / IPv6(src=src, dst=dst, nh=4) / inner4,
       Ether(dst=mac) / IPv6(src=src, dst=dst, nh=41) / inner6] * 5, iface=iface)
"""


def test_ipv6_guard_drops_plain_ipip_over_ipv6(bed: Testbed) -> None:
    """Plain IPv4-in-IPv6 and IPv6-in-IPv6 with a tunnel's own addresses: dropped, counted."""
    pytest.importorskip("scapy")
    n1, n2 = bed.nodes[0], bed.nodes[1]
    with VppClient(n2.instance.api_socket).connect() as api:
        before = errors(api)
        ends = {(t.src, t.dst) for t in ipip.dump_tunnels(api)}
    assert (n2.underlay[0].ip, n1.underlay[0].ip) in ends
    pod_watch = subprocess.Popen(
        ["ip", "netns", "exec", n2.pod_netns(0), "tcpdump", "-ni", "eth0", "-c", "1", "-l",
         "icmp and src 198.18.1.99"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        time.sleep(1)
        craft = in_ns(bed.underlay_ns, sys.executable, "-c", CRAFT_IPIP6, "br0",
                      _uplink_mac(n2.index), str(n1.underlay[0].ip), str(n2.underlay[0].ip),
                      check=False, timeout=60)
        assert craft.returncode == 0, craft.stdout + craft.stderr
        time.sleep(1)
    finally:
        pod_watch.terminate()
        seen, _ = pod_watch.communicate(timeout=10)
    with VppClient(n2.instance.api_socket).connect() as api:
        after = errors(api)
        assert ipsec.dump_protections(api)
    grew = {key: after[key] - before.get(key, 0) for key in after}
    print("error counters that grew:", {f"{k[0]}: {k[1]}": v for k, v in grew.items() if v})
    assert grew[("ip6-inacl", "input ACL hits")] >= 10
    assert grew.get(("ipip6-input", "packets decapsulated"), 0) == 0
    assert "198.18.1.99" not in seen


def test_ipv6_requests_and_dumps_match_vpp_papi(bed: Testbed,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv6 tunnel and address requests encode, and IPv6 dumps decode, like vpp-papi."""
    from vppmesh.dataplane.vpp import classify, interfaces
    from vppmesh.host import guard

    n1 = bed.nodes[0]
    with VppClient(n1.instance.api_socket).connect() as api:
        channel = vpp_helpers.channel_of(api)
        vpp_helpers.assert_encodes_like_papi(channel, [
            ipip.add_tunnel(100_000_999, n1.underlay[0].ip,
                            ipaddress.ip_address("2001:db8:ee::999")),
            interfaces.address(3, n1.underlay[1], True),
            classify.add_table(guard.mask(6), "guard"),
            classify.deny_session(1, guard.match(6, 41), "guard"),
            classify.set_input_acl(1, ip6=2, what="guard")])
        raws = record_raw_replies(channel, monkeypatch)
        tunnels = ipip.dump_tunnels(api)
        uplink, addresses = interfaces.find_uplink(api, None, n1.underlay[0])
        monkeypatch.undo()
    assert uplink is not None and set(n1.underlay) <= set(addresses)
    assert any(t.src.version == 6 for t in tunnels)
    kinds = {type(channel.reference_decode(r)).__name__ for r in raws}
    assert {"ipip_tunnel_details", "ip_address_details"} <= kinds
    vpp_helpers.assert_decodes_like_papi(channel, raws)


def test_ipv6_udp_encap_runs_esp_in_udp_over_ipv6(bed: Testbed) -> None:
    """`udp_encap: true` on an IPv6 node: its pairs switch to ESP in UDP over IPv6 (a new
    key generation each way), pods keep talking, and verify sees ESP in UDP. Runs last:
    it changes the mesh."""
    import yaml

    n1, _, n3 = bed.nodes
    data = yaml.safe_load(bed.mesh_file.read_text())
    data["nodes"][2]["udp_encap"] = True
    bed.mesh_file.write_text(yaml.safe_dump(data, sort_keys=False))
    for node in bed.nodes:
        bed.run_vppmesh(node, "up", *bed.state_args(node))
    status = json.loads(bed.run_vppmesh(n1, "status", "--json").stdout)
    encaps = {p["name"]: {t["encapsulation"] for t in p["tunnels"]} for p in status["peers"]}
    assert encaps == {"n2": {"esp"}, "n3": {"esp-in-udp 4500->4500"}}
    assert load_mesh(bed.mesh_file).pod_mtu() == 1408  # IPv6 + UDP: 85 bytes
    capture = BASE / "udp6.pcap"
    dump = vpp_helpers.tcpdump(bed.underlay_ns, capture, "ip6 and udp")
    try:
        time.sleep(1.0)
        vpp_helpers.assert_pods_ping(((n1, n3), (n3, n1)), count=3)
    finally:
        time.sleep(0.5)
        stop_process(dump)
    with capture.open("rb") as f:
        udp = [dpkt.ethernet.Ethernet(raw).data.data for _, raw in dpkt.pcap.Reader(f)]
    assert len(udp) >= 6  # 3 echoes and 3 replies each way, less any capture start misses
    # IPv6 forbids a zero UDP checksum: VPP's offload must have filled it in.
    assert all(u.sport == 4500 and u.dport == 4500 and u.sum != 0 for u in udp)
    result = bed.run_vppmesh(n3, "verify", "--capture", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["capture"]["esp_in_udp"] > 0, report
