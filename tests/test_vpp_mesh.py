"""End to end against real VPPs: a 3-node testbed, `vppmesh up` on each node.

Skipped with the reason when no VPP binary is found or when not root.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import Testbed, TestbedSpec, destroy, in_ns
from vppmesh.testing import vpp_helpers
from vppmesh.testing.vpp_helpers import require_vpp

pytestmark = [pytest.mark.vpp]
PREFIX = "vmi-"
BASE = Path("/run/vppmesh-itest")

bed = vpp_helpers.bed_fixture(nodes=3, tunnels=4, pods=1, workers=1, prefix=PREFIX,
                              base_dir=BASE)


def run_cli(bed: Testbed, node, *args: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return bed.run_vppmesh(node, *args, check=False)


def test_second_up_changes_nothing(bed: Testbed) -> None:
    for node in bed.nodes:
        result = run_cli(bed, node, "up", *bed.up_args(node))
        assert result.returncode == 0, result.stderr
        assert " 0 change(s)" in result.stdout


def test_status_reports_every_peer_protected(bed: Testbed) -> None:
    node = bed.nodes[0]
    result = run_cli(bed, node, "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["missing_peers"] == []
    assert {p["name"] for p in status["peers"]} == {"n2", "n3"}
    for peer in status["peers"]:
        assert len(peer["tunnels"]) == 4
        assert all(t["admin_up"] and t["protected"] for t in peer["tunnels"])
        # SA i of each peer is bound to worker i mod W (one worker: thread 1).
        assert all(t["sa_out"]["thread"] == 1 for t in peer["tunnels"])
        # One-shot `up`, no agents: keys from the static schedule, not forward secret.
        assert (peer["keys"], peer["forward_secret"]) == ("static", False)


def test_pod_to_pod_ping_every_pair(bed: Testbed) -> None:
    vpp_helpers.assert_pods_ping(vpp_helpers.every_pair(bed), count=2)


def link_packets(netns: str, ifname: str) -> int:
    """Packets received plus sent by a Linux interface."""
    out = in_ns(netns, "ip", "-s", "-j", "link", "show", ifname).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["packets"]) + int(stats["tx"]["packets"])


def vpp_drops(api: VppClient) -> int:
    """Packets VPP dropped, over all its interfaces (`show interface`'s drops)."""
    return sum(int(n) for n in re.findall(r"\sdrops\s+(\d+)", api.cli("show interface")))


def test_unheld_address_of_the_own_pod_cidr_dies_in_vpp(bed: Testbed) -> None:
    """The mesh VRF's default route leads to the host, whose route for the node's pod CIDR
    leads back into VPP: without VPP's drop route for that CIDR, a packet to an address
    no pod holds would bounce between them until its TTL ran out."""
    node = bed.nodes[0]
    unheld = node.pod_cidr.network_address + 200
    count = 20
    with VppClient(node.instance.api_socket).connect() as api:
        assert node.pod_cidr in routes.dump_table(api, 1717)[1]
        drops_before = vpp_drops(api)
        host_before = link_packets(node.netns, "vppmesh0")
        ping = in_ns(node.pod_netns(0), "ping", "-c", str(count), "-i", "0.05", "-W", "1",
                     str(unheld), check=False)
        host_after = link_packets(node.netns, "vppmesh0")
        drops = vpp_drops(api) - drops_before
    assert ping.returncode != 0 and f"{count} packets transmitted, 0 received" in ping.stdout
    print(f"VPP drops +{drops}, vppmesh0 rx+tx +{host_after - host_before} for {count} pings")
    assert count <= drops <= count + 5
    assert host_after - host_before <= count  # at most one copy per packet, never dozens
    vpp_helpers.assert_pods_ping(vpp_helpers.every_pair(bed), count=2)


def test_mtu_fits_and_one_more_byte_fails_cleanly(bed: Testbed) -> None:
    src, dst = bed.nodes[0], bed.nodes[1]
    payload = 1440 - 28
    ok = vpp_helpers.pod_ping(src, dst, count=2, size=payload)
    assert ok.returncode == 0, ok.stdout
    started = time.monotonic()
    too_big = vpp_helpers.pod_ping(src, dst, count=1, size=payload + 1)
    assert too_big.returncode != 0
    assert "message too long" in (too_big.stdout + too_big.stderr).lower()
    assert time.monotonic() - started < 3


def outbound_counters(bed: Testbed, node, peer_number: int) -> dict[int, int]:  # type: ignore[no-untyped-def]
    from vppmesh.lab.demo import outbound_packets

    return outbound_packets(node, peer_number)


def test_tcp_over_every_tunnel_and_only_esp_on_the_wire(bed: Testbed) -> None:
    src, dst = bed.nodes[0], bed.nodes[1]
    capture = BASE / "underlay.pcap"
    dump = vpp_helpers.tcpdump(bed.underlay_ns, capture, snaplen=None)
    time.sleep(1.0)
    before = outbound_counters(bed, src, dst.index)
    server = vpp_helpers.iperf3_server(dst.pod_netns(0))
    try:
        time.sleep(0.5)
        out = in_ns(src.pod_netns(0), "iperf3", "-c", str(dst.pod_address(0)), "-t", "3",
                    "-P", "8", "--cport", "40000", "--json", check=False, timeout=60)
    finally:
        server.kill()
        time.sleep(0.5)
        dump.terminate()
        dump.wait()
    result = json.loads(out.stdout)
    assert "error" not in result, result.get("error")
    assert result["end"]["sum_received"]["bits_per_second"] > 10e6
    after = outbound_counters(bed, src, dst.index)
    used = [sa for sa, n in after.items() if n - before.get(sa, 0) > 100]
    assert len(used) == 4, f"only {len(used)} of 4 tunnels carried traffic"
    # Read the capture: nothing but ESP between node addresses, no pod address in clear.
    text = subprocess.run(["tcpdump", "-n", "-r", str(capture), "ip"], capture_output=True,
                          text=True, check=False).stdout
    lines = [line for line in text.splitlines() if " IP " in line]
    assert len(lines) > 1000
    node_addrs = {str(a.ip) for n in bed.nodes for a in n.underlay}
    for line in lines:
        assert "ESP(" in line, line
        assert "198.18." not in line, line
        src_ip, dst_ip = line.split(" IP ")[1].split(":")[0].split(" > ")
        assert src_ip in node_addrs and dst_ip in node_addrs
    raw = capture.read_bytes()
    assert b"iperf3" not in raw


def test_verify_proves_encryption_from_counters_and_capture(bed: Testbed) -> None:
    node = bed.nodes[0]
    result = run_cli(bed, node, "verify", "--capture", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["verdict"].startswith("PASS")
    assert [p["tunnels_ok"] for p in report["peers"]] == [4, 4]
    assert all(p["out_packets"] > 0 and p["in_packets"] > 0 for p in report["peers"])
    capture = report["capture"]
    assert capture["interface"] == "host-eth0"
    assert capture["esp_between_nodes"] > 0
    assert capture["ipip_in_clear"] == capture["pod_address_in_clear"] == 0
    # No agents run here: every pair is on static keys, reported but only required on demand.
    assert [p["keys"] for p in report["peers"]] == ["static", "static"]
    required = run_cli(bed, node, "verify", "--no-probes", "--seconds", "0.5",
                       "--require-forward-secrecy")
    assert required.returncode == 3, required.stdout + required.stderr
    assert "no forward secrecy on pair(s) n1-n2 (static), n1-n3 (static): run `vppmesh up " \
           "--watch` (the agent) on both nodes" in required.stdout


def test_verify_fails_on_pod_traffic_in_clear(bed: Testbed) -> None:
    """An operator's unprotected IPIP tunnel in the mesh VRF leaks pod traffic: caught."""
    node, peer = bed.nodes[0], bed.nodes[1]
    leak_prefix = ipaddress.IPv4Network("198.18.99.0/24")
    with VppClient(node.instance.api_socket).connect() as api:
        gateway = next(i for i in interfaces.dump_interfaces(api) if i.tag == "vppmesh:gateway")
        tunnel = api.call(ipip.add_tunnel(7, node.underlay[0].ip, peer.underlay[1].ip))
        index = tunnel.sw_if_index
        sender = None
        try:
            api.call_many([interfaces.set_table(index, 1717),
                           interfaces.set_unnumbered(index, gateway.sw_if_index),
                           interfaces.set_admin(index, True),
                           routes.route(1717, leak_prefix, [index], True)])
            sender = subprocess.Popen(["ip", "netns", "exec", node.pod_netns(0), "ping", "-i",
                                       "0.2", "-c", "40", str(leak_prefix[1])],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = run_cli(bed, node, "verify", "--capture", "--json")
        finally:
            if sender is not None:
                sender.kill()
            api.call(routes.route(1717, leak_prefix, [index], False))
            api.call(ipip.del_tunnel(index))
    assert result.returncode == 3, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report["ok"] and report["verdict"].startswith("FAIL")
    assert report["capture"]["ipip_in_clear"] > 0
    assert str(node.pod_address(0)) in report["capture"]["offenders"][0]
    # The mesh itself is still healthy: only the capture failed.
    assert all(p["problems"] == [] for p in report["peers"])


def test_down_leaves_nothing_of_vppmesh(bed: Testbed) -> None:
    node = bed.nodes[2]
    result = run_cli(bed, node, "down")
    assert result.returncode == 0, result.stderr
    assert f"- route {node.pod_cidr}\n" in result.stdout  # the drop route, explicitly
    with VppClient(node.instance.api_socket).connect() as api:
        assert not [t for t in ipip.dump_tunnels(api) if is_owned_tunnel_instance(t.instance)]
        assert not [s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)]
        assert not ipsec.dump_protections(api)
        assert not [i for i in interfaces.dump_interfaces(api) if i.tag.startswith("vppmesh:")]
        assert 1717 not in routes.dump_tables(api)
        uplink = next(i for i in interfaces.dump_interfaces(api) if i.name == "host-eth0")
        assert [str(a) for a in interfaces.dump_addresses(api, uplink.sw_if_index)] == \
            [str(node.underlay[0])]
    # Bringing it back reinstalls no outbound key: its old keys were used, so it steps to
    # the next key generation by itself (which its peers already accept).
    again = run_cli(bed, node, "up", *bed.up_args(node))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "outbound generation 0 -> 1" in again.stdout
    with VppClient(node.instance.api_socket).connect() as api:
        outbound = [s.spec for s in ipsec.dump_sas(api)
                    if is_owned_sa_id(s.spec.sa_id) and s.spec.direction == "out"]
    assert outbound and all(s.spi & 0xF == 1 for s in outbound)
    status = json.loads(run_cli(bed, node, "status", "--json").stdout)
    assert all(t["admin_up"] and t["protected"] for p in status["peers"] for t in p["tunnels"])
    # Its pod, attached again, is reachable: the re-created mesh VRF forwards to the node's
    # own /32s (down removes them explicitly before deleting the VRF).
    bed.run_vppmesh(node, "attach", "--name", node.pod_name(0), "--netns", node.pod_netns(0),
                    "--address", str(node.pod_address(0)))
    ping = vpp_helpers.pod_ping(bed.nodes[0], node, count=2)
    assert ping.returncode == 0, ping.stdout


def test_testbed_down_leaves_no_namespace_or_process() -> None:
    require_vpp()
    bed = Testbed(TestbedSpec(nodes=2, tunnels=1, pods=0, prefix="vmd-",
                              base_dir=Path("/run/vppmesh-dtest")))
    bed.up()
    pids = [int(n.instance.pid_file.read_text()) for n in bed.nodes]
    destroy("vmd-", Path("/run/vppmesh-dtest"), quiet=True)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "vmd-" not in names
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert not Path("/run/vppmesh-dtest").exists()
