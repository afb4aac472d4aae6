"""One node's channel on the wire: the pure session fed from, and answered through, VPP.

The agent loop owns the clock and the poll: it calls `receive(now)` when the transport's
socket is readable and `tick(now)` on its timer, and acts on the events. Datagrams leave
from the node's own address of the destination's family, through VPP (transport.py).

Two paths to each peer. The underlay: from the node's underlay address to the peer's
(its endpoint, learned through NAT where there is one). The tunnel: from this node's
channel address to the peer's (config.Node.channel_address, held by each VPP's gateway
loopback in the mesh VRF), written to VPP routed in the mesh VRF (the descriptor names
the gateway loopback, whose FIB the lookup uses: src/vnet/ip/punt_node.c), so VPP sends
it through the pair's encrypted tunnel like pod traffic, and the peer's VPP punts it to
its agent (the UDP punt registration is per port, whatever the table). Blocking UDP 4501
on the underlay therefore no longer stops key agreement while the tunnel carries
traffic: the attacker must drop the ESP itself, which denies service openly; the pair
then stops at its key's hard limit as before (fail closed).

The tunnel path is used only while the pair's tunnel is usable (`tunnel_usable`: an
outbound SA installed and the pair not stopped; the agent says so after each run). Its
datagrams never move the peer's endpoint (the session sees them as coming from where the
peer already is: no NAT learning from the inside of a tunnel, whose addresses say
nothing about the underlay). The path policy, per peer:
- an answer goes back on the path the peer's last authenticated datagram came through
  (`last_path`): that one works now;
- so do the next SWITCH_AFTER messages while nothing authenticated came back (a single
  loss is usually VPP resolving the next hop); each further one takes the other path
  than the one before (`_silent`): a retry of an unanswered handshake or KeyInit goes
  the other way, so one blocked path costs a few retries. Messages alternate
  rather than being sent twice: a copy would reach the peer as a replay and be counted
  as one (the drop counters are the attack report);
- NAT keepalives and flow probes stay on the underlay (they are about the underlay flow),
  and only underlay datagrams move the endpoint, so a NAT pair's new mapping is learned
  from the first underlay datagram that gets through.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

from vppmesh.channel.messages import HEADER, Drop, Message
from vppmesh.channel.session import Channel, Event, Output
from vppmesh.channel.transport import Punted, PuntTransport
from vppmesh.host.underlay import NAT_T_PORT

# The channel's UDP port on every node's VPP: next to ESP in UDP's 4500, unassigned.
PORT = 4501
UNDERLAY, TUNNEL = "underlay", "tunnel"
PATHS = (UNDERLAY, TUNNEL)
# Unanswered messages to a peer before the next one takes the other path (path()).
SWITCH_AFTER = 2


class ChannelEndpoint:
    """`channel` speaking through `transport`, from `local` (IP address per version)."""

    def __init__(self, channel: Channel, transport: PuntTransport,
                 local: dict[int, str], port: int = PORT) -> None:
        self.channel, self.transport, self.port = channel, transport, port
        self.local = {version: (address, port) for version, address in local.items()}
        # Peer addresses whose pair runs ESP in UDP: the channel shares the ESP flow there
        # (from UDP 4500, behind the non-ESP marker: transport.py).
        self.esp_flow: frozenset[str] = frozenset()
        # The tunnel path (see the module): this node's channel address and the mesh VRF
        # interface to route from (None: no tunnel path), the peers' channel addresses by
        # node number, and the peers whose tunnel is usable now.
        self.tunnel_source: str | None = None
        self.tunnel_sw_if_index: int | None = None
        self.tunnel_peers: dict[int, str] = {}
        self.tunnel_usable: frozenset[int] = frozenset()
        self.last_path: dict[int, str] = {}  # per peer: its last authenticated datagram's
        self._silent: dict[int, int] = {}  # per peer: sends since it was last heard
        self.path_datagrams: Counter[str] = Counter()  # authenticated, by path

    def fileno(self) -> int:
        return self.transport.fileno()

    def receive(self, now: float, limit: int = 256) -> list[Event]:
        """Every datagram waiting (up to `limit`) through the session."""
        out = Output()
        for punted in self.transport.receive(limit):
            path, source = UNDERLAY, punted.source
            if self.tunnel_source is not None and punted.destination[0] == self.tunnel_source:
                path, found = TUNNEL, self._from_tunnel(punted)
                if found is None:
                    continue
                source = found
            drops = self.channel.drops.total()
            out.extend(self.channel.receive(now, source, punted.payload))
            if self.channel.drops.total() == drops:  # authenticated (else it was dropped)
                self._heard(HEADER.unpack_from(punted.payload)[2], path)
        return self.emit(out)

    def _from_tunnel(self, punted: Punted) -> tuple[str, int] | None:
        """Where the peer is on the underlay, for a datagram that came through its tunnel
        (the session sees it from there: no endpoint move); None: dropped (counted)."""
        payload = punted.payload
        sender = HEADER.unpack_from(payload)[2] if len(payload) >= HEADER.size else None
        if sender is None or self.tunnel_peers.get(sender) != punted.source[0]:
            self.channel.drops[Drop.UNKNOWN_PEER] += 1  # not from that peer's tunnel
            return None
        endpoint = self.channel.endpoint(sender)
        if endpoint is None:  # never heard on the underlay: nowhere to answer from
            self.channel.drops[Drop.UNKNOWN_PEER] += 1
        return endpoint

    def _heard(self, peer: int, path: str) -> None:
        self.last_path[peer] = path
        self._silent[peer] = 0
        self.path_datagrams[path] += 1

    def path(self, peer: int) -> str:
        """The path of the next message to `peer` (the module's policy); counts it."""
        if self.tunnel_sw_if_index is None or self.tunnel_source is None or \
                peer not in self.tunnel_usable or peer not in self.tunnel_peers:
            return UNDERLAY
        silent = self._silent.get(peer, 0)
        self._silent[peer] = silent + 1
        last = self.last_path.get(peer, UNDERLAY)
        # The path that last worked carries the first messages after the peer spoke: a
        # single unanswered one is the usual first datagram a VPP drops while it resolves
        # the next hop, not a blocked path, and a message lost that way into the tunnel
        # is only repeated 15 s later. From SWITCH_AFTER unanswered ones on, paths
        # alternate.
        if silent < SWITCH_AFTER or (silent - SWITCH_AFTER) % 2 == 1:
            return last
        return PATHS[1 - PATHS.index(last)]

    def tick(self, now: float) -> list[Event]:
        return self.emit(self.channel.tick(now))

    def send(self, now: float, peer: int, message: Message) -> list[Event]:
        return self.emit(self.channel.send(now, peer, message))

    def emit(self, out: Output, *, path: str | None = None) -> list[Event]:
        """Send the datagrams of `out`, each peer's on one path (`path`, or the policy's);
        its events are the caller's."""
        paths: dict[int, str] = {}
        forced = path
        for destination, data in out.datagrams:
            peer = HEADER.unpack_from(data)[3]
            path = forced or paths.get(peer)
            if path is None:
                path = paths[peer] = self.path(peer)
            if path == TUNNEL:
                assert self.tunnel_source is not None
                self.transport.send((self.tunnel_source, self.port),
                                    (self.tunnel_peers[peer], self.port), data,
                                    self.tunnel_sw_if_index)
                continue
            source = self.local.get(ipaddress.ip_address(destination[0]).version)
            if source is None:
                self.channel.stats["no_local_address"] += 1
                continue
            if destination[0] in self.esp_flow:
                source = (source[0], NAT_T_PORT)
            self.transport.send(source, destination, data)
        return out.events

    def drops(self) -> Counter[Drop]:
        """Everything dropped, by reason: at the transport and in the session."""
        return self.transport.drops + self.channel.drops
