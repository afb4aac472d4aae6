"""What the capacity harness measures on: two VPPs joined by memif, or one VPP alone.

*Pair*: the testbed with a memif underlay (`TestbedSpec(underlay="memif")`), each VPP's
main thread pinned to its own core. VPP A (node n1) receives the pods' packets from the
packet generator in its mesh VRF and encrypts; VPP B (n2) decrypts and delivers them to
a counting sink. Both sides are measured separately from `show runtime`.

*Encrypt-only*: one VPP whose uplink is a packet-generator interface with static
neighbours for the peer's addresses: encrypted packets leave into a sink, so the core
does nothing but take the pods' packets and encrypt them. That is where the workers are
measured: W=0 (the main thread does it all) and W workers with the generator on every
worker, and where vppmesh binds SA i of every peer to worker i mod W.

Contenders program the path between the generator and the sink. The vppmesh ones run
`vppmesh up` in the node's namespace exactly as users do; the others are configured by
hand through the same request builders.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from pydantic import SecretBytes

from benchmarks.capacity import traffic
from vppmesh.config import Mesh, MeshSettings, Node, dump_mesh
from vppmesh.dataplane import engines
from vppmesh.dataplane.startup import Instance
from vppmesh.dataplane.state import GATEWAY_TAG, SaSpec
from vppmesh.dataplane.vpp import interfaces, ipip, ipsec, routes
from vppmesh.dataplane.vpp.client import Request, VppClient
from vppmesh.keying.keys import generate_private_key
from vppmesh.lab.testbed import (
    Testbed,
    TestbedSpec,
    in_ns,
    single_vpp,
)

PREFIX = "vmc-"
BASE = Path("/run/vppmesh-capacity")
PROFILE = "capacity"
MESH_TABLE = 1717
HAND_TABLE = 0
SOURCE_PG = 0
SINK_PG = 1
UPLINK_PG = 2
POD_A = ipaddress.IPv4Network("198.18.1.0/24")
POD_B = ipaddress.IPv4Network("198.18.2.0/24")
DST = ipaddress.IPv4Address("198.18.2.10")
PEER_MAC = "02:fe:ee:00:00:02"
WG_PORT = 51820
WG_HANDSHAKE_TIMEOUT = 20.0
WG_PEER_ESTABLISHED = 2  # vl_api_wireguard_peer_flags_t
LINK_TIMEOUT = 15.0


class HarnessError(RuntimeError):
    """The harness could not measure a contender: a result would be a row of zeros."""


@dataclass
class Setup:
    """A programmed path, ready for traffic: who sends, who counts what."""


    sender: VppClient
    receiver: VppClient | None
    sent_node: str  # the link's tx node on the sender: encrypted packets that left
    sink_node: str | None  # the sink's tx node on the receiver: packets delivered
    workers: int
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def sides(self) -> list[VppClient]:
        return [self.sender] + ([self.receiver] if self.receiver else [])


# ---- contenders -----------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    name: str
    description: str
    kind: str  # routed, ipip, ipsec, vppmesh, wireguard
    tunnels: int = 1
    encrypts: bool = True

    @property
    def is_vppmesh(self) -> bool:
        return self.kind == "vppmesh"


CONTENDERS = {c.name: c for c in (
    Contender("routed", "VPP routing pod to pod over the link, no tunnel", "routed",
              encrypts=False),
    Contender("ipip", "VPP plain IPIP tunnel, no encryption", "ipip", encrypts=False),
    Contender("ipsec-hand", "VPP IPIP + ESP AES-GCM-256 (ESN, anti-replay), configured by "
              "hand: one tunnel", "ipsec"),
    Contender("vppmesh-1t", "vppmesh (`vppmesh up`), 1 tunnel per pair", "vppmesh", 1),
    Contender("vppmesh-4t", "vppmesh (`vppmesh up`), 4 tunnels per pair, ECMP", "vppmesh", 4),
    Contender("wireguard", "VPP's WireGuard plugin (ChaCha20-Poly1305), one peer",
              "wireguard"),
)}


# ---- building blocks ------------------------------------------------------------------

def _x25519() -> tuple[bytes, bytes]:
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return private, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _gateway(api: VppClient) -> int:
    for iface in interfaces.dump_interfaces(api):
        if iface.tag == GATEWAY_TAG:
            return iface.sw_if_index
    raise RuntimeError("no vppmesh gateway in VPP: `vppmesh up` did not run")


def _uplink(api: VppClient, address: ipaddress.IPv4Interface) -> int:
    found, _ = interfaces.find_uplink(api, None, address)
    if found is None:
        raise RuntimeError(f"no uplink with {address}")
    return found.sw_if_index


def _wait_link_up(api: VppClient, sw_if_index: int) -> None:
    deadline = time.monotonic() + LINK_TIMEOUT
    while time.monotonic() < deadline:
        if any(i.sw_if_index == sw_if_index and i.link_up
               for i in interfaces.dump_interfaces(api)):
            return
        time.sleep(0.1)
    raise RuntimeError(f"link {sw_if_index} did not come up within {LINK_TIMEOUT:.0f} s")


def _wait_wireguard_handshake(api: VppClient) -> None:
    """Until the sender's peer is established: WireGuard sends data only after its
    handshake, and a lost first initiation is retried only after REKEY_TIMEOUT (5 s), so a
    window that starts before the handshake counts nothing. One ping into the tunnel a
    second starts (and restarts) the handshake."""
    deadline = time.monotonic() + WG_HANDSHAKE_TIMEOUT
    while time.monotonic() < deadline:
        api.cli(f"ping {POD_B[1]} repeat 1")
        peers = api.dump("wireguard_peers_dump", peer_index=0xFFFFFFFF)
        if any(int(p.peer.flags) & WG_PEER_ESTABLISHED for p in peers):
            return
        time.sleep(0.5)
    raise HarnessError(f"the WireGuard handshake between the two VPPs did not complete "
                       f"within {WG_HANDSHAKE_TIMEOUT:.0f} s (see `show wireguard peer` on "
                       "both); the contender would carry nothing")


def vppmesh_up(netns: str, mesh_file: Path, node: str, api_socket: Path, key: Path,
               state_dir: Path, *extra: str) -> None:
    """`vppmesh up` in the node's namespace, as an operator runs it."""
    result = in_ns(netns, sys.executable, "-m", "vppmesh", "up", "--mesh", str(mesh_file),
                   "--node", node, "--api-socket", str(api_socket), "--key", str(key),
                   "--state-dir", str(state_dir), "--host-link", "none", *extra,
                   check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"vppmesh up on {node} failed: {result.stdout}{result.stderr}")


def _hand_tunnel(api: VppClient, uplink: int, src: object, dst: object) -> int:
    tunnel = api.call(ipip.add_tunnel(1, src, dst)).sw_if_index
    api.call_many([interfaces.set_unnumbered(tunnel, uplink, True, "tunnel"),
                   interfaces.set_mtu(tunnel, 1480, "tunnel")])
    return tunnel


def _hand_sas(api: VppClient, tunnel: int, out_key: tuple[bytes, int], in_key: tuple[bytes, int],
              spi_out: int, spi_in: int) -> None:
    sa_out = SaSpec(sa_id=10, spi=spi_out, key=SecretBytes(out_key[0]), salt=out_key[1],
                    anti_replay_window=MeshSettings().anti_replay_window)
    sa_in = SaSpec(sa_id=20, spi=spi_in, key=SecretBytes(in_key[0]), salt=in_key[1],
                   anti_replay_window=MeshSettings().anti_replay_window)
    api.call_many([ipsec.add_sa(sa_out), ipsec.add_sa(sa_in)])
    api.call(ipsec.protect(tunnel, 10, (20,), "tunnel"))


def _hand_path(contender: Contender, a: VppClient, b: VppClient,
               ul_a: ipaddress.IPv4Interface, ul_b: ipaddress.IPv4Interface) -> None:
    """routed, ipip, ipsec-hand and wireguard: both sides in table 0, by hand."""
    up_a, up_b = _uplink(a, ul_a), _uplink(b, ul_b)
    if contender.kind == "routed":
        a.call(routes.route(HAND_TABLE, POD_B, [up_a], True, nexthop=ul_b.ip))
        return
    if contender.kind in ("ipip", "ipsec"):
        t_a = _hand_tunnel(a, up_a, ul_a.ip, ul_b.ip)
        t_b = _hand_tunnel(b, up_b, ul_b.ip, ul_a.ip)
        if contender.kind == "ipsec":
            k_ab = (secrets.token_bytes(32), secrets.randbits(32))
            k_ba = (secrets.token_bytes(32), secrets.randbits(32))
            _hand_sas(a, t_a, k_ab, k_ba, 0x100, 0x200)
            _hand_sas(b, t_b, k_ba, k_ab, 0x200, 0x100)
        for api, tunnel in ((a, t_a), (b, t_b)):
            api.call(interfaces.set_admin(tunnel, True, "tunnel"))
        a.call(routes.route(HAND_TABLE, POD_B, [t_a], True))
        return
    if contender.kind == "wireguard":
        keys = {"a": _x25519(), "b": _x25519()}
        wg = {}
        for side, api, ul in (("a", a, ul_a), ("b", b, ul_b)):
            wg[side] = api.call(Request("wireguard_interface_create", {
                "interface": {"user_instance": 0, "sw_if_index": 0xFFFFFFFF,
                              "private_key": keys[side][0], "public_key": b"\0" * 32,
                              "port": WG_PORT, "src_ip": str(ul.ip)},
                "generate_key": False}, "wg0")).sw_if_index
        for side, api, up, peer, peer_ul, allowed in (
                ("a", a, up_a, "b", ul_b, POD_B), ("b", b, up_b, "a", ul_a, POD_A)):
            api.call_many([interfaces.set_unnumbered(wg[side], up, True, "wg0"),
                           interfaces.set_mtu(wg[side], 1420, "wg0"),
                           interfaces.set_admin(wg[side], True, "wg0")])
            api.call(Request("wireguard_peer_add", {"peer": {
                "public_key": keys[peer][1], "port": WG_PORT, "persistent_keepalive": 0,
                "table_id": 0, "endpoint": str(peer_ul.ip), "sw_if_index": wg[side],
                "flags": 0, "n_allowed_ips": 1, "allowed_ips": [str(allowed)]}},
                f"wireguard peer {peer}"))
        # A wg interface is point-to-multipoint: a route needs a next hop inside a peer's
        # allowed IPs, which picks the peer.
        a.call(routes.route(HAND_TABLE, POD_B, [wg["a"]], True, nexthop=POD_B[1]))
        _wait_wireguard_handshake(a)
        return
    raise ValueError(f"unknown contender kind {contender.kind}")


def _set_engine(apis: list[VppClient], engine: str | None) -> None:
    """The hand-configured contenders run AES-GCM on the engine vppmesh would take (or the
    one asked for), so that the comparison is of the same crypto."""
    for api in apis:
        engines.ensure(api, engine or engines.AUTO)


# ---- the pair (two VPPs, memif) -------------------------------------------------------

class Pair:
    """Two VPPs joined by memif, one contender programmed; torn down on exit."""

    def __init__(self, contender: Contender, *, engine: str | None = None) -> None:
        self.contender = contender
        self.engine = engine
        self.bed = Testbed(TestbedSpec(
            nodes=2, tunnels=max(contender.tunnels, 1), pods=0, workers=0, profile=PROFILE,
            prefix=PREFIX, base_dir=BASE / "pair", mesh_table_id=MESH_TABLE,
            underlay="memif", pin_cores=True))
        self._stack = ExitStack()

    def __enter__(self) -> Setup:
        with ExitStack() as stack:
            stack.callback(self.bed.down, quiet=True)
            self.bed.up(join=False)
            n1, n2 = self.bed.nodes
            setup = self._program(stack.enter_context(VppClient(n1.instance.api_socket).connect()),
                                  stack.enter_context(VppClient(n2.instance.api_socket).connect()))
            self._stack = stack.pop_all()
        return setup

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _program(self, a: VppClient, b: VppClient) -> Setup:
        n1, n2 = self.bed.nodes
        ul_a, ul_b = n1.underlay[0], n2.underlay[0]
        _wait_link_up(a, _uplink(a, ul_a))
        if self.contender.is_vppmesh:
            extra = ("--crypto-engine", self.engine) if self.engine else ()
            for node in (n1, n2):
                vppmesh_up(node.netns, self.bed.mesh_file, node.name, node.instance.api_socket,
                           node.key_file, node.dir, *extra)
            traffic.add_source(a, SOURCE_PG, table_id=MESH_TABLE, unnumbered_to=_gateway(a))
            traffic.add_sink(b, SINK_PG, table_id=MESH_TABLE, dst=DST,
                             unnumbered_to=_gateway(b))
        else:
            _set_engine([a, b], self.engine)
            _hand_path(self.contender, a, b, ul_a, ul_b)
            traffic.add_source(a, SOURCE_PG, table_id=HAND_TABLE,
                               address=ipaddress.IPv4Interface(f"{POD_A[1]}/24"))
            traffic.add_sink(b, SINK_PG, table_id=HAND_TABLE, dst=DST,
                             address=ipaddress.IPv4Interface(f"{POD_B[1]}/24"))
        return Setup(sender=a, receiver=b, sent_node="memif1/0-tx", sink_node=f"pg{SINK_PG}-tx",
                     workers=0)


# ---- encrypt-only (one VPP, uplink into a sink) ---------------------------------------

class EncryptOnly:
    """One VPP with W workers; vppmesh up towards a peer that exists only in the mesh file.

    The uplink is pg2: what leaves it is counted by `pg2-tx` and dropped, and static
    neighbours stand in for the peer's addresses, so nothing but encryption (and the
    generator) runs on the cores.
    """

    def __init__(self, contender: Contender, *, workers: int, engine: str | None = None) -> None:
        if not contender.is_vppmesh:
            raise ValueError("encrypt-only runs vppmesh contenders")
        self.contender = contender
        self.workers = workers
        self.engine = engine
        self.netns = f"{PREFIX}e1"
        self.dir = BASE / "encrypt"
        self._stack = ExitStack()

    def __enter__(self) -> Setup:
        with ExitStack() as stack:
            instance = stack.enter_context(single_vpp(
                self.netns, self.dir, profile=PROFILE, workers=self.workers, main_core=0))
            setup = self._build(instance,
                                stack.enter_context(VppClient(instance.api_socket).connect()))
            self._stack = stack.pop_all()
        return setup

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _mesh(self) -> tuple[Mesh, list[ipaddress.IPv4Interface], list[ipaddress.IPv4Interface]]:
        tunnels = self.contender.tunnels
        ul = {k: [ipaddress.IPv4Interface(f"192.0.2.{10 * k + t + 1}/24") for t in range(tunnels)]
              for k in (1, 2)}
        nodes = []
        for k, pod in ((1, POD_A), (2, POD_B)):
            public = generate_private_key(self.dir / f"n{k}.key", force=True)
            nodes.append(Node(name=f"n{k}", node_number=k, underlay=ul[k],  # type: ignore[arg-type]
                              pod_cidr=pod, public_key=public))
        mesh = Mesh(settings=MeshSettings(tunnels_per_peer=tunnels, underlay_mtu=1500,
                                          mesh_table_id=MESH_TABLE), nodes=nodes)
        return mesh, ul[1], ul[2]

    def _build(self, instance: Instance, api: VppClient) -> Setup:
        mesh, ul_a, ul_b = self._mesh()
        mesh_file = self.dir / "mesh.yaml"
        mesh_file.write_text(dump_mesh(mesh))
        uplink = traffic.create_pg(api, UPLINK_PG)
        api.call_many([interfaces.set_mtu(uplink, 1500, "uplink"),
                       interfaces.address(uplink, ul_a[0], True),
                       interfaces.set_admin(uplink, True, "uplink")])
        api.call_many([routes.neighbor(uplink, peer.ip, PEER_MAC, True, fib_entry=True)
                       for peer in ul_b])
        extra = ("--crypto-engine", self.engine) if self.engine else ()
        vppmesh_up(self.netns, mesh_file, "n1", instance.api_socket, self.dir / "n1.key",
                   self.dir / "state", "--uplink", f"pg{UPLINK_PG}", *extra)
        traffic.add_source(api, SOURCE_PG, table_id=MESH_TABLE, unnumbered_to=_gateway(api))
        return Setup(sender=api, receiver=None, sent_node=f"pg{UPLINK_PG}-tx", sink_node=None,
                     workers=self.workers, notes={"placement": sa_placement(api, self.workers)})


def sa_placement(api: VppClient, workers: int) -> dict[str, object]:
    """Where each vppmesh SA runs, against the design: tunnel i on worker i mod W."""
    rows = []
    for sa in ipsec.dump_sas(api):
        spec = sa.spec
        expected = (spec.tunnel % workers) + 1 if workers else 0
        rows.append({"sa_id": hex(spec.sa_id), "direction": spec.direction,
                     "tunnel": spec.tunnel, "thread_index": sa.thread_index,
                     "expected_thread": expected, "ok": sa.thread_index == expected})
    return {"workers": workers, "sas": rows, "all_ok": bool(rows) and all(r["ok"] for r in rows)}


def cpu_cores() -> int:
    return os.cpu_count() or 1
