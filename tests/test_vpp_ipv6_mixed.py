"""A mixed mesh against real VPPs: each pair agrees on its family.

n1 has IPv4 only, n2 IPv4 and IPv6 (IPv4 primary), n3 IPv6 and IPv4 (IPv6 primary): n1's
pairs run over IPv4, n2-n3 over IPv6. Pods ping every pair, the underlay carries ESP over
IPv4 exactly between n1 and the others and ESP over IPv6 exactly between n2 and n3, and
`verify --capture` passes on n3. Skipped with the reason when no VPP binary is found or
when not root. Prefix vm7-.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections import Counter
from pathlib import Path

import dpkt
import pytest

from benchmarks.netns import stop_process
from vppmesh.lab.testbed import Testbed
from vppmesh.testing import vpp_helpers

pytestmark = [pytest.mark.vpp]
PREFIX = "vm7-"
BASE = Path("/run/vppmesh-vm7")

bed = vpp_helpers.bed_fixture(nodes=3, tunnels=1, pods=1, workers=0, prefix=PREFIX,
                              base_dir=BASE, underlay_family="mixed")


def test_ipv6_mixed_mesh_pairs_pick_their_family(bed: Testbed) -> None:
    n1, n2, _ = bed.nodes
    families = {}
    for node in (n1, n2):
        status = json.loads(bed.run_vppmesh(node, "status", "--json").stdout)
        for peer in status["peers"]:
            t = peer["tunnels"][0]
            assert t["admin_up"] and t["protected"]
            families[(node.name, peer["name"])] = ipaddress.ip_address(t["dst"]).version
    assert families == {("n1", "n2"): 4, ("n1", "n3"): 4, ("n2", "n1"): 4, ("n2", "n3"): 6}


def test_ipv6_mixed_mesh_ping_and_only_esp_of_each_pairs_family(bed: Testbed) -> None:
    capture = BASE / "mixed.pcap"
    dump = vpp_helpers.tcpdump(bed.underlay_ns, capture)
    try:
        time.sleep(1.0)
        vpp_helpers.assert_pods_ping(vpp_helpers.every_pair(bed), count=3)
        mtu = 1416  # the IPv6 pair sets it for everyone
        ping = vpp_helpers.pod_ping(bed.nodes[0], bed.nodes[2], count=2, size=mtu - 28)
        assert ping.returncode == 0, ping.stdout
    finally:
        time.sleep(0.5)
        stop_process(dump)
    owner = {a.ip: n.name for n in bed.nodes for a in n.underlay}
    esp: Counter[tuple[int, frozenset[str]]] = Counter()
    with capture.open("rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(raw).data
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                continue
            proto = ip.p if isinstance(ip, dpkt.ip.IP) else getattr(ip, "p", ip.nxt)
            src, dst = ipaddress.ip_address(ip.src), ipaddress.ip_address(ip.dst)
            if proto == 58:
                continue  # ICMPv6 neighbor discovery and MLD between the uplinks
            assert proto == 50, f"{src} > {dst} protocol {proto}"
            esp[(src.version, frozenset({owner[src], owner[dst]}))] += 1
    pairs = {key for key, count in esp.items() if count >= 6}
    assert pairs == {(4, frozenset({"n1", "n2"})), (4, frozenset({"n1", "n3"})),
                     (6, frozenset({"n2", "n3"}))}, esp
    assert set(esp) == pairs, esp


def test_ipv6_mixed_mesh_verify_capture_passes_on_the_dual_stack_node(bed: Testbed) -> None:
    result = bed.run_vppmesh(bed.nodes[2], "verify", "--capture", "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"], report
    assert report["capture"]["esp_between_nodes"] > 0
