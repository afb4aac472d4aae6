"""`vppmesh verify`: prove to an operator, on a live node, that mesh traffic is encrypted.

Three independent pieces of evidence, each from the dataplane itself:

1. structure: every peer has its tunnels, each admin-up, protected, with an outbound SA
   of ours (AES-GCM-256, ESN, anti-replay) and inbound SAs whose SPIs name that peer;
2. counters: over a short window the SAs of every peer count packets in both directions
   (probe pings from the host link make traffic when none flows);
3. capture (`--capture`): VPP itself records the uplink's frames (pcap trace works for
   every driver: af_packet, AVF, DPDK) and each frame is classified. Any frame showing a
   pod address or an IPIP packet in clear fails the run. ESP counts over IPv4 and IPv6
   alike, and inside UDP (RFC 3948) on port 4500 or a NAT's forwarded port.

Beside them, each pair's key kind (from the generation file): agreed by the two agents
over their channel (ephemeral, forward secret) or derived from the static keys. It is
reported; with `--require-forward-secrecy` a pair still on static keys fails the run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import dpkt
from pydantic import BaseModel

from vppmesh.config import Mesh, Node
from vppmesh.dataplane.plan import HOST_LINUX_IFNAME
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance, tunnel_instance
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.dataplane.vpp.stats import StatsReader
from vppmesh.errors import VppMeshError
from vppmesh.host import link as linux
from vppmesh.host.underlay import NAT_T_PORT, encapsulation, path
from vppmesh.host.uplink import TAG_NIC
from vppmesh.keying.keys import spi_sender, spi_tunnel
from vppmesh.keying.pairs import PairSecrecy
from vppmesh.ops.status import FORWARD_SECRECY_FIX, PairKeys, secrecy_summary

PCAP_DIR = Path("/tmp")  # VPP writes pcap trace files there, whatever name it is given
IPPROTO_IPIP = 4
IPPROTO_ESP = 50
IPPROTO_IPV6 = 41
IPPROTO_UDP = 17
SNAPLEN = 128  # outer headers plus an inner IPv4/TCP header: enough to classify, no data


class PeerVerdict(PairKeys):
    name: str
    node_number: int
    tunnels_expected: int
    tunnels_ok: int
    route_paths: int
    out_packets: int | None  # SA counter deltas over the window; None without stats
    in_packets: int | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class CaptureVerdict(BaseModel):
    interface: str
    frames: int
    esp_between_nodes: int
    esp_elsewhere: int
    esp_in_udp: int = 0  # of the ESP frames above, those carried in UDP (RFC 3948)
    ipip_in_clear: int
    pod_address_in_clear: int
    other: int
    offenders: list[str]  # header summaries of the first offending frames (no payload)

    @property
    def ok(self) -> bool:
        return self.esp_between_nodes > 0 and not self.ipip_in_clear \
            and not self.pod_address_in_clear


class VerifyReport(BaseModel):
    node: str
    window_seconds: float
    probes: int
    peers: list[PeerVerdict]
    capture: CaptureVerdict | None
    require_forward_secrecy: bool = False

    @property
    def not_forward_secret(self) -> list[PeerVerdict]:
        """The peers whose keys are not agreed both ways (or not known to be), or whose
        agreed key is older than the forward-secrecy window, or that are stopped."""
        return [p for p in self.peers if p.forward_secret is not True or p.key_problems]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.peers) and (self.capture is None or self.capture.ok) \
            and not (self.require_forward_secrecy and self.not_forward_secret)

    @property
    def verdict(self) -> str:
        if self.ok:
            extra = ""
            if self.capture is not None:
                extra = (f"; capture on {self.capture.interface}: {self.capture.frames} frames, "
                         f"{self.capture.esp_between_nodes} ESP between node addresses, "
                         "0 in clear")
            if self.require_forward_secrecy:
                extra += "; every pair on ephemeral keys (forward secret)"
            return (f"PASS: {len(self.peers)} peer(s), every tunnel protected and counting "
                    f"both ways{extra}")
        reasons = [f"{p.name}: {'; '.join(p.problems)}" for p in self.peers if p.problems]
        if self.require_forward_secrecy and self.not_forward_secret:
            pairs = ", ".join(
                f"{self.node}-{p.name} ({'; '.join(p.key_problems) or p.keys or 'unknown'})"
                for p in self.not_forward_secret)
            reasons.append(f"no forward secrecy on pair(s) {pairs}: {FORWARD_SECRECY_FIX}")
        if self.capture is not None and not self.capture.ok:
            c = self.capture
            if c.pod_address_in_clear or c.ipip_in_clear:
                reasons.append(f"capture on {c.interface}: {c.pod_address_in_clear} frame(s) "
                               f"with pod addresses and {c.ipip_in_clear} IPIP frame(s) in "
                               "clear")
            else:
                reasons.append(f"capture on {c.interface}: no ESP between node addresses "
                               "(no mesh traffic during the window)")
        return "FAIL: " + " | ".join(reasons)


class Structure(BaseModel):
    peers: list[PeerVerdict]
    sa_out: dict[int, list[int]]  # peer number -> stat indexes of its outbound SAs
    sa_in: dict[int, list[int]]  # peer number -> stat indexes of its inbound SAs
    tunnel_out: dict[tuple[int, int], int]  # (peer, tunnel) -> its outbound SA stat index

    def stat_indexes(self) -> list[int]:
        return sorted({i for v in (*self.sa_out.values(), *self.sa_in.values()) for i in v})


def check_structure(api: VppApi, mesh: Mesh, local: Node,
                    nat_ports: Mapping[str, tuple[int, ...]] | None = None) -> Structure:
    """Per peer, what VPP holds against what the mesh file says it must hold."""
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    tunnels = {t.instance: t for t in ipip.dump_tunnels(api)
               if is_owned_tunnel_instance(t.instance)}
    sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)}
    protections = ipsec.dump_protections(api)
    table = mesh.settings.mesh_table_id
    mesh_routes = routes.dump_routes(api, table) if table in routes.dump_tables(api) else {}
    count = mesh.settings.tunnels_per_peer
    verdicts = []
    out_by_peer: dict[int, list[int]] = {}
    in_by_peer: dict[int, list[int]] = {}
    tunnel_out: dict[tuple[int, int], int] = {}
    for peer in mesh.peers_of(local.name):
        problems: list[str] = []
        ok = 0
        tunnel_ifs = []
        out_idx: list[int] = []
        in_idx: list[int] = []
        pair = path(local, peer, count)
        if nat_ports and peer.name in nat_ports and pair.udp_encap:
            pair = replace(pair, udp_dst_ports=nat_ports[peer.name])  # where its NAT maps
        for index in range(count):
            where = f"tunnel {index}"
            t = tunnels.get(tunnel_instance(peer.node_number, index))
            if t is None:
                problems.append(f"{where} missing")
                continue
            tunnel_ifs.append(t.sw_if_index)
            want_src, want_dst = pair.endpoints[index]
            if (t.src, t.dst) != (want_src, want_dst):
                problems.append(f"{where} runs {t.src} -> {t.dst}, expected "
                                f"{want_src} -> {want_dst}")
                continue
            iface = ifaces.get(t.sw_if_index)
            if iface is None or not iface.admin_up:
                problems.append(f"{where} is down")
                continue
            protection = protections.get(t.sw_if_index)
            if protection is None:
                problems.append(f"{where} is up WITHOUT protection: its traffic is in clear")
                continue
            sa_out, sa_ins = protection
            issue = _sa_issue(sas.get(sa_out), "out", local.node_number, index)
            issue = issue or _encapsulation_issue(sas.get(sa_out),
                                                  pair.encapsulation(index))
            issue = issue or next((i for i in (_sa_issue(sas.get(s), "in", peer.node_number,
                                                         index)
                                               for s in sa_ins) if i), None)
            if not sa_ins:
                issue = "has no inbound SA"
            if issue:
                problems.append(f"{where} {issue}")
                continue
            out_idx.append(sas[sa_out].stat_index)
            tunnel_out[(peer.node_number, index)] = sas[sa_out].stat_index
            in_idx += [sas[s].stat_index for s in sa_ins]
            ok += 1
        paths = mesh_routes.get(peer.pod_cidr, ())  # type: ignore[call-overload]
        if sorted(paths) != sorted(tunnel_ifs) or not paths:
            problems.append(f"route to {peer.pod_cidr} has {len(paths)} path(s) over its "
                            f"tunnels, expected {count}")
        out_by_peer[peer.node_number], in_by_peer[peer.node_number] = out_idx, in_idx
        verdicts.append(PeerVerdict(name=peer.name, node_number=peer.node_number,
                                    tunnels_expected=count, tunnels_ok=ok,
                                    route_paths=len(paths), out_packets=None, in_packets=None,
                                    problems=problems))
    return Structure(peers=verdicts, sa_out=out_by_peer, sa_in=in_by_peer,
                     tunnel_out=tunnel_out)


def _encapsulation_issue(sa: ipsec.SaState | None,
                         want: tuple[bool, int | None]) -> str | None:
    """An outbound SA must send as its pair needs: ESP in UDP to the right port, or not.

    (Inbound SAs carry no UDP flag: VPP takes UDP/4500 to ESP input regardless.)
    """
    if sa is None:
        return None
    have = encapsulation(sa.spec)
    if have == want:
        return None
    return (f"outbound SA {sa.spec.sa_id:#x} sends {_describe(have)}, but the pair needs "
            f"{_describe(want)}")


def _describe(encapsulation: tuple[bool, int | None]) -> str:
    udp, port = encapsulation
    return f"ESP in UDP to port {port}" if udp else "plain ESP"


def _sa_issue(sa: ipsec.SaState | None, direction: str, sender: int,
              tunnel: int) -> str | None:
    if sa is None:
        return f"protection names a missing {direction}bound SA"
    if sa.spec.direction != direction:
        return f"uses SA {sa.spec.sa_id:#x} in the wrong direction"
    if sa.crypto_algorithm != ipsec.CRYPTO_AES_GCM_256:
        return f"{direction}bound SA {sa.spec.sa_id:#x} is not AES-GCM-256"
    if sa.flags & ipsec.SA_FLAGS != ipsec.SA_FLAGS:
        return f"{direction}bound SA {sa.spec.sa_id:#x} lacks ESN or anti-replay"
    if spi_sender(sa.spec.spi) != sender or spi_tunnel(sa.spec.spi) != tunnel:
        return f"{direction}bound SA {sa.spec.sa_id:#x} has SPI {sa.spec.spi:#x} of another " \
               "sender or tunnel"
    return None


def read_packets(reader: StatsReader | None, indexes: list[int]) -> dict[int, int]:
    """Packets counted so far by each SA (by stat index); empty without a stats socket."""
    if reader is None:
        return {}
    return {i: c.packets for i, c in reader.sa_counters(indexes).items()}


def find_uplink_interface(api: VppApi, local: Node) -> interfaces.Interface:
    ifaces = interfaces.dump_interfaces(api)
    # After an uplink takeover the wire is the NIC VPP bridges (vppmesh/host/uplink/); VPP's own
    # addresses sit on the bridge's BVI, which sees only VPP's side of the traffic.
    taken = next((i for i in ifaces if i.tag == TAG_NIC), None)
    if taken is not None:
        return taken
    uplink, _ = interfaces.find_uplink(api, local.uplink, local.primary, ifaces)
    if uplink is None:
        raise VppMeshError(f"no VPP interface holds {local.name}'s primary underlay address "
                           f"{local.primary}; is the mesh up (`vppmesh up`)?")
    return uplink


def pcap_on(sw_if_index: int, filename: str, max_packets: int) -> Request:
    return Request("pcap_trace_on", {
        "capture_rx": True, "capture_tx": True, "capture_drop": False, "filter": False,
        "preallocate_data": False, "free_data": True, "max_packets": max_packets,
        "max_bytes_per_packet": SNAPLEN, "sw_if_index": sw_if_index, "error": "",
        "filename": filename,
    }, "pcap trace on the uplink")


def pcap_off() -> Request:
    return Request("pcap_trace_off", {}, "pcap trace off")


def classify_capture(frames: Iterable[bytes], mesh: Mesh, interface: str) -> CaptureVerdict:
    """Sort captured Ethernet frames into ESP between nodes, clear text, and the rest."""
    node_addrs = {a.ip for n in mesh.nodes for a in n.underlay} | \
        {n.nat.public for n in mesh.nodes if n.nat is not None}
    udp_ports = {NAT_T_PORT} | {n.nat.port for n in mesh.nodes if n.nat is not None}
    pods = [n.pod_cidr for n in mesh.nodes]
    counts = {"frames": 0, "esp_between_nodes": 0, "esp_elsewhere": 0, "esp_in_udp": 0,
              "ipip_in_clear": 0, "pod_address_in_clear": 0, "other": 0}
    offenders: list[str] = []

    def in_pods(*addrs: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(a in p for a in addrs for p in pods)  # type: ignore[operator]

    for raw in frames:
        counts["frames"] += 1
        eth = dpkt.ethernet.Ethernet(raw)
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
            counts["other"] += 1
            continue
        src = ipaddress.ip_address(ip.src)
        dst = ipaddress.ip_address(ip.dst)
        # IPv6: the header after any extension headers (dpkt leaves `p` unset when it
        # stops at ESP, which it counts among them; then the first next header is ESP).
        proto = ip.p if isinstance(ip, dpkt.ip.IP) else getattr(ip, "p", ip.nxt)
        summary = f"{src} > {dst} proto {proto}"
        if proto == IPPROTO_UDP and esp_in_udp(ip.data, udp_ports):
            counts["esp_in_udp"] += 1
            proto = IPPROTO_ESP
        if proto == IPPROTO_ESP and not in_pods(src, dst):
            key = "esp_between_nodes" if {src, dst} <= node_addrs else "esp_elsewhere"
            counts[key] += 1
            continue
        if proto in (IPPROTO_IPIP, IPPROTO_IPV6):
            counts["ipip_in_clear"] += 1
            inner = ip.data
            if isinstance(inner, dpkt.ip.IP | dpkt.ip6.IP6):
                summary += (f" (inner {ipaddress.ip_address(inner.src)} > "
                            f"{ipaddress.ip_address(inner.dst)})")
        elif in_pods(src, dst):
            counts["pod_address_in_clear"] += 1
        else:
            counts["other"] += 1
            continue
        if len(offenders) < 5:
            offenders.append(summary)
    return CaptureVerdict(interface=interface, offenders=offenders, **counts)


def esp_in_udp(udp: object, ports: set[int]) -> bool:
    """ESP in UDP (RFC 3948) on one of the mesh's ports: not a NAT keepalive (one 0xff
    byte) nor IKE (a zero non-ESP marker where the SPI would be)."""
    if not isinstance(udp, dpkt.udp.UDP) or not ({udp.sport, udp.dport} & ports):
        return False
    payload = bytes(udp.data)
    return len(payload) >= 8 and payload[:4] != b"\0\0\0\0"


def read_pcap(path: Path) -> list[bytes]:
    with path.open("rb") as f:
        return [bytes(frame) for _, frame in dpkt.pcap.Reader(f)]


PROBE_PAYLOAD = b"vppmesh-verify probe: must never be seen in clear"
PROBE_FLOWS_PER_TUNNEL = 16
PROBE_PORT = 9  # discard: the peer answers with ICMP port unreachable, or nothing


class Probes:
    """Traffic for the window, from this node's host link to every peer's host link.

    Pings make the SAs count both ways; UDP datagrams from many source ports spread over
    every tunnel (ECMP hashes on ports), so a single unprotected tunnel cannot hide.
    """

    def __init__(self, mesh: Mesh, local: Node, seconds: float) -> None:
        self.targets = [str(p.mesh_address) for p in mesh.peers_of(local.name)]
        self.source = str(local.mesh_address)
        self.flows = PROBE_FLOWS_PER_TUNNEL * mesh.settings.tunnels_per_peer
        count = max(2, int(seconds / 0.2))
        self.pings = [subprocess.Popen(
            ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-I",
             HOST_LINUX_IFNAME, target], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for target in self.targets]

    def spray(self) -> None:
        for flow in range(self.flows):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((self.source, 0))
                for target in self.targets:
                    with contextlib.suppress(OSError):
                        s.sendto(PROBE_PAYLOAD + b" %d" % flow, (target, PROBE_PORT))

    def stop(self) -> None:
        for p in self.pings:
            p.kill()
            p.wait()


def verify(api: VppApi, mesh: Mesh, node: str, *, stats_socket: Path | None,
           seconds: float = 3.0, capture: bool = False, probes: bool = True,
           max_packets: int = 20000, secrecy: Mapping[str, PairSecrecy] | None = None,
           require_forward_secrecy: bool = False,
           nat_ports: Mapping[str, tuple[int, ...]] | None = None,
           now: float | None = None) -> VerifyReport:
    """The report; `secrecy` (status.key_secrecy) gives each pair's key kind, which
    `require_forward_secrecy` demands be ephemeral both ways; `nat_ports` (status.nat_ports)
    the ports the agent learned that peers' NATs map their ESP to."""
    local = mesh.node(node)
    structure = check_structure(api, mesh, local, nat_ports)
    peers = structure.peers
    for peer in peers:
        peer.secrecy = secrecy.get(peer.name) if secrecy is not None else None
        if peer.secrecy is not None:
            peer.key_problems = peer.secrecy.problems(
                mesh.settings, time.time() if now is None else now)
    use_probes = probes and linux.link_exists(HOST_LINUX_IFNAME)
    uplink = find_uplink_interface(api, local) if capture else None
    filename = f"vppmesh-verify-{os.getpid()}.pcap"
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(StatsReader(stats_socket)) if stats_socket else None
        before = read_packets(reader, structure.stat_indexes())
        if uplink is not None:
            api.call(pcap_on(uplink.sw_if_index, filename, max_packets))
        running = Probes(mesh, local, seconds) if use_probes else None
        try:
            if running is not None:
                running.spray()
            time.sleep(seconds)
        finally:
            if uplink is not None:
                api.call(pcap_off())
            if running is not None:
                running.stop()
        after = read_packets(reader, structure.stat_indexes())
    def delta(stat_indexes: list[int]) -> int:
        return sum(after[i] - before[i] for i in stat_indexes)

    for peer in peers:
        if not after:
            break
        out = delta(structure.sa_out[peer.node_number])
        inb = delta(structure.sa_in[peer.node_number])
        peer.out_packets, peer.in_packets = out, inb
        if peer.tunnels_ok and (out <= 0 or inb <= 0):
            peer.problems.append(f"SA counters did not move both ways in {seconds:g} s "
                                 f"(out +{out}, in +{inb}): no traffic reached this peer")
        if use_probes:
            silent = [t for (number, t), i in structure.tunnel_out.items()
                      if number == peer.node_number and delta([i]) <= 0]
            if silent:
                peer.problems.append(f"tunnel(s) {', '.join(map(str, silent))} sent nothing "
                                     "encrypted while probes were spread over every tunnel")
    verdict = None
    if uplink is not None:
        path = PCAP_DIR / filename
        try:
            verdict = classify_capture(read_pcap(path), mesh, uplink.name)
        finally:
            path.unlink(missing_ok=True)
    return VerifyReport(node=node, window_seconds=seconds,
                        probes=len(peers) if use_probes else 0, peers=peers, capture=verdict,
                        require_forward_secrecy=require_forward_secrecy)


def render(report: VerifyReport) -> str:
    header = f"{'peer':<12} {'tunnels ok':>10} {'route paths':>11} {'out pkts':>9} " \
             f"{'in pkts':>9}  {'keys':<23}  problems"
    lines = [f"node {report.node}: {report.window_seconds:g} s window, "
             f"{report.probes} probe(s)", header, "-" * len(header)]
    for p in report.peers:
        out = "-" if p.out_packets is None else f"+{p.out_packets}"
        inb = "-" if p.in_packets is None else f"+{p.in_packets}"
        lines.append(f"{p.name:<12} {f'{p.tunnels_ok}/{p.tunnels_expected}':>10} "
                     f"{p.route_paths:>11} {out:>9} {inb:>9}  {p.keys or '-':<23}  "
                     f"{'; '.join(p.problems) or 'ok'}")
    c = report.capture
    if c is not None:
        lines.append(f"capture on {c.interface}: {c.frames} frames: {c.esp_between_nodes} ESP "
                     f"between node addresses ({c.esp_in_udp} in UDP), {c.esp_elsewhere} ESP "
                     "elsewhere, "
                     f"{c.ipip_in_clear} IPIP in clear, {c.pod_address_in_clear} with pod "
                     f"addresses in clear, {c.other} other (ARP, host traffic)")
        lines += [f"  offending frame: {o}" for o in c.offenders]
    pairs = {p.name: p.secrecy for p in report.peers if p.secrecy is not None}
    if pairs and not report.require_forward_secrecy:  # (else the verdict says it)
        lines.append(secrecy_summary(pairs))
        lines += [f"{p.name}: {problem}" for p in report.peers for problem in p.key_problems]
    lines.append(report.verdict)
    return "\n".join(lines)
