"""status: what the mesh looks like from this node, straight from VPP."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from pydantic import BaseModel, computed_field

from vppmesh.config import Mesh
from vppmesh.dataplane import engines
from vppmesh.dataplane.state import is_owned_sa_id, is_owned_tunnel_instance, split_tunnel_instance
from vppmesh.dataplane.vpp import crypto, host_interfaces, interfaces, ipip, ipsec, system
from vppmesh.dataplane.vpp.client import VppApi
from vppmesh.dataplane.vpp.stats import StatsReader
from vppmesh.keying.epochs import GenerationStore
from vppmesh.keying.pairs import PairSecrecy, pair_secrecy


class SaStatus(BaseModel):
    sa_id: int
    spi: int
    direction: str
    packets: int | None
    bytes: int | None
    thread: int
    # VPP's sequence number: the last sent (outbound SA) or received (inbound SA).
    seq: int = 0
    # ESP in UDP (RFC 3948): (source port, destination port); None for plain ESP.
    udp_ports: tuple[int, int] | None = None


class TunnelStatus(BaseModel):
    name: str
    index: int
    src: str
    dst: str
    admin_up: bool
    protected: bool
    sa_out: SaStatus | None
    sa_in: list[SaStatus]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def encapsulation(self) -> str:
        """`esp` or `esp-in-udp SPORT->DPORT`, as the outbound SA sends."""
        if self.sa_out is None or self.sa_out.udp_ports is None:
            return "esp"
        return "esp-in-udp {}->{}".format(*self.sa_out.udp_ports)


class PairKeys(BaseModel):
    """A peer's key kind in `status` and `verify` (and their JSON)."""

    # Whether its keys are agreed over the agents' channel, each way (key_secrecy);
    # None: not asked (the metrics' snapshots).
    secrecy: PairSecrecy | None = None
    # What keeps the pair from forward secrecy within its window now: a stalled
    # agreement, a stopped pair, an agreed key too old (PairSecrecy.problems).
    key_problems: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def keys(self) -> str | None:
        """`ephemeral`, `static` or e.g. `ephemeral out/static in` (keys_kind)."""
        return keys_kind(self.secrecy) if self.secrecy is not None else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def forward_secret(self) -> bool | None:
        return self.secrecy.forward_secret if self.secrecy is not None else None


class PeerStatus(PairKeys):
    name: str
    node_number: int
    tunnels: list[TunnelStatus]

    @property
    def healthy(self) -> bool:
        return bool(self.tunnels) and all(t.admin_up and t.protected for t in self.tunnels)


class CryptoStatus(BaseModel):
    """Which engine runs AES-GCM-256, and whether the CPU's widest AES is in use."""

    engine: str | None
    candidates: list[str]
    native_variant: str | None  # None: not logged (see vppmesh/dataplane/vpp/crypto.py)
    cpu_vaes: bool
    warning: str | None


class NodeStatus(BaseModel):
    node: str
    vpp_version: str
    workers: int
    host_link: str | None
    crypto: CryptoStatus | None = None
    peers: list[PeerStatus]
    missing_peers: list[str]
    # What keeps each pair (with tunnels or not) from forward secrecy now, by peer name:
    # a stalled agreement, a stopped pair (which has no tunnels), a key too old.
    key_problems: dict[str, list[str]] = {}


# What a pair not yet on agreed keys needs, said by status, plan and verify alike.
FORWARD_SECRECY_FIX = ("run `vppmesh up --watch` (the agent) on both nodes; VPP needs "
                       "`punt { socket ... }` in startup.conf")


def key_secrecy(state_dir: Path, node: str, peers: Iterable[str]) -> dict[str, PairSecrecy]:
    """Per peer, whether its keys are agreed over the agents' channel, each way: read
    from the node's generation file, which is what decides the keys (secrecy.py). A peer
    the file does not know yet runs on static keys (nothing was ever agreed with it)."""
    names = list(peers)
    found = pair_secrecy(GenerationStore(state_dir, node).load(), names)
    return {name: found.get(name, PairSecrecy(outbound=False, inbound=False))
            for name in names}


def nat_ports(state_dir: Path, node: str) -> dict[str, tuple[int, ...]]:
    """Per peer behind a NAT that maps its ESP to other ports than its record says, the
    ports per tunnel the agent learned (the generation file's `nat_ports`)."""
    state = GenerationStore(state_dir, node).load()
    return {name: tuple(pg.nat_ports) for name, pg in state.peers.items() if pg.nat_ports}


def keys_kind(pair: PairSecrecy) -> str:
    """`ephemeral` (agreed both ways: forward secret), `static`, or each way apart."""
    out, inbound = ("ephemeral" if agreed else "static"
                    for agreed in (pair.outbound, pair.inbound))
    return out if out == inbound else f"{out} out/{inbound} in"


def secrecy_summary(pairs: Mapping[str, PairSecrecy], limit: int = 10) -> str:
    """One line: how many pairs are forward secret, and which are not (the first
    `limit` of them) with the fix."""
    static = sorted(name for name, pair in pairs.items() if not pair.forward_secret)
    if not static:
        return f"keys: ephemeral (forward secret) with all {len(pairs)} peer(s)"
    named = ", ".join(f"{name} ({keys_kind(pairs[name])})" for name in static[:limit])
    more = f" and {len(static) - limit} more" if len(static) > limit else ""
    return (f"keys: ephemeral (forward secret) with {len(pairs) - len(static)} of "
            f"{len(pairs)} peer(s); not with {named}{more}: {FORWARD_SECRECY_FIX}")


def psk_summary(pairs: Mapping[str, PairSecrecy], limit: int = 10) -> str:
    """One line: which PSK the pairs' channel sessions run on, by role here and id
    (keys.psk_id), so an operator rotating the PSK sees when every pair moved."""
    return _by_role("channel PSK", {n: p.channel_psk for n, p in pairs.items()}, limit)


def key_summary(pairs: Mapping[str, PairSecrecy], limit: int = 10) -> str:
    """One line: which of this node's private keys (current, previous: during its key
    rotation) each pair's channel session authenticated, so the operator sees when
    KEY.previous may go (no peer left on `previous`)."""
    return _by_role("channel key", {n: p.channel_key for n, p in pairs.items()}, limit)


def path_summary(pairs: Mapping[str, PairSecrecy], limit: int = 10) -> str:
    """One line: the path that carried each pair's last key agreement (`tunnel`: the
    channel on the underlay did not get through, blocked or lost: channel/endpoint.py)."""
    return _by_role("last agreement via", {n: p.channel_path for n, p in pairs.items()},
                    limit).replace("no session", "none yet")


def _by_role(label: str, roles: Mapping[str, str | None], limit: int) -> str:
    """`label: ROLE: peers; ...`, peers without a session under `no session`."""
    grouped: dict[str, list[str]] = {}
    for name, role in sorted(roles.items()):
        grouped.setdefault(role or "no session", []).append(name)
    parts = []
    for role, names in sorted(grouped.items()):
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        parts.append(f"{role}: {', '.join(names[:limit])}{more}")
    return f"{label}: " + "; ".join(parts)


def crypto_status(api: VppApi, flags: frozenset[str] | None = None) -> CryptoStatus | None:
    state = crypto.read_state(api)
    if state.handlers is None:
        return None
    flags = engines.cpu_flags() if flags is None else flags
    return CryptoStatus(engine=state.active, candidates=list(state.handlers.candidates),
                        native_variant=state.native_variant,
                        cpu_vaes=engines.host_has_vaes(flags),
                        warning=engines.warning(state.active, state.native_variant, flags))


def collect(api: VppApi, mesh: Mesh, node: str, stats_socket: Path | None,
            reader: StatsReader | None = None, *, with_crypto: bool = False,
            secrecy: Mapping[str, PairSecrecy] | None = None,
            now: float | None = None) -> NodeStatus:
    """Peers, tunnels and SA counters; `reader` (an open stats reader, kept by the
    agent's metrics) is used instead of connecting to `stats_socket`. `with_crypto` adds
    the crypto engine view (it reads VPP's log: for `vppmesh status`, not every scrape);
    `secrecy` (key_secrecy) each peer's key kind; `now` (the agent's clock) dates the
    keys' ages."""
    now = time.time() if now is None else now
    by_number = {n.node_number: n.name for n in mesh.nodes}
    ifaces = {i.sw_if_index: i for i in interfaces.dump_interfaces(api)}
    tunnels = [t for t in ipip.dump_tunnels(api) if is_owned_tunnel_instance(t.instance)]
    sas = {s.spec.sa_id: s for s in ipsec.dump_sas(api) if is_owned_sa_id(s.spec.sa_id)}
    protections = ipsec.dump_protections(api)
    counters = {}
    if reader is not None:
        counters = reader.sa_counters(sorted({s.stat_index for s in sas.values()}))
    elif stats_socket is not None and stats_socket.exists():
        with StatsReader(stats_socket) as reader:
            counters = reader.sa_counters(sorted({s.stat_index for s in sas.values()}))

    def sa_status(sa_id: int) -> SaStatus | None:
        sa = sas.get(sa_id)
        if sa is None:
            return None
        c = counters.get(sa.stat_index)
        # Built without validation: the values come typed from VPP's decoded replies, and
        # at 1000 peers validating 12,000 of these took 0.2 s of every metrics snapshot.
        return SaStatus.model_construct(
            sa_id=sa_id, spi=sa.spec.spi, direction=sa.spec.direction,
            packets=c.packets if c else None, bytes=c.bytes if c else None,
            thread=sa.thread_index,
            seq=sa.seq_outbound if sa.spec.direction == "out" else sa.last_seq_inbound,
            udp_ports=(sa.spec.udp_src_port, sa.spec.udp_dst_port)
            if sa.spec.udp_encap else None)

    # Once per pair, for its row and for the lines below the table (pairs without
    # tunnels too: a stopped pair has none).
    key_problems = {name: found for name, pair in (secrecy or {}).items()
                    if (found := pair.problems(mesh.settings, now))}
    peers: dict[int, PeerStatus] = {}
    for t in sorted(tunnels, key=lambda t: t.instance):
        number, index = split_tunnel_instance(t.instance)
        peer = peers.get(number)
        if peer is None:
            name = by_number.get(number, f"#{number}")
            pair = secrecy.get(name) if secrecy is not None else None
            peer = peers[number] = PeerStatus(
                name=name, node_number=number, tunnels=[], secrecy=pair,
                key_problems=key_problems.get(name, []))
        protection = protections.get(t.sw_if_index)
        iface = ifaces.get(t.sw_if_index)
        peer.tunnels.append(TunnelStatus.model_construct(
            name=f"ipip{t.instance}", index=index, src=str(t.src), dst=str(t.dst),
            admin_up=bool(iface and iface.admin_up), protected=protection is not None,
            sa_out=sa_status(protection[0]) if protection else None,
            sa_in=[s for s in (sa_status(i) for i in protection[1]) if s] if protection else [],
        ))
    expected = {n.node_number for n in mesh.nodes if n.name != node}
    host = next((i for i in ifaces.values() if i.tag == "vppmesh:host"), None)
    return NodeStatus(
        node=node, vpp_version=system.version(api), workers=system.worker_count(api),
        host_link=f"{host.name} ({host_interfaces.attachment_kind(host.dev_type)})"
        if host else None,
        crypto=crypto_status(api) if with_crypto else None,
        peers=list(peers.values()),
        missing_peers=sorted(by_number[n] for n in expected - set(peers)),
        key_problems=key_problems,
    )


def render_table(status: NodeStatus) -> str:
    lines = [f"node {status.node}: VPP {status.vpp_version}, {status.workers} worker(s), "
             f"host link {status.host_link or 'none'}"]
    if status.crypto is not None:
        c = status.crypto
        variant = f" ({c.native_variant} code)" if c.engine == "native" and c.native_variant \
            else ""
        lines.append(f"crypto: AES-GCM-256 on {c.engine}{variant}; engines "
                     f"{', '.join(c.candidates)}; CPU VAES {'yes' if c.cpu_vaes else 'no'}")
        if c.warning:
            lines.append(f"warning: {c.warning}")
    header = f"{'peer':<12} {'tunnel':<14} {'src -> dst':<34} {'state':<10} " \
             f"{'out pkts':>10} {'in pkts':>10}  {'keys':<23}  encapsulation"
    lines += [header, "-" * len(header)]
    for peer in status.peers:
        for t in peer.tunnels:
            state = "up" if t.admin_up and t.protected else ("unprotected" if t.admin_up
                                                             else "down")
            out_p = t.sa_out.packets if t.sa_out and t.sa_out.packets is not None else "-"
            in_p = sum(s.packets or 0 for s in t.sa_in) if t.sa_in else "-"
            lines.append(f"{peer.name:<12} {t.name:<14} {t.src + ' -> ' + t.dst:<34} "
                         f"{state:<10} {out_p:>10} {in_p:>10}  {peer.keys or '-':<23}  "
                         f"{t.encapsulation}")
    for name in status.missing_peers:
        stopped = any(p.startswith("stopped") for p in status.key_problems.get(name, ()))
        lines.append(f"{name:<12} (no tunnels: " + ("fail closed, below)" if stopped
                                                     else "run `vppmesh up`)"))
    pairs = {p.name: p.secrecy for p in status.peers if p.secrecy is not None}
    if pairs:
        lines.append(secrecy_summary(pairs))
        lines.append(psk_summary(pairs))
        lines.append(key_summary(pairs))
        lines.append(path_summary(pairs))
    lines += [f"{name}: {problem}" for name, problems in sorted(status.key_problems.items())
              for problem in problems]
    return "\n".join(lines)
