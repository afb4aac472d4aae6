"""Day-2 operations against real VPPs: pods come back by themselves after VPP restarts,
and the agent's Prometheus endpoint tells what the dataplane does.

Two testbed nodes (prefix vmx-), one CNI pod on each (vppmesh-cni ADD, host-local IPAM,
exactly as a runtime drives it), each node running `vppmesh up --watch --cni-state-dir
... --metrics 127.0.0.1:9477`. Select with `pytest -k restart` or `pytest -k metrics`;
skipped with the reason when VPP, root, host-local or scapy is missing. Run alone:
    VPPMESH_VPP=/opt/vpp/bin/vpp .venv/bin/python -m pytest -s tests/test_operations_vpp.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from benchmarks.netns import stop_process
from vppmesh.dataplane.vpp import ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.lab.testbed import NodeHandle, Testbed, _uplink_mac, find_vpp, in_ns, sh
from vppmesh.ops.metrics import families
from vppmesh.testing import HOSTILE_PACKETS, vpp_helpers
from vppmesh.testing.wait import wait_for

pytestmark = [pytest.mark.vpp]
PREFIX = "vmx-"
BASE = Path("/run/vppmesh-vmx")
CRAFT = HOSTILE_PACKETS
METRICS = "127.0.0.1:9477"
RESTARTS = 3
GRACE = 2.0


def pod_ns(node: NodeHandle) -> str:
    return f"{PREFIX}c{node.index}"


def container(node: NodeHandle) -> str:
    return f"c0ffee{node.index:02d}" * 4


def netconf(bed: Testbed, node: NodeHandle) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "vppmesh", "type": "vppmesh-cni",
            "apiSocket": str(node.instance.api_socket), "mesh": str(bed.mesh_file),
            "node": node.name, "stateDir": str(node.dir / "cni"),
            "logFile": str(node.dir / "cni.log"),
            "ipam": {"type": "host-local", "dataDir": str(node.dir / "ipam")}}


def cni(bed: Testbed, node: NodeHandle, command: str,
        prev: dict[str, Any] | None = None) -> tuple[int, Any]:
    """The plugin in the node's namespace, as the node's container runtime runs it."""
    conf = netconf(bed, node)
    if prev is not None:
        conf["prevResult"] = prev
    done = vpp_helpers.run_cni(node.netns, command, conf, container=container(node),
                               netns=pod_ns(node), pod="web")
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None


class Agent(vpp_helpers.WatchAgent):
    """`vppmesh up --watch` with pod re-attach and metrics, in the node's namespace."""

    def __init__(self, bed: Testbed, node: NodeHandle) -> None:
        super().__init__(bed, node, "--cni-state-dir", str(node.dir / "cni"),
                         "--metrics", METRICS, "--stats-socket", str(node.instance.stats_socket))

    def scrape(self, *, check: bool = True) -> dict[tuple[str, tuple[tuple[str, str], ...]],
                                                    float]:
        """The agent's /metrics, read with prometheus_client's own parser ({} if the
        agent does not answer and not `check`)."""
        fetch = ("import sys, urllib.request\n"
                 f"sys.stdout.write(urllib.request.urlopen('http://{METRICS}/metrics', "
                 "timeout=10).read().decode())")
        done = in_ns(self.node.netns, sys.executable, "-c", fetch, check=False, timeout=30)
        if done.returncode != 0 and not check:
            return {}
        assert done.returncode == 0, f"scrape failed: {done.stderr}"
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in families(done.stdout) for s in f.samples}


def total(samples: dict[tuple[str, Any], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all((k, w) in lab for k, w in labels.items()))


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with vpp_helpers.testbed(vpp_helpers.require_host_local, prefix=PREFIX, base_dir=BASE,
                             nodes=2, tunnels=2, pods=0, workers=0) as bed:
        vpp_helpers.on_demand_rekeys(bed, GRACE)  # receivers follow a new generation in 2 s
        vpp_helpers.add_namespaces(*(pod_ns(node) for node in bed.nodes))
        yield bed


@pytest.fixture(scope="module")
def pods(bed: Testbed) -> dict[str, dict[str, Any]]:
    added = {}
    for node in bed.nodes:
        code, result = cni(bed, node, "ADD")
        assert code == 0, result
        added[node.name] = result
    return added


@pytest.fixture(scope="module")
def agents(bed: Testbed, pods: dict[str, Any]) -> Iterator[dict[str, Agent]]:
    with vpp_helpers.running_agents({n.name: Agent(bed, n) for n in bed.nodes}) as running:
        yield running


def address(pods: dict[str, Any], node: NodeHandle) -> str:
    return str(pods[node.name]["ips"][0]["address"].split("/")[0])


def test_metrics_follow_traffic_replays_and_reconciles(
        bed: Testbed, pods: dict[str, Any], agents: dict[str, Agent]) -> None:
    n1, n2 = bed.nodes
    target = address(pods, n2)
    wait_for(lambda: vpp_helpers.ping_ok(pod_ns(n1), target), 30, "pod-to-pod ping")
    wait_for(lambda: total(agents[n1.name].scrape(check=False),
                           "vppmesh_tunnel_protected") == 2,
             30, "a metrics snapshot with both tunnels")
    first = agents[n1.name].scrape()
    assert total(first, "vppmesh_tunnel_up") == 2
    assert total(first, "vppmesh_reconcile_duration_seconds_count") >= 1
    assert total(first, "vppmesh_vpp_up") == 1
    assert total(first, "vppmesh_pods_attached") == 1
    assert any(name == "vppmesh_key_generation" for name, _ in first)
    for limit in ("packets", "bytes", "seconds"):
        assert 0 <= total(first, "vppmesh_key_limit_used_ratio", limit=limit) < 0.5
    # Traffic: a 5 s iperf3 stream; the next snapshot (at most 5 s later) counts it.
    server = vpp_helpers.iperf3_server(pod_ns(n2))
    try:
        time.sleep(0.5)
        in_ns(pod_ns(n1), "iperf3", "-c", target, "-t", "5", "-b", "20M", timeout=60)
    finally:
        stop_process(server)
    time.sleep(6)
    second = agents[n1.name].scrape()
    for direction in ("out", "in"):
        grew = total(second, "vppmesh_tunnel_packets_total", direction=direction) \
            - total(first, "vppmesh_tunnel_packets_total", direction=direction)
        grew_bytes = total(second, "vppmesh_tunnel_bytes_total", direction=direction) \
            - total(first, "vppmesh_tunnel_bytes_total", direction=direction)
        # 5 s at 20 Mbit/s out (12.5 MB); TCP's ACKs come back (fewer: delayed ACKs).
        least_packets, least_bytes = (5000, 5_000_000) if direction == "out" else (100, 5000)
        assert grew >= least_packets and grew_bytes >= least_bytes, \
            (direction, grew, grew_bytes)
    assert total(second, "vppmesh_reconcile_duration_seconds_count") > \
        total(first, "vppmesh_reconcile_duration_seconds_count")
    print(f"\nmetrics on {n1.name}: {len(second)} samples; out packets "
          f"{total(second, 'vppmesh_tunnel_packets_total', direction='out'):.0f}, "
          f"reconcile polls {total(second, 'vppmesh_reconcile_duration_seconds_count'):.0f}")

    # Hostile ESP against n2 (vppmesh/testing/hostile_packets.py): the replay counter rises, and
    # forged, unknown-SPI and plain IPIP packets land in their counters too.
    pytest.importorskip("scapy")
    before = agents[n2.name].scrape()
    # The SPI of n2's inbound SA that carries the ping now (ECMP puts one flow on one
    # tunnel): the one whose last sequence number moves.
    def inbound_seq() -> dict[int, int]:
        with VppClient(n2.instance.api_socket).connect() as api:
            return {s.spec.spi: s.last_seq_inbound for s in ipsec.dump_sas(api)
                    if s.spec.direction == "in" and s.spec.peer_number == n1.index}

    with vpp_helpers.SteadyPing(pod_ns(n1), target, interval=0.05):
        time.sleep(0.5)
        first_seq = inbound_seq()
        time.sleep(1)
        moving = [spi for spi, seq in inbound_seq().items() if seq > first_seq.get(spi, seq)]
        assert moving, "no inbound SA of n2 carries n1's ping"
        spi = moving[0]
        tunnel = (spi >> 4) & 0xF  # keys.spi_for: tunnel t runs between underlay addresses t
        craft = in_ns(bed.underlay_ns, sys.executable, str(CRAFT), "br0",
                      _uplink_mac(n2.index), str(n1.underlay[tunnel].ip),
                      str(n2.underlay[tunnel].ip), hex(spi), "10", check=False, timeout=60)
        assert craft.returncode == 0, craft.stdout + craft.stderr
    time.sleep(6)
    after = agents[n2.name].scrape()

    def grew(reason: str) -> float:
        return total(after, "vppmesh_esp_errors_total", reason=reason) - \
            total(before, "vppmesh_esp_errors_total", reason=reason)

    print(f"hostile packets at {n2.name}: replay +{grew('replay'):.0f}, decryption failed "
          f"+{grew('decryption_failed'):.0f}, no matching tunnel "
          f"+{grew('no_matching_tunnel'):.0f}, guard drops +"
          f"{total(after, 'vppmesh_guard_dropped_packets_total') - total(before, 'vppmesh_guard_dropped_packets_total'):.0f}")  # noqa: E501
    # The 10 replayed packets; the 10 with a far-behind sequence number count as replays
    # or, read by ESN as the next 2^32 epoch, fail decryption (+20 there, seen here).
    assert grew("replay") >= 10
    assert grew("decryption_failed") >= 10
    assert grew("replay") + grew("decryption_failed") >= 30
    assert grew("no_matching_tunnel") >= 10
    assert total(after, "vppmesh_guard_dropped_packets_total") - \
        total(before, "vppmesh_guard_dropped_packets_total") >= 20


def test_agent_restart_loses_no_packet(bed: Testbed, pods: dict[str, Any],
                                       agents: dict[str, Agent]) -> None:
    """The agent-alone upgrade: stopped, a one-shot `up` (the new version) changes
    nothing, started again; VPP forwards throughout."""
    n1, n2 = bed.nodes
    target = address(pods, n2)
    wait_for(lambda: vpp_helpers.ping_ok(pod_ns(n1), target), 30, "pod-to-pod ping")
    ping_log = BASE / "agent-restart-ping.txt"
    with ping_log.open("w") as out:
        # A count, not a deadline: -w alone ends ping with the last reply in flight,
        # which would count as lost; with -c ping waits for every reply (up to -w).
        pinger = subprocess.Popen(["ip", "netns", "exec", pod_ns(n1), "ping", "-D", "-i",
                                   "0.05", "-c", "500", "-w", "60", target], stdout=out,
                                  stderr=subprocess.STDOUT)
    time.sleep(2)
    for node in (n1, n2):
        agents[node.name].stop()
        out = bed.run_vppmesh(node, "up", *bed.state_args(node)).stdout
        assert " 0 change(s)" in out, out
        time.sleep(2)  # no agent at all for a while
        agents[node.name].start()
    pinger.wait(timeout=60)
    text = ping_log.read_text()
    times = reply_times(ping_log)
    gaps = [b - a for a, b in pairwise(times)]
    summary = next(line for line in text.splitlines() if "packets transmitted" in line)
    print(f"\nagent restarts on both nodes under ping -i 0.05: {summary}; longest gap "
          f"between replies {max(gaps):.2f} s")
    assert " 0% packet loss" in summary, summary
    assert max(gaps) < 1.0  # scheduling on 2 busy cores; the loss above is the point


def netns_identity(ns: str) -> tuple[int, int]:
    """(netns inode, eth0 ifindex): both change if the pod or its link were recreated."""
    inode = os.stat(f"/var/run/netns/{ns}").st_ino
    link = json.loads(in_ns(ns, "ip", "-j", "link", "show", "eth0").stdout)[0]
    return inode, int(link["ifindex"])


def reply_times(path: Path) -> list[float]:
    """Wall-clock times of ping's replies (ping -D prints [epoch] before each)."""
    times = []
    for line in path.read_text().splitlines():
        if line.startswith("[") and "bytes from" in line:
            times.append(float(line[1:line.index("]")]))
    return times


def test_pods_survive_vpp_restart_under_traffic_without_plaintext(
        bed: Testbed, pods: dict[str, Any], agents: dict[str, Agent]) -> None:
    n1, n2 = bed.nodes
    target = address(pods, n2)
    wait_for(lambda: vpp_helpers.ping_ok(pod_ns(n1), target), 30, "pod-to-pod ping")
    identity = {n.name: netns_identity(pod_ns(n)) for n in bed.nodes}
    capture = vpp_helpers.UnderlayCapture(bed, BASE / "restart.pcap")
    ping_log = BASE / "restart-ping.txt"
    # The stream must outlast every restart however slow the machine (a restart, its checks
    # and 2 x rekey_grace of traffic take 15-35 s); the ping runs until it is stopped.
    seconds = 20 + RESTARTS * 45
    with ping_log.open("w") as out:
        pinger = subprocess.Popen(["ip", "netns", "exec", pod_ns(n1), "ping", "-D", "-i",
                                   "0.1", target], stdout=out, stderr=subprocess.STDOUT)
    server = vpp_helpers.iperf3_server(pod_ns(n2))
    time.sleep(0.5)
    client = subprocess.Popen(
        ["ip", "netns", "exec", pod_ns(n1), "iperf3", "-c", target, "-t", str(seconds - 5),
         "-b", "20M", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs: list[dict[str, float]] = []
    try:
        time.sleep(5)
        for run in range(RESTARTS):
            log_before = len(agents[n2.name].text())
            pid = int(n2.instance.pid_file.read_text())
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists()  # type: ignore[misc]
                     or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(),
                     10, "VPP to die")
            n2.instance.api_socket.unlink(missing_ok=True)
            bed._start_vpp(n2, find_vpp())
            answered = time.time()  # VPP answers its API again
            bed._uplink(n2)  # the host's own configuration (startup.conf on a real host)
            wait_for(lambda a=answered: any(t > a for t in reply_times(ping_log)), 30,  # type: ignore[misc]
                     f"ping to resume after VPP restart {run + 1}")
            resumed = min(t for t in reply_times(ping_log) if t > answered)
            before_kill = max((t for t in reply_times(ping_log) if t < killed), default=killed)
            wait_for(lambda lb=log_before: "VPP is back" in agents[n2.name].text()[lb:],
                     30, "the agent to report VPP back")
            log = agents[n2.name].text()[log_before:]
            assert "1 pod(s) re-attached" in log, log
            agent = re.search(r"programmed again in (\d+) ms .*re-attached in (\d+) ms", log)
            runs.append({"resumed_after_answer_s": round(resumed - answered, 2),
                         "outage_s": round(resumed - before_kill, 2),
                         "vpp_start_s": round(answered - killed, 2),
                         "agent_mesh_ms": int(agent.group(1)) if agent else -1,
                         "agent_mesh_and_pods_ms": int(agent.group(2)) if agent else -1})
            print(f"\nrestart {run + 1}: {runs[-1]}", flush=True)
            for node in bed.nodes:  # CHECK passes: the attachment is as ADD made it
                code, out = cni(bed, node, "CHECK", prev=pods[node.name])
                assert code == 0, (node.name, out)
            # Not recreated: same namespace, same pod link.
            assert {n.name: netns_identity(pod_ns(n)) for n in bed.nodes} == identity
            # Traffic both ways for 2 x rekey_grace proves the new generation to the
            # sender, which keeps the next restart within the peer's window.
            time.sleep(4 * GRACE + 4)
        out, _err = client.communicate(timeout=seconds + 60)
    finally:
        client.kill()
        stop_process(server)
        pinger.kill()
    seen = capture.stop()
    result = json.loads(out)
    assert "error" not in result, result.get("error")
    intervals = [i["sum"]["bits_per_second"] for i in result["intervals"]]
    metrics = agents[n2.name].scrape()
    summary = {"runs": runs, "capture": seen,
               "iperf3_mbit": round(result["end"]["sum_received"]["bits_per_second"] / 1e6, 1),
               "empty_seconds": sum(1 for i in intervals if i == 0),
               "recovery_s": total(metrics, "vppmesh_vpp_recovery_seconds"),
               "unavailable_s": total(metrics, "vppmesh_vpp_unavailable_seconds")}
    print("\nVPP restarts:", json.dumps(summary))
    assert all(r["resumed_after_answer_s"] <= 5.0 for r in runs), runs
    assert seen["clear"] == 0 and seen["esp"] > 1000, capture.clear_lines[:10]
    assert intervals[-1] > 0  # the TCP stream carried data again after the last restart
    assert total(metrics, "vppmesh_vpp_restarts_total") == RESTARTS
    assert total(metrics, "vppmesh_pod_reattachments_total") == RESTARTS
    assert total(metrics, "vppmesh_pods_attached") == 1
    assert "fail closed" not in agents[n2.name].text()


def test_vanished_pod_is_collected_after_restart(
        bed: Testbed, pods: dict[str, Any], agents: dict[str, Agent]) -> None:
    """A pod whose namespace is gone (deleted without DEL): after the next VPP restart the
    agent removes its record, its veth and its address instead of re-attaching it."""
    n1 = bed.nodes[0]
    ns = f"{PREFIX}gone"
    sh("ip", "netns", "add", ns)
    done = vpp_helpers.run_cni(n1.netns, "ADD", netconf(bed, n1), container="deadbeef" * 4,
                               netns=ns, pod=None)
    assert done.returncode == 0, done.stdout
    records = n1.dir / "cni"
    assert len(list(records.glob("*.json"))) == 2
    sh("ip", "netns", "del", ns)
    log_before = len(agents[n1.name].text())
    bed.restart_vpp(n1)
    wait_for(lambda: "is gone (no network namespace)" in agents[n1.name].text()[log_before:],
             30, "the vanished pod to be collected")
    assert len(list(records.glob("*.json"))) == 1
    ipam = [p.name for p in (n1.dir / "ipam" / "vppmesh").iterdir()
            if p.name.startswith("198.18.")]
    assert len(ipam) == 1, ipam  # only the live pod's address stays reserved
    code, out = cni(bed, n1, "CHECK", prev=pods[n1.name])
    assert code == 0, out
