"""The tap v2 path end to end, run INSIDE a VM guest that has /dev/vhost-net.

tests/test_vm.py boots the guest (vppmesh.lab.vm) and runs this module there with pytest;
its file name keeps it out of the host's own collection. A 2-node testbed (prefix vmv-)
with 2 VPP workers per node, the host links and pods attached as tap v2 (GSO, GRO
coalescing, 2 queue pairs) and `settings.gso: true`. The checks are those of issue 12:
ping and DF ping at the pod MTU, iperf3 TCP (4 streams, 10 s) with checksums and ESP
errors watched, an underlay capture (only ESP between node addresses, no frame above
the underlay MTU), `vppmesh verify --capture`, both workers carrying traffic, CNI
ADD/CHECK/DEL with attachment tap, and a pod tap that survives a VPP restart.
Throughput under software emulation means nothing: only correctness is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpkt
import pytest

from vppmesh.dataplane.vpp import host_interfaces, interfaces
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.dataplane.vpp.stats import Counter, StatsReader
from vppmesh.host import link as linux
from vppmesh.lab.testbed import NodeHandle, Testbed, in_ns, sh
from vppmesh.testing import vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vm]
PREFIX = "vmv-"
BASE = Path("/run/vppmesh-vmv")
WORKERS = 2
POD_MTU = 1440
UNDERLAY_FRAME = 1500 + 14
CNI_PATH = Path("/usr/lib/cni")
CNI_NS = f"{PREFIX}c1"
RESULTS = Path(os.environ.get("VPPMESH_VM_RESULTS", "/tmp"))
# What the checks measured, written to RESULTS/vm-measurements.json for the host side.
MEASURED: dict[str, Any] = {}


def record(key: str, value: Any) -> None:
    MEASURED[key] = value
    if RESULTS.is_dir():
        (RESULTS / "vm-measurements.json").write_text(json.dumps(MEASURED, indent=2))


def vpp_runs_here(vpp: str) -> bool:
    """False when VPP dies at once with SIGILL (built for a CPU this guest lacks).

    VPP ignores a SIGTERM while it starts ("IGNORE early SIGTERM"): it is killed."""
    probe = subprocess.Popen([vpp, "unix", "{", "nodaemon", "cli-listen",
                              "/run/vmv-probe.sock", "}", "plugins", "{", "plugin", "default",
                              "{", "disable", "}", "}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        return probe.wait(timeout=8) not in (132, -4)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        return True


def require_vpp_runs_here() -> None:
    from vppmesh.lab.testbed import find_vpp

    if not vpp_runs_here(str(find_vpp())):
        pytest.skip("VPP dies with SIGILL in the guest: build it generically (multi-arch)")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    if os.environ.get("VPPMESH_VM_GUEST") != "1":
        pytest.skip("runs inside the VM guest that tests/test_vm.py boots")
    if not linux.tap_supported():
        pytest.skip("no /dev/vhost-net in this guest (modprobe vhost_net)")
    with vpp_helpers.testbed(require_vpp_runs_here, nodes=2, tunnels=2, pods=1,
                             workers=WORKERS, attachment="tap", gso=True, prefix=PREFIX,
                             base_dir=BASE) as bed:
        yield bed


def api(node: NodeHandle) -> VppClient:
    return VppClient(node.instance.api_socket, timeout=30).connect()


def tagged(node: NodeHandle, tag: str) -> interfaces.Interface:
    with api(node) as client:
        return next(i for i in interfaces.dump_interfaces(client) if i.tag == tag)


def pod_tap(node: NodeHandle) -> interfaces.Interface:
    """The pod's tap: by its tag, else by the namespace VPP created it in (a run under
    emulation once found no interface with the pod's tag although the pod pinged)."""
    tag = f"vppmesh:pod:{node.pod_name(0)}"
    with api(node) as client:
        ifaces = interfaces.dump_interfaces(client)
        taps = host_interfaces.dump_taps(client)
    found = [i for i in ifaces if i.tag == tag] or \
        [i for i in ifaces if i.sw_if_index in taps
         and taps[i.sw_if_index].host_namespace.endswith(node.pod_netns(0))]
    record(f"{node.name}.interfaces", [(i.name, i.tag, i.dev_type) for i in ifaces])
    assert found, f"no tap of pod {node.pod_name(0)} in VPP: {ifaces}"
    return found[0]


def rx_modes(node: NodeHandle, ifname: str) -> list[str]:
    with api(node) as client:
        return vpp_helpers.rx_modes(client, ifname)


def per_thread(node: NodeHandle, name: str, index: int) -> list[Counter]:
    with StatsReader(node.instance.stats_socket) as reader:
        return reader.per_thread(name, index)


def esp_errors(node: NodeHandle) -> dict[str, int]:
    """VPP's error counters of the ESP and IPsec nodes, but for the packet counts
    (`IPSec pkts received`, rx_pkts, and ipsec4-tun-input's "good packets received",
    stat name `rx`) that some of them keep as informational counters."""
    with StatsReader(node.instance.stats_socket) as reader:
        found = reader.error_counters("^/err/(esp|ipsec)")
    return {k: v for k, v in found.items()
            if v and "rx_pkts" not in k and "received" not in k.lower()
            and not k.endswith("/rx")}


def snmp(ns: str) -> dict[str, int]:
    """The Tcp: line of /proc/net/snmp in a namespace (InCsumErrors among them)."""
    lines = [line.split() for line in in_ns(ns, "cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def queues(ns: str, ifname: str = "eth0") -> list[str]:
    return sorted(in_ns(ns, "ls", f"/sys/class/net/{ifname}/queues").stdout.split())


def ping(ns: str, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return in_ns(ns, "ping", "-c", "3", "-W", "5", *extra, target, check=False, timeout=60)


# ---- the attachment itself ------------------------------------------------------------
def test_host_links_and_pods_are_taps_with_a_queue_pair_per_worker(bed: Testbed) -> None:
    for node in bed.nodes:
        with api(node) as client:
            taps = host_interfaces.dump_taps(client)
            by_tag = {i.tag: i for i in interfaces.dump_interfaces(client)}
            placement = client.cli("show interface rx-placement")
        pod = pod_tap(node)
        by_tag[pod.tag or "pod"] = pod
        for tag in ("vppmesh:host", pod.tag or "pod"):
            iface = by_tag[tag]
            assert iface.dev_type in host_interfaces.TAP_DEV_TYPES, (tag, iface)
            flags = taps[iface.sw_if_index].tap_flags
            for flag in (host_interfaces.TAP_FLAG_GSO, host_interfaces.TAP_FLAG_GRO_COALESCE):
                assert flags & flag, f"{tag}: tap_flags {flags}"
            assert iface.name in placement
            # Adaptive: an idle tap lets its worker sleep (polling never does).
            assert rx_modes(node, iface.name) == ["adaptive"] * WORKERS, placement
        pod_flags = taps[pod.sw_if_index].tap_flags
        assert pod_flags & host_interfaces.TAP_FLAG_PERSIST
        # Linux side: one rx and one tx queue per worker, TSO on (large segments).
        assert queues(node.pod_netns(0)) == ["rx-0", "rx-1", "tx-0", "tx-1"]
        features = in_ns(node.pod_netns(0), "ethtool", "-k", "eth0").stdout
        assert "tcp-segmentation-offload: on" in features
        kind = json.loads(in_ns(node.pod_netns(0), "ip", "-j", "-d", "link", "show",
                                "eth0").stdout)[0]["linkinfo"]["info_kind"]
        assert kind == "tun"
        record(f"{node.name}.rx_placement", placement)


def test_pod_to_pod_ping_and_df_ping_at_the_pod_mtu(bed: Testbed) -> None:
    n1, n2 = bed.nodes
    for src, dst in ((n1, n2), (n2, n1)):
        done = ping(src.pod_netns(0), str(dst.pod_address(0)))
        assert done.returncode == 0, done.stdout
    payload = POD_MTU - 28
    fits = ping(n1.pod_netns(0), str(n2.pod_address(0)), "-M", "do", "-s", str(payload))
    assert fits.returncode == 0, fits.stdout
    too_big = ping(n1.pod_netns(0), str(n2.pod_address(0)), "-M", "do", "-s",
                   str(payload + 1))
    assert too_big.returncode != 0
    assert "message too long" in (too_big.stdout + too_big.stderr).lower()


# ---- large segments -------------------------------------------------------------------
@pytest.fixture(scope="module")
def iperf(bed: Testbed) -> dict[str, Any]:
    """iperf3, 4 TCP streams for 10 s, n1's pod -> n2's pod, with everything watched."""
    n1, n2 = bed.nodes
    capture = BASE / "underlay.pcap"
    tap1, tap2 = pod_tap(n1), pod_tap(n2)
    before = {
        "csum_rx": snmp(n2.pod_netns(0))["InCsumErrors"],
        "csum_tx": snmp(n1.pod_netns(0))["InCsumErrors"],
        "esp": {n.name: esp_errors(n) for n in bed.nodes},
        "rx1": per_thread(n1, "/if/rx", tap1.sw_if_index),
        "tx2": per_thread(n2, "/if/tx", tap2.sw_if_index),
    }
    dump = vpp_helpers.tcpdump(bed.underlay_ns, capture, snaplen=0)
    server = vpp_helpers.iperf3_server(n2.pod_netns(0))
    try:
        time.sleep(3)
        out = in_ns(n1.pod_netns(0), "iperf3", "-c", str(n2.pod_address(0)), "-t", "10",
                    "-P", "4", "--connect-timeout", "20000", "--json", check=False,
                    timeout=240)
    finally:
        server.kill()
        time.sleep(1)
        dump.terminate()
        dump.wait()
    result = json.loads(out.stdout or "{}")
    after_rx1 = per_thread(n1, "/if/rx", tap1.sw_if_index)
    after_tx2 = per_thread(n2, "/if/tx", tap2.sw_if_index)
    measured = {
        "iperf_error": result.get("error"),
        "mbit_s": result.get("end", {}).get("sum_received", {}).get("bits_per_second", 0) / 1e6,
        "retransmits": result.get("end", {}).get("sum_sent", {}).get("retransmits"),
        "streams": [s["receiver"]["bytes"] for s in result.get("end", {}).get("streams", [])],
        "csum_errors_receiver": snmp(n2.pod_netns(0))["InCsumErrors"] - before["csum_rx"],
        "csum_errors_sender": snmp(n1.pod_netns(0))["InCsumErrors"] - before["csum_tx"],
        "esp_errors_before": before["esp"],
        "esp_errors_after": {n.name: esp_errors(n) for n in bed.nodes},
        "pod_tap_rx_per_thread": [
            (a.packets - b.packets, a.bytes - b.bytes)
            for a, b in zip(after_rx1, before["rx1"], strict=True)],
        "pod_tap_tx_per_thread_receiver": [
            (a.packets - b.packets, a.bytes - b.bytes)
            for a, b in zip(after_tx2, before["tx2"], strict=True)],
        "capture": str(capture),
    }
    record("iperf", measured)
    return measured


def test_iperf3_with_gso_has_no_connection_error(iperf: dict[str, Any]) -> None:
    assert iperf["iperf_error"] is None, iperf["iperf_error"]
    assert len(iperf["streams"]) == 4 and all(b > 0 for b in iperf["streams"]), iperf
    assert iperf["mbit_s"] > 0


def test_large_segments_reach_vpp_and_are_segmented_before_esp(iperf: dict[str, Any]) -> None:
    """The pod's tap hands VPP frames larger than the MTU (GSO); none leaves unsegmented."""
    packets = sum(p for p, _ in iperf["pod_tap_rx_per_thread"])
    octets = sum(b for _, b in iperf["pod_tap_rx_per_thread"])
    assert packets > 0
    average = octets / packets
    record("pod_tap_rx_average_frame", average)
    assert average > POD_MTU + 14, f"average frame from the pod {average:.0f} B: no GSO"


def test_receiving_pod_sees_no_checksum_errors(iperf: dict[str, Any]) -> None:
    assert iperf["csum_errors_receiver"] == 0, iperf
    assert iperf["csum_errors_sender"] == 0, iperf


def test_no_esp_error_counter_grows(iperf: dict[str, Any]) -> None:
    grown = {node: {k: v - iperf["esp_errors_before"][node].get(k, 0)
                    for k, v in after.items() if v != iperf["esp_errors_before"][node].get(k, 0)}
             for node, after in iperf["esp_errors_after"].items()}
    assert not any(grown.values()), grown


def test_underlay_carries_only_esp_between_nodes_within_the_mtu(
        bed: Testbed, iperf: dict[str, Any]) -> None:
    node_addrs = {str(a.ip) for n in bed.nodes for a in n.underlay}
    esp = largest = 0
    offenders = []
    with open(iperf["capture"], "rb") as f:
        for _ts, frame in dpkt.pcap.Reader(f):
            largest = max(largest, len(frame))
            eth = dpkt.ethernet.Ethernet(frame)
            if not isinstance(eth.data, dpkt.ip.IP):
                continue  # ARP
            ip = eth.data
            src, dst = (".".join(str(b) for b in a) for a in (ip.src, ip.dst))
            if ip.p == dpkt.ip.IP_PROTO_ESP and src in node_addrs and dst in node_addrs:
                esp += 1
            else:
                offenders.append(f"{src} > {dst} proto {ip.p} len {len(frame)}")
    record("capture", {"esp_frames": esp, "largest_frame": largest, "other_ip": offenders[:5]})
    assert esp > 1000
    assert not offenders, offenders[:5]
    assert largest <= UNDERLAY_FRAME, f"a {largest}-byte frame on a 1500-byte underlay"


def test_both_workers_carry_the_pod_traffic(bed: Testbed, iperf: dict[str, Any]) -> None:
    """Thread 0 is main; each worker polls one of the tap's two queues."""
    rx = iperf["pod_tap_rx_per_thread"]
    assert len(rx) == WORKERS + 1, rx
    busy = [thread for thread, (packets, _) in enumerate(rx) if packets > 50]
    assert busy == [1, 2], f"packets per thread on n1's pod tap: {rx}"


def test_verify_capture_passes(bed: Testbed, iperf: dict[str, Any]) -> None:
    result = bed.run_vppmesh(bed.nodes[0], "verify", "--capture", "--seconds", "5", "--json",
                             check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    record("verify", report["verdict"])
    assert report["ok"] and report["verdict"].startswith("PASS")
    assert report["capture"]["ipip_in_clear"] == report["capture"]["pod_address_in_clear"] == 0


# ---- CNI ------------------------------------------------------------------------------
def cni(bed: Testbed, command: str, conf: dict[str, Any]) -> tuple[int, Any]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": "vmv0cafe0123456789", "CNI_IFNAME": "eth0",
           "CNI_PATH": str(CNI_PATH), "CNI_NETNS": f"/var/run/netns/{CNI_NS}",
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=tap-0"}
    done = subprocess.run(["ip", "netns", "exec", bed.nodes[0].netns, sys.executable, "-m",
                           "vppmesh.cni"], input=json.dumps(conf), env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else done.stderr


def test_cni_add_check_del_with_attachment_tap(bed: Testbed) -> None:
    if not (CNI_PATH / "host-local").exists():
        pytest.skip(f"no host-local in {CNI_PATH}: apt-get install containernetworking-plugins")
    n1, n2 = bed.nodes
    sh("ip", "netns", "add", CNI_NS)
    conf = {"cniVersion": "1.0.0", "name": "vppmesh", "type": "vppmesh-cni",
            "apiSocket": str(n1.instance.api_socket), "mesh": str(bed.mesh_file),
            "node": n1.name, "attachment": "tap", "stateDir": str(BASE / "cni-state"),
            "ipam": {"type": "host-local", "dataDir": str(BASE / "ipam"),
                     "ranges": [[{"subnet": "198.18.1.0/24", "rangeStart": "198.18.1.100"}]]}}
    code, added = cni(bed, "ADD", conf)
    assert code == 0, added
    address = added["ips"][0]["address"].split("/")[0]
    assert len(added["interfaces"]) == 1  # a tap: no host-side veth in the result
    with api(n1) as client:
        pod = next(i for i in interfaces.dump_interfaces(client)
                   if i.tag.startswith("vppmesh:pod:cni-"))
        tap = host_interfaces.dump_taps(client)[pod.sw_if_index]
    assert pod.dev_type in host_interfaces.TAP_DEV_TYPES
    assert tap.tap_flags & host_interfaces.TAP_FLAG_PERSIST
    assert queues(CNI_NS) == ["rx-0", "rx-1", "tx-0", "tx-1"]
    assert rx_modes(n1, pod.name) == ["adaptive"] * WORKERS
    done = ping(CNI_NS, str(n2.pod_address(0)))
    assert done.returncode == 0, done.stdout
    code, checked = cni(bed, "CHECK", {**conf, "prevResult": added})
    assert code == 0, checked
    code, deleted = cni(bed, "DEL", {**conf, "prevResult": added})
    assert code == 0, deleted
    with api(n1) as client:
        assert not [i for i in interfaces.dump_interfaces(client)
                    if i.tag.startswith("vppmesh:pod:cni-")]
    assert not linux.link_exists("eth0", CNI_NS)
    record("cni", {"address": address, "interface": pod.name})


# ---- VPP restart ----------------------------------------------------------------------
def test_pod_tap_survives_a_vpp_restart_and_is_attached_again(bed: Testbed) -> None:
    n1, n2 = bed.nodes
    ns = n2.pod_netns(0)
    before = json.loads(in_ns(ns, "ip", "-j", "addr", "show", "eth0").stdout)[0]
    bed.restart_vpp(n2)
    during = json.loads(in_ns(ns, "ip", "-j", "addr", "show", "eth0").stdout)[0]
    # The Linux end outlived VPP: same device, same address.
    assert during["ifindex"] == before["ifindex"]
    assert [a["local"] for a in during["addr_info"] if a["family"] == "inet"] == \
        [str(n2.pod_address(0))]
    bed.run_vppmesh(n2, "up", *bed.up_args(n2))
    attached = bed.run_vppmesh(n2, "attach", *bed.attach_args(n2, 0))
    assert "tap" in attached.stdout, attached.stdout
    after = json.loads(in_ns(ns, "ip", "-j", "addr", "show", "eth0").stdout)[0]
    assert after["ifindex"] == before["ifindex"]
    assert queues(ns) == ["rx-0", "rx-1", "tx-0", "tx-1"]
    assert rx_modes(n2, pod_tap(n2).name) == ["adaptive"] * WORKERS
    took = wait_for(lambda: ping(n1.pod_netns(0), str(n2.pod_address(0))).returncode == 0,
                    120, "pod-to-pod ping after n2's VPP restart", interval=1)
    record("restart_ping_seconds", round(took, 1))


# ---- uplink takeover ------------------------------------------------------------------
def test_uplink_host_tap_carries_tcp_with_gso(bed: Testbed) -> None:
    """The takeover's host link as a tap (GSO/GRO): TCP from the host through VPP's bridge
    to the wire, segmented by the NIC's output, with correct checksums at the peer."""
    from vppmesh.host.uplink import TAG_HOST
    from vppmesh.lab.testbed import destroy
    from vppmesh.lab.uplinkbed import HOST_NS, PEER_ADDR, PEER_NS, VPP_ADDR, UplinkBed

    uplink = UplinkBed()
    try:
        uplink.build()
        took = in_ns(HOST_NS, sys.executable, "-m", "vppmesh", "uplink", "take", "--interface",
                     "eth0", "--address", VPP_ADDR, "--host-link", "tap", "--api-socket",
                     str(uplink.instance.api_socket), "--state-dir",
                     "/run/vppmesh-vme-uplink/state", check=False, timeout=1500)
        assert took.returncode == 0, took.stdout + took.stderr
        link = json.loads(in_ns(HOST_NS, "ip", "-j", "-d", "link", "show", "eth0").stdout)[0]
        assert link["linkinfo"]["info_kind"] == "tun"
        assert "tcp-segmentation-offload: on" in in_ns(HOST_NS, "ethtool", "-k", "eth0").stdout
        with VppClient(uplink.instance.api_socket, timeout=30).connect() as client:
            host_tap = next(i for i in interfaces.dump_interfaces(client)
                            if i.tag == TAG_HOST)
            modes = vpp_helpers.rx_modes(client, host_tap.name)
        assert modes[:1] == ["adaptive"], modes
        peer = PEER_ADDR.split("/")[0]
        before = snmp(PEER_NS)["InCsumErrors"]
        host_before = snmp(HOST_NS)["InCsumErrors"]
        server = vpp_helpers.iperf3_server(PEER_NS)
        try:
            time.sleep(2)
            out = in_ns(HOST_NS, "iperf3", "-c", peer, "-t", "5", "-P", "2", "--json",
                        "--connect-timeout", "20000", check=False, timeout=120)
        finally:
            server.kill()
        result = json.loads(out.stdout or "{}")
        record("uplink_tap", {"error": result.get("error"), "mbit_s": result.get(
            "end", {}).get("sum_received", {}).get("bits_per_second", 0) / 1e6,
            "peer_csum_errors": snmp(PEER_NS)["InCsumErrors"] - before,
            "host_csum_errors": snmp(HOST_NS)["InCsumErrors"] - host_before})
        assert "error" not in result, result.get("error")
        assert snmp(PEER_NS)["InCsumErrors"] == before
        assert snmp(HOST_NS)["InCsumErrors"] == host_before
        restored = in_ns(HOST_NS, sys.executable, "-m", "vppmesh", "uplink", "restore",
                         "--api-socket", str(uplink.instance.api_socket), "--state-dir",
                         "/run/vppmesh-vme-uplink/state", check=False, timeout=1500)
        assert restored.returncode == 0, restored.stdout + restored.stderr
    finally:
        destroy("vme-u", Path("/run/vppmesh-vme-uplink"), quiet=True)
