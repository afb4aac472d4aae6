"""Peers behind NAT: where their NATs map their tunnels' ESP, and keeping this node's
mappings alive.

NAT. Towards a peer whose pair runs ESP in UDP the channel shares the ESP flow of tunnel
0 (UDP 4500, behind the non-ESP marker: channel/transport.py), so it crosses the peer's
NAT on the ESP's own mapping; a node behind NAT probes each other tunnel's flow
(FlowProbe). Where the peer's authenticated datagrams come from is where its NAT maps
that tunnel's ESP: a port other than its record's `nat.port` (a NAT that changes the
source port) is learned, and `learned_view` gives the runs a view whose path to that
peer sends there; the outbound SAs follow through a new key generation (the scheduler's
"UDP encapsulation changed"). A node behind NAT sends RFC 3948 keepalives on every
tunnel's flow every NAT_KEEPALIVE_INTERVAL, so a dynamic NAT keeps the mappings while
the pair is idle. When its NAT drops the mappings under traffic (a router's conntrack
flushed or restarted), its ESP leaves from new ports and its peers' ESP dies at the old
ones until they hear from the new ones: a pair whose outbound SAs counted packets over a
poll while its inbound ones counted none (FlowWatch) gets the channel's keepalive and
probes on every tunnel's flow at once, so its peer learns the new mappings within a
poll, not at the next keepalive.

The generation file keeps the learned ports (`nat_ports`), so a one-shot `up` and a
restarted agent send there too (saved_ports, ported_view).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from vppmesh.channel import messages as m
from vppmesh.channel.endpoint import PORT, UNDERLAY
from vppmesh.dataplane.view import PeerView
from vppmesh.host.underlay import NAT_T_PORT

if TYPE_CHECKING:
    from vppmesh.channel import session as s
    from vppmesh.channel.endpoint import ChannelEndpoint
    from vppmesh.channel.messages import Address
    from vppmesh.dataplane.view import LocalView
    from vppmesh.dataplane.vpp.ipsec import SaState
    from vppmesh.keying.epochs import GenerationState

log = logging.getLogger("vppmesh")

# RFC 3948's keepalive period: below the 30 s in which Linux's conntrack forgets a UDP
# flow that saw no reply (most home routers keep theirs longer).
NAT_KEEPALIVE_INTERVAL = 20.0
# A NAT pair sending ESP with none coming back is looked at over this long at least (the
# agent's poll is 2 s): over a shorter window, a quiet moment of two-way traffic would
# look like a dead mapping.
NAT_STALL_WINDOW = 1.5


class ChannelLink(Protocol):
    """What NAT learning and the agreement use of the agent's channel (secrecy.Secrecy)."""

    endpoint: ChannelEndpoint | None
    clock: Callable[[], float]

    @property
    def channel(self) -> s.Channel | None: ...

    def live(self, peer: int) -> bool: ...

    def save_marks(self) -> None: ...


class NatLearning:
    """One agent's NAT state (see the module): the ports learned from its peers' channel
    datagrams, its keepalives and the pairs whose ESP gets no answer. `link`: the
    agent's channel (secrecy.Secrecy: its endpoint, channel, clock and live sessions)."""

    def __init__(self, link: ChannelLink) -> None:
        self.link = link
        # Per peer behind NAT, where its record says its ESP arrives (address and port)
        # and, per tunnel, the port its authenticated datagrams came from instead; the
        # keepalive flows of this node's tunnels when it is behind NAT.
        self._reach: dict[int, tuple[str, int]] = {}
        self._names: dict[int, str] = {}
        self._tunnels = 1
        self.learned: dict[int, dict[int, int]] = {}  # peer -> {tunnel: port}
        self._adopted: set[int] = set()  # peers whose saved port was looked at
        self._adjusted: dict[int, tuple[PeerView, tuple[int, ...], PeerView]] = {}
        self._learned_view: tuple[LocalView, dict[int, tuple[int, ...]], LocalView] | None = None
        self._keepalive_flows: list[tuple[int, int, Address, Address]] = []
        self._next_keepalive = float("-inf")
        self._flows = FlowWatch()
        self.probes = 0  # pairs probed at once for a stall (watch_flows)

    def follow(self, view: LocalView) -> None:
        """Where peers behind NAT are reached (a learned port of an address that moved
        is forgotten), and this node's keepalive flows."""
        reach = {p.node.node_number: channel_address(p) for p in view.peers
                 if p.path.udp_encap and p.node.nat is not None}
        for number in list(self.learned):
            if reach.get(number) != self._reach.get(number):
                del self.learned[number]
        self._reach = reach
        self._tunnels = view.settings.tunnels_per_peer
        self._names = {p.node.node_number: p.name for p in view.peers
                       if p.node.node_number in reach}
        self._keepalive_flows = [
            (p.node.node_number, t, (str(src), NAT_T_PORT), (str(dst), p.path.udp_dst_port))
            for p in view.peers if p.path.udp_encap and view.node.nat is not None
            for t, (src, dst) in enumerate(p.path.endpoints)]
        self._flows.forget(peer for peer, *_ in self._keepalive_flows)

    def handshake_complete(self, now: float) -> None:
        """A session was made: behind NAT, probe the other tunnels' flows now."""
        if self._keepalive_flows:
            self._next_keepalive = min(self._next_keepalive, now)

    def learn(self, peer: int, host: str, port: int, tunnel: int = 0) -> bool:
        """The peer's authenticated datagrams on tunnel `tunnel`'s flow (tunnel 0: the
        channel's) now come from (host, port): behind NAT, that tunnel's ESP must go
        there too. True when the SAs towards it must change."""
        reach = self._reach.get(peer)
        if reach is None or reach[0] != host or not 0 <= tunnel < self._tunnels:
            return False  # not behind NAT, or not its public address: the SAs stay
        ports = self.learned.setdefault(peer, {})
        before = ports.get(tunnel)
        if port == reach[1]:
            ports.pop(tunnel, None)
        else:
            ports[tunnel] = port
        if not ports:
            del self.learned[peer]
        if ports.get(tunnel) == before:
            return False
        name = self._names.get(peer, peer)
        which = f" (tunnel {tunnel})" if self._tunnels > 1 else ""
        log.info("peer %s: its NAT maps its ESP in UDP%s to %s port %d: the outbound SAs "
                 "follow", name, which, host, port)
        return True

    def ports(self) -> dict[int, tuple[int, ...]]:
        """Per peer with a learned port, the ports of all its tunnels (the record's where
        none was learned)."""
        return {peer: tuple(learned.get(t, self._reach[peer][1]) for t in range(self._tunnels))
                for peer, learned in self.learned.items()}

    def learned_view(self, view: LocalView, state: GenerationState) -> LocalView:
        """`view` with the learned ports (ported_view; the same object while they are
        unchanged, so plan() keeps its cache). Ports an earlier agent learned (the
        generation file's `nat_ports`) are taken once, and the channel sent there."""
        for number, saved in saved_ports(view, state).items():
            if number in self._adopted or number not in self._reach:
                continue
            self._adopted.add(number)
            host, port = self._reach[number]
            if number not in self.learned:
                self.learned[number] = {t: p for t, p in enumerate(saved) if p != port}
                channel = self.link.channel
                if channel is not None and channel.knows(number):
                    channel.reach(number, (host, saved[0]))
        if not self.learned:
            return view
        ports = self.ports()
        cached = self._learned_view
        if cached is not None and cached[0] is view and cached[1] == ports:
            return cached[2]
        adjusted = ported_view(view, ports, self._adjusted)
        self._learned_view = (view, ports, adjusted)
        return adjusted

    def keepalives(self, now: float) -> None:
        """Behind NAT: an RFC 3948 keepalive on every tunnel's flow when one is due."""
        endpoint = self.link.endpoint
        if endpoint is None or not self._keepalive_flows or now < self._next_keepalive:
            return
        self._next_keepalive = now + NAT_KEEPALIVE_INTERVAL
        channel = endpoint.channel
        for peer, tunnel, source, (host, port) in self._keepalive_flows:
            port = self.learned.get(peer, {}).get(tunnel, port)
            endpoint.transport.keepalive(source, (host, port))
            if tunnel and channel.knows(peer):  # the peer learns this flow's mapping
                probe = channel.probe(now, peer, tunnel)
                if probe is not None:
                    endpoint.transport.send(source, (host, port), probe)

    def watch_flows(self, sas: Mapping[int, SaState], packets: Mapping[int, int] | None,
                    ) -> list[int]:
        """Behind NAT, after a run read its SAs (`sas` by SA id, `packets` by stat index:
        keying.observe.read_key_sas): probe every pair that sent ESP over the last poll and got
        none back (FlowWatch), on every tunnel's flow: the channel's keepalive on tunnel
        0's (the peer follows its endpoint), a FlowProbe on each other's. From whatever
        ports the NAT maps them to now, the peer learns them (learn), so its ESP finds
        this node again within a poll of a lost mapping. Returns the peers probed."""
        endpoint = self.link.endpoint
        if endpoint is None or not self._keepalive_flows:
            return []
        now = self.link.clock()
        channel = endpoint.channel
        counted = packets or {}
        flows: dict[int, list[tuple[int, Address, Address]]] = {}
        for peer, tunnel, source, (host, port) in self._keepalive_flows:
            port = self.learned.get(peer, {}).get(tunnel, port)
            flows.setdefault(peer, []).append((tunnel, source, (host, port)))
        sent: dict[int, dict[int, int]] = {peer: {} for peer in flows}
        received: dict[int, dict[int, int]] = {peer: {} for peer in flows}
        for sa_id, sa in sas.items():
            peer = sa.spec.peer_number
            if peer not in flows:
                continue
            if sa.spec.direction == "out":
                sent[peer][sa_id] = max(sa.seq_outbound, counted.get(sa.stat_index, 0))
            else:
                received[peer][sa_id] = max(sa.last_seq_inbound,
                                            counted.get(sa.stat_index, 0))
        probed = []
        for peer, peer_flows in flows.items():
            if not self._flows.stalled(now, peer, sent[peer], received[peer]) or \
                    not self.link.live(peer):
                continue
            probed.append(peer)
            self.probes += 1
            log.debug("peer %s: ESP sent and none received over the last poll: probing "
                      "every tunnel's flow (the NAT may have new mappings)",
                      self._names.get(peer, peer))
            for tunnel, source, destination in peer_flows:
                if tunnel == 0:  # on the underlay: a datagram from the tunnel teaches no port
                    endpoint.emit(channel.send(now, peer, m.Keepalive()), path=UNDERLAY)
                    continue
                probe = channel.probe(now, peer, tunnel)
                if probe is not None:
                    endpoint.transport.send(source, destination, probe)
        return probed


class FlowWatch:
    """Behind NAT: which pairs send ESP that nothing answers, from the SAs' packet counts
    of successive runs (sans-IO: the caller gives `now`).

    A pair is stalled when, over at least NAT_STALL_WINDOW, some outbound SA of it counted
    packets and no inbound one did: the NAT may have dropped the mappings (its ESP now
    leaves from ports the peer does not know). The pair is then probed at once, and
    again while the stall lasts, backing off from one window to NAT_KEEPALIVE_INTERVAL
    (traffic that is one-way by nature costs a few datagrams a minute, no more than the
    keepalives); anything inbound starts the backoff again. Idle pairs, and pairs whose
    traffic comes back, cost nothing.
    """

    def __init__(self) -> None:
        # peer -> (when, outbound counts, inbound counts), by SA id, as last compared
        self._seen: dict[int, tuple[float, dict[int, int], dict[int, int]]] = {}
        self._backoff: dict[int, tuple[float, float]] = {}  # peer -> (next probe, wait)

    def stalled(self, now: float, peer: int, sent: dict[int, int],
                received: dict[int, int]) -> bool:
        """The pair's SA counts now: True when it must be probed now."""
        seen = self._seen.get(peer)
        if seen is not None and 0 <= now - seen[0] < NAT_STALL_WINDOW:
            return False  # an early run: too short a window to judge
        self._seen[peer] = (now, sent, received)
        if seen is None:
            return False
        if _grew(received, seen[2]):
            self._backoff.pop(peer, None)
            return False
        if not _grew(sent, seen[1]):
            return False  # idle
        at, wait = self._backoff.get(peer, (float("-inf"), 0.0))
        if now < at:
            return False
        wait = min(max(2 * wait, NAT_STALL_WINDOW), NAT_KEEPALIVE_INTERVAL)
        self._backoff[peer] = (now + wait, wait)
        return True

    def forget(self, keep: Iterable[int]) -> None:
        """Only the pairs in `keep` are watched."""
        kept = set(keep)
        for table in (self._seen, self._backoff):
            for peer in [p for p in table if p not in kept]:
                del table[peer]


def _grew(counts: Mapping[int, int], before: Mapping[int, int]) -> bool:
    """Whether some SA counted packets since `before` (a new SA: since it was made)."""
    return any(n > before.get(sa, 0) for sa, n in counts.items())


def saved_ports(view: LocalView, state: GenerationState) -> dict[int, tuple[int, ...]]:
    """Per peer behind NAT (node number), the ports its NAT maps its tunnels' ESP to as
    an agent learned them (the generation file's `nat_ports`): a one-shot `up` sends
    there too."""
    count = view.settings.tunnels_per_peer
    found = {}
    for peer in view.peers:
        pg = state.peers.get(peer.name)
        if peer.path.udp_encap and peer.node.nat is not None and pg is not None and \
                len(pg.nat_ports) == count:
            found[peer.node.node_number] = tuple(pg.nat_ports)
    return found


def ported_view(view: LocalView, ports: Mapping[int, tuple[int, ...]],
                known: dict[int, tuple[PeerView, tuple[int, ...], PeerView]] | None = None,
                ) -> LocalView:
    """`view` whose path to each peer in `ports` (node number -> port per tunnel) sends
    its ESP in UDP to those ports; `known` keeps the peer views made before (plan()
    caches on them)."""
    if not ports:
        return view
    known = known if known is not None else {}
    peers = []
    for peer in view.peers:
        number = peer.node.node_number
        wanted = ports.get(number)
        if wanted is None or not peer.path.udp_encap:
            peers.append(peer)
            continue
        made = known.get(number)
        if made is None or made[0] is not peer or made[1] != wanted:
            made = (peer, wanted, PeerView(node=peer.node, secret=peer.secret,
                                           path=replace(peer.path, udp_dst_ports=wanted)))
            known[number] = made
        peers.append(made[2])
    return replace(view, peers=tuple(peers),
                   by_name=MappingProxyType({p.name: p for p in peers}))


def channel_address(peer: PeerView) -> tuple[str, int]:
    """Where the channel reaches `peer` first: the ESP flow's address and port when the
    pair runs ESP in UDP, else the channel's own port."""
    host = str(peer.path.endpoints[0][1])
    return (host, peer.path.udp_dst_port) if peer.path.udp_encap else (host, PORT)
