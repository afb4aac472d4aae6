"""Forward secrecy in the agent: the agents' channel (vppmesh/channel/) run by the agent
loop, and the SA keys of the key generations it agrees.

A long-running agent (watch.AgentLoop, through node.Session) keeps one `Secrecy`. It
registers VPP's punt socket for the channel's port when it meets a VPP (again after a
restart, announcing the restart to every peer), follows the mesh's peers, and between
runs services the channel: datagrams in, timers, events. What the peers said goes into
the key generations (epochs.PeerSaid, per peer with a live session); the generations
the scheduler wants are offered (KeyInit), and after each successful run the agent
states what VPP now holds: the inbound generations installed with agreed keys
("installed"), its window base ("slid") and the generation it sends on ("sending").

The key book holds, per (peer, direction, generation), the SA keys derived from the
generation's ephemeral secret (keys.derive_sa_key_ephemeral), in memory only. An entry
is dropped, and the channel forgets the secret, when the generation retires: outbound
once the sender stepped past it (its SAs deleted), inbound once the receiver's window
slid past it; all of a peer's when it leaves the mesh or its public key changes. From
then on nothing on either node recomputes those keys. An agent that
restarts without its book adopts the keys VPP holds for generations its generation file
marks as agreed (`ephemeral_out`, `ephemeral_in`), so a restarted agent changes nothing
in VPP; a generation neither the agent nor VPP holds is never installed with its static
key: outbound it counts as used (the scheduler steps past it), inbound it is left out.

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
"""

from __future__ import annotations

import base64
import logging
import os
import select
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vppmesh.channel import messages as m
from vppmesh.channel import session as s
from vppmesh.channel.endpoint import PATHS, PORT, UNDERLAY, ChannelEndpoint
from vppmesh.channel.transport import PuntTransport
from vppmesh.clock import AgentClock, TimestampFile, Timestamps
from vppmesh.errors import VppMeshError
from vppmesh.keying.agreement import Agreement, Claim
from vppmesh.keying.book import KeyBook
from vppmesh.keying.epochs import WINDOW, GenerationState, PeerSaid
from vppmesh.keys import psk_id, public_key_b64
from vppmesh.nat import ported_view, saved_ports
from vppmesh.state import GATEWAY_TAG
from vppmesh.underlay import NAT_T_PORT
from vppmesh.view import PeerView
from vppmesh.vpp import interfaces, punt

if TYPE_CHECKING:
    from vppmesh.channel.messages import Address
    from vppmesh.view import LocalView
    from vppmesh.vpp.client import Request, VppApi
    from vppmesh.vpp.ipsec import SaState

log = logging.getLogger("vppmesh")

# The agent's end of VPP's punt socket, beside VPP's API socket (a directory both see).
CHANNEL_SOCKET = "vppmesh-channel.sock"
# How many datagrams a burst may queue on the agent's socket before the kernel refuses
# more (net.unix.max_dgram_qlen is 10 by default): every peer answering at once fits.
DGRAM_QUEUE = 4096
DGRAM_QLEN = Path("/proc/sys/net/unix/max_dgram_qlen")
# RFC 3948's keepalive period: below the 30 s in which Linux's conntrack forgets a UDP
# flow that saw no reply (most home routers keep theirs longer).
NAT_KEEPALIVE_INTERVAL = 20.0
# A NAT pair sending ESP with none coming back is looked at over this long at least (the
# agent's poll is 2 s): over a shorter window, a quiet moment of two-way traffic would
# look like a dead mapping.
NAT_STALL_WINDOW = 1.5
# A peer's public key changed in the mesh file: how long the keys agreed under its old
# key wait for its agent's word (over a session of the new key) that it still holds the
# old one, before they are dropped (follow_keys). Two handshake retry ceilings: a peer
# whose agent runs answers within a few retries.
KEY_VOUCH_WAIT = 2 * s.HANDSHAKE_RETRY_MAX


@dataclass
class _Heard:
    """The latest of what one peer's agent said."""

    installed: int | None = None
    slid: int | None = None
    sending: tuple[int, float] | None = None
    restarted: bool = False


def raise_dgram_queue(minimum: int = DGRAM_QUEUE) -> None:
    """Let a unix datagram socket queue `minimum` datagrams (a node-wide sysctl; only
    raised, never lowered). Best effort: without it a burst is dropped and retried."""
    try:
        if int(DGRAM_QLEN.read_text()) < minimum:
            DGRAM_QLEN.write_text(str(minimum))
    except (OSError, ValueError) as exc:
        log.debug("cannot raise %s: %s", DGRAM_QLEN, exc)


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


class Secrecy(Agreement):
    """One agent's channel and key book (see the module)."""

    def __init__(self, socket_path: Path, *, state_dir: Path | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        """`clock`: the node's (vppmesh/clock.py: NodeOptions.clock), the same as its runs'
        `now`, since what the peers said (`sending`) meets the generation file's times;
        None: a clock of this process only. `state_dir`: where the handshake timestamps'
        reservation and the peers' timestamp marks survive the agent (TimestampFile);
        None: nothing persists (a restarted agent could accept a handshake recorded
        before, and its own timestamps rest on its clock alone)."""
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.clock: Callable[[], float] = clock or AgentClock(None)
        self._stamps: tuple[Timestamps, TimestampFile | None] | None = None
        self._saved_marks: dict[int, int] = {}  # the peers' timestamp marks on disk
        self.book = KeyBook()
        self.endpoint: ChannelEndpoint | None = None
        self._pid: int | None = None  # the VPP the punt registration is for
        self._configs: dict[int, s.PeerConfig] = {}
        self._followed: LocalView | None = None
        self._heard: dict[int, _Heard] = {}
        self._tunnel_in: dict[int, int] = {}  # "installed", said since the peer's restart
        self._agreed_path: dict[int, str] = {}  # the path of each peer's last agreement
        self._stated: dict[tuple[int, str], int] = {}
        self._asked: dict[int, frozenset[int]] = {}  # lost inbound generations, asked for
        self._outbox: list[s.Output] = []
        self._announce: int | None = None  # the boot id of a restart not yet announced
        self.unavailable: str | None = None  # why there is no channel (told once)
        # NAT: per peer behind one, where its record says its ESP arrives (address and
        # port) and, per tunnel, the port its authenticated datagrams came from instead;
        # the keepalive flows of this node's tunnels when it is behind NAT.
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
        self.nat_probes = 0  # pairs probed at once for a stall (watch_flows)
        # The PSKs held (role, id) and the static schedule's id, as last followed.
        self._psks: tuple[tuple[tuple[str, str], ...], str] | None = None
        # Per peer, the previous public key its agent said (over a session of its
        # current key) it still holds (s.PreviousKeyHeld; follow_keys).
        self._vouched: dict[int, bytes] = {}
        self.unvouched = 0  # peers' agreed keys dropped for want of a vouch (follow_keys)

    @property
    def channel(self) -> s.Channel | None:
        return self.endpoint.channel if self.endpoint is not None else None

    def fileno(self) -> int:
        assert self.endpoint is not None
        return self.endpoint.fileno()

    # ---- VPP and the mesh ------------------------------------------------------------
    def attach(self, api: VppApi, view: LocalView, vpp_pid: int, *,
               reconnected: bool = False) -> None:
        """Meet the VPP at `api` (process `vpp_pid`; `reconnected`: the connection broke
        since the last run, so this is another VPP whatever its pid): register the punt
        socket when it is a VPP not met before, announce a restart, follow the peers."""
        if vpp_pid != self._pid or reconnected:
            restarted = self._pid is not None
            self._pid = vpp_pid  # asked once per VPP: a refusal holds until it restarts
            boot_id = self._boot_id(vpp_pid, fresh=restarted)
            try:
                replies = api.call_many([punt.register(PORT, False, self.socket_path),
                                         punt.register(PORT, True, self.socket_path),
                                         *self._esp_flow_registrations(api)])
            except VppMeshError as exc:
                if self.unavailable is None:
                    log.warning("no channel between agents (keys stay on the static "
                                "schedule, without forward secrecy): %s; VPP needs "
                                "`punt { socket ... }` in its startup.conf "
                                "(vppmesh render-startup)", exc)
                self.unavailable = str(exc)
                return
            self.unavailable = None
            vpp_socket = Path(str(replies[0].pathname))
            if self.endpoint is None or self.endpoint.transport.vpp_path != vpp_socket:
                if self.endpoint is not None:
                    self.endpoint.transport.close()
                raise_dgram_queue()
                transport = PuntTransport(self.socket_path, vpp_socket)
                timestamps, marks = self._handshakes(view.name)
                channel = s.Channel(view.node.node_number, view.secrets, [],
                                    boot_id=boot_id, timestamps=timestamps,
                                    timestamp_marks=marks)
                self.endpoint = ChannelEndpoint(channel, transport, {})
                self._configs, self._stated, self._announce = {}, {}, None
                self._followed = None
            elif restarted:
                # Told once this VPP holds the mesh (flush): before that it has no address
                # to send from, and every datagram would wait for a retry.
                self._announce = boot_id
            if self.endpoint is not None:
                self.endpoint.tunnel_sw_if_index = None  # this VPP's gateway: found below
        if self.endpoint is not None and self.endpoint.tunnel_sw_if_index is None:
            self.endpoint.tunnel_sw_if_index = gateway_index(api)
        self.follow(view)

    def _handshakes(self, node: str) -> tuple[Timestamps, dict[int, int]]:
        """This agent's handshake timestamps (one issuer for every channel it opens),
        starting above what an earlier agent reserved, and the peers' timestamp marks a
        new channel starts from: what the earlier agent kept, or the last channel's."""
        if self._stamps is None:
            store = TimestampFile(self.state_dir / f"{node}.handshakes.json") \
                if self.state_dir is not None else None
            issued, self._saved_marks = store.load() if store is not None else (0, {})
            reserve = (lambda up_to: store.save(up_to, self._saved_marks)) \
                if store is not None else None
            self._stamps = (Timestamps(self.clock, issued=issued, reserve=reserve), store)
        channel = self.channel
        marks = channel.timestamp_marks() if channel is not None else self._saved_marks
        return self._stamps[0], marks

    def _save_marks(self, *, closing: bool = False) -> None:
        """The peers' timestamp marks, when they changed; `closing`: with the timestamp
        really issued last (the next agent starts right above it)."""
        if self._stamps is None or self._stamps[1] is None:
            return
        timestamps, store = self._stamps
        channel = self.channel
        marks = channel.timestamp_marks() if channel is not None else self._saved_marks
        if marks == self._saved_marks and not closing:
            return
        issued = timestamps.issued if closing else timestamps.reserved
        if store.save(issued, marks):
            self._saved_marks = marks
            timestamps.reserved = issued

    def _esp_flow_registrations(self, api: VppApi) -> list[Request]:
        """Punt what arrives on UDP 4500 with SPI 0 (the channel on the ESP flow) to
        the agent, where VPP knows those reasons."""
        reasons = punt.reason_ids(api)
        missing = [n for n in punt.SPI_UDP_0.values() if n not in reasons]
        if missing:
            log.warning("VPP has no punt reason %s: the channel does not cross NATs on "
                        "the ESP flow (no port learning)", ", ".join(missing))
        return [punt.register_exception(reasons[n], n, self.socket_path)
                for n in punt.SPI_UDP_0.values() if n in reasons]

    def _boot_id(self, vpp_pid: int, *, fresh: bool) -> int:
        """The id peers know this node's VPP by: new for a VPP this agent saw start,
        kept across agent restarts while the VPP runs (a file beside the socket, on the
        runtime directory), so a restarted agent is not taken for a restarted VPP."""
        path = self.socket_path.with_suffix(".boot")
        if not fresh:
            try:
                pid, boot = path.read_text().split()
                if int(pid) == vpp_pid:
                    return int(boot)
            except (OSError, ValueError):
                pass
        boot_id = int.from_bytes(os.urandom(8), "big")
        try:
            path.write_text(f"{vpp_pid} {boot_id}\n")
        except OSError as exc:
            log.debug("cannot keep the boot id in %s: %s", path, exc)
        return boot_id

    def follow(self, view: LocalView) -> None:
        """The view's peers and this node's addresses, when they changed."""
        endpoint = self.endpoint
        if endpoint is None:
            return
        if view is self._followed:
            return  # the mesh is unchanged (a Session keeps its view while it is)
        self._follow_psks(view)
        self._follow_own_keys(view)
        endpoint.channel.set_secrets(view.secrets)
        self._followed = view
        endpoint.local = {version: (address, PORT)
                          for version, address in local_addresses(view).items()}
        # Keepalives only where a middlebox keeps state for the pair's flow: ESP in UDP
        # (a NAT, or a node that asked for UDP); elsewhere an idle pair is silent between
        # rekeys, and its sessions still expire by age.
        configs = {p.node.node_number: s.PeerConfig(
            p.node.node_number, p.node.public_key_bytes, channel_address(p),
            keepalive=p.path.udp_encap) for p in view.peers}
        endpoint.channel.set_peers(configs.values())
        endpoint.esp_flow = frozenset(str(p.path.endpoints[0][1]) for p in view.peers
                                      if p.path.udp_encap)
        endpoint.tunnel_source = str(view.node.channel_address)
        endpoint.tunnel_peers = {p.node.node_number: str(p.node.channel_address)
                                 for p in view.peers}
        self._follow_nat(view)
        # A peer that left, or whose record changed, starts afresh on both ends.
        for number in [n for n, c in self._configs.items() if configs.get(n) != c]:
            self._heard.pop(number, None)
            self._tunnel_in.pop(number, None)
            self._asked.pop(number, None)
            for what in ("installed", "slid", "sending"):
                self._stated.pop((number, what), None)
            new = configs.get(number)
            self._vouched.pop(number, None)
            if new is None:
                self.book.forget(number)
            # A new public key: its agreed keys were authenticated by the old key only
            # (perhaps the reason it was replaced); follow_keys keeps them only if the
            # peer, authenticated by the new key, vouches for the old one.
        self._configs = configs

    def _follow_own_keys(self, view: LocalView) -> None:
        """Say what a step of this node's key rotation changed (public keys only)."""
        channel = self.channel
        if channel is None:
            return
        held = tuple(public_key_b64(key) for _role, key in view.secrets.private_keys())
        before = tuple(public_key_b64(key) for _role, key in channel.secrets.private_keys())
        if held == before:
            return
        log.info("private keys held now: %s; the channel answers handshakes to each",
                 ", ".join(f"{role} {public_key_b64(key)}"
                           for role, key in view.secrets.private_keys()))
        now = self.clock()
        names = {p.node.node_number: p.name for p in view.peers}
        stranded = sorted(names.get(n, str(n)) for n in channel.peers()
                          if channel.session_key(n, now) == "previous" and len(held) == 1)
        if stranded:
            log.warning("the previous key was removed while %s still knew this node by it: "
                        "their channel ends (their handshakes fail the pair MAC) until their "
                        "mesh file names the new key", ", ".join(stranded))

    def _follow_psks(self, view: LocalView) -> None:
        """Say what a PSK rotation step changed (never the PSKs themselves: their ids)."""
        held = tuple((role, psk_id(psk)) for role, psk in view.secrets.psks())
        static = psk_id(view.secrets.static_psk)
        before, self._psks = self._psks, (held, static)
        if before is None or before == self._psks:
            return
        log.info("PSKs held now: %s; the channel accepts handshakes under each and "
                 "initiates under the current one", ", ".join(f"{r} {i}" for r, i in held))
        if before[1] != static:
            log.warning(
                "the static key schedule moved to PSK %s (was %s): a pair on static keys "
                "(its agents have not met, or `forward_secrecy: preferred` fell back) with "
                "a node that has not made the same step fails closed (its ESP does not "
                "authenticate) until it has; pairs on agreed keys are not affected",
                static, before[1])

    def _follow_nat(self, view: LocalView) -> None:
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

    def close(self) -> None:
        self._save_marks(closing=True)
        if self.endpoint is not None:
            self.endpoint.transport.close()
        self.endpoint, self._pid = None, None

    # ---- between runs --------------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` for the channel, less when one of its timers is due
        sooner; True when a run should follow now."""
        if self.endpoint is None:
            time.sleep(timeout)
            return False
        now = self.clock()
        due = self.endpoint.channel.next_due()
        if due is not None:
            timeout = max(0.0, min(timeout, due - now))
        readable, _, _ = select.select([self], [], [], timeout)
        return self.service(receive=bool(readable))

    def service(self, *, receive: bool = True) -> bool:
        """Datagrams in, timers, events; True when one of them needs a run."""
        endpoint = self.endpoint
        if endpoint is None:
            return False
        now = self.clock()
        events = endpoint.receive(now) if receive else []
        events += endpoint.tick(now)
        self.keepalives(now)
        wanted = False
        for event in events:
            wanted |= self._event(now, event)
        return wanted

    def _event(self, now: float, event: s.Event) -> bool:
        match event:
            case s.GenerationKeyed(peer=peer, generation=g, outbound=outbound, secret=secret,
                                   psk=psk, shared=shared):
                if self.endpoint is not None and peer in self.endpoint.last_path:
                    self._agreed_path[peer] = self.endpoint.last_path[peer]
                return self.book.add(peer, g, outbound, secret, psk, shared)
            case s.PreviousKeyHeld(peer=peer, public_key=key):
                changed = self._vouched.get(peer) != key
                self._vouched[peer] = key
                return changed
            case s.PeerAcked(peer=peer, what=what, generation=g):
                heard = self._heard.setdefault(peer, _Heard())
                if what == "installed":
                    heard.installed = g
                    self._tunnel_in[peer] = g
                elif what == "slid":
                    heard.slid = g
                else:
                    heard.sending = (g, now)
                return True
            case s.PeerRestarted(peer=peer):
                self._tunnel_in.pop(peer, None)
                self._heard.setdefault(peer, _Heard()).restarted = True
                return True
            case s.HandshakeComplete():
                if self._keepalive_flows:  # probes of the other tunnels' flows now
                    self._next_keepalive = min(self._next_keepalive, now)
                # No run for it: sessions rekey every 2 minutes (8 a second at 1000
                # peers); a pair on static keys moves to agreed ones at the next poll.
                return False
            case s.EndpointChanged(peer=peer, endpoint=(host, port)):
                return self.learn(peer, host, port)
            case s.FlowSeen(peer=peer, tunnel=tunnel, source=(host, port)):
                return self.learn(peer, host, port, tunnel)
        return False

    # ---- NAT ---------------------------------------------------------------------------
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
                if self.channel is not None and number in self.channel.peers():
                    self.channel.reach(number, (host, saved[0]))
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
        endpoint = self.endpoint
        if endpoint is None or not self._keepalive_flows or now < self._next_keepalive:
            return
        self._next_keepalive = now + NAT_KEEPALIVE_INTERVAL
        channel = endpoint.channel
        for peer, tunnel, source, (host, port) in self._keepalive_flows:
            port = self.learned.get(peer, {}).get(tunnel, port)
            endpoint.transport.keepalive(source, (host, port))
            if tunnel and peer in channel.peers():  # the peer learns this flow's mapping
                probe = channel.probe(now, peer, tunnel)
                if probe is not None:
                    endpoint.transport.send(source, (host, port), probe)

    def watch_flows(self, sas: Mapping[int, SaState], packets: Mapping[int, int] | None,
                    ) -> list[int]:
        """Behind NAT, after a run read its SAs (`sas` by SA id, `packets` by stat index:
        node.read_key_sas): probe every pair that sent ESP over the last poll and got
        none back (FlowWatch), on every tunnel's flow: the channel's keepalive on tunnel
        0's (the peer follows its endpoint), a FlowProbe on each other's. From whatever
        ports the NAT maps them to now, the peer learns them (learn), so its ESP finds
        this node again within a poll of a lost mapping. Returns the peers probed."""
        endpoint = self.endpoint
        if endpoint is None or not self._keepalive_flows:
            return []
        now = self.clock()
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
                    not self._live(channel, peer):
                continue
            probed.append(peer)
            self.nat_probes += 1
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

    # ---- what a run uses -------------------------------------------------------------
    def said(self, view: LocalView) -> dict[str, PeerSaid]:
        """What each peer with a live session said, for epochs.schedule."""
        channel = self.channel
        if channel is None:
            return {}
        said = {}
        for peer in view.peers:
            number = peer.node.node_number
            if not self._live(channel, number):
                continue
            heard = self._heard.get(number, _Heard())
            said[peer.name] = PeerSaid(keyed=self.book.outbound(number),
                                       installed=heard.installed, slid=heard.slid,
                                       sending=heard.sending, restarted=heard.restarted)
        return said

    def offering(self, peer: int, generation: int) -> bool:
        """An offer of our outbound `generation` to `peer` awaits its answer (from a
        peer with a live session: else the generation counts as used, node.observe_keys)."""
        channel = self.channel
        return channel is not None and self._live(channel, peer) and \
            channel.offering(peer, generation)

    def _live(self, channel: s.Channel, peer: int) -> bool:
        """A usable session with `peer` now. Only then does its word count: a peer
        whose agent stopped drops out when its last session expires, and the static
        schedule takes over rather than wait for it forever."""
        return peer in channel.peers() and channel.established(peer, self.clock())

    def _mark(self, state: GenerationState, wants: Mapping[str, int]) -> None:
        for name, g in wants.items():
            pg = state.peers[name]
            if g not in pg.ephemeral_out:
                pg.ephemeral_out.append(g)

    def applied(self, claim: Claim, view: LocalView, state: GenerationState,
                installed: Mapping[str, tuple[int, ...]]) -> list[tuple[bytes, int]]:
        """After a successful run (VPP holds the plan), before the state is saved:
        record the inbound generations installed with agreed keys, retire what is gone,
        and queue (flush() sends) the states and offers of `claim` for the peers.

        `installed`: the inbound generations the run installed, per peer. Returns the
        outbound agreed keys retired, (key, salt): the ledger forgets them.
        """
        wants = claim.wants
        retired: list[tuple[bytes, int]] = []
        channel = self.channel
        now = self.clock()
        if self.endpoint is not None:  # the channel's path inside the tunnels (endpoint.py)
            self.endpoint.tunnel_usable = self._tunnel_usable(view, state, installed)
        for peer in view.peers:
            number = peer.node.node_number
            pg = state.peers.get(peer.name)
            if pg is None:
                continue
            pg.nat_ports = list(self.ports().get(number, ()))
            pg.channel_psk = self.session_psk(view, number)
            pg.channel_key = self.session_key(number)
            pg.channel_path = self._agreed_path.get(number, pg.channel_path)
            agreed_in = [g for g in installed.get(peer.name, ())
                         if self.book.keys(number, False, g) is not None]
            pg.ephemeral_in = sorted(set(agreed_in) | set(pg.ephemeral_in))
            live = channel is not None and number in channel.peers()
            if live:  # the peer's KeyInits are answered for its window here only
                assert channel is not None
                channel.accept_generations(number, pg.in_base, WINDOW)
            for (_, outbound, g), keys in self.book.retire(peer, pg):
                if outbound:
                    retired += [(k.key.get_secret_value(), k.salt) for k in keys]
                if live:
                    assert channel is not None
                    channel.retire_generation(number, g, outbound=outbound)
            heard = self._heard.get(number)
            if heard is not None:
                heard.restarted = False
            if not live or channel is None or not self._live(channel, number):
                continue
            # Inbound generations agreed before, whose keys neither this agent nor VPP
            # holds any more (the peer left the mesh and came back, say): the peer must
            # rekey towards us, once per loss.
            lost = frozenset(g for g in pg.ephemeral_in
                             if self.book.keys(number, False, g) is None)
            if lost and self._asked.get(number) != lost:
                self._outbox.append(channel.ask_rekey(now, number))
            self._asked[number] = lost
            states = {"slid": pg.in_base}
            if agreed_in:
                states["installed"] = max(agreed_in)
            if peer.name in installed:  # its outbound SAs of pg.out are in VPP now
                states["sending"] = pg.out
            for what, g in states.items():
                if self._stated.get((number, what)) != g:
                    self._stated[(number, what)] = g
                    self._outbox.append(channel.acknowledge(now, number, what, g))
            want = wants.get(peer.name)
            if want is not None and self.book.keys(number, True, want) is None and \
                    not channel.offering(number, want):
                self._outbox.append(channel.start_generation(now, number, want))
        return retired

    def _tunnel_usable(self, view: LocalView, state: GenerationState,
                       installed: Mapping[str, tuple[int, ...]]) -> frozenset[int]:
        """The peers whose tunnel carries the channel (endpoint.py): this node sends on
        an agreed key there (the pair is not stopped: `installed` names it), and the
        peer's agent said, since its last restart, that it installed agreed keys
        inbound. A peer whose VPP restarted holds none of the old keys: until it says so
        again, datagrams into the tunnel would only be lost. (A generation it has not
        installed yet costs at most one retry: the next goes on the underlay.)"""
        usable = []
        for peer in view.peers:
            pg = state.peers.get(peer.name)
            number = peer.node.node_number
            if pg is not None and peer.name in installed and pg.out in pg.ephemeral_out \
                    and number in self._tunnel_in:
                usable.append(number)
        return frozenset(usable)

    def _send(self) -> None:
        """Send what applied() queued (flush(): after the generation state is saved),
        after a restart of VPP first its announcement."""
        outbox, self._outbox = self._outbox, []
        if self.endpoint is None:
            return
        if self._announce is not None:
            log.info("VPP restarted: telling every peer's agent")
            outbox.insert(0, self.endpoint.channel.restarted(self.clock(), self._announce))
            self._announce = None
        for out in outbox:
            self.endpoint.emit(out)
        self._save_marks()  # handshakes accepted since the last run: at most one write

    # ---- reporting -------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """The channel's counters: drops by reason and its stats (metrics, status)."""
        endpoint = self.endpoint
        if endpoint is None:
            return {}
        found = {f"drop_{reason}": count for reason, count in endpoint.drops().items()}
        found.update(endpoint.channel.stats)
        found["sent_datagrams"] = endpoint.transport.sent
        found["received_datagrams"] = endpoint.transport.received
        found["send_errors"] = endpoint.transport.send_errors
        found["nat_keepalives"] = endpoint.transport.keepalives
        for path in PATHS:
            found[f"path_{path}"] = endpoint.path_datagrams[path]
        found["nat_probes"] = self.nat_probes
        return found

    def session_key(self, peer: int) -> str | None:
        """The role ("current", "previous") of this node's key the peer's live session
        authenticated (None: no session)."""
        channel = self.channel
        if channel is None or peer not in channel.peers():
            return None
        return channel.session_key(peer, self.clock())

    def follow_keys(self, view: LocalView, state: GenerationState) -> None:
        """A peer's public key changed in the mesh file (a node key rotation's step 2, or
        a key replaced because it leaked): keep the pair's agreed keys only if the peer
        vouches for its old key.

        The keys agreed under the old key were authenticated by it alone. The peer's
        agent, over a session the new key authenticated, says it still holds the old
        one (PreviousKey: it rotated with `keygen --rotate` and keeps KEY.previous):
        then they are its keys, and they stay until the pair's generations move on, so
        no packet is lost. Until it does, for KEY_VOUCH_WAIT at most, they stay too
        (the new key's handshake takes a round trip, and no one holding the old key
        only can make a session any more); past it they are dropped and the pair starts
        afresh (fail closed: a leaked key's agreements protect nothing more), said in
        the log and counted (vppmesh_channel_previous_key_unvouched)."""
        now = self.clock()
        for peer in view.peers:
            pg = state.peers.get(peer.name)
            number = peer.node.node_number
            if pg is None:
                continue
            if pg.public_key != peer.node.public_key:
                if not pg.pinned:
                    continue  # nothing agreed: the pair starts afresh (epochs.schedule)
                pg.previous_public_key, pg.key_changed_since = pg.public_key, now
                pg.public_key = peer.node.public_key
                log.info("%s: new public key in the mesh file; the keys agreed under its "
                         "old one stay while its agent vouches for it (a key rotation), "
                         "%.0f s at most", peer.name, KEY_VOUCH_WAIT)
            if pg.previous_public_key is None:
                continue
            vouched = self._vouched.get(number)
            if vouched is not None and base64.b64encode(vouched).decode() == \
                    pg.previous_public_key:
                log.info("%s: its agent holds its previous key still: the keys agreed under "
                         "it stay until the pair's next generations", peer.name)
                pg.previous_public_key = pg.key_changed_since = None
                continue
            since = pg.key_changed_since if pg.key_changed_since is not None else now
            if 0 <= now - since < KEY_VOUCH_WAIT:
                continue
            log.warning(
                "%s: its agent did not vouch for its previous key within %.0f s (it no "
                "longer holds it: the key was replaced, not rotated, or KEY.previous was "
                "removed too early): the keys agreed under the old key are dropped and "
                "the pair starts afresh under the new one", peer.name, KEY_VOUCH_WAIT)
            self.book.forget(number)
            self.unvouched += 1
            pg.public_key = ""  # epochs.schedule starts the pair afresh

    def session_psk(self, view: LocalView, peer: int) -> str | None:
        """"ROLE ID" of the PSK the peer's live session runs on (None: no session)."""
        channel = self.channel
        if channel is None or peer not in channel.peers():
            return None
        role = channel.session_psk(peer, self.clock())
        if role is None:
            return None
        return f"{role} {psk_id(dict(view.secrets.psks()).get(role, b''))}"

    def established(self, view: LocalView) -> set[str]:
        """The peers with a live session now."""
        channel = self.channel
        if channel is None:
            return set()
        return {p.name for p in view.peers if self._live(channel, p.node.node_number)}


def channel_address(peer: PeerView) -> tuple[str, int]:
    """Where the channel reaches `peer` first: the ESP flow's address and port when the
    pair runs ESP in UDP, else the channel's own port."""
    host = str(peer.path.endpoints[0][1])
    return (host, peer.path.udp_dst_port) if peer.path.udp_encap else (host, PORT)


def local_addresses(view: LocalView) -> dict[int, str]:
    """This node's primary underlay address per IP version (the channel's source)."""
    found: dict[int, str] = {}
    for address in view.node.underlay:
        found.setdefault(address.ip.version, str(address.ip))
    return found


def gateway_index(api: VppApi) -> int | None:
    """The sw_if_index of VPP's gateway loopback (in the mesh VRF; None: not made yet):
    channel datagrams routed from it go through the tunnels (channel/endpoint.py)."""
    found = next((i for i in interfaces.dump_interfaces(api) if i.tag == GATEWAY_TAG), None)
    return found.sw_if_index if found is not None else None
