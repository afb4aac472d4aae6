"""`make demo`: a 3-node encrypted mesh on this machine, iperf3 across every pair.

The table shows per node pair the TCP goodput, the retransmits and how many of the pair's
tunnels carried the traffic (from the sender's per-SA counters), so ECMP is visible.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from vppmesh.dataplane.state import is_owned_sa_id
from vppmesh.dataplane.vpp import ipsec
from vppmesh.dataplane.vpp.client import VppClient
from vppmesh.dataplane.vpp.stats import StatsReader
from vppmesh.lab.testbed import NodeHandle, Testbed, TestbedSpec, in_ns

IPERF_PORT = 5201


@dataclass
class PairResult:
    src: str
    dst: str
    gbits: float
    retransmits: int
    tunnels_used: int
    tunnels: int
    ping_ok: bool


def outbound_packets(node: NodeHandle, peer_number: int) -> dict[int, int]:
    """Packets sent so far on each outbound SA of `node` towards one peer."""
    with VppClient(node.instance.api_socket).connect() as api:
        sas = [s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)
               and s.spec.direction == "out" and s.spec.peer_number == peer_number]
    with StatsReader(node.instance.stats_socket) as reader:
        counters = reader.sa_counters([s.stat_index for s in sas])
    return {s.spec.sa_id: counters[s.stat_index].packets for s in sas}


def iperf_pair(bed: Testbed, src: NodeHandle, dst: NodeHandle, *, seconds: int,
               streams: int) -> PairResult:
    server_ns, client_ns = dst.pod_netns(0), src.pod_netns(0)
    target = str(dst.pod_address(0))
    ping = in_ns(client_ns, "ping", "-c", "2", "-W", "2", target, check=False)
    before = outbound_packets(src, dst.index)
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p",
                               str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        result = None
        for _attempt in range(20):  # the server needs a moment to listen
            out = in_ns(client_ns, "iperf3", "-c", target, "-p", str(IPERF_PORT), "-t",
                        str(seconds), "-P", str(streams), "--json", check=False,
                        timeout=seconds + 30)
            data = json.loads(out.stdout or "{}")
            if "error" not in data and "end" in data:
                result = data
                break
            time.sleep(0.2)
        if result is None:
            raise RuntimeError(f"iperf3 {src.name} -> {dst.name} failed: {out.stdout[-500:]}")
    finally:
        server.kill()
        server.wait()
    after = outbound_packets(src, dst.index)
    used = sum(1 for sa, n in after.items() if n - before.get(sa, 0) > 100)
    end = result["end"]
    return PairResult(src=src.name, dst=dst.name,
                      gbits=end["sum_received"]["bits_per_second"] / 1e9,
                      retransmits=int(end["sum_sent"].get("retransmits", 0)),
                      tunnels_used=used, tunnels=len(after), ping_ok=ping.returncode == 0)


def run_demo(spec: TestbedSpec | None = None, *, seconds: int = 5, streams: int = 8,
             keep: bool = False) -> list[PairResult]:
    bed = Testbed(spec or TestbedSpec(nodes=3, tunnels=4, pods=1))

    def say(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    bed.up(progress=say)
    try:
        results = []
        for src, dst in itertools.combinations(bed.nodes, 2):
            say(f"iperf3 {src.pod_name(0)} -> {dst.pod_name(0)} ({streams} streams, {seconds} s)")
            results.append(iperf_pair(bed, src, dst, seconds=seconds, streams=streams))
        return results
    finally:
        if not keep:
            bed.down(quiet=True)


def render(results: list[PairResult]) -> str:
    header = f"{'pair':<12} {'ping':<5} {'Gbit/s':>8} {'retransmits':>12} {'tunnels used':>13}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.src + ' -> ' + r.dst:<12} {'ok' if r.ping_ok else 'FAIL':<5} "
                     f"{r.gbits:>8.2f} {r.retransmits:>12} "
                     f"{str(r.tunnels_used) + ' of ' + str(r.tunnels):>13}")
    return "\n".join(lines)
